"""`srae latent cache`: encode a labelled dataset once with the DiT's frozen encoder, for `srae train dit`."""

from __future__ import annotations

import typer

from scale_rae_cli.options import (
    CacheDtypeOpt,
    CacheOutOpt,
    ChunkOpt,
    EncodeBatchOpt,
    LabelledDataOpt,
    ProfileOpt,
    QuietOpt,
    SetOpt,
    load,
)

EPILOG = (
    "Example: srae latent cache --profile tiny-cpu --data shapes/classes --out runs/latents   "
    "(then: srae train dit --data runs/latents ...; rerun the same command to resume; torchrun shards it)"
)

def cache(data: LabelledDataOpt, out: CacheOutOpt, profile: ProfileOpt = None, set_: SetOpt = None,
          chunk_size: ChunkOpt = 1000, batch_size: EncodeBatchOpt = 64, dtype: CacheDtypeOpt = "float32",
          quiet: QuietOpt = False) -> None:
    """Encode every image once (centre crop to dit_training.image_size, plus its horizontal flip when
    dit_training.hflip) into safetensors chunks with labels and exact latent statistics; resumable."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.events import Reporter
    from scale_rae_core.train.latent_cache import cache_latents, read_manifest

    prof = load(profile, set_)
    prof.check_runtime()
    with backend_for(prof.backend) as backend:
        main = backend.is_main
        with Reporter(None, show_progress=main and prof.output.progress and not quiet) as rep:
            cache_latents(prof, data, out, backend, chunk_size=chunk_size, batch_size=batch_size, dtype=dtype,
                          reporter=rep)
    if main:
        _, m = read_manifest(out)
        n, c = m["latent_shape"]
        typer.echo(f"cached {m['total']} images ({n} × {c} latents, {m['dtype']}, flips {'on' if m['hflip'] else 'off'}) "
                   f"of encoder {m['encoder']['path']} in {out}")
        typer.echo(f"next: srae train dit --data {out} --set dit_training.stats={out / 'latent_stats.safetensors'} ...")
