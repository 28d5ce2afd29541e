"""Guidance for class-conditional velocity models: none, classifier-free guidance, autoguidance.

All three give the velocity at one time t of the sampler's grid (t = 1 noise, 0 data), for a batch x (B, ...)
and labels y (B,):

* `none`: v(x, t, y).
* `cfg`: v_u + w·(v_c − v_u), v_c = v(x, t, y), v_u = v(x, t, null) with the model's null class, from one forward
  over 2B rows [y; null].
* `autoguidance`: v_g + w·(v − v_g), v_g from a second, weaker guidance model on the same x, t, y (RAE: DiT^DH-S
  trained briefly). Two forwards of B rows each; the batch is not doubled (RAE's scripts double it and discard
  half, rae.md §6.4).

Guidance acts only where t lies in the closed `interval` (RAE's `t_min`/`t_max`, in transport time); elsewhere,
and whenever w = 1, the plain conditional velocity is used and the second forward is skipped. Every sample of
a batch shares the grid's t, so the choice is made on the host per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scale_rae_core.errors import ConfigError

GUIDANCE_METHODS = ("none", "cfg", "autoguidance")


@dataclass(frozen=True)
class Guidance:
    method: str = "none"  # none | cfg | autoguidance
    scale: float = 1.0  # w; RAE: autoguidance 1.42 at 256 px, 1.5 at 512 px
    interval: tuple[float, float] = (0.0, 1.0)  # closed [t_min, t_max] where guidance applies

    def __post_init__(self) -> None:
        if self.method not in GUIDANCE_METHODS:
            raise ConfigError(f"unknown guidance method '{self.method}'; choose one of {', '.join(GUIDANCE_METHODS)}")
        if self.scale < 0:
            raise ConfigError(f"guidance scale must be >= 0, got {self.scale}")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"guidance interval must be (t_min, t_max) with 0 <= t_min <= t_max <= 1, got {self.interval}")

    def active_at(self, t: float) -> bool:
        """Whether the guided combination (and its second forward) is used at time t."""
        lo, hi = self.interval
        return self.method != "none" and self.scale != 1.0 and lo <= t <= hi


def check_guidance(model: nn.Module, guidance: Guidance, guide_model: nn.Module | None) -> None:
    """One-line errors for a guidance setup that cannot work with `model`."""
    if guidance.method == "cfg" and guidance.scale != 1.0 and not model.has_null_label:
        raise ConfigError(
            "classifier-free guidance needs a model trained with class dropout (it has no null class); "
            "use --guidance none or autoguidance"
        )
    if guidance.method != "autoguidance":
        if guide_model is not None:
            raise ConfigError(f"a guidance model was given but the guidance method is '{guidance.method}'; use autoguidance")
        return
    if guide_model is None:
        raise ConfigError("autoguidance needs a guidance model (a weaker model on the same latents); pass one")
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


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels must be integers in [0, num_classes); one-line error naming the first bad one."""
    if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"class labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ConfigError(f"class label {int(bad[0])} is outside the model's {num_classes} classes (0..{num_classes - 1})")


def guided_velocity(
    model: nn.Module,
    x: torch.Tensor,
    t: float,
    labels: torch.Tensor,
    guidance: Guidance,
    guide_model: nn.Module | None = None,
) -> torch.Tensor:
    """The (guided) velocity at time t for x (B, ...) and labels (B,), in float32."""
    B = x.shape[0]
    t_vec = torch.full((B,), t, device=x.device, dtype=torch.float32)
    if not guidance.active_at(t):
        return model(x, t_vec, labels).float()
    w = guidance.scale
    if guidance.method == "cfg":
        null = torch.full_like(labels, model.null_label)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t_vec, t_vec]), torch.cat([labels, null])).float().chunk(2)
        return v_uncond + w * (v_cond - v_uncond)
    assert guide_model is not None, "check_guidance runs before sampling"
    v_main = model(x, t_vec, labels).float()
    v_guide = guide_model(x, t_vec, labels).float()
    return v_guide + w * (v_main - v_guide)
