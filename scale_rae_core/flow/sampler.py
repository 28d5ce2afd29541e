"""The one flow sampler, for the Scale-RAE head and for class-conditional DiTs, diffusers-style.

    sampler = FlowSampler(SamplerConfig("heun", steps=50), shift=dimension_shift(256, 1152))
    sampler.set_timesteps(device)         # sampler.timesteps / timesteps_next: the intervals, float32
    x = sampler.sample(model, noise, cond, guidance=Guidance("cfg", 3.0), null_cond=null)

It integrates from noise at t = 1 towards data at t = 0 (`transport.py`) on one of the time grids of `grids.py`.
The sampler names, defined here once for every command (`--sampler`):

| name        | integrator          | grid        | model calls (K intervals)        |
|-------------|---------------------|-------------|----------------------------------|
| `euler`     | ODE, Euler          | `srae`      | K = steps                        |
| `heun`      | ODE, Heun           | `srae`      | 2K − 1 (the step to t = 0 is Euler, as in EDM) |
| `sde`       | SDE, Euler–Maruyama | `srae`      | K                                |
| `sde-heun`  | SDE, stochastic Heun| `srae`      | 2K − 1                           |
| `rae-euler` | ODE, Euler          | `rae`       | K = steps (RAE's num_steps − 1)  |
| `rae-heun`  | ODE, Heun (torchdiffeq `heun2`) | `rae` | 2K                            |
| `reference` | ODE, Euler          | `scale-rae` | K = steps − 1                    |

ODE: x ← x + (t_next − t)·v(x, t); Heun x' = x + Δt·v(x, t), x ← x + Δt·(v(x, t) + v(x', t_next))/2, except on an
interval that lands on t = 0. Each step is computed in float32 with Δt = t_next − t of the float32 grid, and
returned in x's dtype (the Scale-RAE sampler's arithmetic, kept bit for bit). The model sees t as float32 (B,).

SDE: the reverse-time SDE with the same marginals, dx = [v − D(t)·∇log p] dt + sqrt(2·D(t)) dW̄, with
∇log p = (−(1 − t)·v − x)/t for the linear path. `sde-heun` is RAE's stochastic Heun (noise first, then a Heun step
on the noised point). D(t) is one of `DIFFUSION_FORMS` times `diffusion_norm`. The interval that lands on t = 0
(where the score is undefined) is, with `last_step="tweedie"` (default), the denoised mean E[x₀ | x_t] = x − t·v
(RAE's `Tweedie` last step; the same as an ODE Euler step to 0); with `last_step="none"` an Euler–Maruyama step
like the others — exactly RAE's SDE with `last_step: None` (its grid then also runs from 1 to 0).

Where srae intentionally differs from RAE's `transport/` (rae.md §12):
* the default grid integrates to t = 0 (§12.11); `rae-euler` / `rae-heun` keep RAE's grid;
* RAE's default SDE diffusion `SBDM` is negative in the flipped time convention (−t/(1−t), NaN samples, §12.9);
  srae's `sbdm` is +t/(1 − t), the forward process's g²/2, evaluated at min(t, 1 − 1e-3) since it is infinite at
  t = 1; the default is `sigma` (D = t);
* RAE's last SDE step (`Mean`, `Tweedie`, `Euler`) is evaluated at the unshifted time 1 − t1 = 0.04 while the
  sample sits at shift(0.04) ≈ 0.22 (256 px), so it stops short of data; srae's Tweedie step goes from the last
  grid point to 0. (RAE's default `Mean` step, the SDE drift over one big interval, over-corrects: with D = t and
  a point mass it leaves −t·ε of noise; it is not offered.)
* RAE's stochastic Heun with `last_step: None` evaluates the score at t = 0 (NaN); srae takes the first-order step.

Guidance (`guidance.py`) is decided per interval on the host from the float32 grid, so the loop never reads a
tensor value from the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.grids import schedule
from scale_rae_core.flow.guidance import Guidance, VelocityModel, check_guidance, guided_velocity

NoiseFn = Callable[[torch.Size], torch.Tensor]  # shape -> standard normal float32 noise of that shape

# --sampler NAME -> (mode, method, grid); see the module docstring
MAX_STEPS = 10_000  # sampler steps; the references use 50
SAMPLERS: dict[str, tuple[str, str, str]] = {
    "euler": ("ode", "euler", "srae"),
    "heun": ("ode", "heun", "srae"),
    "sde": ("sde", "euler", "srae"),
    "sde-heun": ("sde", "heun", "srae"),
    "rae-euler": ("ode", "euler", "rae"),
    "rae-heun": ("ode", "heun", "rae"),
    "reference": ("ode", "euler", "scale-rae"),
}
SBDM_EPS = 1e-3
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
    method: str = "euler"  # one of SAMPLERS
    steps: int = 50  # intervals of the grid (`reference`: respaced timesteps, steps − 1 intervals)
    diffusion: str = "sigma"  # SDE: one of DIFFUSION_FORMS
    diffusion_norm: float = 1.0  # SDE: D(t) scale
    last_step: str = "tweedie"  # SDE: tweedie | none

    def __post_init__(self) -> None:
        if self.method not in SAMPLERS:
            raise ConfigError(f"--sampler '{self.method}' is unknown; choose one of {', '.join(SAMPLERS)}")
        least = 2 if self.grid == "scale-rae" else 1
        if not least <= self.steps <= MAX_STEPS:
            raise ConfigError(f"--steps {self.steps}: the {self.method} sampler takes {least} to {MAX_STEPS} steps")
        if self.diffusion not in DIFFUSION_FORMS:
            raise ConfigError(f"sampler diffusion '{self.diffusion}' is unknown; choose one of {', '.join(DIFFUSION_FORMS)}")
        if self.last_step not in LAST_STEPS:
            raise ConfigError(f"sampler last_step '{self.last_step}' is unknown; choose one of {', '.join(LAST_STEPS)}")
        if not (math.isfinite(self.diffusion_norm) and self.diffusion_norm >= 0):
            raise ConfigError(f"sampler diffusion_norm must be >= 0, got {self.diffusion_norm}")

    @property
    def mode(self) -> str:
        return SAMPLERS[self.method][0]  # ode | sde

    @property
    def heun(self) -> bool:
        return SAMPLERS[self.method][1] == "heun"

    @property
    def grid(self) -> str:
        return SAMPLERS[self.method][2]


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """∇log p_t(x) = (−(1 − t)·v − x)/t for x_t = (1 − t)·x₀ + t·ε and v = ε − x₀ (t > 0)."""
    return (-(1 - t) * v - x) / t


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard normal float32 noise (the generator, if given, must live on `device`)."""
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def generator_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Noise from one torch generator (which must live on the latents' device); None: torch's global one."""

    def draw(shape: torch.Size) -> torch.Tensor:
        device = generator.device if generator is not None else None
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    return draw


class PerSampleNoise:
    """Standard normal noise per sample from its own CPU generator seeded with that sample's seed, moved to
    `device`: the initial noise first, then each SDE step. A sample depends only on its seed, not on its batch."""

    def __init__(self, seeds: list[int], device: torch.device | str) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def __call__(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples requested from {len(self.generators)} generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(self.device)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (B,) -> broadcastable against `like` (B, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)


class FlowSampler:
    """Integrates the flow of a velocity model from noise at t = 1 towards data at t = 0 (see the module docstring)."""

    def __init__(self, config: SamplerConfig, shift: float) -> None:
        if shift <= 0:
            raise ConfigError(f"sampler shift must be > 0, got {shift}")
        self.config, self.shift = config, shift
        self.timesteps: torch.Tensor = torch.empty(0)  # (K,) float32: where each interval's model call is
        self.timesteps_next: torch.Tensor = torch.empty(0)  # (K,) float32: where each interval lands
        self._host: list[tuple[float, float]] = []  # the same values on the host

    def set_timesteps(self, device: torch.device | str | None = None) -> None:
        t_cur, t_next = schedule(self.config.grid, self.config.steps, self.shift)
        t_cur, t_next = t_cur.float(), t_next.float()
        self._host = list(zip(t_cur.tolist(), t_next.tolist(), strict=True))
        self.timesteps, self.timesteps_next = t_cur.to(device), t_next.to(device)

    @property
    def num_model_calls(self) -> int:
        """Model calls per `sample` without guidance (CFG doubles the rows, autoguidance the calls)."""
        if not self._host:
            self.set_timesteps()
        heun_steps = sum(1 for _, t_next in self._host if t_next > 0) if self.config.heun else 0
        return len(self._host) + heun_steps

    def step(self, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One Euler step x + (t_next − t)·v, computed in float32 and returned in x's dtype."""
        dt = _per_sample(t_next - t, x).float()
        return (x.float() + dt * v.float()).to(x.dtype)

    def sample(
        self,
        model: VelocityModel,
        noise: torch.Tensor,
        cond: Any,
        *,
        guidance: Guidance | None = None,
        null_cond: torch.Tensor | None = None,
        guide_model: VelocityModel | None = None,
        step_noise: NoiseFn | None = None,
    ) -> torch.Tensor:
        """x at the schedule's end from `noise` (B, ...) at its start; `model(x, t (B,), cond) -> v`.

        `null_cond` / `guide_model`: what CFG / autoguidance need. `step_noise` draws the SDE's per-step noise
        (default: torch's global generator).
        """
        guidance = guidance or Guidance()
        check_guidance(guidance, null_cond, guide_model)
        self.set_timesteps(noise.device)
        B = noise.shape[0]
        active = [(guidance.active_at(t), guidance.active_at(t_next)) for t, t_next in self._host]

        def velocity(x: torch.Tensor, k: int, which: int) -> torch.Tensor:
            t = (self.timesteps if which == 0 else self.timesteps_next)[k].expand(B)
            return guided_velocity(model, x, t, cond, guidance, active=active[k][which], null_cond=null_cond,
                                   guide_model=guide_model)

        if self.config.mode == "sde":
            return self._sde(velocity, noise, step_noise or generator_noise())
        x = noise
        for k, (_, t_next_host) in enumerate(self._host):
            t, t_next = self.timesteps[k].expand(B), self.timesteps_next[k].expand(B)
            v = velocity(x, k, 0)
            x_euler = self.step(v, t, t_next, x)
            if self.config.heun and t_next_host > 0:
                v_next = velocity(x_euler, k, 1)
                x = self.step((v.float() + v_next.float()) / 2, t, t_next, x)
            else:
                x = x_euler
        return x

    def _sde(self, velocity: Callable[[torch.Tensor, int, int], torch.Tensor], noise: torch.Tensor,
             step_noise: NoiseFn) -> torch.Tensor:
        """The reverse SDE in float32 (see the module docstring); coefficients from the host grid."""
        cfg = self.config
        form = DIFFUSION_FORMS[cfg.diffusion]

        def drift(x: torch.Tensor, k: int, which: int) -> torch.Tensor:
            t = self._host[k][which]
            v = velocity(x, k, which).float()
            return v - form(t, cfg.diffusion_norm) * score_from_velocity(v, x, t)

        x = noise.float()
        for k, (t, t_next) in enumerate(self._host):
            dt = t - t_next  # > 0: time runs backwards
            if t_next <= 0 and cfg.last_step == "tweedie":
                x = x - t * velocity(x, k, 0).float()  # E[x₀ | x_t]
                continue
            kick = math.sqrt(2 * form(t, cfg.diffusion_norm) * dt) * step_noise(x.shape).to(x)
            if cfg.heun and t_next > 0:
                x_hat = x + kick
                k1 = drift(x_hat, k, 0)
                k2 = drift(x_hat - dt * k1, k, 1)
                x = x_hat - 0.5 * dt * (k1 + k2)
            else:
                x = x - dt * drift(x, k, 0) + kick
        return x
