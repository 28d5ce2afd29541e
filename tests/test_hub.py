"""The one resolver of local paths and hub repos: offline setting, errors and hints, snapshots, revisions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scale_rae_core import hub
from scale_rae_core.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("value", "offline"), [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), ("no", False),
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
])
def test_offline_is_parsed_as_huggingface_hub_parses_it(value, offline):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if value is not None:
        env["HF_HUB_OFFLINE"] = value
    code = ("from huggingface_hub import constants; from scale_rae_core.hub import hub_offline; "
            "print(hub_offline(), constants.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(offline), str(offline)]


def test_offline_missing_repo_fails_at_once_naming_the_hf_command(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        hub.resolve("nobody/nothing@v2", flag="--decoder", allow_patterns=["*.json"])
    msg = str(err.value)
    assert "\n" not in msg and "huggingface-cli" not in msg
    assert msg == ("--decoder nobody/nothing@v2: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                   "download it with `hf download nobody/nothing --revision v2` or unset HF_HUB_OFFLINE")
    assert hub.download_hint("a/b") == "`hf download a/b`"


def test_online_hub_errors_are_one_line_with_the_hint(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("401 Client Error\nRepository Not Found for url: https://huggingface.co/api/models/a/b")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    with pytest.raises(CheckpointError) as err:
        hub.resolve("a/b", flag="encoder", allow_patterns=["*.json"])
    msg = str(err.value)
    assert "\n" not in msg
    assert "encoder a/b: cannot download from the Hugging Face hub (OSError: 401 Client Error)" in msg
    assert "`hf download a/b`" in msg


def test_local_paths_are_used_as_they_are(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "w.pt").write_bytes(b"x")
    src = hub.resolve(str(tmp_path / "m"), flag="--model")
    assert (src.path, src.repo_id, src.commit) == (tmp_path / "m", None, None)
    assert src.revision.startswith("sha256:") and src.revision == hub.directory_hash(tmp_path / "m")
    assert hub.resolve(str(tmp_path / "m"), flag="x", subfolder="sub").path == tmp_path / "m" / "sub"
    assert hub.resolve(str(tmp_path / "m" / "w.pt"), flag="x", files_ok=True).path == tmp_path / "m" / "w.pt"
    with pytest.raises(CheckpointError, match=r"--model .*w\.pt: is a file; pass the directory"):
        hub.resolve(str(tmp_path / "m" / "w.pt"), flag="--model")
    with pytest.raises(CheckpointError, match=r"no such file or directory, and not a Hugging Face repo id.*; train one"):
        hub.resolve(str(tmp_path / "gone"), flag="model.decoder.path", hint="train one")
    # a local path whose name contains '@' is a path, not a pinned revision
    (tmp_path / "v@1").mkdir()
    assert hub.split_revision(str(tmp_path / "v@1")) == (str(tmp_path / "v@1"), None)
    assert hub.split_revision("o/n@main") == ("o/n", "main")
    assert [hub.is_repo_id(s) for s in ("o/n", "./o/n", "o", "/o/n", "o/n/x", "o/")] == [True] + [False] * 5


def test_hub_snapshots_fetch_only_the_files_asked_for(monkeypatch, tmp_path):
    calls = []

    def snapshot(repo, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo, revision, allow_patterns, local_files_only))
        folder = tmp_path / "snapshots" / "c0ffee"
        (folder / "decoders" / "x").mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        if allow_patterns and any(p.endswith(".bin") for p in allow_patterns):
            (folder / "pytorch_model.bin").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot)
    src = hub.resolve("o/n", flag="x", allow_patterns=["model.pt"], revision="v1", subfolder="decoders/x")
    assert calls[-1] == ("o/n", "v1", ["decoders/x/model.pt"], True)
    assert (src.path, src.repo_id, src.revision) == (tmp_path / "snapshots" / "c0ffee" / "decoders" / "x", "o/n", "c0ffee")
    assert src.describe() == {"id": "o/n", "revision": "c0ffee", "path": str(src.path)}
    hub.resolve("o/n@tag", flag="x", revision="ignored")
    assert calls[-1][1] == "tag"  # the spec's @rev wins
    # a transformers repo without safetensors: its pickled weights are fetched too (transformers reads them
    # with weights_only=True)
    calls.clear()
    src = hub.resolve_transformers("o/old", flag="encoder")
    assert [c[2] for c in calls] == [hub.TRANSFORMERS_FILES, hub.TRANSFORMERS_FILES + hub.PICKLED_WEIGHTS]
    assert (src.path / "pytorch_model.bin").is_file()


def _hub_offline_reads(path: Path) -> list[int]:
    """Lines where ``path`` reads the HF_HUB_OFFLINE environment variable itself."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "HF_HUB_OFFLINE"
                                              for a in node.args):
            lines.append(node.lineno)
    return lines


def test_no_module_parses_hf_hub_offline_on_its_own():
    # environment.py records the raw variable in run reports; it decides nothing
    allowed = {ROOT / "scale_rae_core" / "environment.py"}
    found = {str(p.relative_to(ROOT)): _hub_offline_reads(p) for p in sorted((ROOT / "scale_rae_core").rglob("*.py"))
             if p not in allowed}
    assert {k: v for k, v in found.items() if v} == {}


def test_new_weights_at_the_same_path_change_a_local_revision(tmp_path):
    """Small files are hashed whole; big ones by samples, size and mtime: rewriting either changes the revision."""
    (tmp_path / "config.json").write_text("{}")
    big = tmp_path / "model.safetensors"
    with open(big, "wb") as f:  # sparse: 1 MiB over the full-hash limit, read only at its ends
        f.truncate(hub.FULL_HASH_LIMIT + (1 << 20))
    first = hub.directory_hash(tmp_path)
    assert hub.directory_hash(tmp_path) == first
    with open(big, "r+b") as f:  # new weights in the middle, same size, the sampled ends untouched
        f.seek(hub.FULL_HASH_LIMIT // 2)
        f.write(b"\x01" * 16)
    os.utime(big, ns=(big.stat().st_atime_ns, big.stat().st_mtime_ns + 1_000_000_000))
    second = hub.directory_hash(tmp_path)
    assert second != first
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert hub.directory_hash(tmp_path) not in (first, second)
