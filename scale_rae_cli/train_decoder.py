"""`srae train decoder`: train the RAE pixel decoder (L1 + LPIPS + GAN) on packed shards or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import (
    AcceptChangesOpt,
    ProfileOpt,
    QuietOpt,
    ResumeOpt,
    SetOpt,
    int_option,
    run_trainer,
)

EPILOG = (
    "Example: srae train decoder --profile tiny-cpu --data packed --out runs/decoder   (faster: srae latent cache --for "
    "decoder --data packed --out runs/dec-latents, then --data runs/dec-latents)   "
    "(continue it: add --resume; two processes: torchrun --nproc-per-node 2 -m scale_rae_cli.main train decoder ...)"
)


def decoder(
    data: Annotated[Path, typer.Option("--data", "-d", help="Packed dataset (srae data pack), an image folder (class folders are fine), or a latent cache "
                                                        "(srae latent cache --for decoder: no encoder forward per step).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints/, events.jsonl, and the exported EMA decoder in decoder/.")],
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    steps: Annotated[int | None, int_option("--steps", help="Optimiser steps in total (overrides decoder_training.steps / epochs).")] = None,
    quiet: QuietOpt = False,
    accept_changes: AcceptChangesOpt = False,
) -> None:
    """Train the decoder of the profile's [model] on frozen-encoder tokens, with checkpoints and exact resume."""
    from scale_rae_core.train.decoder import train_decoder

    result = run_trainer(out, profile, set_, steps, "decoder_training.steps", resume, quiet,
                         lambda prof, rep: train_decoder(prof, data, out, resume=resume, reporter=rep,
                                                         accept_changes=accept_changes))
    if result is None:
        return
    last = result.records[-1] if result.records else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "l1", "lpips", "gan") if k in last)
    typer.echo(f"trained to step {result.step} in {out}" + (f" ({summary})" if summary else ""))
    if result.export_dir is not None:
        typer.echo(f"EMA decoder: {result.export_dir}")
        typer.echo(f"next: srae eval recon --decoder {result.export_dir} --data <held-out images> --out recon.json")
