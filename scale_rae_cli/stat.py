"""`srae stat`: exact latent statistics of the profile's encoder over a dataset (for model.stats)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import ProfileOpt, QuietOpt, SetOpt, int_option, load

EPILOG = "Example: srae stat --profile tiny-cpu --data packed --out runs/stats.safetensors --max-images 2000"


def stat(
    data: Annotated[Path, typer.Option("--data", "-d", help="Packed dataset (srae data pack) or an image folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file (mean, var, count).")],
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    max_images: Annotated[int | None, int_option("--max-images", help="Stop after this many images (all processes together).")] = None,
    batch_size: Annotated[int, int_option("--batch-size", help="Images per encoder forward.")] = 32,
    quiet: QuietOpt = False,
) -> None:
    """One pass of the encoder over the data: exact per-element mean/var of its tokens, merged across processes."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.eval.recon import dataset_latent_stats
    from scale_rae_core.events import Reporter
    from scale_rae_core.models.build import build_encoder

    if out.suffix != ".safetensors":
        from scale_rae_core.errors import ConfigError

        raise ConfigError(f"--out {out}: latent statistics are written as .safetensors; give a name ending in .safetensors")
    prof = load(profile, set_)
    prof.check_runtime()
    with backend_for(prof.backend) as backend:
        main = backend.is_main  # the backend decides which process reports
        with Reporter(None, show_progress=main and prof.output.progress and not quiet) as rep:
            encoder = build_encoder(prof.model.encoder).to(backend.device)
            stats = dataset_latent_stats(encoder, data, out, batch_size=batch_size, max_images=max_images, reporter=rep)
    if main:
        std = stats.var.sqrt()
        typer.echo(
            f"latent stats of {stats.count} images, tokens {tuple(stats.shape)}: mean {float(stats.mean.mean()):.4g} "
            f"(|max| {float(stats.mean.abs().max()):.4g}), std mean {float(std.mean()):.4g} "
            f"[{float(std.min()):.4g}, {float(std.max()):.4g}]"
        )
        typer.echo(f"wrote {out}; use it with --set model.stats={out}")
