"""The scaling loop on a tiny random Scale-RAE: layout, metadata, resume, rank split, then `verify` on its output."""

from __future__ import annotations

import json

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.scale.run import ScaleSettings, read_prompt_file, run_root, run_scaling
from scale_rae_core.scale.scorers import build_scorer
from scale_rae_core.scale.select import write_selection
from tests.infer.helpers import build_tiny, write_decoder, write_export

FIELDS = {"input_questions", "score", "gen_output_text", "responses", "prompt_loss", "prompt_conf_score",
          "image_conf_score", "answer", "yes_logit", "no_logit", "yes_conf_score", "no_conf_score", "response_conf_score"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    model, tok = build_tiny(tmp)
    return {"export": write_export(model, tok, tmp / "export"), "decoder": write_decoder(tmp / "decoder")}


@pytest.fixture(scope="module")
def session(files):
    return Session.open(str(files["export"]), load_profile("tiny-cpu"), decoder=str(files["decoder"]))


def test_cli_scale_then_verify(files, tmp_path):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a green circle\n")
    res = CliRunner().invoke(app, [
        "scale", "--prompts", str(prompts), "--n", "2", "--rounds", "1", "--out", str(tmp_path / "runs"),
        "--model", str(files["export"]), "--decoder", str(files["decoder"]), "--scorer", "shapes", "--steps", "2",
        "--max-new-tokens", "1", "--verify-max-new-tokens", "2", "--profile", "tiny-cpu", "--set", "run.seed=5", "-q"])
    assert res.exit_code == 0, res.output
    root = tmp_path / "runs" / "export" / "1_verify_scale_latent"
    assert json.loads((root / "00000" / "metadata.jsonl").read_text())["seeds"] == [5, 6]  # no --seed: run.seed
    res = CliRunner().invoke(app, ["verify", str(root), "--metric", "loss", "--keep", "1"])
    assert res.exit_code == 0, res.output
    assert (root.with_name(root.name + "_loss_verified") / "00000" / "samples" / "00000.png").is_file()
    res = CliRunner().invoke(app, ["verify", str(root), "--metric", "nope"])
    assert res.exit_code == 1 and res.output.startswith("error: --metric nope: unknown")
    for cmd in ("scale", "verify"):
        assert "Example" in CliRunner().invoke(app, [cmd, "--help"]).output


def test_prompt_files(tmp_path):
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"index": 7, "prompt": "a red circle"}\n\n{"index": 3, "prompt": "a blue square"}\n')
    assert [(p["index"], p["prompt"]) for p in read_prompt_file(ref)] == [(7, "a red circle"), (3, "a blue square")]
    geneval = tmp_path / "evaluation_metadata.jsonl"
    geneval.write_text('{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n')
    assert read_prompt_file(geneval) == [{"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                                          "prompt": "a photo of a bench", "index": 0}]
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\na green square\n")
    assert [(p["index"], p["prompt"]) for p in read_prompt_file(text)] == [(0, "a red circle"), (1, "a green square")]
    ref.write_text('{"index": 1, "prompt": "a"}\n{"index": 1, "prompt": "b"}\n')
    with pytest.raises(DataError, match="index 1 appears twice"):
        read_prompt_file(ref)


def test_scaling_run_resume_and_verify(session, tmp_path):
    prompts = [{"index": 0, "prompt": "a red circle", "tag": "t"}, {"index": 1, "prompt": "a blue square on the left"}]
    settings = ScaleSettings(n=2, rounds=1, batch_size=2, max_new_tokens=2, verify_max_new_tokens=3)
    sampler = SamplerSettings(steps=2)
    scorers = [build_scorer("shapes")]
    root = run_scaling(session, prompts, tmp_path, "/models/Tiny.Model", settings, sampler, scorers, rank=0, world_size=1)
    assert root == run_root(tmp_path, "/models/Tiny.Model", settings) == tmp_path / "Tiny-Model" / "1_verify_scale_latent"
    for index in (0, 1):
        folder = root / f"{index:05d}"
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
        meta = json.loads((folder / "metadata.jsonl").read_text())
        assert meta["prompt"] == prompts[index]["prompt"] and meta["n_samples_generated"] == 2
        assert set(meta["text_responses"]) == {"0", "1"}
        for record in meta["text_responses"].values():
            assert set(record) == FIELDS and record["prompt_loss"] > 0 and record["answer"] in ("yes", "no", "uncertain")
        assert len(meta["scores"]["shapes"]) == 2 and meta["seeds"] == [42, 43]
    assert json.loads((root / "00000" / "metadata.jsonl").read_text())["tag"] == "t"

    # partial prompt: sample 1 lost its PNG and scores -> a re-run redoes only sample 1, keeping sample 0 as is
    folder = root / "00001"
    meta = json.loads((folder / "metadata.jsonl").read_text())
    first = meta["text_responses"]["0"]
    png0 = (folder / "samples" / "00000.png").read_bytes()
    (folder / "samples" / "00001.png").unlink()
    untouched = (root / "00000" / "metadata.jsonl").stat().st_mtime_ns
    run_scaling(session, prompts, tmp_path, "/models/Tiny.Model", settings, sampler, scorers, rank=0, world_size=1)
    again = json.loads((folder / "metadata.jsonl").read_text())
    assert again["text_responses"]["0"] == first and (folder / "samples" / "00000.png").read_bytes() == png0
    redone, before = again["text_responses"]["1"], meta["text_responses"]["1"]  # same seed -> same sample
    assert all(  # batch of 1 now vs 2 before: equal up to float noise
        redone[k] == pytest.approx(v, rel=1e-4) if isinstance(v, float) else redone[k] == v for k, v in before.items())
    assert (root / "00000" / "metadata.jsonl").stat().st_mtime_ns == untouched  # finished prompt skipped

    # continuing with other sampling settings would mix samples: refused in one line, nothing touched
    (folder / "samples" / "00001.png").unlink()
    kept = (folder / "metadata.jsonl").read_text()
    for changed_settings, changed_sampler, what in (
        (settings, SamplerSettings(steps=2, guidance=3.0), "guidance 1.0 -> 3.0"),
        (settings, SamplerSettings(steps=5), "steps 2 -> 5"),
        (ScaleSettings(n=2, rounds=1, seed=7, batch_size=2, max_new_tokens=2, verify_max_new_tokens=3), sampler,
         "seed 42 -> 7"),
        (ScaleSettings(n=2, rounds=1, batch_size=2, max_new_tokens=5, verify_max_new_tokens=3), sampler,
         "max_new_tokens 2 -> 5"),
        (ScaleSettings(n=2, rounds=1, batch_size=2, max_new_tokens=2, verify_max_new_tokens=4), sampler,
         "verify_max_new_tokens 3 -> 4"),
    ):
        with pytest.raises(ConfigError, match="its samples were made with other settings: " + what.replace(".", r"\.")):
            run_scaling(session, prompts, tmp_path, "/models/Tiny.Model", changed_settings, changed_sampler, scorers,
                        rank=0, world_size=1)
    assert (folder / "metadata.jsonl").read_text() == kept
    assert json.loads(kept)["srae"]["decoder"]  # the decoder is recorded and checked too
    run_scaling(session, prompts, tmp_path, "/models/Tiny.Model", settings, sampler, scorers, rank=0, world_size=1)

    # rank split: rank 1 of 2 takes prompt 1 only
    other = tmp_path / "split"
    run_scaling(session, prompts, other, "Tiny", settings, sampler, scorers, rank=1, world_size=2)
    assert [p.name for p in (other / "Tiny" / "1_verify_scale_latent").iterdir()] == ["00001"]

    report = write_selection(root, "answer_conf", 1, tmp_path / "selected")
    assert report["prompts"] == 2 and "shapes" in report["metrics"]["answer_conf"]["scores"]
    assert len(list((tmp_path / "selected" / "00000" / "samples").iterdir())) == 1


def test_verify_on_image_reads_the_png_as_understand_does(session, tmp_path):
    from scale_rae_core.infer.understand import understand_image
    from scale_rae_core.prompts import VERIFY_QUESTION

    settings = ScaleSettings(n=1, rounds=1, batch_size=1, max_new_tokens=2, verify_max_new_tokens=4, verify_on="image")
    prompt = "a red circle"
    root = run_scaling(session, [{"index": 0, "prompt": prompt}], tmp_path, "Tiny", settings, SamplerSettings(steps=2),
                       [build_scorer("shapes")], rank=0, world_size=1)
    record = json.loads((root / "00000" / "metadata.jsonl").read_text())["text_responses"]["0"]
    png = root / "00000" / "samples" / "00000.png"
    asked = understand_image(session, png, VERIFY_QUESTION.format(prompt=prompt), tmp_path / "u", SamplerSettings(steps=2),
                             max_new_tokens=4)
    assert record["responses"] == [asked.text]


def test_accepted_changes_continue_and_are_recorded(session, tmp_path):
    prompts = [{"index": 0, "prompt": "a red circle"}]
    scorers = [build_scorer("shapes")]
    first = ScaleSettings(n=1, rounds=1, batch_size=1, max_new_tokens=1, verify_max_new_tokens=2)
    root = run_scaling(session, prompts, tmp_path, "m", first, SamplerSettings(steps=2), scorers, rank=0, world_size=1)
    more = ScaleSettings(n=2, rounds=1, batch_size=1, max_new_tokens=1, verify_max_new_tokens=2)
    with pytest.raises(ConfigError, match="guidance 1.0 -> 2.0; .*or pass --accept-changes"):
        run_scaling(session, prompts, tmp_path, "m", more, SamplerSettings(steps=2, guidance=2.0), scorers, rank=0,
                    world_size=1)
    run_scaling(session, prompts, tmp_path, "m", more, SamplerSettings(steps=2, guidance=2.0), scorers, rank=0,
                world_size=1, accept_changes=True)
    meta = json.loads((root / "00000" / "metadata.jsonl").read_text())
    assert meta["n_samples_generated"] == 2 and meta["srae"]["guidance"] == 2.0
    assert meta["srae_changes"] == [{"from_sample": 1, "changes": {"guidance": [1.0, 2.0]}}]
    assert meta["srae"]["model_revision"] == session.loaded.source.revision and meta["srae"]["dtype"] == "fp32"
    from scale_rae_core.files import current_umask

    assert (root / "00000" / "samples" / "00000.png").stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not 0600


def test_scorer_none_keeps_self_verification_and_builds_no_scorer(files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app
    from scale_rae_core.scale import scorers as S

    built = []
    monkeypatch.setattr(S, "build_scorer", lambda name, **kw: built.append(name))  # none may be built
    prompts = tmp_path / "p.txt"
    prompts.write_text("a green circle\n")
    common = ["--prompts", str(prompts), "--n", "2", "--out", str(tmp_path / "runs"), "--model", str(files["export"]),
              "--decoder", str(files["decoder"]), "--steps", "2", "--max-new-tokens", "1", "--verify-max-new-tokens", "2",
              "--profile", "tiny-cpu", "-q"]
    res = CliRunner().invoke(app, ["scale", *common, "--scorer", "none"])
    assert res.exit_code == 0, res.output
    assert built == [] and "(1 prompts × 2 samples, 0 failed)" in res.output
    root = tmp_path / "runs" / "export" / "1_verify_scale_latent"
    meta = json.loads((root / "00000" / "metadata.jsonl").read_text())
    assert meta["scores"] == {} and "all_ir_scores" not in meta and set(meta["text_responses"]) == {"0", "1"}
    assert all(set(r) == FIELDS for r in meta["text_responses"].values())
    report = write_selection(root, "answer_conf", 1, tmp_path / "sel")  # selection by the model's own answers
    assert report["failed"] == {} and "combined" not in report["metrics"]  # no ImageReward: no combined ranking
    res = CliRunner().invoke(app, ["scale", *common, "--scorer", "none", "--scorer", "shapes"])
    assert res.exit_code == 1 and "--scorer none means no scorer at all; drop it or the others (shapes)" in res.output


def test_a_prompt_that_cannot_be_asked_fails_alone_and_verify_keeps_its_folder(session, tmp_path):
    from scale_rae_core.scale.run import failed_prompts

    long = "a " + "very " * 2100 + "long prompt"
    prompts = [{"index": 0, "prompt": long}, {"index": 1, "prompt": "a red circle"}]
    settings = ScaleSettings(n=1, rounds=1, batch_size=1, max_new_tokens=1, verify_max_new_tokens=2)
    root = run_scaling(session, prompts, tmp_path, "m", settings, SamplerSettings(steps=2), [build_scorer("shapes")],
                       rank=0, world_size=1)
    meta = json.loads((root / "00000" / "metadata.jsonl").read_text())
    assert meta["prompt"] == long and "longer than the 2048 tokens the model reads" in meta["srae_failed"]
    assert list((root / "00000" / "samples").iterdir()) == [] and meta["n_samples_generated"] == 0
    assert json.loads((root / "00001" / "metadata.jsonl").read_text())["n_samples_generated"] == 1  # the next one ran
    assert list(failed_prompts(root, prompts)) == ["00000"]
    report = write_selection(root, "loss", 1, tmp_path / "sel")
    assert list(report["failed"]) == ["00000"] and (tmp_path / "sel" / "00000" / "samples").is_dir()
    # a re-run tries the failed prompt again (and fails it again), the finished one is skipped
    run_scaling(session, prompts, tmp_path, "m", settings, SamplerSettings(steps=2), [build_scorer("shapes")],
                rank=0, world_size=1)
    assert "srae_failed" in json.loads((root / "00000" / "metadata.jsonl").read_text())
