"""ODE and SDE samplers for class-conditional RAE latents, from noise at t = 1 to data at t = 0 (`transport.py`).

    latents = sample_class_latents(model, labels, noise, shift=latent_shift((768, 16, 16)),
                                   sampler=SamplerConfig("ode", "euler", steps=50),
                                   guidance=Guidance("autoguidance", 1.42), guide_model=small)

Time grid (`time_grid`; every point passes through the shift t' = s·t / (1 + (s − 1)·t)):
* `srae` (default): `steps` intervals from exactly 1 to exactly 0, t_k = shift(1 − k/steps).
* `reference`: RAE's ODE grid, t_k = shift(1 − k·0.999/steps), k = 0 … steps. It stops at shift(0.001) ≈ 0.0069
  at 256 px, and its last step is ≈ 0.125 wide (rae.md §6.3, §12.11). RAE's `num_steps = 50` counts grid
  points: it is `steps = 49` here.

ODE (`sample_ode`): `euler` x ← x + (t_next − t)·v(x, t); `heun` (torchdiffeq's `heun2`, RAE's ODE with
`sampling_method: heun2`) x' = x + Δt·v(x, t), x ← x + Δt·(v(x, t) + v(x', t_next))/2. A Heun step that lands on
t = 0 is an Euler step (as in EDM and `sampler.py`): 2·steps − 1 model calls on the srae grid, 2·steps on the
reference grid.

SDE (`sample_sde`): the reverse-time SDE with the same marginals, dx = [v − D(t)·∇log p] dt + sqrt(2·D(t)) dW̄,
with ∇log p = (−(1 − t)·v − x)/t for the linear path. `euler` is Euler–Maruyama, `heun` RAE's stochastic Heun
(noise first, then a Heun step on the noised point). D(t) is one of `DIFFUSION_FORMS` times `diffusion_norm`.
The interval that lands on t = 0 (where the score is undefined) is, with `last_step="tweedie"` (default), the
denoised mean E[x₀ | x_t] = x − t·v (RAE's `Tweedie` last step; the same as an ODE Euler step to 0); with
`last_step="none"` an Euler–Maruyama step like the others — which is exactly RAE's SDE with `last_step: None`
(its grid then also runs from 1 to 0).

Where srae intentionally differs from RAE's `transport/` (rae.md §12):
* the default grid integrates to t = 0 (§12.11); `grid="reference"` keeps RAE's;
* RAE's default SDE diffusion `SBDM` is negative in the flipped time convention (−t/(1−t), NaN samples, §12.9);
  srae's `sbdm` is +t/(1 − t), the forward process's g²/2, evaluated at min(t, 1 − 1e-3) since it is infinite at
  t = 1; the default is `sigma` (D = t);
* RAE's last SDE step (`Mean`, `Tweedie`, `Euler`) is evaluated at the unshifted time 1 − t1 = 0.04 while the
  sample sits at shift(0.04) ≈ 0.22 (256 px), so it stops short of data; srae's Tweedie step goes from the last
  grid point to 0. (RAE's default `Mean` step, the SDE drift over one big interval, over-corrects: with D = t and
  a point mass it leaves −t·ε of noise; it is not offered.)
* RAE's stochastic Heun with `last_step: None` evaluates the score at t = 0 (NaN); srae takes the first-order step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.guidance import Guidance, check_guidance, check_labels, guided_velocity
from scale_rae_core.flow.transport import shift_time

VelocityAt = Callable[[torch.Tensor, float], torch.Tensor]  # (x (B, ...), t) -> v (B, ...) float32
NoiseFn = Callable[[torch.Size], torch.Tensor]  # shape -> standard normal float32 noise of that shape

REFERENCE_T1 = 1 - 1 / 1000  # RAE's check_interval end point for velocity + linear path
SBDM_EPS = 1e-3
SAMPLER_MODES = ("ode", "sde")
SAMPLER_METHODS = ("euler", "heun")
GRIDS = ("srae", "reference")
LAST_STEPS = ("tweedie", "none")

DIFFUSION_FORMS: dict[str, Callable[[float, float], float]] = {
    "constant": lambda t, norm: norm,
    "sigma": lambda t, norm: norm * t,
    "linear": lambda t, norm: norm * t,
    "decreasing": lambda t, norm: 0.25 * (norm * math.cos(math.pi * (1 - t)) + 1) ** 2,
    "increasing-decreasing": lambda t, norm: norm * math.sin(math.pi * (1 - t)) ** 2,
    "sbdm": lambda t, norm: norm * min(t, 1 - SBDM_EPS) / (1 - min(t, 1 - SBDM_EPS)),
}


@dataclass(frozen=True)
class SamplerConfig:
    mode: str = "ode"  # ode | sde
    method: str = "euler"  # euler | heun
    steps: int = 50  # intervals of the grid
    grid: str = "srae"  # srae | reference (ODE only)
    diffusion: str = "sigma"  # SDE: one of DIFFUSION_FORMS
    diffusion_norm: float = 1.0
    last_step: str = "tweedie"  # SDE: tweedie | none

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("mode", self.mode, SAMPLER_MODES), ("method", self.method, SAMPLER_METHODS),
            ("grid", self.grid, GRIDS), ("diffusion", self.diffusion, tuple(DIFFUSION_FORMS)),
            ("last_step", self.last_step, LAST_STEPS),
        ):
            if value not in allowed:
                raise ConfigError(f"sampler {name} '{value}' is unknown; choose one of {', '.join(allowed)}")
        if self.steps < 1:
            raise ConfigError(f"sampler steps must be >= 1, got {self.steps}")
        if self.mode == "sde" and self.grid != "srae":
            raise ConfigError("the reference grid is RAE's ODE grid; the SDE runs on the srae grid (set grid = 'srae')")
        if self.diffusion_norm < 0:
            raise ConfigError(f"sampler diffusion_norm must be >= 0, got {self.diffusion_norm}")


def time_grid(steps: int, shift: float, grid: str = "srae") -> list[float]:
    """`steps + 1` decreasing times (float64 maths) from 1 towards 0; see the module docstring."""
    if steps < 1 or shift <= 0 or grid not in GRIDS:
        raise ConfigError(f"time grid needs steps >= 1, shift > 0 and grid in {GRIDS}; got {steps}, {shift}, {grid!r}")
    end = 1.0 if grid == "srae" else REFERENCE_T1
    raw = 1 - torch.linspace(0.0, end, steps + 1, dtype=torch.float64)
    return [float(t) for t in shift_time(raw, shift)]


def sample_ode(velocity: VelocityAt, noise: torch.Tensor, grid: list[float], method: str = "euler") -> torch.Tensor:
    """Integrate dx/dt = v from `noise` at grid[0] to grid[-1] (float32)."""
    x = noise.float()
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        if method == "heun" and t_next > 0:
            x = x + dt * 0.5 * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """∇log p_t(x) = (−(1 − t)·v − x)/t for x_t = (1 − t)·x₀ + t·ε and v = ε − x₀ (t > 0)."""
    return (-(1 - t) * v - x) / t


def sample_sde(
    velocity: VelocityAt,
    noise: torch.Tensor,
    grid: list[float],
    step_noise: NoiseFn,
    method: str = "euler",
    diffusion: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str = "tweedie",
) -> torch.Tensor:
    """Integrate the reverse SDE from `noise` at grid[0] to grid[-1] (float32); `step_noise` draws each step's ξ."""
    form = DIFFUSION_FORMS[diffusion]

    def drift(x: torch.Tensor, t: float) -> torch.Tensor:
        v = velocity(x, t)
        return v - form(t, diffusion_norm) * score_from_velocity(v, x, t)

    x = noise.float()
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        dt = t - t_next  # > 0: time runs backwards
        if t_next <= 0 and last_step == "tweedie":
            x = x - t * velocity(x, t)  # E[x₀ | x_t]
            continue
        kick = math.sqrt(2 * form(t, diffusion_norm) * dt) * step_noise(x.shape).to(x)
        if method == "heun" and t_next > 0:
            x_hat = x + kick
            k1 = drift(x_hat, t)
            k2 = drift(x_hat - dt * k1, t_next)
            x = x_hat - 0.5 * dt * (k1 + k2)
        else:
            x = x - dt * drift(x, t) + kick
    return x


def generator_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Step noise from one torch generator (which must live on the latents' device)."""

    def draw(shape: torch.Size) -> torch.Tensor:
        device = generator.device if generator is not None else None
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    return draw


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

    `model` (and `guide_model`) is a `ClassDiT` / `DiTwDDTHead` (anything with `.cfg` and `(x, t, y) -> v`), in
    eval mode. `step_noise` draws the SDE's per-step noise (default: torch's global generator).
    """
    sampler = sampler or SamplerConfig()
    guidance = guidance or Guidance()
    cfg = model.cfg
    check_labels(labels, cfg.num_classes)
    check_guidance(model, guidance, guide_model)
    if tuple(noise.shape[1:]) != (cfg.in_channels, cfg.grid, cfg.grid) or noise.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"noise {tuple(noise.shape)} does not fit {labels.shape[0]} labels and the model's latents "
            f"({cfg.in_channels}, {cfg.grid}, {cfg.grid})"
        )

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(model, x, t, labels, guidance, guide_model)

    grid = time_grid(sampler.steps, shift, sampler.grid)
    if sampler.mode == "ode":
        return sample_ode(velocity, noise, grid, sampler.method)
    return sample_sde(velocity, noise, grid, step_noise or generator_noise(), sampler.method,
                      sampler.diffusion, sampler.diffusion_norm, sampler.last_step)
