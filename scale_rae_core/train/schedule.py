"""Learning-rate schedules: linear warmup, then cosine decay to a floor, then constant at the floor.

One multiplicative factor is shared by every parameter group; each group keeps its own peak lr (the LLM at
``stage.lr``, the diffusion head at ``stage.head_lr``). Schedulers are ``LambdaLR`` objects stepped once
per optimiser step, so the lr used by optimiser step ``s`` (0-based) is ``peak × factor(s)``:

* warmup, ``s < W``: ``factor = (s + 1) / W`` — from ``peak / W`` at the first step up to exactly ``peak`` at
  step ``W − 1``. (The reference's HF schedule starts at ``0 / W``, spending its first step at lr 0; RAE's
  decoder recipe uses ``(s + 1) / W`` as here.)
* cosine, ``W ≤ s < D``: ``factor = m + (1 − m) · ½ (1 + cos(π (s − W) / (D − W)))`` — 1 at ``s = W``,
  reaching the floor ``m = min_lr_ratio`` at ``s = D``.
* after, ``s ≥ D``: ``factor = m``.

Unified training (:func:`stage_scheduler`) decays over the whole run (``D = steps``) with
``W = ceil(warmup_ratio × steps)`` as HF computes it. The RAE decoder recipe (:func:`rae_scheduler`) warms
up from zero for one epoch, decays from ``base_lr`` to ``final_lr`` by a given step and then stays there.

The RAE stage-2 recipe (:class:`WarmupConstantLinear`, the DiT trainer) holds the peak instead of a cosine:
warmup as above over ``W`` steps (RAE: none), the peak until step ``C``, then a linear decay reaching ``m`` at
``D`` and ``m`` after it (RAE: constant 2e-4 for 40 epochs, linear to 2e-5 at epoch 800, rae.md §7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from scale_rae_core.config import StageSettings
from scale_rae_core.errors import ConfigError


@dataclass(frozen=True)
class WarmupCosine:
    """The lr factor at optimiser step ``s`` (see the module docstring)."""

    warmup_steps: int
    decay_end: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.decay_end < self.warmup_steps:
            raise ValueError(
                f"need 0 <= warmup_steps <= decay_end, got {self.warmup_steps}, {self.decay_end}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.decay_end:
            return self.min_lr_ratio
        progress = (step - self.warmup_steps) / (self.decay_end - self.warmup_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class WarmupConstantLinear:
    """The lr factor at optimiser step ``s``: warmup to 1 over ``warmup_steps``, 1 until ``constant_end``, then
    linear to ``min_lr_ratio`` at ``decay_end`` and constant after (see the module docstring)."""

    warmup_steps: int
    constant_end: int
    decay_end: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps <= self.constant_end <= self.decay_end:
            raise ValueError(
                f"need 0 <= warmup_steps <= constant_end <= decay_end, got {self.warmup_steps}, {self.constant_end}, "
                f"{self.decay_end}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step < self.constant_end:
            return 1.0
        if step >= self.decay_end:
            return self.min_lr_ratio
        progress = (step - self.constant_end) / (self.decay_end - self.constant_end)
        return 1.0 + (self.min_lr_ratio - 1.0) * progress


def warmup_steps_from_ratio(warmup_ratio: float, steps: int) -> int:
    """HF's rule: ``ceil(warmup_ratio × steps)``."""
    return math.ceil(warmup_ratio * steps)


def warmup_cosine_scheduler(
    optimizer: Optimizer, *, warmup_steps: int, decay_end: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """``LambdaLR`` with :class:`WarmupCosine`, shared by all parameter groups (each keeps its own peak lr)."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, decay_end, min_lr_ratio))


def stage_scheduler(optimizer: Optimizer, stage: StageSettings) -> LambdaLR:
    """The unified-training schedule of a ``[stage1]`` / ``[stage2]`` section: warmup over
    ``ceil(warmup_ratio × steps)``, cosine to ``min_lr_ratio × lr`` at the last step."""
    return warmup_cosine_scheduler(
        optimizer,
        warmup_steps=warmup_steps_from_ratio(stage.warmup_ratio, stage.steps),
        decay_end=stage.steps,
        min_lr_ratio=stage.min_lr_ratio,
    )


def rae_scheduler(
    optimizer: Optimizer, *, warmup_steps: int, decay_end: int, base_lr: float, final_lr: float
) -> LambdaLR:
    """RAE decoder schedule: warmup from zero over ``warmup_steps``, cosine from ``base_lr`` to ``final_lr``
    by ``decay_end``, then constant ``final_lr``. The optimizer's groups should start at ``base_lr``."""
    if base_lr <= 0 or not 0 <= final_lr <= base_lr:
        raise ConfigError(
            f"decoder_training.min_lr = {final_lr} must lie in [0, decoder_training.lr = {base_lr}]; lower min_lr"
        )
    if not 0 <= warmup_steps <= decay_end:
        raise ConfigError(
            f"decoder_training: warmup ({warmup_steps} steps) is longer than the run ({decay_end} steps); "
            "lower warmup_epochs or raise epochs/steps"
        )
    return warmup_cosine_scheduler(
        optimizer, warmup_steps=warmup_steps, decay_end=decay_end, min_lr_ratio=final_lr / base_lr
    )
