"""Image-quality metrics: PSNR, SSIM and the Fréchet distance behind FID / rFID.

All maths runs in float64 and works on any device; images are ``(B, C, H, W)`` tensors.

- ``psnr`` / ``ssim`` return one value per image, ``(B,)``.
- ``FeatureStats`` streams feature vectors into (count, sum, sum of outer products), all float64. Merging
  two accumulators is elementwise addition, so batches, shards or ranks combine exactly in any order
  (a distributed backend can ``all_reduce(SUM)`` each tensor of ``state_dict()``).
- ``frechet_distance`` is ``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))``, with the trace of the
  square root taken from the eigenvalues of the symmetric PSD matrix ``C1^(1/2) C2 C1^(1/2)`` (same
  eigenvalues as ``C1 C2``), so no scipy and no complex ``sqrtm``. Like the reference, it is clamped at 0.
- ``reconstruction_metrics`` streams (original, reconstruction) batches and reports mean PSNR, mean SSIM
  and rFID, labelled with the feature network that produced it (see ``features.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from scale_rae_core.errors import DataError

if TYPE_CHECKING:
    from scale_rae_core.eval.features import FeatureNet

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; reconstruction_metrics averages them as this
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
RANGE_TOLERANCE = 1e-4  # reconstruction_metrics accepts values this far outside [0, 1] (float rounding)


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise DataError(
            f"{what}: image batches differ in shape, {tuple(x.shape)} vs {tuple(y.shape)}; "
            "pass originals and reconstructions at the same size"
        )
    if x.dim() != 4:
        raise DataError(f"{what}: expected images shaped (B, C, H, W), got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------- PSNR


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``(B,)`` float64 in dB; ``inf`` where ``x == y``."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> inf


# ----------------------------------------------------------------------------------------------- SSIM


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian, ``(size,)`` float64; SSIM's 2-D window is its outer product."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image, ``(B,)`` float64 (Wang et al. 2004).

    Gaussian window 11 (sigma 1.5), K1 0.01, K2 0.03, weighted local moments without sample correction,
    only window positions fully inside the image ("valid"), each channel on its own, then the mean over
    positions and channels. No automatic downsampling (unlike the original MATLAB script for big images).
    """
    _check_pair(x, y, "ssim")
    B, C, H, W = x.shape
    if min(H, W) < SSIM_WINDOW:
        raise DataError(
            f"ssim: images are {H}x{W}, smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window; "
            "evaluate at a larger resolution"
        )
    g = gaussian_window().to(x.device)
    # A separable filter on every channel independently: fold channels into the batch.
    kh = g.view(1, 1, SSIM_WINDOW, 1)
    kw = g.view(1, 1, 1, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh), kw)  # (B*C, 1, H-10, W-10)

    a = x.double().reshape(B * C, 1, H, W)
    b = y.double().reshape(B * C, 1, H, W)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov_ab = blur(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return ssim_map.reshape(B, -1).mean(1)


# ------------------------------------------------------------------------------------------ FID maths


class FeatureStats:
    """Streaming first and second moments of feature vectors, float64 on the CPU.

    ``update(feats)`` adds a ``(N, dim)`` batch; ``merge(other)`` adds another accumulator. The result
    does not depend on how the vectors were split. ``mean()`` and ``cov()`` (unbiased, like ``np.cov``)
    need at least two vectors.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"FeatureStats needs a positive dimension, got {dim}")
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)  # sum of x x^T

    def update(self, feats: torch.Tensor) -> FeatureStats:
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise DataError(
                f"FeatureStats: expected features shaped (N, {self.dim}), got {tuple(feats.shape)}"
            )
        f = feats.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(f).all():
            raise DataError(
                "FeatureStats: the feature network returned NaN/inf; check the images and weights"
            )
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise DataError(
                f"FeatureStats: cannot merge {other.dim}-d statistics into {self.dim}-d ones; "
                "both sides must use the same feature network"
            )
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def mean(self) -> torch.Tensor:
        self._need(1)
        return self.sum / self.count

    def cov(self) -> torch.Tensor:
        self._need(2)
        mu = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors whose elementwise sum over accumulators is their merge."""
        return {
            "count": torch.tensor(self.count, dtype=torch.float64),
            "sum": self.sum.clone(),
            "outer": self.outer.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> FeatureStats:
        stats = cls(int(state["sum"].shape[0]))
        stats.count = int(round(float(state["count"])))
        stats.sum = state["sum"].to(device="cpu", dtype=torch.float64).clone()
        stats.outer = state["outer"].to(device="cpu", dtype=torch.float64).clone()
        return stats

    def _need(self, n: int) -> None:
        if self.count < n:
            raise DataError(
                f"FeatureStats: {self.count} feature vectors seen, at least {n} needed; "
                "evaluate on more images"
            )


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues (rounding) become 0."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2); tensors or arrays, computed in float64."""
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).cpu() for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=torch.float64).cpu() for c in (cov1, cov2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise DataError(
            f"frechet_distance: statistics do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
            f"cov {tuple(cov1.shape)} / {tuple(cov2.shape)}; compute both with the same network"
        )
    s1 = _sqrt_psd(cov1)
    inner = s1 @ cov2 @ s1  # symmetric PSD, same eigenvalues as cov1 @ cov2
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    fid = diff.dot(diff) + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return max(float(fid), 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two accumulated feature sets."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


# ----------------------------------------------------------------------------- reconstruction report


def _check_unit_range(t: torch.Tensor, what: str) -> None:
    lo, hi = float(t.min()), float(t.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE or math.isnan(lo) or math.isnan(hi):
        raise DataError(
            f"reconstruction_metrics: {what} have values in [{lo:.4g}, {hi:.4g}], expected [0, 1]; "
            "clamp decoder outputs with .clamp(0, 1) and scale uint8 images by 1/255"
        )


@torch.no_grad()
def reconstruction_metrics(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], feature_net: FeatureNet
) -> dict[str, Any]:
    """Mean PSNR, mean SSIM and rFID over (original, reconstruction) batches in [0, 1], ``(B, 3, H, W)``.

    PSNR of a perfect reconstruction is infinite; it counts as ``PSNR_CAP_DB`` in the mean and is
    reported in ``identical_images``. rFID compares the feature statistics of all originals with those
    of all reconstructions; it needs at least two images and is strongly biased upwards for small sets.
    """
    n = 0
    identical = 0
    psnr_sum = 0.0
    ssim_sum = 0.0
    real = FeatureStats(feature_net.dim)
    fake = FeatureStats(feature_net.dim)
    for original, recon in pairs:
        _check_pair(original, recon, "reconstruction_metrics")
        _check_unit_range(original, "originals")
        _check_unit_range(recon, "reconstructions")
        p = psnr(original, recon)
        identical += int(torch.isinf(p).sum())
        psnr_sum += float(p.clamp_max(PSNR_CAP_DB).sum())
        ssim_sum += float(ssim(original, recon).sum())
        real.update(feature_net(original))
        fake.update(feature_net(recon))
        n += original.shape[0]
    if n < 2:
        raise DataError(
            f"reconstruction_metrics: got {n} image pair(s), rFID needs at least 2; evaluate on more images"
        )
    return {
        "num_images": n,
        "psnr": psnr_sum / n,
        "psnr_cap_db": PSNR_CAP_DB,
        "identical_images": identical,
        "ssim": ssim_sum / n,
        "rfid": fid_from_stats(real, fake),
        "fid_network": feature_net.label,
        "fid_feature_dim": feature_net.dim,
    }
