"""kill -9 during training and during a checkpoint save, then --resume: the final export is byte-identical to an
uninterrupted run's, and metrics.jsonl holds every step once (stage 1 and the decoder, tiny-cpu, a few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.runlock import LOCK_NAME
from tests.train.unified_helpers import TINY_OVERRIDES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = ["checkpoint.every_steps=2", "checkpoint.keep=3", "output.log_every=1", "output.progress=false"]
STAGE1 = [x for o in [*TINY_OVERRIDES, *COMMON] for x in ("--set", o)]
DECODER = [x for o in ["decoder_training.global_batch_size=8", "decoder_training.micro_batch_size=8", *COMMON]
           for x in ("--set", o)]

# Runs `srae ARGS...` and SIGKILLs itself at a chosen point: "step N" right after optimiser step N (before it is
# logged or saved), or "save N" while checkpoint N is being written (its shards are on disk, its marker is not).
KILLER = """
import os, signal, sys
point, at = sys.argv[1], int(sys.argv[2])
if point == "step":
    from scale_rae_core.train.loop import TrainLoop
    check = TrainLoop._check_finite_metrics
    def killing(self, record):
        if record["step"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        check(self, record)
    TrainLoop._check_finite_metrics = killing
else:
    import scale_rae_core.train.checkpoint as C
    write = C._write_json
    def killing(path, data):
        if path.name == C.MARKER and path.parent.name == C.step_dir_name(at) + ".tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)
    C._write_json = killing
from scale_rae_cli.main import app
sys.exit(app(sys.argv[3:], prog_name="srae"))
"""


def srae(args: list[str]) -> None:
    res = CliRunner().invoke(app, [str(a) for a in args], env={"SRAE_DEBUG": None, "SRAE_PROFILE": None})
    assert res.exit_code == 0, (res.output, res.exception)


def killed(point: str, at: int, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(at), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("kill-data")
    srae(["data", "synth", tmp / "shapes", "--n", "24", "--image-size", "32"])
    return tmp / "shapes"


@pytest.mark.parametrize("trainer", ["stage1", "decoder"])
def test_killed_during_a_step_and_during_a_save_then_resumed_exports_the_same_bytes(trainer, data, tmp_path):
    if trainer == "stage1":
        def command(run):
            return ["train", "stage1", "--data", data / "conversations.jsonl", "--out", run, "--steps", STEPS, *STAGE1]
        export = "export"
    else:
        def command(run):
            return ["train", "decoder", "--data", data / "captioned", "--out", run, "--steps", STEPS, *DECODER]
        export = "decoder"
    srae(command(tmp_path / "ref"))
    reference = files(tmp_path / "ref" / export)
    assert reference and metric_steps(tmp_path / "ref") == list(range(1, STEPS + 1))

    for point, at, resumes_from in (("step", 5, 4), ("save", 4, 2)):
        run = tmp_path / f"{point}-{at}"
        killed(point, at, command(run))
        ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
        if point == "save":  # the save in progress is left as .tmp, the previous one is complete
            assert ckpts == ["step-00000002", "step-00000004.tmp"]
        else:
            assert ckpts == ["step-00000002", "step-00000004"]
        assert (run / LOCK_NAME).is_file()  # the dead holder's lock file stays behind, stale
        srae([*command(run), "--resume"])
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        resumed = [e for e in events if e["event"].endswith(".resume")]
        assert [e["step"] for e in resumed] == [resumes_from]
        assert metric_steps(run) == list(range(1, STEPS + 1))  # every step once: the lost ones were redone
        assert files(run / export) == reference, f"{trainer} killed at {point} {at}: the export differs"
        assert not (run / LOCK_NAME).exists()
