"""One pass of an RAE over a dataset: reconstruction quality (`srae eval recon`) and latent stats (`srae stat`).

Both read a packed dataset or an image folder (`train.decoder_data.open_images`, centre crops, repeated
images skipped), split across processes when torch.distributed is up, in eval mode (no encoder noise).

* `evaluate_reconstruction`: mean PSNR, mean SSIM and rFID (`eval.metrics.reconstruction_metrics`) of the
  clamped reconstructions against the originals, labelled with the FID feature network (`eval.features`).
* `dataset_latent_stats`: exact per-element mean/var of the raw encoder tokens (`models.stats.RunningStats`,
  merged across ranks), saved as safetensors for `model.stats`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.events import Reporter
from scale_rae_core.models.encoder import FrozenEncoder
from scale_rae_core.models.rae import RAE
from scale_rae_core.models.stats import LatentStats, RunningStats
from scale_rae_core.train.decoder_data import batches, open_images


def _check_counts(batch_size: int, max_images: int | None, least: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: give at least 1 image per forward")
    if max_images is not None and max_images < least:
        raise ConfigError(f"--max-images {max_images}: give at least {least} (or leave it out to read every image)")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def dataset_latent_stats(encoder: FrozenEncoder, data: str | Path, out: str | Path, *, batch_size: int = 32,
                         max_images: int | None = None, reporter: Reporter | None = None) -> LatentStats:
    """Exact mean/var of `encoder` tokens [N, C] over the images at `data`; written to `out` (safetensors).
    A variance needs two images at least: fewer (``max_images`` or the data) is refused, nothing is written."""
    _check_counts(batch_size, max_images, 2)
    reporter = reporter or Reporter()
    rank, world = _rank_world()
    encoder.eval()
    stream = open_images(data, image_size=encoder.input_size, train=False, rank=rank, world_size=world, unique=True)
    limit = None if max_images is None else max(1, max_images // world)
    acc = RunningStats()
    t0 = time.perf_counter()
    device = encoder.mean.device
    with reporter.task("latent stats", limit or stream.images_per_epoch) as advance:
        for x, _ in batches(stream, batch_size, limit=limit):
            acc.update(encoder(x.to(device)))
            advance(x.shape[0])
    if acc.count == 0:
        raise DataError(f"--data {data}: no images were read; pass a packed dataset or an image folder with images")
    acc.all_reduce()
    stats = acc.result()
    if stats.count < 2:
        raise DataError(f"--data {data}: {stats.count} distinct image read, but a variance needs at least 2; add images")
    if rank == 0:
        stats.save(out, metadata={"encoder": encoder.cfg.path_or_repo, "encoder_kind": encoder.kind,
                                  "input_size": str(encoder.input_size), "data": str(data)})
    reporter.event("stat.done", out=str(out), images=stats.count, seconds=round(time.perf_counter() - t0, 2))
    return stats


@torch.no_grad()
def evaluate_reconstruction(rae: RAE, data: str | Path, *, fid_net: str | None = None, batch_size: int = 32,
                            max_images: int | None = None, out: str | Path | None = None,
                            reporter: Reporter | None = None) -> dict[str, Any]:
    """PSNR / SSIM / rFID of `rae` on the images at `data` (one process); written as JSON to `out` if given."""
    from scale_rae_core.eval.features import get_feature_net
    from scale_rae_core.eval.metrics import reconstruction_metrics

    _check_counts(batch_size, max_images, 1)
    reporter = reporter or Reporter()
    rank, world = _rank_world()
    if world > 1:
        raise DataError("srae eval recon runs in one process; launch it without torchrun")
    rae.eval()
    device = rae.encoder.mean.device
    side = rae.decoder.cfg.image_size
    stream = open_images(data, image_size=side, train=False, unique=True)
    net = get_feature_net(fid_net, device)
    limit = max_images
    t0 = time.perf_counter()

    def pairs():
        with reporter.task("reconstruct", limit or stream.images_per_epoch) as advance:
            for x, _ in batches(stream, batch_size, limit=limit):
                x = x.to(device)
                yield x, rae(x).clamp(0, 1)
                advance(x.shape[0])

    result = reconstruction_metrics(pairs(), net)
    result.update(data=str(data), image_size=side, decoder_preset=rae.decoder.cfg.preset,
                  encoder=rae.encoder.cfg.path_or_repo, seconds=round(time.perf_counter() - t0, 2))
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    reporter.event("eval_recon.done", **result)
    return result
