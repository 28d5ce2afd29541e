"""The flow-matching objective for class-conditional RAE latents, as the DiT trainer calls it.

Path, time convention and target are `transport.py`'s (t = 0 data, t = 1 noise, x_t = (1 − t)·x₀ + t·ε, target
ε − x₀, unweighted mean of squares per sample). Training times are logit-normal (μ = 0, σ = 1, RAE's
`logit-normal_0_1`), shifted by t' = s·t / (1 + (s − 1)·t) with s = sqrt(C·H·W / 4096): √48 ≈ 6.93 for RAE's
768 × 16 × 16 latents, √192 ≈ 13.86 for 768 × 32 × 32.

One intentional difference from RAE: RAE truncates the logit-normal to [0, 0.999] before the shift; srae samples it
untruncated (P(t > 0.999) = 2.6e-12 under N(0, 1), so the distributions agree to that mass).
"""

from __future__ import annotations

import torch
from torch import nn

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.transport import BASE_DIM, FlowMatching, dimension_shift


def latent_shift(latent_shape: tuple[int, int, int], base: int = BASE_DIM) -> float:
    """s = sqrt(C·H·W / base) for latents shaped (C, H, W): RAE's `time_dist_shift` (shift dim = tokens × channels)."""
    if len(latent_shape) != 3:
        raise ConfigError(f"latent shape must be (C, H, W), got {tuple(latent_shape)}")
    C, H, W = latent_shape
    return dimension_shift(H * W, C, base)


def class_flow(latent_shape: tuple[int, int, int], base: int = BASE_DIM) -> FlowMatching:
    """The training-time flow for latents shaped (C, H, W): logit-normal(0, 1) times with the dimension shift."""
    return FlowMatching(shift=latent_shift(latent_shape, base))


def class_flow_loss(
    model: nn.Module,
    latents: torch.Tensor,
    labels: torch.Tensor,
    flow: FlowMatching | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample flow-matching loss (B,) of `model(x_t, t, labels)` on normalised latents (B, C, H, W).

    `flow` defaults to `class_flow(latents.shape[1:])`; t and ε come from `generator` (on the latents' device) if
    given. The model is called in its current mode, so label dropout applies when it is training.
    """
    if latents.dim() != 4 or labels.shape != (latents.shape[0],):
        raise ValueError(f"expected latents (B, C, H, W) and labels (B,), got {tuple(latents.shape)}, {tuple(labels.shape)}")
    flow = flow or class_flow(tuple(latents.shape[1:]))
    return flow.loss(lambda x, t, y: model(x, t, y), latents, labels, generator=generator)
