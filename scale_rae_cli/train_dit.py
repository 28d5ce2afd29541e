"""`srae train dit`: a class-conditional DiT (DiT^DH / LightningDiT) on RAE latents (RAE stage 2)."""

from __future__ import annotations

import typer

from scale_rae_cli.options import (
    AcceptChangesOpt,
    DiTDataOpt,
    DiTRunOpt,
    DiTStepsOpt,
    ProfileOpt,
    QuietOpt,
    ResumeOpt,
    SetOpt,
    load,
)

EPILOG = (
    "Example: srae train dit --profile tiny-cpu --data shapes/classes --out runs/dit   "
    "(continue it: add --resume; 8 GPUs: torchrun --nproc-per-node 8 -m scale_rae_cli.main train dit --profile gpu-8 ...)"
)

def dit(data: DiTDataOpt, out: DiTRunOpt, profile: ProfileOpt = None, set_: SetOpt = None, resume: ResumeOpt = False,
        steps: DiTStepsOpt = None, quiet: QuietOpt = False, accept_changes: AcceptChangesOpt = False) -> None:
    """Train [dit_training]'s class DiT by flow matching in the normalised latents of its RAE encoder, with EMA,
    checkpoints and exact resume; the EMA model is exported to OUT/model for srae sample."""
    from scale_rae_core.events import Reporter
    from scale_rae_core.train.dit import train_dit

    overrides = list(set_ or [])
    if steps is not None:
        if steps < 1:
            from scale_rae_core.errors import ConfigError

            raise ConfigError(f"--steps {steps}: train at least 1 step")
        overrides.append(f"dit_training.steps={steps}")
    prof = load(profile, overrides)
    # every process passes the same reporter; the engine keeps it on the main process only
    with Reporter(out / prof.output.events_file, show_progress=prof.output.progress and not quiet) as rep:
        result = train_dit(prof, data, out, resume=resume, reporter=rep, accept_changes=accept_changes)
    if not result.is_main:
        return
    if resume and result.resumed_from is None:
        typer.echo(f"--resume: {out} held no checkpoint yet, so this was a new run")
    last = result.records[-1] if result.records else {}
    summary = f" (loss {last['loss']:.4g})" if "loss" in last else ""
    typer.echo(f"trained to step {result.step} in {out}{summary}")
    if result.export_dir is not None:
        typer.echo(f"EMA model: {result.export_dir}")
        typer.echo(f"next: srae sample --model {result.export_dir} --n 48 --out samples/")
