"""Flow matching: the time convention, the shift, t-sampling and the per-sample loss."""

from __future__ import annotations

import math

import pytest
import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.transport import (
    FlowMatching,
    dimension_shift,
    interpolate,
    sample_t,
    shift_time,
    velocity_target,
)


def _data(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 2, 2, generator=gen), torch.randn(batch, 4, 2, 2, generator=gen)


def test_time_convention_t0_is_data_t1_is_noise_velocity_is_noise_minus_data() -> None:
    x0, eps = _data()
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)
    torch.testing.assert_close(interpolate(x0, eps, torch.full((3,), 0.25)), 0.75 * x0 + 0.25 * eps)
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    # The loss feeds the network exactly this path and these times.
    seen: dict[str, torch.Tensor] = {}

    def spy(x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    t = torch.tensor([0.0, 0.5, 1.0])
    FlowMatching().loss(spy, x0, None, t=t, noise=eps)
    assert torch.equal(seen["t"], t)
    assert torch.equal(seen["x_t"][0], x0[0]) and torch.equal(seen["x_t"][2], eps[2])


def test_dimension_shift_values() -> None:
    assert dimension_shift(256, 1152) == pytest.approx(math.sqrt(72))
    assert dimension_shift(256, 1152) == pytest.approx(8.485, abs=1e-3)
    assert dimension_shift(256, 1024) == pytest.approx(8.0)  # WebSSL
    assert dimension_shift(256, 64) == pytest.approx(2.0)  # FLUX-VAE alignment
    assert dimension_shift(256, 1152, base=256 * 1152) == pytest.approx(1.0)
    assert FlowMatching.for_latents(256, 1152).shift == pytest.approx(math.sqrt(72))
    with pytest.raises(ConfigError, match="base_dim"):
        dimension_shift(256, 1152, base=0)


def test_shift_time_fixes_endpoints_and_moves_towards_noise() -> None:
    s = math.sqrt(72)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    shifted = shift_time(t, s)
    assert shifted[0].item() == 0.0 and shifted[2].item() == 1.0
    assert shifted[1].item() == pytest.approx(s / (1 + s))
    assert torch.equal(shift_time(t, 1.0), t)


def test_shifted_logit_normal_median_is_about_0p89() -> None:
    s = dimension_shift(256, 1152)
    t = sample_t(20001, torch.Generator().manual_seed(0), shift=s)
    assert t.shape == (20001,) and t.dtype == torch.float32
    assert 0.0 < t.min().item() and t.max().item() < 1.0
    assert s / (1 + s) == pytest.approx(0.8946, abs=1e-4)  # shift of the logit-normal median 0.5
    assert t.median().item() == pytest.approx(0.8946, abs=0.01)
    assert (t > 0.9).float().mean().item() == pytest.approx(0.47, abs=0.02)


def test_oracle_model_has_exactly_zero_loss_and_loss_is_per_sample() -> None:
    x0, eps = _data(batch=5)
    flow = FlowMatching(shift=3.0)

    def oracle(x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return eps - x0

    loss = flow.loss(oracle, x0, None, generator=torch.Generator().manual_seed(0), noise=eps)
    assert loss.shape == (5,)
    assert torch.count_nonzero(loss) == 0

    def zero(x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return torch.zeros_like(x_t)

    loss = flow.loss(zero, x0, None, noise=eps)
    torch.testing.assert_close(loss, (eps - x0).pow(2).mean(dim=(1, 2, 3)))


def test_noise_and_target_are_float32_for_bf16_data() -> None:
    x0, eps = _data()
    x0 = x0.bfloat16()
    seen: dict[str, torch.dtype] = {}

    def oracle(x_t: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        seen["x_t"] = x_t.dtype
        return eps - x0.float()  # exact only if the target was formed from float32 noise

    loss = FlowMatching().loss(oracle, x0, None, noise=eps)
    assert loss.dtype == torch.float32 and torch.count_nonzero(loss) == 0
    assert seen["x_t"] == torch.bfloat16


def test_loss_is_reproducible_under_a_generator() -> None:
    x0, _ = _data()

    def model(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_t) * cond

    flow = FlowMatching.for_latents(4, 4, base=4)
    a = flow.loss(model, x0, torch.tensor(2.0), generator=torch.Generator().manual_seed(7))
    b = flow.loss(model, x0, torch.tensor(2.0), generator=torch.Generator().manual_seed(7))
    c = flow.loss(model, x0, torch.tensor(2.0), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="flow.shift"):
        FlowMatching(shift=0.0)
    with pytest.raises(ConfigError, match="flow.logit_std"):
        FlowMatching(logit_std=-1.0)
