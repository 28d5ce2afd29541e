"""Warmup + cosine schedules: exact factors at the key steps, per-group lrs, and the profile-driven factories."""

from __future__ import annotations

import math

import pytest
import torch

from scale_rae_core.config import StageSettings
from scale_rae_core.errors import ConfigError
from scale_rae_core.train.schedule import (
    WarmupCosine,
    rae_scheduler,
    stage_scheduler,
    warmup_cosine_scheduler,
    warmup_steps_from_ratio,
)


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups)


def _lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    """lr of every group used by optimiser steps 0 … steps-1."""
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_factor_at_key_steps():
    f = WarmupCosine(warmup_steps=4, decay_end=10, min_lr_ratio=0.1)
    assert f(0) == 0.25  # (0 + 1) / 4: the first step already trains
    assert f(1) == 0.5
    assert f(3) == 1.0  # peak at the last warmup step
    assert f(4) == 1.0  # cosine starts at the peak
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))  # halfway: 0.55
    assert f(7) == pytest.approx(0.55)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert f(10) == 0.1  # floor at decay_end ...
    assert f(1000) == 0.1  # ... and constant after


def test_no_warmup_and_zero_floor():
    f = WarmupCosine(warmup_steps=0, decay_end=4)
    assert [f(s) for s in range(6)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0])


def test_invalid_factor_arguments_are_rejected():
    with pytest.raises(ValueError):
        WarmupCosine(warmup_steps=5, decay_end=4)
    with pytest.raises(ValueError):
        WarmupCosine(warmup_steps=1, decay_end=4, min_lr_ratio=1.5)


def test_each_group_keeps_its_own_lr_with_a_shared_factor():
    optimizer = _optimizer(1e-3, 1e-2)  # LLM and diffusion head
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, decay_end=6, min_lr_ratio=0.1)
    f = WarmupCosine(2, 6, 0.1)
    for step, (llm, head) in enumerate(_lrs(scheduler, optimizer, 8)):
        assert llm == pytest.approx(1e-3 * f(step), rel=1e-12)
        assert head == pytest.approx(1e-2 * f(step), rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_stage_scheduler_follows_the_profile_section():
    stage = StageSettings(lr=5.65e-5, head_lr=5.65e-4, warmup_ratio=0.0134, min_lr_ratio=0.2, steps=1000)
    assert warmup_steps_from_ratio(stage.warmup_ratio, stage.steps) == 14  # ceil(13.4), as HF computes it
    optimizer = _optimizer(stage.lr, stage.head_lr)
    scheduler = stage_scheduler(optimizer, stage)
    lrs = _lrs(scheduler, optimizer, 1001)
    assert lrs[0] == pytest.approx([stage.lr / 14, stage.head_lr / 14])
    assert lrs[13] == pytest.approx([stage.lr, stage.head_lr])
    assert lrs[999][0] > 0.2 * stage.lr
    assert lrs[1000] == pytest.approx([0.2 * stage.lr, 0.2 * stage.head_lr])


def test_rae_schedule_warms_up_from_zero_and_holds_the_final_lr():
    optimizer = _optimizer(2e-4)
    scheduler = rae_scheduler(optimizer, warmup_steps=10, decay_end=100, base_lr=2e-4, final_lr=2e-5)
    lrs = [g[0] for g in _lrs(scheduler, optimizer, 151)]
    assert lrs[0] == pytest.approx(2e-5)  # 2e-4 × 1/10
    assert lrs[9] == pytest.approx(2e-4)
    assert lrs[55] == pytest.approx(2e-5 + 1.8e-4 * 0.5)  # halfway through the cosine
    assert lrs[100] == pytest.approx(2e-5)
    assert lrs[150] == pytest.approx(2e-5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone after warmup


def test_rae_schedule_errors_name_the_profile_keys():
    with pytest.raises(ConfigError, match="decoder_training.min_lr"):
        rae_scheduler(_optimizer(1e-4), warmup_steps=1, decay_end=10, base_lr=1e-4, final_lr=2e-4)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        rae_scheduler(_optimizer(1e-4), warmup_steps=20, decay_end=10, base_lr=1e-4, final_lr=1e-5)
