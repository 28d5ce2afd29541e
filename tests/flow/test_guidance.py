"""Guidance on class labels: arithmetic, interval masks, batch sizes and one-line errors (the class checks live in
class_flow, the generic ones in guidance)."""

from __future__ import annotations

import pytest
import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.flow.class_flow import check_class_guidance
from scale_rae_core.flow.guidance import Guidance, check_guidance, guided_velocity
from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, ClassDiTConfig


class Recorder(torch.nn.Module):
    """v(x, t, y) = offset + y (per sample, broadcast); records the rows of every call."""

    def __init__(self, offset: float, cfg: ClassDiTConfig = CLASS_DIT_PRESETS["tiny"], null: bool = True) -> None:
        super().__init__()
        self.offset, self.cfg, self.has_null_label = offset, cfg, null
        self.null_label = cfg.num_classes
        self.calls: list[tuple[int, list[int]]] = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        return torch.full_like(x, self.offset) + y.view(-1, 1, 1, 1).to(x.dtype)


X = torch.zeros(2, 32, 8, 8)
Y = torch.tensor([1, 3])
NULL = torch.tensor(12)  # the tiny preset's null label


def T(t: float) -> torch.Tensor:
    return torch.full((2,), t)


def test_cfg_is_one_doubled_forward_with_the_null_class():
    model = Recorder(0.0)
    v = guided_velocity(model, X, T(0.5), Y, Guidance("cfg", 4.0), null_cond=NULL)
    assert model.calls == [(4, [1, 3, 12, 12])]
    v_c, v_u = Y.float().view(-1, 1, 1, 1), torch.full((2, 1, 1, 1), 12.0)
    torch.testing.assert_close(v, (v_u + 4.0 * (v_c - v_u)).expand_as(X))


def test_autoguidance_does_not_double_the_batch():
    main, guide = Recorder(1.0), Recorder(-2.0)
    v = guided_velocity(main, X, T(0.3), Y, Guidance("autoguidance", 1.5), guide_model=guide)
    assert main.calls == [(2, [1, 3])] and guide.calls == [(2, [1, 3])]
    v_m, v_g = 1.0 + Y.float(), -2.0 + Y.float()
    torch.testing.assert_close(v, (v_g + 1.5 * (v_m - v_g)).view(-1, 1, 1, 1).expand_as(X))


@pytest.mark.parametrize(("t", "guided"), [(0.2, False), (0.25, True), (0.5, True), (0.75, True), (0.8, False)])
def test_interval_is_closed_and_skips_the_second_forward_outside(t, guided):
    main, guide = Recorder(1.0), Recorder(-2.0)
    v = guided_velocity(main, X, T(t), Y, Guidance("autoguidance", 3.0, (0.25, 0.75)), guide_model=guide)
    assert len(guide.calls) == int(guided)
    expected = (-2.0 + Y.float()) + 3.0 * 3.0 if guided else 1.0 + Y.float()
    torch.testing.assert_close(v, expected.view(-1, 1, 1, 1).expand_as(X))


def test_scale_one_and_none_are_the_conditional_velocity():
    model = Recorder(0.5)
    for g in (Guidance("cfg", 1.0), Guidance("none", 7.0)):
        torch.testing.assert_close(guided_velocity(model, X, T(0.5), Y, g), (0.5 + Y.float()).view(-1, 1, 1, 1).expand_as(X))
    assert [rows for rows, _ in model.calls] == [2, 2]


@pytest.mark.parametrize(
    ("guidance", "guide", "message"),
    [
        (Guidance("autoguidance", 1.4), Recorder(0, ClassDiTConfig(**{**vars(CLASS_DIT_PRESETS["tiny"]), "grid": 4})),
         "the guidance model works on latents 32x4x4, the model on 32x8x8; use a guidance model trained on the same latents"),
        (Guidance("autoguidance", 1.4), Recorder(0, ClassDiTConfig(**{**vars(CLASS_DIT_PRESETS["tiny"]), "num_classes": 10})),
         "the guidance model has 10 classes, the model 12"),
        (Guidance("autoguidance", 1.4), None, "autoguidance needs a guidance model"),
        (Guidance("cfg", 2.0), Recorder(0), "a guidance model was given but the guidance method is 'cfg'"),
    ],
)
def test_bad_guidance_setups_are_one_line_errors(guidance, guide, message):
    with pytest.raises(ConfigError) as err:
        check_class_guidance(Recorder(0), guidance, guide)
        check_guidance(guidance, NULL, guide)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cfg_needs_a_null_class():
    with pytest.raises(ConfigError, match="needs a model trained with class dropout"):
        check_class_guidance(Recorder(0, null=False), Guidance("cfg", 2.0), None)
    with pytest.raises(ConfigError, match="needs the model's null condition"):
        check_guidance(Guidance("cfg", 2.0), None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "pag"}, "unknown guidance method 'pag'"), ({"scale": -1.0}, "--guidance -1.0 must be a number from 0 to 1000"),
     ({"interval": (0.8, 0.2)}, "--guidance-interval (0.8, 0.2) must be lo,hi")],
)
def test_bad_guidance_values(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Guidance(**kwargs)
