"""output.tracker: every metrics.jsonl record mirrored to TensorBoard (read back with its EventAccumulator) and to
W&B in offline mode (read back from the offline run's transaction log), resume included; a missing package is one
line naming the extra."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.errors import ConfigError
from tests.train.test_loop import SETS, run

LOG_EVERY_STEP = "output.log_every=1"


def jsonl_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def killed_after_step_3_then_resumed(run_dir: Path, tracker: str) -> list[dict]:
    """Steps 1-3 logged, the step-3 checkpoint lost (a kill during its save), resumed from step 2 to step 5: step 3
    is logged twice (by the killed run and again by the resumed one), 4 and 5 once."""
    sets = [LOG_EVERY_STEP, f"output.tracker={tracker}"]
    run(run_dir, stop_at=3, sets=sets)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000003")
    rest, _ = run(run_dir, resume=True, sets=sets)
    assert rest.start_step == 2 and [r["step"] for r in jsonl_records(run_dir)] == [1, 2, 3, 4, 5]
    return jsonl_records(run_dir)


def test_tensorboard_holds_every_metric_at_every_logged_step_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = killed_after_step_3_then_resumed(tmp_path / "r", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    names = {k for r in records for k in r if k != "step"}
    assert names == {"loss", "lr", "position", "samples_per_s"}
    assert set(acc.Tags()["scalars"]) == names
    for name in names:
        logged = [(e.step, e.value) for e in acc.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records], name  # step 3 once
    profile = acc.Tensors("profile/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(profile.strip("`\n")) == load_profile("tiny-cpu", [*SETS, LOG_EVERY_STEP, "output.tracker=tensorboard"]).to_toml_dict()


def test_a_tracker_that_is_not_installed_is_refused_in_one_line_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "r", sets=["output.tracker=tensorboard"])
    msg = str(err.value)
    assert "\n" not in msg and "output.tracker = 'tensorboard' needs the tensorboard package" in msg
    assert "pip install 'srae[tensorboard]'" in msg and "--set output.tracker=none" in msg
    assert not (tmp_path / "r").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"output\.tracker: input should be 'none', 'tensorboard' or 'wandb'"):
        load_profile("tiny-cpu", ["output.tracker=mlflow"])


# ------------------------------------------------------------------------------------------ W&B, offline


def wandb_log(path: Path) -> list[bytes]:
    """The records of an offline run's ``.wandb`` file: a 7-byte header, then LevelDB-log chunks (checksum u32,
    length u16, type u8: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts, out = 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            out.append(b"".join(parts))
            parts = []
    return out


def test_wandb_offline_run_holds_the_history_and_the_profile(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = killed_after_step_3_then_resumed(tmp_path / "r", "wandb")
    run_id = json.loads((tmp_path / "r" / "wandb_run.json").read_text())["id"]
    logs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2  # the resumed invocation reopened the same run
    history: dict[int, dict] = {}
    configs = []
    for path in logs:
        for raw in wandb_log(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
                history.setdefault(rec.history.step.num, row)  # W&B keeps the first value of a step
            elif kind == "run":
                assert rec.run.run_id == run_id
                configs.append({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    assert sorted(history) == [1, 2, 3, 4, 5]
    for r in records:
        for name, value in r.items():
            if name == "samples_per_s" and r["step"] == 3:
                continue  # a timing; W&B kept the killed run's step 3 (the losses are the same: the resume is exact)
            if name != "step":
                assert history[r["step"]][name] == pytest.approx(value, rel=1e-9), (r["step"], name)
    profile = load_profile("tiny-cpu", [*SETS, LOG_EVERY_STEP, "output.tracker=wandb"]).to_toml_dict()
    assert configs and all({k: c[k] for k in profile} == profile for c in configs)  # the resolved profile


def test_wandb_problems_are_one_line(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from scale_rae_core.train.tracking import WANDB_RUN_FILE, open_tracker

    tracker = open_tracker("wandb", tmp_path, {"run": {}}, "toy", 0)
    (tmp_path / WANDB_RUN_FILE).write_text("not json")
    with pytest.raises(ConfigError, match=r"wandb_run\.json: not \{\"id\": \.\.\.\}; delete it to start a new W&B run"):
        tracker.log({"step": 1, "loss": 1.0})
    (tmp_path / WANDB_RUN_FILE).unlink()

    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", no_login)
    with pytest.raises(ConfigError) as err:
        tracker.log({"step": 1, "loss": 1.0})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("output.tracker = 'wandb': wandb.init failed (UsageError: api_key not")
    assert "set WANDB_MODE=offline" in msg
    assert len(json.loads((tmp_path / WANDB_RUN_FILE).read_text())["id"]) == 8  # the id is made once and kept
