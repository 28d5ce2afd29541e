"""Class-conditional RAE latents: the flow-matching objective the DiT trainer calls, and the sampling entry point.

Path, time convention and target are `transport.py`'s (t = 0 data, t = 1 noise, x_t = (1 − t)·x₀ + t·ε, target
ε − x₀, unweighted mean of squares per sample). Training times are logit-normal (μ = 0, σ = 1, RAE's
`logit-normal_0_1`), shifted by t' = s·t / (1 + (s − 1)·t) with s = sqrt(C·H·W / 4096): √48 ≈ 6.93 for RAE's
768 × 16 × 16 latents, √192 ≈ 13.86 for 768 × 32 × 32.

One intentional difference from RAE: RAE truncates the logit-normal to [0, 0.999] before the shift; srae samples it
untruncated (P(t > 0.999) = 2.6e-12 under N(0, 1), so the distributions agree to that mass).

Sampling (`sample_class_latents`) runs the one sampler of `sampler.py` with the model's null label as the null
condition of classifier-free guidance, after one-line checks of the labels, the noise and the guidance model.
"""

from __future__ import annotations

import torch
from torch import nn

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.guidance import Guidance
from scale_rae_core.flow.sampler import FlowSampler, NoiseFn, SamplerConfig
from scale_rae_core.flow.transport import BASE_DIM, FlowMatching, dimension_shift


def latent_shift(latent_shape: tuple[int, int, int], base: int = BASE_DIM) -> float:
    """s = sqrt(C·H·W / base) for latents shaped (C, H, W): RAE's `time_dist_shift` (shift dim = tokens × channels)."""
    if len(latent_shape) != 3:
        raise ConfigError(f"latent shape must be (C, H, W), got {tuple(latent_shape)}")
    C, H, W = latent_shape
    return dimension_shift(H * W, C, base)


def class_flow(latent_shape: tuple[int, int, int], base: int = BASE_DIM, logit_mean: float = 0.0,
               logit_std: float = 1.0) -> FlowMatching:
    """The training-time flow for latents shaped (C, H, W): logit-normal(μ, σ) times (RAE: (0, 1)) with the
    dimension shift."""
    return FlowMatching(shift=latent_shift(latent_shape, base), logit_mean=logit_mean, logit_std=logit_std)


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


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels must be integers in [0, num_classes); one-line error naming the first bad one."""
    if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"class labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ConfigError(f"class label {int(bad[0])} is outside the model's {num_classes} classes (0..{num_classes - 1})")


def check_class_guidance(model: nn.Module, guidance: Guidance, guide_model: nn.Module | None) -> None:
    """One-line errors for a guidance setup that cannot work with the class DiT `model` (then `check_guidance`)."""
    if guidance.method == "cfg" and guidance.enabled and not model.has_null_label:
        raise ConfigError(
            "classifier-free guidance needs a model trained with class dropout (it has no null class); "
            "use --guidance 1 or autoguidance"
        )
    if guide_model is None:
        return
    main, guide = model.cfg, guide_model.cfg
    if (guide.in_channels, guide.grid) != (main.in_channels, main.grid):
        raise ConfigError(
            f"the guidance model works on latents {guide.in_channels}x{guide.grid}x{guide.grid}, the model on "
            f"{main.in_channels}x{main.grid}x{main.grid}; use a guidance model trained on the same latents"
        )
    if guide.num_classes != main.num_classes:
        raise ConfigError(
            f"the guidance model has {guide.num_classes} classes, the model {main.num_classes}; use a guidance "
            "model trained on the same classes"
        )


@torch.no_grad()
def sample_class_latents(
    model: nn.Module,
    labels: torch.Tensor,
    noise: torch.Tensor,
    shift: float,
    sampler: SamplerConfig | None = None,
    guidance: Guidance | None = None,
    guide_model: nn.Module | None = None,
    step_noise: NoiseFn | None = None,
) -> torch.Tensor:
    """Latents (B, C, g, g) float32 for `labels` (B,) from `noise` (B, C, g, g) at t = 1.

    `model` (and `guide_model`) is a `ClassDiT` / `DiTwDDTHead` (anything with `.cfg`, `.null_label`,
    `.has_null_label` and `(x, t, y) -> v`), in eval mode. `step_noise` draws the SDE's per-step noise
    (default: torch's global generator).
    """
    guidance = guidance or Guidance()
    cfg = model.cfg
    check_labels(labels, cfg.num_classes)
    check_class_guidance(model, guidance, guide_model)
    if tuple(noise.shape[1:]) != (cfg.in_channels, cfg.grid, cfg.grid) or noise.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"noise {tuple(noise.shape)} does not fit {labels.shape[0]} labels and the model's latents "
            f"({cfg.in_channels}, {cfg.grid}, {cfg.grid})"
        )
    null = torch.tensor(model.null_label, device=labels.device) if model.has_null_label else None
    out = FlowSampler(sampler or SamplerConfig(), shift).sample(
        model, noise.float(), labels, guidance=guidance, null_cond=null, guide_model=guide_model, step_noise=step_noise,
    )
    return out.float()
