"""Rectified-flow matching: the path, time sampling and the training loss, for any velocity network.

Time convention (the reference's; pinned by tests/flow/test_transport.py):

    t = 0 is data, t = 1 is noise.
    x_t = (1 − t)·x₀ + t·ε,   ε ~ N(0, I)
    the network predicts the velocity  v = dx_t/dt = ε − x₀,  so sampling integrates from t = 1 down to t = 0.

Training times are logit-normal, t = sigmoid(u) with u ~ N(mean, std²) (default N(0, 1)), then shifted
towards noise by t' = s·t / (1 + (s − 1)·t) with the dimension-dependent factor s = sqrt(N·C / base),
base = 4096 (SD3's convention; 256 tokens × 1152 channels gives s = √72 ≈ 8.49, median t' ≈ 0.89).
The loss is the unweighted mean over all elements of (v̂ − v)², one value per sample.

Noise is always drawn in float32 and the path and target are formed in float32 (the reference draws ε in
bfloat16). `x_t` is cast to x₀'s dtype before it goes into the network; the loss is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from scale_rae_core.errors import ConfigError

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x_t, t (B,), cond) -> v̂

BASE_DIM = 4096


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    """t' = s·t / (1 + (s − 1)·t): keeps 0 and 1 fixed, moves mass towards 1 (noise) for s > 1."""
    return s * t / (1 + (s - 1) * t)


def dimension_shift(num_tokens: int, channels: int, base: int = BASE_DIM) -> float:
    """s = sqrt(N·C / base); √72 ≈ 8.485 for 256 tokens × 1152 channels."""
    if num_tokens < 1 or channels < 1 or base < 1:
        raise ConfigError(
            f"flow shift needs positive num_tokens, channels and base_dim, got {num_tokens}, {channels}, {base}"
        )
    return math.sqrt(num_tokens * channels / base)


def sample_t(
    batch_size: int,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Shifted logit-normal training times, (B,) float32 in (0, 1).

    The generator, when given, must live on `device`.
    """
    u = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32) * std + mean
    return shift_time(torch.sigmoid(u), shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x₀ + t·ε with t (B,) broadcast over the remaining dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ..., 1)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = dx_t/dt = ε − x₀."""
    return noise - x0


class FlowMatching:
    """Velocity-prediction rectified flow with shifted logit-normal times.

    `FlowMatching.for_latents(256, 1152)` gives the Scale-RAE setting (s = √72).
    """

    def __init__(self, shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        if shift <= 0:
            raise ConfigError(f"flow.shift must be > 0, got {shift}")
        if logit_std <= 0:
            raise ConfigError(f"flow.logit_std must be > 0, got {logit_std}")
        self.shift = shift
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    @classmethod
    def for_latents(
        cls, num_tokens: int, channels: int, base: int = BASE_DIM, **kwargs: float
    ) -> FlowMatching:
        return cls(shift=dimension_shift(num_tokens, channels, base), **kwargs)

    def sample_t(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        return sample_t(batch_size, generator, self.shift, device, self.logit_mean, self.logit_std)

    def loss(
        self,
        model_fn: VelocityFn,
        x0: torch.Tensor,
        cond: Any,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (B,) = mean over all non-batch elements of (model_fn(x_t, t, cond) − (ε − x₀))².

        t and ε are drawn (float32, from `generator` if given; it must live on x0's device) unless passed.
        """
        B = x0.shape[0]
        if t is None:
            t = self.sample_t(B, generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x0f = x0.float()
        x_t = interpolate(x0f, noise.float(), t.float())
        target = velocity_target(x0f, noise.float())
        pred = model_fn(x_t.to(x0.dtype), t, cond)
        return (pred.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
