"""The scorer protocol and registry: built-ins, a user's scorer, import specs, errors."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.scale import scorers
from scale_rae_core.scale.scorers import (
    Scorer,
    available_scorers,
    build_scorer,
    register_scorer,
    score_batch,
)
from scale_rae_core.shapes.synth import ShapeSpec, render


def test_shapes_scorer_is_one_when_every_named_attribute_matches():
    scorer = build_scorer("shapes")
    assert isinstance(scorer, Scorer) and scorer.name == "shapes"
    red_left = render(ShapeSpec("red", "circle", "left", "large"), 64)
    prompts = ["a red circle on the left", "a red circle on the right", "a blue circle on the left", "a red circle"]
    assert score_batch(scorer, prompts, [red_left] * 4) == [1.0, 0.0, 0.0, 1.0]


class _Brightness:
    name = "brightness"

    def __init__(self, device="cpu", gain: float = 1.0):
        self.gain = gain

    def score(self, prompts, images):
        return torch.tensor([self.gain * float(np.asarray(im, dtype=np.float32).mean()) for im in images])


def test_user_scorers_plug_in_by_registry_or_import_spec(monkeypatch):
    monkeypatch.setattr(scorers, "_REGISTRY", dict(scorers._REGISTRY))  # leave the real registry untouched
    register_scorer("brightness", _Brightness)
    assert "brightness" in available_scorers() and {"image_reward", "shapes"} <= set(available_scorers())
    white, black = Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0))
    scores = score_batch(build_scorer("brightness", gain=2.0), ["x", "x"], [white, black])
    assert scores[0] > scores[1]

    module = types.ModuleType("my_scorers_for_test")
    module.make = _Brightness
    module.not_a_scorer = lambda device="cpu": object()
    sys.modules["my_scorers_for_test"] = module
    try:
        assert build_scorer("my_scorers_for_test:make").name == "brightness"
        with pytest.raises(ConfigError, match="has no .name and .score"):
            build_scorer("my_scorers_for_test:not_a_scorer")
    finally:
        del sys.modules["my_scorers_for_test"]
    with pytest.raises(ConfigError, match="unknown scorer 'pickscore'"):
        build_scorer("pickscore")
    with pytest.raises(ConfigError, match="cannot import"):
        build_scorer("no_such_module_xyz:make")


def test_score_batch_checks_the_output():
    class Wrong:
        name = "wrong"

        def score(self, prompts, images):
            return torch.zeros(len(images) + 1)

    with pytest.raises(DataError, match="returned 3 scores for 2 images"):
        score_batch(Wrong(), ["a", "b"], [None, None])
    with pytest.raises(DataError, match="2 prompts for 1 images"):
        score_batch(Wrong(), ["a", "b"], [None])


def test_image_reward_scorer_loads_a_local_checkpoint(tmp_path):
    from tests.scale.test_imagereward import images, save_public, tiny_model

    model = tiny_model(tmp_path)
    folder = save_public(model, tmp_path / "ir")
    scorer = build_scorer("image_reward", weights=str(folder))
    ims = images(2)
    assert score_batch(scorer, ["a red circle"] * 2, ims) == model.score("a red circle", ims).tolist()
