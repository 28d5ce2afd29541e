"""Time grids of the flow samplers (t = 1 noise -> t = 0 data, `transport.py`), all computed in float64.

A sampler walks a schedule of intervals (t_k -> t_next_k). Every point passes through the shift
t' = s·t / (1 + (s − 1)·t) (`transport.shift_time`). Three grids:

* `srae` (the default of every srae sampler): `steps` intervals from exactly 1 to exactly 0,
  t_k = shift(1 − k/steps).
* `rae`: RAE's ODE grid (rae.md §6.3), t_k = shift(1 − k·0.999/steps), k = 0 … steps. It stops at shift(0.001)
  (≈ 0.0069 at 256 px) and its last step is ≈ 0.125 wide (§12.11). RAE's `num_steps = 50` counts grid points:
  it is `steps = 49` here.
* `scale-rae`: the released Scale-RAE sampler's schedule (reference notes §2.3, §8.2). With T = 1000 training
  steps, used = `space_timesteps(T, steps)` and τ(k) = shift((k + 1)/T), it steps τ(used[i]) -> τ(used[i−1]) for
  i = steps−2 … 1 (for 50 steps: 0.9976 … down to 0.0084), then a final step from τ(used[−2]) = 0.9976 to
  τ(used[−1]) = 1.0 evaluated at the nearly clean sample — a small re-noising step. steps − 1 intervals; it
  never reaches 0. Kept exactly so published samples can be matched.
"""

from __future__ import annotations

import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.transport import shift_time

GRIDS = ("srae", "rae", "scale-rae")
REFERENCE_TRAIN_STEPS = 1000  # the released Scale-RAE respacing's training steps
RAE_T1 = 1 - 1 / 1000  # RAE's check_interval end point for velocity prediction on the linear path

Schedule = tuple[torch.Tensor, torch.Tensor]  # (t, t_next), each (K,) float64: the K intervals in order


def space_timesteps(num_train_steps: int, count: int) -> list[int]:
    """`count` integer indices spread evenly over [0, num_train_steps − 1], both ends included, ascending.

    The released respacing (one section): a float position starts at 0 and grows by the stride
    (T − 1)/(count − 1) once per index, and each index is Python's round() of the position reached so far. The
    accumulated sum carries float rounding that ``round(i · stride)`` does not, so the two disagree at some counts
    (21, 23, 31, 35, ...: a position that should be k + 0.5 lands just above or below it); this is the released rule.
    For (1000, 50): 0, 20, 41, …, 958, 979, 999.
    """
    if not 1 <= count <= num_train_steps:
        raise ConfigError(f"sampler steps must be in [1, {num_train_steps}], got {count}")
    stride = 1.0 if count == 1 else (num_train_steps - 1) / (count - 1)
    position, used = 0.0, []
    for _ in range(count):
        used.append(round(position))
        position += stride
    return sorted(set(used))


def srae_grid(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float64: shift(1 − k/steps), from exactly 1.0 to exactly 0.0."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def rae_grid(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float64: RAE's ODE grid shift(1 − k·0.999/steps), from 1.0 to shift(0.001)."""
    return shift_time(1 - torch.linspace(0.0, RAE_T1, steps + 1, dtype=torch.float64), shift)


def reference_schedule(steps: int, shift: float, train_steps: int = REFERENCE_TRAIN_STEPS) -> Schedule:
    """(t, t_next), each (steps − 1,) float64, of the released Scale-RAE sampler (see the module docstring)."""
    if steps < 2:
        raise ConfigError(f"the reference sampler needs at least 2 steps, got {steps}")
    used = space_timesteps(train_steps, steps)

    def tau(k: int) -> float:
        return float(shift_time(torch.tensor((k + 1) / train_steps, dtype=torch.float64), shift))

    t_cur = [tau(used[i]) for i in range(steps - 2, 0, -1)] + [tau(used[-2])]
    t_next = [tau(used[i - 1]) for i in range(steps - 2, 0, -1)] + [tau(used[-1])]
    return torch.tensor(t_cur, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64)


def schedule(grid: str, steps: int, shift: float) -> Schedule:
    """The intervals (t, t_next) of `grid` with `steps` (see the module docstring)."""
    if grid not in GRIDS:
        raise ConfigError(f"unknown time grid '{grid}'; choose one of {', '.join(GRIDS)}")
    if steps < 1:
        raise ConfigError(f"sampler steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ConfigError(f"sampler shift must be > 0, got {shift}")
    if grid == "scale-rae":
        return reference_schedule(steps, shift)
    points = srae_grid(steps, shift) if grid == "srae" else rae_grid(steps, shift)
    return points[:-1], points[1:]
