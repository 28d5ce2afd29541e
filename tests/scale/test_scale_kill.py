"""kill -9 of `srae scale` in the middle of a prompt, then the same command again: the outputs (every PNG and
metadata.jsonl) are identical to an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.infer.loading import BUNDLED_MODEL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Runs `srae ARGS...` and SIGKILLs itself at its AT-th metadata write (one when a prompt starts, one per sample):
# at the 7th, prompt 1's sample 1 has its PNG on disk but not its scores.
KILLER = """
import os, signal, sys
import scale_rae_core.scale.run as R
at, calls, write = int(sys.argv[1]), [0], R._write_metadata
def killing(folder, meta):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    write(folder, meta)
R._write_metadata = killing
from scale_rae_cli.main import app
sys.exit(app(sys.argv[2:], prog_name="srae"))
"""


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_scale_killed_mid_prompt_then_rerun_gives_the_same_outputs(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square on the left\n")
    args = ["scale", "--prompts", tmp_path / "prompts.txt", "--model", BUNDLED_MODEL, "--n", "3", "--batch-size", "1",
            "--steps", "2", "--max-new-tokens", "2", "--verify-max-new-tokens", "2", "--scorer", "shapes", "-q"]
    runner = CliRunner()
    env = {"SRAE_DEBUG": None, "SRAE_PROFILE": None, "SRAE_MODEL_PATH": None}
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "ref"]], env=env)
    assert res.exit_code == 0, res.output
    reference = tree(tmp_path / "ref")
    assert len([k for k in reference if k.endswith(".png")]) == 6

    proc = subprocess.run(
        [sys.executable, "-c", KILLER, "7", *map(str, [*args, "--out", tmp_path / "out"])], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr
    root = tmp_path / "out" / "shapes-demo" / "1_verify_scale_latent"
    assert sorted(p.name for p in (root / "00001" / "samples").iterdir()) == ["00000.png", "00001.png"]  # 1 unscored
    res = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "out"]], env=env)
    assert res.exit_code == 0, res.output
    assert tree(tmp_path / "out") == reference
