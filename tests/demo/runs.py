"""The tiny demo the slow tests run (tiny world, tiny step counts) and helpers to run and read it.

``conftest.first_run`` runs it once per session, for reading only; a test that runs the demo again works on its
own copy (``own_copy``), so the tests pass in any order or subset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.demo.stages import STAGE_NAMES

TINY = [
    "--n", "30", "--quiet",
    "--set", "decoder_training.steps=2", "--set", "decoder_training.micro_batch_size=8",
    "--set", "decoder_training.global_batch_size=8",
    "--set", "stage1.steps=2", "--set", "stage1.global_batch_size=4", "--set", "stage1.micro_batch_size=2",
    "--set", "checkpoint.every_steps=2", "--set", "output.log_every=1", "--set", "dit_training.steps=2",
    "--sampler-steps", "2", "--gen-prompts", "2", "--understand-images", "1", "--scale-n", "1", "--scale-rounds", "2",
    "--bench-prompts", "2", "--bench-k", "2", "--bench-images", "2", "--class-samples", "2", "--class-steps", "2",
]
PER_CLASS = 2  # class-stage samples per class in the tiny demo
QUICK = [name for name in STAGE_NAMES if name != "stage2"]  # the quick recipe does not finetune
STAGE2 = ["--set", "stage2.steps=2", "--set", "stage2.global_batch_size=4", "--set", "stage2.micro_batch_size=2"]


def demo(out: Path, *extra: str, code: int = 0) -> str:
    """``srae demo --out OUT`` with the tiny settings and ``extra``; checks the exit code, returns the output."""
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *TINY, *extra])
    assert result.exit_code == code, result.output
    return result.output


def own_copy(first_run: tuple[Path, str], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    return out


def statuses(out: Path) -> dict[str, str]:
    return json.loads((out / "demo.json").read_text())["status"]


def event_names(out: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
