"""Per-element latent statistics: exact dataset mean/variance in one pass, and latent (de)normalisation.

Statistics are kept as (count, mean, M2) in float64, M2 = sum of squared deviations from the mean, and
batches, workers and ranks are combined with the parallel update of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,   d = mean_b - mean_a,   mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d^2 n_a n_b / n

which is exact (up to rounding) and stable even for large offsets, unlike a momentum average. The variance
is the population variance M2 / n (`unbiased=False`, as the reference computes per batch).

Layout: the per-sample latent shape, usually tokens [N, C]. RAE's released `stat.pt` files hold [C, H, W]
tensors; `load_stats` turns them into tokens (token n = i*W + j <- [:, i, j]) unless `layout="chw"`.
Normalisation: z' = (z - mean) / sqrt(var + eps), eps = 1e-5.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from scale_rae_core.errors import CheckpointError
from scale_rae_core.files import apply_umask, read_plain_state_dict

FORMAT = "srae-latent-stats"
DEFAULT_EPS = 1e-5


@dataclass
class LatentStats:
    """count, mean, var of a latent dataset (per element of one sample's latent), plus the eps used."""

    mean: torch.Tensor  # per-sample latent shape, e.g. (N, C)
    var: torch.Tensor  # same shape
    count: int = 0
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        if self.mean.shape != self.var.shape:
            raise CheckpointError(
                f"latent stats: mean {tuple(self.mean.shape)} and var {tuple(self.var.shape)} differ in shape"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    # ---- normalisation -----------------------------------------------------------------------------
    def _check(self, z: torch.Tensor) -> None:
        if tuple(z.shape[-self.mean.ndim :]) != self.shape:
            raise CheckpointError(
                f"latent stats have shape {self.shape} but the latents are {tuple(z.shape)}; "
                "use the stats computed for this encoder and resolution"
            )

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / sqrt(var + eps), broadcast over leading (batch) dims."""
        self._check(z)
        mean, var = self.mean.to(z.device, z.dtype), self.var.to(z.device, z.dtype)
        return (z - mean) / torch.sqrt(var + self.eps)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: z * sqrt(var + eps) + mean."""
        self._check(z)
        mean, var = self.mean.to(z.device, z.dtype), self.var.to(z.device, z.dtype)
        return z * torch.sqrt(var + self.eps) + mean

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
        """safetensors with `mean`, `var` (float32) and `count`; written atomically (temp + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": self.mean.detach().float().cpu().contiguous(),
            "var": self.var.detach().float().cpu().contiguous(),
            "count": torch.tensor([self.count], dtype=torch.int64),
        }
        meta = {**(metadata or {}), "format": FORMAT, "eps": repr(self.eps)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            apply_umask(tmp)  # safetensors writes 0600
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class RunningStats:
    """Streaming (count, mean, M2) accumulator in float64; `update` per batch, `merge` across workers."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        if self.mean is None or self.m2 is None or self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"latent shape changed: {tuple(self.mean.shape)} vs {tuple(mean_b.shape)}")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b.to(self.m2.device) + delta.square() * (n_a * n_b / n)
        self.count = n

    def update(self, batch: torch.Tensor) -> None:
        """Add a batch [B, *shape] of latents (dim 0 is the sample dim)."""
        x = batch.detach().to(torch.float64)
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).square().sum(dim=0)
        self._combine(x.shape[0], mean_b, m2_b)

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold `other` (e.g. another worker's accumulator) into this one; returns self."""
        if other.mean is not None and other.m2 is not None:
            self._combine(other.count, other.mean, other.m2)
        return self

    def all_reduce(self) -> RunningStats:
        """Merge every rank's accumulator (all_gather of count/mean/M2); a no-op without torch.distributed.

        Every rank merges the gathered states in rank order, so all ranks end with identical statistics.
        Each rank must have seen at least one batch (the shape must be known everywhere).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.mean is None or self.m2 is None:
            raise ValueError("all_reduce needs at least one batch on every rank")
        device = self.mean.device
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        world = dist.get_world_size()
        count = torch.tensor([self.count], dtype=torch.int64, device=device)
        counts = [torch.empty_like(count) for _ in range(world)]
        means = [torch.empty_like(self.mean, device=device) for _ in range(world)]
        m2s = [torch.empty_like(self.m2, device=device) for _ in range(world)]
        dist.all_gather(counts, count)
        dist.all_gather(means, self.mean.to(device))
        dist.all_gather(m2s, self.m2.to(device))
        merged = RunningStats()
        for c, m, s in zip(counts, means, m2s, strict=True):
            merged._combine(int(c.item()), m.cpu(), s.cpu())
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def result(self, eps: float = DEFAULT_EPS) -> LatentStats:
        if self.mean is None or self.m2 is None or self.count == 0:
            raise ValueError("no latents were accumulated")
        return LatentStats(mean=self.mean.clone(), var=self.m2 / self.count, count=self.count, eps=eps)


def compute_latent_stats(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    distributed: bool = True,
) -> LatentStats:
    """Exact per-element mean/var of `encoder(pixels)` over `batches`, merged across ranks if initialised.

    `encoder` should be in eval mode (no noise augmentation); it is called under `torch.no_grad`.
    """
    acc = RunningStats()
    with torch.no_grad():
        for pixels in batches:
            acc.update(encoder(pixels))
    if distributed:
        acc.all_reduce()
    return acc.result()


def load_stats(path: str | os.PathLike[str], layout: str = "tokens") -> LatentStats:
    """Our safetensors file, or a released RAE `stat.pt` ({'mean': [C,H,W] or None, 'var': [C,H,W]}).

    For `stat.pt`, `layout="tokens"` reshapes [C, H, W] to [H*W, C] (row-major tokens, as the encoders
    emit them); `layout="chw"` keeps [C, H, W]. A missing/None mean means 0, a missing var means 1.
    """
    path = Path(path)
    if layout not in ("tokens", "chw"):
        raise ValueError(f"layout must be 'tokens' or 'chw', got {layout!r}")
    if not path.is_file():
        raise CheckpointError(f"{path}: latent stats file not found; compute it with compute_latent_stats")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or not {"mean", "var"} <= set(f.keys()):
                raise CheckpointError(
                    f"{path}: not an srae latent-stats file (needs mean, var, format={FORMAT})"
                )
            mean, var = f.get_tensor("mean"), f.get_tensor("var")
            count = int(f.get_tensor("count").item()) if "count" in f.keys() else 0
        return LatentStats(mean=mean, var=var, count=count, eps=float(meta.get("eps", DEFAULT_EPS)))

    raw = read_plain_state_dict(path, "a dict with 'mean' and/or 'var' tensors (RAE stat.pt)", allow_none=True)
    if not ({"mean", "var"} & set(raw)):
        raise CheckpointError(f"{path}: expected a dict with 'mean' and/or 'var' tensors (RAE stat.pt)")
    unknown = sorted(set(raw) - {"mean", "var"})
    if unknown:
        raise CheckpointError(f"{path}: unexpected key(s) {unknown}; a stat.pt holds only 'mean' and 'var'")
    mean, var = raw.get("mean"), raw.get("var")
    ref = var if var is not None else mean
    if not isinstance(ref, torch.Tensor) or ref.ndim != 3:
        raise CheckpointError(f"{path}: 'mean'/'var' must be [C, H, W] tensors")
    mean = torch.zeros_like(ref) if mean is None else mean
    var = torch.ones_like(ref) if var is None else var
    mean, var = mean.float(), var.float()
    if layout == "tokens":
        mean = mean.flatten(1).transpose(0, 1).contiguous()  # (C, H, W) -> (H*W, C)
        var = var.flatten(1).transpose(0, 1).contiguous()
    return LatentStats(mean=mean, var=var, count=0)
