"""Class-conditional sample sets (what `srae sample --model RUN --n N` writes, and gFID scores).

A `SamplePlan` fixes, for every index i in 0 … N−1, a class label and a seed, from (N, classes, label sampling,
seed) alone:

* `equal`: exactly N / K images per class (N must be a multiple of K), in an order shuffled by the seed
  (RAE's `sample_ddp.py` is exact only when N divides evenly over its batches, rae.md §12.12);
* `random`: labels drawn uniformly by the seed.

The seed of index i is derived from (plan seed, i), and the index's initial noise and every SDE step noise come
from a generator seeded with it, on the CPU. So an image depends only on its index and the settings, not on the
batch it was drawn in or on how the work was split over processes.

Output folder:

    plan.json       the plan and the sampling settings; a rerun into the folder must match it
    000000.png …    one PNG per index (written atomically), the resume state: existing indices are skipped
    samples.npz     `arr_0` uint8 (N, H, W, 3) in index order (ADM layout), packed once all N exist

`shard(n, rank, world)` gives each process a contiguous range; the ranges cover 0 … N−1 exactly once.
`generate_samples` draws one process's pending indices; `pack_samples` writes the npz when all are present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.eval.adm_npz import AdmNpzWriter
from scale_rae_core.files import atomic_write
from scale_rae_core.flow.class_flow import sample_class_latents
from scale_rae_core.flow.guidance import Guidance
from scale_rae_core.flow.sampler import PerSampleNoise, SamplerConfig

LABEL_SAMPLING = ("equal", "random")
PLAN_FILE = "plan.json"
NPZ_FILE = "samples.npz"

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents (B, C, g, g) -> images (B, 3, H, W) in [0, 1]


@dataclass(frozen=True)
class SamplePlan:
    n: int
    num_classes: int
    label_sampling: str = "equal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.num_classes < 1:
            raise ConfigError(f"--n and the number of classes must be positive, got {self.n} and {self.num_classes}")
        if self.label_sampling not in LABEL_SAMPLING:
            raise ConfigError(f"--label-sampling must be one of {', '.join(LABEL_SAMPLING)}, got '{self.label_sampling}'")
        if self.label_sampling == "equal" and self.n % self.num_classes:
            raise ConfigError(
                f"--label-sampling equal needs --n to be a multiple of the {self.num_classes} classes, got {self.n}; "
                f"use --n {self.n - self.n % self.num_classes or self.num_classes} or --label-sampling random"
            )

    def labels(self) -> np.ndarray:
        """(n,) int64 label of every index."""
        rng = np.random.default_rng(self.seed)
        if self.label_sampling == "equal":
            return rng.permutation(np.repeat(np.arange(self.num_classes), self.n // self.num_classes))
        return rng.integers(0, self.num_classes, self.n)

    def seed_of(self, index: int) -> int:
        """The noise seed of one index (a 64-bit hash of (seed, index))."""
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0])


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous index range of process `rank` out of `world_size`."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def image_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index:06d}.png"


def pending(out_dir: Path, indices: range) -> list[int]:
    """Indices whose PNG is not written yet (a PNG appears only once complete)."""
    return [i for i in indices if not image_path(out_dir, i).is_file()]


def prepare_folder(out_dir: Path, plan: SamplePlan, settings: dict[str, Any]) -> None:
    """Create `out_dir` with plan.json, or check that an existing one holds the same plan and settings."""
    record = {"plan": asdict(plan), "settings": settings}
    path = out_dir / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            raise ConfigError(
                f"{out_dir} holds samples of another plan or other settings ({path}); "
                "use a new --out folder, or the same --n, --seed, labels and sampler settings to resume"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, clamped and rounded."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    decode: Decode,
    out_dir: str | Path,
    plan: SamplePlan,
    *,
    shift: float,
    sampler: SamplerConfig,
    guidance: Guidance,
    guide_model: nn.Module | None = None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    settings: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write this process's missing PNGs of `plan` into `out_dir`; returns counts {shard, skipped, written}.

    `settings` (model id, precision, ...) are recorded in plan.json with the sampler and guidance settings so a
    resume cannot mix different runs.
    """
    if plan.num_classes != model.cfg.num_classes:
        raise ConfigError(f"the plan has {plan.num_classes} classes but the model {model.cfg.num_classes}; they must agree")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    record = {"sampler": asdict(sampler), "guidance": asdict(guidance), **(settings or {})}
    prepare_folder(out_dir, plan, json.loads(json.dumps(record)))
    indices = shard(plan.n, rank, world_size)
    todo = pending(out_dir, indices)
    labels = plan.labels()
    device = next(model.parameters()).device
    cfg = model.cfg
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        noise = PerSampleNoise([plan.seed_of(i) for i in batch], device)
        x1 = noise((len(batch), cfg.in_channels, cfg.grid, cfg.grid))
        y = torch.from_numpy(labels[batch]).to(device)
        latents = sample_class_latents(model, y, x1, shift, sampler, guidance, guide_model, step_noise=noise)
        for index, image in zip(batch, to_uint8(decode(latents)), strict=True):
            _write_png(image_path(out_dir, index), image)
        if progress is not None:
            progress(len(batch))
    return {"shard": len(indices), "skipped": len(indices) - len(todo), "written": len(todo)}


def pack_samples(out_dir: str | Path, plan: SamplePlan) -> Path:
    """Pack 000000.png … into `out_dir/samples.npz` (ADM layout) once every index of the plan exists."""
    out_dir = Path(out_dir)
    missing = pending(out_dir, range(plan.n))
    if missing:
        raise DataError(
            f"{out_dir}: {len(missing)} of {plan.n} samples are missing (first: {image_path(out_dir, missing[0]).name}); "
            "finish sampling (rerun to resume) before packing"
        )
    first = np.asarray(Image.open(image_path(out_dir, 0)).convert("RGB"))
    writer = AdmNpzWriter(out_dir / NPZ_FILE, plan.n, first.shape[0], first.shape[1])
    try:
        for i in range(plan.n):
            with Image.open(image_path(out_dir, i)) as im:
                writer.write(np.asarray(im.convert("RGB"))[None])
    except BaseException:
        writer.abort()
        raise
    return writer.close()
