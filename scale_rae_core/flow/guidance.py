"""Guidance of a velocity model, for any condition: none, classifier-free guidance, autoguidance.

All three give the velocity at one time t of a sampler's schedule (t = 1 noise, 0 data), shared by every sample of
the batch x (B, ...) with conditions `cond` (token conditions (B, N, Z) for the Scale-RAE head, class labels (B,)
for a class DiT):

* `none`: v(x, t, cond).
* `cfg`: v_u + w·(v_c − v_u), v_c = v(x, t, cond), v_u = v(x, t, null) from ONE forward over 2B rows
  [cond; null]. `null_cond` is the model's null condition, broadcast to `cond`'s shape: the Scale-RAE head's
  learned null tokens (1, N, Z), or a class DiT's null label as a 0-d tensor.
* `autoguidance`: v_g + w·(v − v_g), v_g from a second, weaker guidance model on the same x, t, cond (RAE: a
  DiT^DH-S trained briefly). Two forwards of B rows each; the batch is not doubled (RAE's scripts double it and
  discard half, rae.md §6.4).

Guidance acts only where t lies in the closed `interval` (RAE's `t_min`/`t_max`, in transport time); elsewhere,
and whenever w = 1, the plain conditional velocity is used and the second forward is skipped. The sampler decides
this on the host from its own float32 time grid (`Guidance.active_at`), so sampling never reads a device value.
The guided combination is formed in the model's output dtype; samplers step in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scale_rae_core.errors import ConfigError

GUIDANCE_METHODS = ("none", "cfg", "autoguidance")

VelocityModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x (B, ...), t (B,), cond) -> v


MAX_GUIDANCE = 1_000.0  # guidance weights beyond this only blow the latents up (practical ones are below 20)


@dataclass(frozen=True)
class Guidance:
    method: str = "none"  # none | cfg | autoguidance
    scale: float = 1.0  # w; RAE: autoguidance 1.42 at 256 px, 1.5 at 512 px
    interval: tuple[float, float] = (0.0, 1.0)  # closed [t_min, t_max] where guidance applies

    def __post_init__(self) -> None:
        if self.method not in GUIDANCE_METHODS:
            raise ConfigError(f"unknown guidance method '{self.method}'; choose one of {', '.join(GUIDANCE_METHODS)}")
        if not (math.isfinite(self.scale) and 0 <= self.scale <= MAX_GUIDANCE):
            raise ConfigError(f"--guidance {self.scale} must be a number from 0 to {MAX_GUIDANCE:g} (1 = no guidance)")
        if not (len(self.interval) == 2 and all(math.isfinite(v) for v in self.interval)
                and 0.0 <= self.interval[0] <= self.interval[1] <= 1.0):
            raise ConfigError(f"--guidance-interval {self.interval} must be lo,hi with 0 <= lo <= hi <= 1")

    @property
    def enabled(self) -> bool:
        """Whether guidance can act at all (a method and a scale other than 1)."""
        return self.method != "none" and self.scale != 1.0

    def active_at(self, t: float) -> bool:
        """Whether the guided combination (and its second forward) is used at time t.

        t is compared in float32, as the model sees it: float32(lo) <= float32(t) <= float32(hi).
        """
        if not self.enabled:
            return False
        lo, hi, tt = torch.tensor([*self.interval, t], dtype=torch.float32).tolist()
        return lo <= tt <= hi


def check_guidance(guidance: Guidance, null_cond: torch.Tensor | None, guide_model: Any) -> None:
    """One-line errors for a guidance setup that cannot run (any model)."""
    if guidance.method == "cfg" and guidance.enabled and null_cond is None:
        raise ConfigError("classifier-free guidance with a scale other than 1 needs the model's null condition; "
                          "pass it, or set the guidance scale to 1")
    if guidance.method != "autoguidance":
        if guide_model is not None:
            raise ConfigError(f"a guidance model was given but the guidance method is '{guidance.method}'; use autoguidance")
        return
    if guide_model is None:
        raise ConfigError("autoguidance needs a guidance model (a weaker model on the same latents); pass one")


def guided_velocity(
    model: VelocityModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    guidance: Guidance,
    *,
    active: bool | None = None,
    null_cond: torch.Tensor | None = None,
    guide_model: VelocityModel | None = None,
) -> torch.Tensor:
    """The (guided) velocity for x (B, ...) at t (B,) (one time for the whole batch) and `cond` (B, ...).

    `active`: whether t lies in the guidance interval, as `guidance.active_at` says for the host value of t (the
    samplers pass it); None reads t[0] from the device. One forward of B rows when inactive, of 2B rows under
    CFG, two of B rows under autoguidance.
    """
    if active is None:
        active = guidance.active_at(float(t[0]))
    if not active:
        return model(x, t, cond)
    w = guidance.scale
    if guidance.method == "cfg":
        assert null_cond is not None, "check_guidance runs before sampling"
        uncond = null_cond.expand_as(cond).to(cond.dtype)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
        return v_uncond + w * (v_cond - v_uncond)
    assert guide_model is not None, "check_guidance runs before sampling"
    v_main = model(x, t, cond)
    v_guide = guide_model(x, t, cond)
    return v_guide + w * (v_main - v_guide)
