"""`srae latent cache`: encode a dataset once with a frozen encoder, for `srae train dit` (labelled, the DiT's
encoder) or `srae train decoder` (`--for decoder`: [model.encoder], with the pixels)."""

from __future__ import annotations

import typer

from scale_rae_cli.options import (
    CacheDtypeOpt,
    CacheForOpt,
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
    "(then: srae train dit --data runs/latents ...; rerun the same command to resume; torchrun shards it; "
    "--for decoder caches latents and pixels for srae train decoder)"
)

def cache(data: LabelledDataOpt, out: CacheOutOpt, profile: ProfileOpt = None, set_: SetOpt = None,
          chunk_size: ChunkOpt = 1000, batch_size: EncodeBatchOpt = 64, dtype: CacheDtypeOpt = "float32",
          for_: CacheForOpt = "dit", quiet: QuietOpt = False) -> None:
    """Encode every image once (centre crop to dit_training.image_size, plus its horizontal flip when
    dit_training.hflip) into safetensors chunks with labels and exact latent statistics; resumable. --for decoder:
    [model.encoder] at decoder_training.image_size, each distinct image once, with its pixels."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.events import Reporter
    from scale_rae_core.train.latent_cache import cache_latents, read_manifest

    prof = load(profile, set_)
    prof.check_runtime()
    with backend_for(prof.backend) as backend:
        main = backend.is_main
        with Reporter(None, show_progress=main and prof.output.progress and not quiet) as rep:
            cache_latents(prof, data, out, backend, chunk_size=chunk_size, batch_size=batch_size, dtype=dtype,
                          for_=for_, reporter=rep)
    if main:
        _, m = read_manifest(out)
        n, c = m["latent_shape"]
        extra = "with pixels" if m.get("pixels") else f"flips {'on' if m['hflip'] else 'off'}"
        typer.echo(f"cached {m['total']} images ({n} × {c} latents, {m['dtype']}, {extra}) "
                   f"of encoder {m['encoder']['path']} in {out}")
        if m.get("for") == "decoder":
            typer.echo(f"next: srae train decoder --data {out} ...")
        else:
            typer.echo(f"next: srae train dit --data {out} --set dit_training.stats={out / 'latent_stats.safetensors'} ...")
