"""The one sampler on the Scale-RAE head's token conditions: the grids, exactness, guidance arithmetic,
determinism, the method table."""

from __future__ import annotations

import math

import pytest
import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.grids import reference_schedule, space_timesteps
from scale_rae_core.flow.guidance import Guidance, guided_velocity
from scale_rae_core.flow.sampler import SAMPLERS, FlowSampler, SamplerConfig, initial_noise
from scale_rae_core.flow.transport import dimension_shift, shift_time
from scale_rae_core.models.dit import DiTConfig, LightningDiT

SHIFT = math.sqrt(72)


class Counting:
    """A velocity model that records how often it is called and with how many rows."""

    def __init__(self, velocity: torch.Tensor | None = None) -> None:
        self.rows: list[int] = []
        self.velocity = velocity

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        if self.velocity is None:
            return torch.tanh(x) * t.view(-1, 1) + cond
        return self.velocity.expand_as(x)


def _straight_path(batch: int = 2, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)


def test_space_timesteps_matches_the_reference_respacing() -> None:
    used = space_timesteps(1000, 50)
    assert len(used) == 50
    assert used[:3] == [0, 20, 41] and used[-3:] == [958, 979, 999]


def _released_respacing(count: int, train_steps: int = 1000) -> list[int]:
    """The released rule, re-derived: running sums of the fractional stride, each rounded (Python round)."""
    from itertools import accumulate

    stride = (train_steps - 1) / (count - 1)
    positions = accumulate([stride] * (count - 1), initial=0.0)
    return sorted({round(p) for p in positions})


def test_space_timesteps_is_the_released_respacing_for_every_count() -> None:
    rounded_products = []  # counts where round(i · stride) would give another grid
    for count in range(2, 1001):
        expected = _released_respacing(count)
        assert space_timesteps(1000, count) == expected, count
        assert len(expected) == count and expected[0] == 0 and expected[-1] == 999
        stride = 999 / (count - 1)
        if expected != [round(i * stride) for i in range(count)]:
            rounded_products.append(count)
    assert len(rounded_products) == 278 and rounded_products[:7] == [21, 23, 31, 35, 39, 43, 45]
    assert 50 not in rounded_products
    # the sampler's intervals follow it: at 21 steps its times sit on the accumulated indices
    used = _released_respacing(21)
    t, t_next = reference_schedule(21, SHIFT)
    tau = [shift_time(torch.tensor((k + 1) / 1000, dtype=torch.float64), SHIFT).item() for k in used]
    assert t.tolist() == [tau[i] for i in range(19, 0, -1)] + [tau[-2]]
    assert t_next.tolist() == [tau[i - 1] for i in range(19, 0, -1)] + [tau[-1]]
    assert used != [round(i * 999 / 20) for i in range(21)]


def test_reference_grid_values_and_49_calls() -> None:
    sampler = FlowSampler(SamplerConfig("reference", 50), shift=dimension_shift(256, 1152))
    sampler.set_timesteps()
    t, t_next = sampler.timesteps, sampler.timesteps_next
    assert len(t) == 49 and sampler.num_model_calls == 49
    assert t[0].item() == pytest.approx(shift_time(torch.tensor(0.980), SHIFT).item(), abs=1e-6)
    assert t[0].item() == pytest.approx(0.9976, abs=1e-4)  # pure noise evaluated as if at 0.9976
    assert t_next[-2].item() == pytest.approx(0.0084, abs=1e-4)  # last integration point, not 0
    assert t_next[-2].item() == pytest.approx(shift_time(torch.tensor(0.001), SHIFT).item(), abs=1e-6)
    assert t[-1].item() == t[0].item() and t_next[-1].item() == 1.0  # final re-noising step
    assert bool((t_next[:-1] < t[:-1]).all()) and torch.equal(t[1:-1], t_next[:-2])

    model = Counting()
    x, cond = _straight_path()
    sampler.sample(model, x, cond)
    assert model.rows == [2] * 49
    model.rows.clear()
    sampler.sample(model, x, cond, guidance=Guidance("cfg", 2.0), null_cond=torch.zeros(6))
    assert model.rows == [4] * 49  # guidance doubles the rows, not the calls


def test_corrected_grid_runs_from_one_to_exactly_zero() -> None:
    euler = FlowSampler(SamplerConfig("euler", 50), shift=SHIFT)
    euler.set_timesteps()
    assert euler.timesteps[0].item() == 1.0 and euler.timesteps_next[-1].item() == 0.0
    assert bool((euler.timesteps_next < euler.timesteps).all())
    torch.testing.assert_close(euler.timesteps[1:], euler.timesteps_next[:-1])
    x, cond = _straight_path()
    model = Counting()
    euler.sample(model, x, cond)
    assert len(model.rows) == 50 == euler.num_model_calls

    heun = FlowSampler(SamplerConfig("heun", 10), shift=SHIFT)
    model = Counting()
    heun.sample(model, x, cond)
    assert len(model.rows) == 19 == heun.num_model_calls  # the last interval (to t = 0) is an Euler step


def test_constant_velocity_recovers_data_exactly_and_reference_does_not() -> None:
    x0, eps = _straight_path()
    model = Counting(velocity=eps - x0)  # the straight path's velocity, for every x and t
    for method in ("euler", "heun"):
        out = FlowSampler(SamplerConfig(method, 7), shift=SHIFT).sample(model, eps, None)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)
    sampler = FlowSampler(SamplerConfig("reference", 50), shift=SHIFT)
    out = sampler.sample(model, eps, None)
    travelled = (sampler.timesteps_next - sampler.timesteps).double().sum().item()  # −0.9892 + 0.0024
    assert travelled == pytest.approx(-(0.9976 - 0.0084) + (1.0 - 0.9976), abs=2e-4)
    torch.testing.assert_close(out, eps + travelled * (eps - x0), rtol=0, atol=1e-5)
    assert (out - x0).abs().max().item() > 1e-3


def test_state_dependent_straight_path_oracle_never_evaluated_at_t0() -> None:
    x0, eps = _straight_path()

    def oracle(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return (x - x0) / t.view(-1, 1)  # equals ε − x₀ on the path; undefined at t = 0

    for method in ("euler", "heun"):
        out = FlowSampler(SamplerConfig(method, 5), shift=SHIFT).sample(oracle, eps, None)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_guidance_arithmetic_one_call_and_interval_masking() -> None:
    cond = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    null = torch.tensor([0.5, 0.0])
    x = torch.zeros(2, 2)

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return c + x

    calls: list[int] = []
    t = torch.full((2,), 0.9)
    assert torch.equal(guided_velocity(model, x, t, cond, Guidance("cfg", 1.0)), cond)
    assert calls == [2]  # no unconditional rows at w = 1
    calls.clear()
    guided = guided_velocity(model, x, t, cond, Guidance("cfg", 3.0), null_cond=null)
    assert calls == [4]
    torch.testing.assert_close(guided, null + 3.0 * (cond - null))
    calls.clear()
    interval = Guidance("cfg", 3.0, (0.5, 1.0))
    outside = guided_velocity(model, x, torch.full((2,), 0.2), cond, interval, null_cond=null)
    inside = guided_velocity(model, x, t, cond, interval, null_cond=null)
    assert torch.equal(outside, cond) and torch.equal(inside, guided)
    assert calls == [2, 4]  # outside the interval: the conditional rows only
    with pytest.raises(ConfigError, match="needs the model's null condition"):
        FlowSampler(SamplerConfig("euler", 2), shift=1.0).sample(model, x, cond, guidance=Guidance("cfg", 3.0))


def test_interval_decisions_use_the_float32_times_the_model_sees() -> None:
    """float32(0.1) > 0.1: a time that is 0.1 in float32 lies inside [0, 0.1], as the model's (B,) float32 t says."""
    t32 = torch.tensor(0.1, dtype=torch.float32).item()
    assert t32 > 0.1 and Guidance("cfg", 2.0, (0.0, 0.1)).active_at(t32)
    assert not Guidance("cfg", 2.0, (0.0, 0.0999999)).active_at(t32)
    assert not Guidance("cfg", 1.0).active_at(0.5) and not Guidance("none", 3.0).active_at(0.5)


def test_every_sampler_name_runs_and_counts_its_calls() -> None:
    x0, eps = _straight_path()
    rows: list[int] = []

    def oracle(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        rows.append(x.shape[0])
        return (x - x0) / t.view(-1, 1)  # the exact velocity towards the single data point x0

    for name in SAMPLERS:
        rows.clear()
        sampler = FlowSampler(SamplerConfig(name, 6), shift=SHIFT)
        out = sampler.sample(oracle, eps, None, step_noise=torch.randn)
        assert len(rows) == sampler.num_model_calls, name
        if SAMPLERS[name][2] == "srae":  # the grids that reach t = 0 recover the data, with or without noise
            torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_sampling_a_tiny_dit_with_guidance_is_deterministic_under_a_generator() -> None:
    cfg = DiTConfig(in_channels=4, grid=2, hidden=32, depth=1, heads=2, cond_dim=16)
    dit = LightningDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cond = torch.randn(2, cfg.num_tokens, cfg.cond_dim, generator=torch.Generator().manual_seed(2))
    null = dit.null_condition(2).detach()
    sampler = FlowSampler(SamplerConfig("heun", 4), shift=2.0)

    def run(seed: int) -> torch.Tensor:
        noise = initial_noise((2, 4, 2, 2), torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return sampler.sample(dit, noise, cond, guidance=Guidance("cfg", 2.5, (0.0, 0.7)), null_cond=null)

    a, b, c = run(0), run(0), run(1)
    assert a.dtype == torch.float32 and a.shape == (2, 4, 2, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_sampler_settings_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="--sampler 'dpm' is unknown; choose one of euler, heun, sde"):
        SamplerConfig("dpm")
    with pytest.raises(ConfigError, match="--steps 1: the reference sampler takes 2 to 10000 steps"):
        SamplerConfig("reference", 1)
    with pytest.raises(ConfigError, match="--steps 0: the euler sampler takes 1 to 10000 steps"):
        SamplerConfig("euler", 0)
    with pytest.raises(ConfigError, match="--steps 10001: the heun sampler takes 1 to 10000 steps"):
        SamplerConfig("heun", 10_001)
    with pytest.raises(ConfigError, match="sampler shift must be > 0"):
        FlowSampler(SamplerConfig(), shift=0.0)
    with pytest.raises(ConfigError, match=r"must be lo,hi with 0 <= lo <= hi <= 1"):
        Guidance("cfg", 2.0, (0.8, 0.2))
    with pytest.raises(ConfigError, match=r"--guidance nan must be a number from 0 to 1000"):
        Guidance("cfg", float("nan"))
