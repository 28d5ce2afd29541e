"""The class-conditional training loss: exact for the true velocity, the shift, and trainable end to end."""

from __future__ import annotations

import math

import pytest
import torch

from scale_rae_core.flow.class_flow import class_flow, class_flow_loss, latent_shift
from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, build_class_dit


class Oracle(torch.nn.Module):
    """Knows the data: v = (x_t − x0)/t is exactly ε − x0."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.labels = x0, None

    def forward(self, x, t, y):
        self.labels = y
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_class_flow_loss_is_zero_for_the_exact_velocity_and_uses_the_shift():
    x0 = torch.randn(4, 32, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    oracle = Oracle(x0)
    loss = class_flow_loss(oracle, x0, labels, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and float(loss.max()) < 1e-9
    assert torch.equal(oracle.labels, labels)
    assert class_flow((768, 32, 32)).shift == pytest.approx(math.sqrt(192)) == latent_shift((768, 32, 32))


def test_class_flow_loss_is_the_mean_square_against_noise_minus_data():
    x0 = torch.randn(3, 32, 8, 8)
    zero_model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    flow = class_flow((32, 8, 8))
    loss = class_flow_loss(zero_model, x0, torch.zeros(3, dtype=torch.long), flow, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    flow.sample_t(3, gen)  # the loss draws t first, then ε
    noise = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(loss, (noise - x0).pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("name", ["tiny", "tiny-ddt"])
def test_a_few_steps_lower_the_loss_of_the_class_dit(name):
    cfg = CLASS_DIT_PRESETS[name]
    torch.manual_seed(0)
    model = build_class_dit(cfg).train()
    latents = torch.randn(8, cfg.in_channels, cfg.grid, cfg.grid)
    labels = torch.arange(8) % cfg.num_classes
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    flow = class_flow((cfg.in_channels, cfg.grid, cfg.grid))

    def loss_at(seed: int) -> torch.Tensor:
        return class_flow_loss(model, latents, labels, flow, torch.Generator().manual_seed(seed)).mean()

    with torch.no_grad():
        model.eval()
        before = loss_at(123)
        model.train()
    for step in range(40):
        opt.zero_grad()
        loss_at(step).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss_at(123)
    assert float(after) < 0.92 * float(before)  # random latents: a slow start, but a steady fall
    assert model.y_embedder.embedding_table.weight.grad is not None  # the labels reach the loss
