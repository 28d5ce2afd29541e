"""The sampler on class-conditional RAE latents: parity with RAE's transport on the same network and noise, the
grids, integration to t = 0, the SDE, and one-line errors.

The `reference_*` loops are written from rae.md §6 (RAE `transport/transport.py` + `integrators.py`, torchdiffeq
fixed-grid Euler / heun2), in float32 like RAE, independently of srae's sampler.
"""

from __future__ import annotations

import math

import pytest
import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.class_flow import latent_shift, sample_class_latents
from scale_rae_core.flow.grids import rae_grid, srae_grid
from scale_rae_core.flow.guidance import Guidance
from scale_rae_core.flow.sampler import DIFFUSION_FORMS, SamplerConfig, generator_noise
from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, build_class_dit

CFG = CLASS_DIT_PRESETS["tiny-ddt"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_class_dit(CFG).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-zero everywhere, so the network really depends on x, t and y
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return m


def _inputs(batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, CFG.in_channels, CFG.grid, CFG.grid, generator=gen)
    return noise, torch.arange(batch) % CFG.num_classes


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ RAE-style reference loops


def reference_ode_grid(num_steps: int, s: float) -> torch.Tensor:
    t = 1 - torch.linspace(0, 1 - 1 / 1000, num_steps)  # check_interval: t0 = 0, t1 = 0.999 (float32)
    return s * t / (1 + (s - 1) * t)


def reference_ode(model, x, y, num_steps, s, method):
    t = reference_ode_grid(num_steps, s)
    f = lambda tt, xx: model(xx, torch.ones(xx.shape[0]) * tt, y)  # noqa: E731  velocity drift
    for t0, t1 in zip(t[:-1], t[1:], strict=True):
        dt = t1 - t0
        k1 = f(t0, x)
        if method == "euler":
            x = x + dt * k1
        else:  # torchdiffeq heun2: alpha [1], beta [[1]], c_sol [1/2, 1/2]
            k2 = f(t1, x + dt * k1)
            x = x + dt * (0.5 * k1 + 0.5 * k2)
    return x


def reference_sde_euler(model, x, y, num_steps, s, gen):
    """RAE's sample_sde with sampling_method Euler, diffusion_form 'sigma', norm 1, last_step None."""
    t = 1 - torch.linspace(0, 1, num_steps)  # last_step None -> last_step_size 0 -> t1 = 1
    t = s * t / (1 + (s - 1) * t)
    for t_curr, t_next in zip(t[:-1], t[1:], strict=True):
        w = torch.randn(x.size(), generator=gen)
        tt = torch.ones(x.size(0)) * t_curr
        dw = w * torch.sqrt(t_curr - t_next)
        v = model(x, tt, y)
        te = tt.view(-1, 1, 1, 1)
        # ICPlan.get_score_from_velocity: alpha = 1 - t, d_alpha = -1, sigma = t, d_sigma = 1
        ratio = (1 - te) / -1
        score = (ratio * v - x) / (te**2 - ratio * 1 * te)
        diffusion = 1.0 * te  # compute_diffusion(form='sigma')
        drift = v - diffusion * score
        x = x - drift * (t_curr - t_next) + torch.sqrt(2 * diffusion) * dw
    return x


# ------------------------------------------------------------------------------------------------ tests


def test_grids():
    s = latent_shift((768, 16, 16))
    assert s == pytest.approx(math.sqrt(48))
    ref = rae_grid(49, s).tolist()  # RAE's num_steps = 50 grid points
    assert len(ref) == 50
    assert ref[:3] == pytest.approx([1.0, 0.9970, 0.9939], abs=1e-4)  # rae.md §6.3
    assert ref[-3:] == pytest.approx([0.2320, 0.1315, 0.00689], abs=1e-4)
    srae = srae_grid(50, s).tolist()
    assert len(srae) == 51 and srae[0] == 1.0 and srae[-1] == 0.0
    assert all(a > b for a, b in zip(srae, srae[1:], strict=False))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_parity_with_rae_on_the_reference_grid(model, method):
    noise, y = _inputs()
    s = latent_shift((CFG.in_channels, CFG.grid, CFG.grid))
    ours = sample_class_latents(model, y, noise, s, SamplerConfig(f"rae-{method}", steps=9))
    with torch.no_grad():
        ref = reference_ode(model, noise.clone(), y, num_steps=10, s=s, method=method)
    assert _rel(ours, ref) <= 1e-5
    assert _rel(ours, noise) > 0.1  # the sampler moved the latents


def test_sde_parity_with_rae_euler_maruyama(model):
    noise, y = _inputs()
    s = latent_shift((CFG.in_channels, CFG.grid, CFG.grid))
    ours = sample_class_latents(
        model, y, noise, s, SamplerConfig("sde", steps=7, diffusion="sigma", last_step="none"),
        step_noise=generator_noise(torch.Generator().manual_seed(11)),
    )
    with torch.no_grad():
        ref = reference_sde_euler(model, noise.clone(), y, num_steps=8, s=s, gen=torch.Generator().manual_seed(11))
    assert _rel(ours, ref) <= 1e-5


class PointMass(torch.nn.Module):
    """The exact velocity for data = one point x0: v(x, t) = (x − x0)/t (x_t = (1 − t)·x0 + t·ε)."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.cfg = CFG

    has_null_label = True
    null_label = CFG.num_classes

    def forward(self, x, t, y):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "sampler",
    [
        SamplerConfig("euler", steps=5),
        SamplerConfig("heun", steps=5),
        SamplerConfig("sde", steps=6, diffusion="sigma"),
        SamplerConfig("sde-heun", steps=6, diffusion="sbdm"),
        SamplerConfig("sde", steps=6, diffusion="increasing-decreasing"),
    ],
    ids=lambda c: f"{c.method}-{c.diffusion}",
)
def test_srae_grid_integrates_to_data(sampler):
    x0 = torch.randn(1, CFG.in_channels, CFG.grid, CFG.grid).expand(2, -1, -1, -1)
    noise, y = _inputs(batch=2)
    out = sample_class_latents(PointMass(x0), y, noise, 3.0, sampler)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_reference_grid_stops_short_of_data():
    x0 = torch.zeros(2, CFG.in_channels, CFG.grid, CFG.grid)
    noise, y = _inputs(batch=2)
    s = latent_shift((768, 16, 16))
    out = sample_class_latents(PointMass(x0), y, noise, s, SamplerConfig("rae-euler", steps=49))
    torch.testing.assert_close(out, noise * rae_grid(49, s)[-1].item(), rtol=1e-5, atol=1e-6)  # ≈ 0.0069·ε


def test_sde_noise_changes_samples_but_same_seed_repeats(model):
    noise, y = _inputs(batch=2)
    cfg = SamplerConfig("sde", steps=4)
    run = lambda seed: sample_class_latents(model, y, noise, 2.0, cfg, step_noise=generator_noise(torch.Generator().manual_seed(seed)))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_rae_sbdm_sign_is_fixed():
    assert DIFFUSION_FORMS["sbdm"](0.5, 1.0) == pytest.approx(1.0)  # RAE's compute_diffusion gives −1.0 here
    assert math.isfinite(DIFFUSION_FORMS["sbdm"](1.0, 1.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "dopri5"}, "--sampler 'dopri5' is unknown; choose one of euler, heun, sde, sde-heun, rae-euler"),
        ({"steps": 0}, "--steps 0: the euler sampler takes 1 to 10000 steps"),
        ({"diffusion": "SBDM"}, "sampler diffusion 'SBDM' is unknown"),
        ({"last_step": "mean"}, "sampler last_step 'mean' is unknown; choose one of tweedie, none"),
    ],
)
def test_bad_sampler_settings(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SamplerConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_label_outside_the_classes_and_wrong_noise_are_one_line_errors(model):
    noise, _ = _inputs(batch=2)
    with pytest.raises(ConfigError) as err:
        sample_class_latents(model, torch.tensor([3, 12]), noise, 2.0)
    assert str(err.value) == "class label 12 is outside the model's 12 classes (0..11)"
    with pytest.raises(ConfigError, match="does not fit 2 labels"):
        sample_class_latents(model, torch.tensor([3, 1]), noise[:, :8], 2.0)
    with pytest.raises(ConfigError, match="1-D integer tensor"):
        sample_class_latents(model, torch.tensor([0.0, 1.0]), noise, 2.0, guidance=Guidance())
