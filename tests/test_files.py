"""The one weights-only reader of torch files: what it accepts, what it refuses, and that nothing else loads."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from scale_rae_core.errors import CheckpointError, DataError
from scale_rae_core.files import read_plain_state_dict, read_plain_tensor

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_plain_state_dicts_load_and_everything_else_is_refused_in_one_line(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(read_plain_state_dict(tmp_path / "ok.pt")["w"], torch.ones(2))
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pt")
    assert set(read_plain_state_dict(tmp_path / "ckpt.pt", inner="state_dict")) == {"w"}
    torch.save({"mean": None, "var": torch.ones(1)}, tmp_path / "stat.pt")
    assert read_plain_state_dict(tmp_path / "stat.pt", allow_none=True)["mean"] is None
    with pytest.raises(CheckpointError, match=r"stat\.pt: expected a plain state_dict \(name -> tensor\); redo"):
        read_plain_state_dict(tmp_path / "stat.pt", fix="redo")

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError) as err:
        read_plain_state_dict(tmp_path / "evil.pt", fix="use a trusted file")
    msg = str(err.value)
    assert "\n" not in msg and "evil.pt: cannot read as a weights-only torch file (" in msg
    assert msg.endswith("; use a trusted file")
    with pytest.raises(CheckpointError, match=r"absent\.pt: not found"):
        read_plain_state_dict(tmp_path / "absent.pt")


def test_plain_tensors_raise_the_callers_error(tmp_path):
    torch.save(torch.arange(3), tmp_path / "t.pt")
    assert torch.equal(read_plain_tensor(tmp_path / "t.pt"), torch.arange(3))
    torch.save({"t": torch.arange(3)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"d\.pt: holds a dict, not a tensor \(N, C\); pass a latent"):
        read_plain_tensor(tmp_path / "d.pt", "a tensor (N, C)", fix="pass a latent", error=DataError)


def test_torch_load_is_called_only_by_the_weights_only_reader():
    calls = []
    for path in sorted((ROOT / "scale_rae_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls.append(str(path.relative_to(ROOT)))
    assert calls == ["scale_rae_core/files.py"]


def test_atomic_writes_respect_the_umask_like_open(tmp_path):
    import os

    from scale_rae_core.files import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_strict_json_names_the_non_finite_key(tmp_path):
    from scale_rae_core.files import finite_json

    assert finite_json({"a": [1.0, 2]}, "m.json") == '{"a": [1.0, 2]}'
    with pytest.raises(DataError, match=r"^m\.json: scores\.x\[1\] is not a finite number; nothing was written"):
        finite_json({"ok": 1, "scores": {"x": [0.5, float("nan")]}}, "m.json")
    with pytest.raises(DataError, match=r"guidance is not a finite number"):
        finite_json({"guidance": float("inf")}, "m.json")


def test_output_folders_and_text_inputs_fail_in_one_line(tmp_path):
    from scale_rae_core.files import output_folder, read_text

    assert output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("keep")
    with pytest.raises(DataError, match=r"^--out .*/f is a file, not a folder"):
        output_folder(tmp_path / "f")
    with pytest.raises(DataError, match=r"^--out .*/f/sub: a file is in the way"):
        output_folder(tmp_path / "f" / "sub")
    with pytest.raises(DataError, match=r"^--out /proc/srae-x: cannot create this folder"):
        output_folder(Path("/proc/srae-x"))
    assert (tmp_path / "f").read_text() == "keep"
    (tmp_path / "p.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(DataError, match=r"^--prompts .*p\.txt: not UTF-8 text \(byte 0xff at offset 3\); save it as UTF-8$"):
        read_text(tmp_path / "p.txt", "--prompts")


# ------------------------------------------------------------------ versioned srae records: one check for all


def test_check_format_returns_a_record_it_reads_and_names_what_is_wrong_otherwise():
    from scale_rae_core.files import check_format

    record = {"format": "srae-x", "version": 2}
    assert check_format(record, "srae-x", 2, "F.json", "an x", "fix it") is record
    assert check_format({"format": "srae-x"}, "srae-x", 1, "F.json", "an x", "fix it") == {"format": "srae-x"}
    for bad, said in (({"format": "other"}, "F.json is not an x (format 'other', expected 'srae-x'); fix it"),
                      ([1, 2], "F.json is not an x (format 'list', expected 'srae-x'); fix it"),
                      ({"format": "srae-x", "version": 3}, "F.json has format version 3, newer than this srae reads (2); upgrade srae"),
                      ({"format": "srae-x", "version": "2"}, "F.json has format version '2', newer than this srae reads (2); upgrade srae")):
        with pytest.raises(DataError) as err:
            check_format(bad, "srae-x", 2, "F.json", "an x", "fix it", DataError)
        assert str(err.value) == said


def _newer(path: Path, fmt: str, **extra) -> None:
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / extra.pop("name", "config.json")).write_text(json.dumps({"format": fmt, "version": 99, **extra}))


def test_every_versioned_reader_refuses_a_newer_version_in_one_line(tmp_path):
    from scale_rae_core.models.adapters.class_dit import CLASS_DIT_FORMAT, load_class_dit
    from scale_rae_core.models.scale_rae import FORMAT, ScaleRAEConfig
    from scale_rae_core.train.checkpoint import FORMAT as CKPT_FORMAT
    from scale_rae_core.train.checkpoint import MARKER, CheckpointManager
    from scale_rae_core.train.latent_cache import CACHE_FORMAT, MANIFEST, read_manifest

    _newer(tmp_path / "dit", CLASS_DIT_FORMAT)
    _newer(tmp_path / "cache", CACHE_FORMAT, name=MANIFEST)
    _newer(tmp_path / "checkpoints" / "step-00000002", CKPT_FORMAT, name=MARKER, step=2)
    cases = ((CheckpointError, lambda: load_class_dit(tmp_path / "dit")),
             (DataError, lambda: read_manifest(tmp_path / "cache")),
             (CheckpointError, lambda: CheckpointManager.read_meta(tmp_path / "checkpoints" / "step-00000002")),
             (CheckpointError, lambda: ScaleRAEConfig.from_json({"format": FORMAT, "version": 99})))
    for error, read in cases:
        with pytest.raises(error) as err:
            read()
        assert "has format version 99, newer than this srae reads" in str(err.value)
        assert str(err.value).endswith("upgrade srae") and "\n" not in str(err.value)
