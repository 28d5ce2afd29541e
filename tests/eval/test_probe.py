"""Linear probe: the split is stratified and deterministic, the classifier is exact on separable features, and
the tiny random encoder separates colour classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scale_rae_core.config import EncoderSettings
from scale_rae_core.errors import DataError
from scale_rae_core.eval.probe import fit_linear, linear_probe, split_heldout

COLOURS = {"blue": (30, 60, 220), "green": (40, 170, 60), "red": (220, 40, 40)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SRAE_CACHE", str(tmp_path_factory.getbasetemp() / "srae-cache"))
    from scale_rae_core.models.build import build_encoder

    yield build_encoder(EncoderSettings(kind="siglip", path="tiny-random", input_size=64))
    mp.undo()


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory):
    """Three classes of noisy solid colours, 8 images each: linearly separable for any sensible features."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(8):
            arr = np.clip(np.array(rgb) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


def test_split_is_stratified_deterministic_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train, test = split_heldout(labels, ["a", "b", "c"], 0.2, seed=7)
    assert sorted(train.tolist() + test.tolist()) == list(range(16))
    assert [int((labels[test] == c).sum()) for c in range(3)] == [2, 1, 0]  # round(0.2·n), ≥1 if n ≥ 2
    again = split_heldout(labels, ["a", "b", "c"], 0.2, seed=7)
    assert torch.equal(again[1], test) and not torch.equal(split_heldout(labels, ["a", "b", "c"], 0.2, seed=8)[1], test)
    with pytest.raises(DataError, match=r"--heldout must be a fraction in \(0, 1\)"):
        split_heldout(labels, ["a", "b", "c"], 1.0, seed=0)


def test_logistic_regression_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    labels = torch.arange(3).repeat(20)
    x = centres[labels] + 0.3 * torch.randn(60, 2, generator=gen, dtype=torch.float64)
    W, b = fit_linear(x, labels, 3)
    assert torch.equal((x @ W + b).argmax(1), labels)


def test_probe_of_the_tiny_encoder_on_colour_classes(encoder, colour_folders, tmp_path):
    out = linear_probe(encoder, colour_folders, heldout=0.25, seed=0, out=tmp_path / "probe.json")
    assert out["classes"] == ["blue", "green", "red"] and (out["num_train"], out["num_heldout"]) == (18, 6)
    assert out["top1"] == 1.0 and out["train_top1"] == 1.0
    assert out["feature_dim"] == encoder.hidden_size and out["encoder"] == "tiny-random"
    assert json.loads((tmp_path / "probe.json").read_text())["top1"] == 1.0


def test_probe_needs_class_folders(encoder, tmp_path):
    (tmp_path / "flat.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders"):
        linear_probe(encoder, tmp_path)
