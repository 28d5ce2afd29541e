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
    load,
)

STAGE1_EPILOG = "Example: srae train stage1 --profile tiny-cpu --data shapes-packed --out runs/stage1"
STAGE2_EPILOG = "Example: srae train stage2 --profile tiny-cpu --from runs/stage1 --data shapes/conversations.jsonl --out runs/stage2"


def _run(stage: str, profile: str | None, overrides: list[str] | None, data: Path | None, out: Path,
         init_from: Path | None, resume: bool, steps: int | None, quiet: bool, accept_changes: bool = False) -> None:
    from scale_rae_core.errors import ConfigError
    from scale_rae_core.events import Reporter
    from scale_rae_core.train.unified import train_unified

    items = list(overrides or [])
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: train at least 1 step")
        items.append(f"{stage}.steps={steps}")
    prof = load(profile, items)
    # every process passes the same reporter; the engine keeps it on the main process only
    with Reporter(out / prof.output.events_file, show_progress=prof.output.progress and not quiet) as rep:
        result = train_unified(prof, stage, data, out, init_from=init_from, resume=resume, reporter=rep,
                               accept_changes=accept_changes)
    if not result.is_main:
        return
    if resume and result.resumed_from is None:
        typer.echo(f"--resume: {out} held no checkpoint yet, so this was a new run")
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
