"""`srae train decoder`: train the RAE pixel decoder (L1 + LPIPS + GAN) on packed shards or an image folder."""

from __future__ import annotations

from pathlib import Path

import typer

from scale_rae_cli.options import ProfileOpt, QuietOpt, SetOpt, load

EPILOG = (
    "Example: srae train decoder --profile tiny-cpu --data packed --out runs/decoder   "
    "(continue it: add --resume; two processes: torchrun --nproc-per-node 2 -m scale_rae_cli.main train decoder ...)"
)


def decoder(
    data: Path = typer.Option(..., "--data", "-d", help="Packed dataset (srae data pack) or an image folder (class folders are fine)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints/, events.jsonl, and the exported EMA decoder in decoder/."),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in --out."),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps in total (overrides decoder_training.steps / epochs)."),
    quiet: QuietOpt = False,
) -> None:
    """Train the decoder of the profile's [model] on frozen-encoder tokens, with checkpoints and exact resume."""
    import os

    from scale_rae_core.events import Reporter
    from scale_rae_core.train.decoder import train_decoder

    overrides = list(set_ or [])
    if steps is not None:
        overrides.append(f"decoder_training.steps={steps}")
    prof = load(profile, overrides)
    main = os.environ.get("RANK", "0") == "0"
    events = out / prof.output.events_file if main else None
    with Reporter(events, show_progress=main and prof.output.progress and not quiet) as rep:
        result = train_decoder(prof, data, out, resume=resume, reporter=rep)
    if main:
        last = result.history[-1] if result.history else {}
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "l1", "lpips", "gan") if k in last)
        typer.echo(f"trained to step {result.steps} in {out}" + (f" ({summary})" if summary else ""))
        if result.export_dir is not None:
            typer.echo(f"EMA decoder: {result.export_dir}")
            typer.echo(f"next: srae eval recon --decoder {result.export_dir} --data <held-out images> --out recon.json")
