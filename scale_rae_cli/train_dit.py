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
    run_trainer,
)

EPILOG = (
    "Example: srae train dit --profile tiny-cpu --data shapes/classes --out runs/dit   "
    "(continue it: add --resume; 8 GPUs: torchrun --nproc-per-node 8 -m scale_rae_cli.main train dit --profile gpu-8 ...)"
)

def dit(data: DiTDataOpt, out: DiTRunOpt, profile: ProfileOpt = None, set_: SetOpt = None, resume: ResumeOpt = False,
        steps: DiTStepsOpt = None, quiet: QuietOpt = False, accept_changes: AcceptChangesOpt = False) -> None:
    """Train [dit_training]'s class DiT by flow matching in the normalised latents of its RAE encoder, with EMA,
    checkpoints and exact resume; the EMA model is exported to OUT/model for srae sample."""
    from scale_rae_core.train.dit import train_dit

    result = run_trainer(out, profile, set_, steps, "dit_training.steps", resume, quiet,
                         lambda prof, rep: train_dit(prof, data, out, resume=resume, reporter=rep,
                                                     accept_changes=accept_changes))
    if result is None:
        return
    last = result.records[-1] if result.records else {}
    summary = f" (loss {last['loss']:.4g})" if "loss" in last else ""
    typer.echo(f"trained to step {result.step} in {out}{summary}")
    if result.export_dir is not None:
        typer.echo(f"EMA model: {result.export_dir}")
        typer.echo(f"next: srae sample --model {result.export_dir} --n 48 --out samples/")
