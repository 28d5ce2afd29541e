"""Two trainings pointed at one run folder: the second is refused in one line naming the first, which finishes
its run intact (continuous metrics, checkpoints that resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.runlock import LOCK_NAME
from tests.train.unified_helpers import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
TINY = [x for o in [*TINY_OVERRIDES, "checkpoint.every_steps=1", "checkpoint.keep=3"] for x in ("--set", o)]
STEPS = 8
# The first training, slowed down at each checkpoint so that it surely still runs when the second one starts.
SLOW_TRAINING = """
import sys, time
from scale_rae_core.train.checkpoint import CheckpointManager
save = CheckpointManager.save
def slow_save(self, *args, **kwargs):
    time.sleep(0.4)
    return save(self, *args, **kwargs)
CheckpointManager.save = slow_save
from scale_rae_cli.main import app
sys.exit(app(sys.argv[1:], prog_name="srae"))
"""


def _holder(run: Path) -> int | None:
    try:
        return json.loads((run / LOCK_NAME).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def test_a_second_training_into_a_running_folder_is_refused_and_the_first_run_is_intact(tmp_path):
    runner = CliRunner()
    env = {"SRAE_DEBUG": None, "SRAE_PROFILE": None}
    assert runner.invoke(app, ["data", "synth", str(tmp_path / "shapes"), "--n", "24", "--image-size", "32"],
                         env=env).exit_code == 0
    data, run = tmp_path / "shapes" / "conversations.jsonl", tmp_path / "run"
    stage1 = ["train", "stage1", "--data", str(data), "--out", str(run), *TINY, "-q"]
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAINING, *stage1, "--steps", str(STEPS)], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _holder(run) != first.pid and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _holder(run) == first.pid, first.communicate()
        second = runner.invoke(app, [*stage1, "--steps", str(STEPS), "--resume"], env=env)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    lines = second.stderr.splitlines()
    assert second.exit_code == 1 and len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {run} is in use by ") and f"(pid {first.pid} on host " in lines[0]
    assert first.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one writer: every step once, in order
    assert not (run / LOCK_NAME).exists()  # released at the end
    more = runner.invoke(app, [*stage1, "--steps", str(STEPS + 1), "--resume", "--accept-changes"], env=env)
    assert more.exit_code == 0, more.output  # its newest checkpoint loads and the run continues
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 2))
