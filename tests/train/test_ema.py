"""EMA: exact decay maths, buffers, independence from a compiled live model, wrappers, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import CheckpointError
from scale_rae_core.train.ema import EMA


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))
        self.register_buffer("seen", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def test_decay_maths_on_one_parameter_and_buffers_copied() -> None:
    live = Scalar()
    ema = EMA(live)
    with torch.no_grad():
        live.w.fill_(10.0)
        live.seen.fill_(5)
    ema.update(live, decay=0.9)
    assert ema.module.w.item() == pytest.approx(0.9 * 2 + 0.1 * 10)  # 2.8
    ema.update(live, decay=0.9)
    assert ema.module.w.item() == pytest.approx(0.9 * 2.8 + 0.1 * 10)  # 3.52
    assert ema.module.seen.item() == 5
    ema.update(live, decay=1.0)
    assert ema.module.w.item() == pytest.approx(3.52)
    ema.update(live, decay=0.0)
    assert ema.module.w.item() == 10.0
    assert live.w.item() == 10.0 and live.w.requires_grad
    assert not ema.module.w.requires_grad and not ema.module.training
    with pytest.raises(ValueError, match="decay"):
        ema.update(live, decay=1.5)


def _zero_(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()


@pytest.mark.parametrize("how", ["closure", "compile-method", "compile-module"])
def test_ema_is_independent_of_a_compiled_live_model(how: str) -> None:
    """rae.md §12.1: a deepcopy after `m.forward = torch.compile(m.forward)` ran the live weights."""
    live = nn.Linear(4, 3)
    w0, b0 = live.weight.detach().clone(), live.bias.detach().clone()
    if how == "closure":
        bound = live.forward
        live.forward = lambda x: bound(x)  # an instance attribute closing over the live module
        wrapped: nn.Module = live
    elif how == "compile-method":
        live.forward = torch.compile(live.forward, backend="eager")
        wrapped = live
    else:
        wrapped = torch.compile(live, backend="eager")
    ema = EMA(wrapped)
    _zero_(live)
    ema.update(wrapped, decay=0.5)
    x = torch.randn(2, 4)
    live_out = wrapped(x)
    ema_out = ema.module(x)
    assert torch.equal(live_out, torch.zeros(2, 3))
    assert torch.allclose(ema_out, F.linear(x, w0 / 2, b0 / 2), atol=1e-6)
    assert not torch.allclose(ema_out, live_out)


class Wrapper(nn.Module):
    """Stands in for DDP/FSDP1: the model under `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_update_matches_names_through_wrappers() -> None:
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    ema = EMA(live)
    with torch.no_grad():
        live[0].weight.fill_(1.0)
    ema.update(Wrapper(live), decay=0.0)
    assert torch.equal(ema.module[0].weight, torch.ones(3, 3))
    with torch.no_grad():
        live[0].weight.fill_(3.0)
    ema.update(torch.compile(live, backend="eager"), decay=0.5)
    assert torch.equal(ema.module[0].weight, torch.full((3, 3), 2.0))
    with pytest.raises(ValueError, match="no tensor"):
        ema.update(nn.Linear(3, 3), decay=0.5)


def test_state_dict_round_trip_copy_to_and_mismatch_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(live)
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].running_mean.fill_(0.5)
    ema.update(live, decay=0.75)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")

    torch.manual_seed(1)
    fresh = EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    fresh.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True), source=str(tmp_path / "ema.pt"))
    x = torch.randn(5, 3)
    assert torch.equal(fresh.module(x), ema.module(x))
    assert torch.equal(fresh.module[1].running_mean, torch.full((4,), 0.5))

    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    ema.copy_to(Wrapper(target))
    assert torch.equal(target(x), ema.module(x))

    other = EMA(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)))
    with pytest.raises(CheckpointError, match=r"ema\.pt: EMA weight '0\.weight' has shape \(4, 3\)"):
        other.load_state_dict(
            torch.load(tmp_path / "ema.pt", weights_only=True), source=str(tmp_path / "ema.pt")
        )
    with pytest.raises(CheckpointError, match="lacks '1.running_var'"):
        sd = dict(ema.state_dict())
        del sd["1.running_var"]
        fresh.load_state_dict(sd, source="ckpt.pt")
