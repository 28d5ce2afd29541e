"""Unified training: exact resume (1 and 2 processes), resharding 2 → 1, interrupted saves, retention,
export, metrics, stage 2, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.errors import DataError
from scale_rae_core.models.scale_rae import load_export
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.unified import train_unified
from tests.train.unified_helpers import tiny_profile, use_list_reader

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "world"
    synthesize(root, 14, image_size=64, seed=0, split_heldout=1 / 7)
    return root / "conversations.jsonl"


@pytest.fixture(scope="module")
def full_run(shapes, tmp_path_factory):
    """An uninterrupted 6-step stage-1 run (reference trajectory)."""
    mp = pytest.MonkeyPatch()
    use_list_reader(mp)
    try:
        run = tmp_path_factory.mktemp("full") / "run"
        yield train_unified(tiny_profile(), "stage1", shapes, run)
    finally:
        mp.undo()


def test_full_run_writes_metrics_checkpoints_and_a_loadable_export(full_run):
    r = full_run
    assert r.step == 6 and len(r.losses) == 6 and all(x == x for x in r.losses)
    records = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "ce", "flow", "lr", "head_lr", "grad_norm", "tokens_per_s", "images_per_s"):
        assert all(key in rec for rec in records)
    assert records[0]["lr"] < records[1]["lr"]  # warmup
    stage = tiny_profile().stage1  # total = CE + flow_weight × flow + words_weight × words, whatever the profile sets
    assert stage.words_weight > 0 and all("words" in rec for rec in records)
    assert all(abs(rec["loss"] - rec["ce"] - stage.flow_weight * rec["flow"] - stage.words_weight * rec["words"]) < 1e-4
               for rec in records)
    # retention: keep = 2
    assert sorted(p.name for p in (r.run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    loaded = load_export(r.export_dir)
    assert {"model.safetensors", "config.json", "llm"} <= {p.name for p in r.export_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (r.export_dir / "llm").iterdir()}
    assert loaded.config.encoder["path"] == "efficientnet-lite0" and loaded.config.dit.in_channels == 40
    assert loaded.encoder_settings().select_layer == 5  # the encoder a resumed or finetuned run rebuilds


def test_resume_is_exact(shapes, full_run, tmp_path, monkeypatch):
    use_list_reader(monkeypatch)
    run = tmp_path / "run"
    first = train_unified(tiny_profile(), "stage1", shapes, run, stop_at=3)
    assert first.export_dir is None
    second = train_unified(tiny_profile(), "stage1", shapes, run, resume=True)
    assert second.start_step == 3
    assert first.losses + second.losses == full_run.losses  # bit-identical, step for step
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_killed_save_resumes_from_previous_good_checkpoint(shapes, full_run, tmp_path, monkeypatch):
    use_list_reader(monkeypatch)
    run = tmp_path / "run"
    train_unified(tiny_profile(), "stage1", shapes, run, stop_at=4)
    ckpts = run / "checkpoints"
    (ckpts / "step-00000004" / "meta.json").unlink()  # killed before the marker: incomplete
    shutil.copytree(ckpts / "step-00000002", ckpts / "step-00000006.tmp")  # and a half-written newer one
    resumed = train_unified(tiny_profile(), "stage1", shapes, run, resume=True)
    assert resumed.start_step == 2
    assert resumed.losses == full_run.losses[2:]
    assert not (ckpts / "step-00000006.tmp").exists()


def test_stage2_from_run_and_from_export(shapes, full_run, tmp_path, monkeypatch):
    use_list_reader(monkeypatch)
    a = train_unified(tiny_profile(), "stage2", shapes, tmp_path / "a", init_from=full_run.run_dir)
    b = train_unified(tiny_profile(), "stage2", shapes, tmp_path / "b", init_from=full_run.export_dir)
    assert a.step == b.step == 2
    # Same weights either way (the last checkpoint and the export hold the same model).
    assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-6)
    assert a.losses[0] < full_run.losses[0]  # starts from trained weights, not from scratch


def test_existing_run_without_resume_is_refused(shapes, full_run, monkeypatch):
    use_list_reader(monkeypatch)
    with pytest.raises(Exception, match="--resume"):
        train_unified(tiny_profile(), "stage1", shapes, full_run.run_dir)


def test_all_samples_too_long_is_one_data_error(shapes, tmp_path, monkeypatch):
    use_list_reader(monkeypatch)
    with pytest.raises(DataError, match="no usable sample.*seq_len"):
        train_unified(tiny_profile("stage1.seq_len=16"), "stage1", shapes, tmp_path / "run")


# ---- CLI (the `srae` app) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "stage1", "--out", "{tmp}/r"], "no training data: pass --data"),
        (["train", "stage1", "--data", "{tmp}/nope.jsonl", "--out", "{tmp}/r"], "nope.jsonl: no such file"),
        (["train", "stage2", "--from", "{tmp}", "--data", "{data}", "--out", "{tmp}/r"], "neither an srae run"),
    ],
)
def test_cli_bad_inputs_print_one_line(args, message, shapes, tmp_path, monkeypatch):
    monkeypatch.delenv("SRAE_DEBUG", raising=False)
    args = [a.format(tmp=tmp_path, data=shapes) for a in args]
    res = CliRunner().invoke(app, [*args, "--set", "model.llm.preset=tiny", "--quiet"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]


def test_cli_too_long_data_prints_one_line(shapes, tmp_path, monkeypatch):
    monkeypatch.delenv("SRAE_DEBUG", raising=False)
    use_list_reader(monkeypatch)
    from tests.train.unified_helpers import TINY_OVERRIDES

    sets = [x for o in [*TINY_OVERRIDES, "stage1.seq_len=16"] for x in ("--set", o)]
    res = CliRunner().invoke(app, ["train", "stage1", "--data", str(shapes), "--out", str(tmp_path / "r"), *sets])
    assert res.exit_code == 1
    assert "error: the data has no usable sample" in res.output


def test_cli_resume_on_an_empty_folder_is_a_new_run(shapes, tmp_path, monkeypatch):
    """--resume with no checkpoint yet starts fresh (a preemptible job's first launch) and says so."""
    use_list_reader(monkeypatch)
    from tests.train.unified_helpers import TINY_OVERRIDES

    sets = [x for o in TINY_OVERRIDES for x in ("--set", o)]
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["train", "stage1", "--data", str(shapes), "--out", str(out), "--resume",
                                      "--steps", "1", "--quiet", *sets])
    assert res.exit_code == 0, res.output
    assert f"--resume: {out} held no checkpoint yet, so this was a new run" in res.output
    assert "stage1: 1 steps in" in res.output
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "stage1.fresh_start" and "stage1.resume" not in events and events[-1] == "stage1.done"


# ---- several processes (gloo) ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, job: dict, tmp: Path) -> dict:
    """Run tests/train/unified_worker.py under torchrun with `nproc` CPU processes; rank 0's losses/records."""
    job_file = tmp / f"job-{_free_port()}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(HERE / "unified_worker.py"), str(job_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(job["out"]).read_text())


@pytest.mark.dist
def test_two_process_resume_is_exact_and_reshards_to_one(shapes, tmp_path):
    def job(run: str, out: str, procs: int, **kw) -> dict:
        return {"data": str(shapes), "run": str(tmp_path / run), "out": str(tmp_path / out), "procs": procs, **kw}

    full = _launch(2, job("full", "full.json", 2), tmp_path)
    part = _launch(2, job("part", "p1.json", 2, stop_at=3), tmp_path)
    rest = _launch(2, job("part", "p2.json", 2, resume=True), tmp_path)
    assert len(full["losses"]) == 6 and part["losses"] + rest["losses"] == full["losses"]
    # 2 → 1: the 2-process checkpoint at step 4 resumes in one process (model, optimiser, schedule restored;
    # the data split differs, so the epoch is re-read). The held-out metrics follow the 2-process run. The full
    # run's folder without its step-6 checkpoint is a 2-process run killed after step 4 (a launch fewer).
    shutil.copytree(tmp_path / "full", tmp_path / "mix")
    shutil.rmtree(tmp_path / "mix" / "checkpoints" / "step-00000006")
    one = _launch(1, job("mix", "m2.json", 1, resume=True), tmp_path)
    assert len(one["losses"]) == 2
    two_eval = [r["eval_answer_ce"] for r in full["records"][4:]]
    one_eval = [r["eval_answer_ce"] for r in one["records"]]
    assert one_eval == pytest.approx(two_eval, rel=0.05)
    assert [r["lr"] for r in one["records"]] == [r["lr"] for r in full["records"][4:]]
