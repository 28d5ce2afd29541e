"""`srae push`: the dry run lists the files and prints the card with no network; the real path makes the calls it
should (HfApi monkeypatched) and uploads exactly the export + card in one commit; bad inputs fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.config import load_profile
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.publish import push

EXPORT_V1 = Path(__file__).parent / "models" / "assets" / "export-v1"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished stage-2 run: export/ (version 2), profile.json, events.jsonl, metrics.jsonl."""
    from scale_rae_core.models.scale_rae import load_export, save_export

    run = tmp_path_factory.mktemp("push") / "stage2"
    loaded = load_export(EXPORT_V1)
    save_export(loaded.model, loaded.tokenizer, run / "export", EXPORT_V1 / "latent_stats.safetensors")
    (run / "profile.json").write_text(json.dumps(load_profile("tiny-cpu").to_toml_dict()))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
        {"event": "stage2.start", "step": 0}, {"event": "stage2.done", "step": 200})))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 200, "loss": 1.25, "ce": 0.5, "flow": 0.375, "words": 0.25,
                                                   "lr": 1e-4}) + "\n")
    return run


class FakeApi:
    calls: list[tuple[str, tuple, dict]] = []
    staged: dict[str, bytes] = {}

    def __init__(self, token=None):
        FakeApi.calls.append(("init", (), {"token": token}))

    def create_repo(self, *args, **kwargs):
        FakeApi.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        FakeApi.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", (), kwargs))
        root = Path(kwargs["folder_path"])
        FakeApi.staged = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return type("Commit", (), {"commit_url": "https://huggingface.co/me/model/commit/abc123"})()


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run touched the hub")

    monkeypatch.setattr("huggingface_hub.HfApi", refuse)


def test_the_dry_run_lists_the_files_and_prints_the_card_offline(run, monkeypatch):
    _no_network(monkeypatch)
    res = CliRunner().invoke(app, ["push", str(run), "me/scale-rae-tiny", "--dry-run"])
    assert res.exit_code == 0, res.output
    names = [line.split()[-1] for line in res.output.split("--- README.md")[0].splitlines()[:-1]]
    assert names == sorted(["README.md", "config.json", "model.safetensors", "latent_stats.safetensors", "llm/config.json",
                            "llm/model.safetensors", "llm/tokenizer.json", "llm/tokenizer_config.json",
                            "llm/chat_template.jinja", "training_profile.json"])
    card = res.output.split("nothing was uploaded to me/scale-rae-tiny) ---\n", 1)[1]
    assert card.startswith("---\nlibrary_name: srae\n") and "# scale-rae-tiny" in card
    assert "- LLM: Qwen2, 1 layers x 16, vocabulary 517" in card and "8 channels; normalised" in card
    assert "- `stage2`: steps 200, global_batch_size 32, lr 0.0005" in card and "stage1" not in card.split("## Use it")[0]
    assert "flow_weight 2.0, words_weight 8.0, seq_len 128" in card  # the tiny-cpu recipe's extra term is named
    assert "- Last logged: step 200, loss 1.25, ce 0.5, flow 0.375, words 0.25" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/scale-rae-tiny", subfolder="llm")' in card
    assert "srae generate \"Generate an image of a red circle on the left.\" --model me/scale-rae-tiny" in card


def test_the_bundled_models_card_carries_its_benchmark(monkeypatch):
    from scale_rae_core.infer.loading import bundled_model

    _no_network(monkeypatch)
    card = push(bundled_model(), "me/shapes", dry_run=True).card
    about = json.loads((bundled_model() / "ABOUT.json").read_text())
    assert f"| understanding | {about['shapes_benchmark']['understanding']:.4g} |" in card
    assert f"How it was made (ABOUT.json):\n\n```bash\n{about['made_by']}\n```" in card  # one command: srae demo
    assert "a pixel decoder in `decoder/` (2 layers x 64, 64 px)" in card


def test_a_push_creates_the_repo_and_uploads_the_export_and_card_in_one_commit(run, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    FakeApi.calls = []
    res = CliRunner().invoke(app, ["push", str(run / "export"), "me/model", "--private", "--revision", "v1"])
    assert res.exit_code == 0, res.output
    assert [c[0] for c in FakeApi.calls] == ["init", "create_repo", "create_branch", "upload_folder"]
    assert FakeApi.calls[1][1:] == (("me/model",), {"repo_type": "model", "private": True, "exist_ok": True})
    assert FakeApi.calls[2][1:] == (("me/model",), {"branch": "v1", "repo_type": "model", "exist_ok": True})
    upload = FakeApi.calls[3][2]
    assert (upload["repo_id"], upload["repo_type"], upload["revision"]) == ("me/model", "model", "v1")
    expected = {p.relative_to(run / "export").as_posix(): p.read_bytes() for p in (run / "export").rglob("*") if p.is_file()}
    staged = dict(FakeApi.staged)
    assert staged.pop("training_profile.json") == (run / "profile.json").read_bytes()
    assert staged.pop("README.md").decode().startswith("---\nlibrary_name: srae")
    assert staged == expected  # every file of the export, byte for byte, and nothing else
    assert not (run / "export" / "README.md").exists()  # the model folder itself is left as it was
    assert "pushed to https://huggingface.co/me/model (branch v1): https://huggingface.co/me/model/commit/abc123" in res.output


def test_bad_inputs_and_hub_errors_fail_in_one_line(run, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="REPO 'not-a-repo' is not a hub repo id; pass owner/name"):
        push(run, "not-a-repo", dry_run=True)
    with pytest.raises(CheckpointError, match="neither a training run with export/ nor an srae export"):
        push(tmp_path, "me/x", dry_run=True)
    (tmp_path / "profile.json").write_text("{}")
    with pytest.raises(CheckpointError, match="the run has no export/ yet"):
        push(tmp_path, "me/x", dry_run=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set; unset it to upload, or use --dry-run"):
        push(run, "me/x")

    class Refusing(FakeApi):
        def create_repo(self, *args, **kwargs):
            raise RuntimeError("401 Client Error: Unauthorized\nmore lines")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.HfApi", Refusing)
    with pytest.raises(CheckpointError, match=r"the hub refused \(RuntimeError: 401 Client Error: Unauthorized\); log in") as info:
        push(run, "me/x")
    assert "\n" not in str(info.value)


def test_a_folder_with_its_own_card_keeps_it(run, tmp_path, monkeypatch):
    import shutil

    _no_network(monkeypatch)
    folder = shutil.copytree(run / "export", tmp_path / "export")
    (folder / "README.md").write_text("# my own card\n")
    (folder / ".export.tmp-123").mkdir()  # leftovers of an interrupted write are not uploaded
    (folder / ".export.tmp-123" / "x").write_text("x")
    result = push(folder, "me/x", dry_run=True)
    assert result.card == "# my own card\n" and not any(name.startswith(".") for name, _ in result.listing())
