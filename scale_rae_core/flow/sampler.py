"""ODE samplers for the flow in `transport.py` (t = 1 noise -> t = 0 data), diffusers-style.

    sampler = FlowSampler("euler", shift=dimension_shift(256, 1152))
    sampler.set_timesteps(50)            # sampler.timesteps: where the model is evaluated
    x = sampler.sample(model_fn, noise, cond, steps=50, guidance=3.0, null_cond=null)

Methods:
* `euler` (default) and `heun`: `steps` intervals on the shifted grid t_k = shift(1 − k/steps), from exactly
  1 to exactly 0. Euler makes `steps` model calls; Heun makes two per interval except the last (to t = 0),
  which is a plain Euler step as in EDM, so 2·steps − 1 calls.
* `reference`: the released Scale-RAE sampler, kept so published samples can be matched. With
  T = 1000 training steps, used = `space_timesteps(T, steps)` and τ(k) = shift((k + 1)/T), it Euler-steps
  τ(used[i]) -> τ(used[i−1]) for i = steps−2 … 1 (for 50 steps: 0.9976 … down to 0.0084), then takes a
  final Euler step from τ(used[−2]) = 0.9976 to τ(used[−1]) = 1.0 evaluated at the nearly clean sample — a
  small re-noising step (reference notes §2.3, §8.2). steps − 1 model calls; integration never reaches 0.

Guidance (`guided_velocity`): v_u + w·(v_c − v_u) from one forward over 2B rows [cond; null]; w = 1 runs the
conditional rows only; with `interval = (lo, hi)` guidance applies where lo ≤ t ≤ hi and the conditional
velocity elsewhere. The loop never reads tensor values on the host.
"""

from __future__ import annotations

from typing import Any

import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.transport import VelocityFn, shift_time

SAMPLER_METHODS = ("euler", "heun", "reference")
REFERENCE_TRAIN_STEPS = 1000


def space_timesteps(num_train_steps: int, count: int) -> list[int]:
    """`count` integer indices spread evenly over [0, num_train_steps − 1], both ends included.

    For (1000, 50): 0, 20, 41, …, 958, 979, 999 — the reference's respacing of a single section.
    """
    if not 1 <= count <= num_train_steps:
        raise ConfigError(f"sampler steps must be in [1, {num_train_steps}], got {count}")
    if count == 1:
        return [0]
    stride = (num_train_steps - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


def corrected_grid(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float64: shift(1 − k/steps), from exactly 1.0 to exactly 0.0."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def reference_schedule(
    steps: int, shift: float, train_steps: int = REFERENCE_TRAIN_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_cur, t_next), each (steps − 1,) float64, of the released sampler (see the module docstring)."""
    if steps < 2:
        raise ConfigError(f"the reference sampler needs at least 2 steps, got {steps}")
    used = space_timesteps(train_steps, steps)

    def tau(k: int) -> float:
        return float(shift_time(torch.tensor((k + 1) / train_steps, dtype=torch.float64), shift))

    t_cur = [tau(used[i]) for i in range(steps - 2, 0, -1)] + [tau(used[-2])]
    t_next = [tau(used[i - 1]) for i in range(steps - 2, 0, -1)] + [tau(used[-1])]
    return torch.tensor(t_cur, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64)


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard normal float32 noise (the generator, if given, must live on `device`)."""
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t () or (B,) -> broadcastable against `like` (B, ...)."""
    if t.dim() == 0:
        return t
    return t.view(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)


def guided_velocity(
    model_fn: VelocityFn,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    guidance: float = 1.0,
    null_cond: torch.Tensor | None = None,
    interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Classifier-free-guided velocity; one model call (B rows if guidance == 1, else 2B rows)."""
    if guidance == 1.0:
        return model_fn(x, t, cond)
    if null_cond is None:
        raise ConfigError("guidance != 1 needs the null condition (null_cond); pass it or set guidance to 1")
    uncond = null_cond.expand_as(cond).to(cond.dtype)
    v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
    guided = v_uncond + guidance * (v_cond - v_uncond)
    if interval is None:
        return guided
    inside = _per_sample((t >= interval[0]) & (t <= interval[1]), guided)
    return torch.where(inside, guided, v_cond)


class FlowSampler:
    """Integrates dx/dt = v(x, t) from noise at t = 1 towards data at t = 0."""

    def __init__(
        self, method: str = "euler", shift: float = 1.0, train_steps: int = REFERENCE_TRAIN_STEPS
    ) -> None:
        if method not in SAMPLER_METHODS:
            raise ConfigError(
                f"unknown sampler method '{method}'; choose one of {', '.join(SAMPLER_METHODS)}"
            )
        if shift <= 0:
            raise ConfigError(f"sampler shift must be > 0, got {shift}")
        self.method = method
        self.shift = shift
        self.train_steps = train_steps
        self.timesteps: torch.Tensor = torch.empty(0)  # (K,) float32: evaluation time of each step
        self.timesteps_next: torch.Tensor = torch.empty(0)  # (K,) float32: where each step lands

    def set_timesteps(self, num_steps: int, device: torch.device | str | None = None) -> None:
        if num_steps < 1:
            raise ConfigError(f"sampler steps must be >= 1, got {num_steps}")
        if self.method == "reference":
            t_cur, t_next = reference_schedule(num_steps, self.shift, self.train_steps)
        else:
            grid = corrected_grid(num_steps, self.shift)
            t_cur, t_next = grid[:-1], grid[1:]
        self.timesteps = t_cur.to(device=device, dtype=torch.float32)
        self.timesteps_next = t_next.to(device=device, dtype=torch.float32)

    @property
    def num_model_calls(self) -> int:
        """Model calls per `sample` for the current timesteps (each with 2B rows under guidance)."""
        steps = len(self.timesteps)
        return 2 * steps - 1 if self.method == "heun" else steps

    def step(self, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One Euler step x + (t_next − t)·v, computed in float32 and returned in x's dtype."""
        dt = _per_sample(t_next - t, x).float()
        return (x.float() + dt * v.float()).to(x.dtype)

    def sample(
        self,
        model_fn: VelocityFn,
        noise: torch.Tensor,
        cond: Any,
        steps: int,
        guidance: float = 1.0,
        null_cond: torch.Tensor | None = None,
        interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from `noise` (B, ...) at t = 1; `model_fn(x, t (B,), cond) -> v`."""
        if interval is not None and interval[0] > interval[1]:
            raise ConfigError(f"guidance interval must be (low, high) with low <= high, got {interval}")
        self.set_timesteps(steps, noise.device)
        B = noise.shape[0]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_velocity(model_fn, x, t, cond, guidance, null_cond, interval)

        x = noise
        last = len(self.timesteps) - 1
        for k in range(len(self.timesteps)):
            t = self.timesteps[k].expand(B)
            t_next = self.timesteps_next[k].expand(B)
            v = velocity(x, t)
            x_euler = self.step(v, t, t_next, x)
            if self.method == "heun" and k < last:
                v_next = velocity(x_euler, t_next)
                x = self.step((v.float() + v_next.float()) / 2, t, t_next, x)
            else:
                x = x_euler
        return x
