"""`srae train stage1|stage2`: unified LLM + DiT training (the lead registers these on the `train` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import (
    AcceptChangesOpt,
    ProfileOpt,
    QuietOpt,
    ResumeOpt,
    RunOutOpt,
    SetOpt,
    StageStepsOpt,
    TrainDataOpt,
    run_trainer,
)

STAGE1_EPILOG = "Example: srae train stage1 --profile tiny-cpu --data shapes-packed --out runs/stage1"
STAGE2_EPILOG = "Example: srae train stage2 --profile tiny-cpu --from runs/stage1 --data shapes/conversations.jsonl --out runs/stage2"


def _run(stage: str, profile: str | None, overrides: list[str] | None, data: Path | None, out: Path,
         init_from: Path | None, resume: bool, steps: int | None, quiet: bool, accept_changes: bool = False) -> None:
    from scale_rae_core.train.unified import train_unified

    result = run_trainer(out, profile, overrides, steps, f"{stage}.steps", resume, quiet,
                         lambda prof, rep: train_unified(prof, stage, data, out, init_from=init_from, resume=resume,
                                                         reporter=rep, accept_changes=accept_changes))
    if result is None:
        return
    last = result.records[-1] if result.records else {}
    summary = f"{stage}: {result.step} steps in {out}"
    if last:
        summary += f" (loss {last['loss']:.4f}, ce {last['ce']:.4f}, flow {last['flow']:.4f})"
    too_long = result.summary.get("skipped", {}).get("too_long")
    if too_long:
        summary += f"; skipped {too_long} samples longer than seq_len"
    typer.echo(summary)
    if result.export_dir is not None:
        typer.echo(f"export: {result.export_dir}")


def stage1(
    out: RunOutOpt,
    data: TrainDataOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    resume: ResumeOpt = False,
    steps: StageStepsOpt = None,
    quiet: QuietOpt = False,
    accept_changes: AcceptChangesOpt = False,
) -> None:
    """Stage 1: pretrain the unified model (pretrained or tiny LLM + a new DiT head) on generation + understanding data."""
    _run("stage1", profile, overrides, data, out, None, resume, steps, quiet, accept_changes)


def stage2(
    init_from: Annotated[Path, typer.Option("--from", help="A stage-1 run folder (its newest checkpoint, else its export) or an export folder.")],
    out: RunOutOpt,
    data: TrainDataOpt = None,
    profile: ProfileOpt = None,
    overrides: SetOpt = None,
    resume: ResumeOpt = False,
    steps: StageStepsOpt = None,
    quiet: QuietOpt = False,
    accept_changes: AcceptChangesOpt = False,
) -> None:
    """Stage 2: finetune a stage-1 model (e.g. on instruction JSONL) with the stage2 section of the profile."""
    _run("stage2", profile, overrides, data, out, init_from, resume, steps, quiet, accept_changes)
