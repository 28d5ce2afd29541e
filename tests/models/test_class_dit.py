"""Class-conditional LightningDiT and DiT^DH: sizes against RAE's, shapes, label dropout, reuse of srae's blocks."""

from __future__ import annotations

import pytest
import torch

from scale_rae_core.errors import ConfigError
from scale_rae_core.models.class_dit import (
    CLASS_DIT_PRESETS,
    ClassDiT,
    ClassDiTConfig,
    DiTwDDTHead,
    build_class_dit,
    count_reference_params,
)
from scale_rae_core.models.dit import DiTBlock, rope_tables_2d, sincos_pos_embed_2d


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("DiTDH-S", 196.5),  # rae.md §5.4, instantiated from the reference
        ("DiTDH-B", 294.3),
        ("DiTDH-L", 621.7),
        ("DiTDH-XL", 838.7),  # paper: 839 M
        ("DiT-XL", 677.2),  # paper: 676 M
        ("DiTDH-small", 23.3),  # UniRAE's small DiT^DH
    ],
)
def test_preset_sizes_match_the_reference(name, millions):
    with torch.device("meta"):
        model = build_class_dit(CLASS_DIT_PRESETS[name])
    assert round(count_reference_params(model) / 1e6, 1) == millions


def test_xl_head_layout():
    cfg = CLASS_DIT_PRESETS["DiTDH-XL"]
    with torch.device("meta"):
        model = build_class_dit(cfg)
    assert isinstance(model, DiTwDDTHead)
    assert (len(model.blocks), len(model.head_blocks)) == (28, 2)
    assert tuple(model.s_projector.weight.shape) == (2048, 1152)
    assert tuple(model.feat_rope.freqs_cos.shape) == (256, 72)  # rae.md §13: RoPE tables [256, 72] and [256, 128]
    assert tuple(model.head_rope.freqs_cos.shape) == (256, 128)
    assert model.blocks[0].mlp.w3.in_features == 3072 and model.head_blocks[0].mlp.w3.in_features == 5461
    assert model.y_embedder.embedding_table.num_embeddings == 1001 and model.null_label == 1000


@pytest.mark.parametrize("name", ["tiny", "tiny-ddt"])
def test_forward_shape_zero_init_and_srae_blocks(name):
    cfg = CLASS_DIT_PRESETS[name]
    model = build_class_dit(cfg).eval()
    assert all(isinstance(b, DiTBlock) for b in model.blocks)
    x = torch.randn(3, cfg.in_channels, cfg.grid, cfg.grid)
    v = model(x, torch.rand(3), torch.tensor([0, 5, 11]))
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # the final layer starts at zero, as in the reference


def _randomise(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("cls", [ClassDiT, DiTwDDTHead])
def test_labels_condition_the_output_and_force_drop_is_the_null_class(cls):
    cfg = CLASS_DIT_PRESETS["tiny" if cls is ClassDiT else "tiny-ddt"]
    model = cls(cfg).eval()
    _randomise(model)
    x, t = torch.randn(2, cfg.in_channels, cfg.grid, cfg.grid), torch.tensor([0.3, 0.7])
    y = torch.tensor([1, 2])
    v = model(x, t, y)
    assert not torch.allclose(v, model(x, t, torch.tensor([3, 4])))
    dropped = model(x, t, y, force_drop_ids=torch.tensor([True, False]))
    null = model(x, t, torch.tensor([model.null_label, 2]))
    torch.testing.assert_close(dropped, null)
    torch.testing.assert_close(dropped[1], v[1])


def test_training_mode_drops_labels_at_the_configured_rate():
    cfg = ClassDiTConfig(in_channels=8, grid=4, hidden=32, depth=1, heads=2, head_depth=0, head_hidden=0,
                         head_heads=0, num_classes=5, class_dropout_prob=0.5)
    emb = ClassDiT(cfg).y_embedder.train()
    labels = torch.zeros(4000, dtype=torch.long)
    out = emb(labels)
    null = emb.embedding_table.weight[5]
    rate = (out == null).all(dim=1).float().mean().item()
    assert 0.45 < rate < 0.55
    assert torch.equal(emb.eval()(labels), emb.embedding_table.weight[labels])


def test_no_null_class_without_dropout():
    cfg = ClassDiTConfig(in_channels=8, grid=4, hidden=32, depth=1, heads=2, head_depth=0, head_hidden=0,
                         head_heads=0, num_classes=5, class_dropout_prob=0.0)
    model = ClassDiT(cfg)
    assert model.y_embedder.embedding_table.num_embeddings == 5 and not model.has_null_label


def test_fixed_tables_survive_meta_build_and_are_in_the_state_dict():
    cfg = CLASS_DIT_PRESETS["tiny-ddt"]
    with torch.device("meta"):
        model = build_class_dit(cfg)
    model.to_empty(device="cpu")
    model.reset_fixed_buffers()
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(cfg.hidden, cfg.grid))
    cos, sin = rope_tables_2d(cfg.head_hidden // cfg.head_heads, cfg.grid)
    torch.testing.assert_close(model.head_rope.freqs_sin, sin)
    keys = model.state_dict().keys()
    assert {"t_embedder.W", "pos_embed", "feat_rope.freqs_cos", "head_rope.freqs_sin"} <= set(keys)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 60, "heads": 4}, "class_dit.hidden (60) must split into class_dit.heads (4)"),
        ({"head_hidden": 100, "head_heads": 3}, "class_dit.head_hidden (100)"),
        ({"num_classes": 0}, "class_dit.num_classes must be a positive integer"),
        ({"class_dropout_prob": 1.0}, "class_dit.class_dropout_prob must be in [0, 1)"),
        ({"head_depth": -1}, "class_dit.head_depth must be >= 0"),
    ],
)
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ClassDiTConfig(**{**vars(CLASS_DIT_PRESETS["tiny-ddt"]), **kwargs})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_model_classes_refuse_the_other_architecture():
    with pytest.raises(ConfigError, match="DiTwDDTHead needs class_dit.head_depth > 0"):
        DiTwDDTHead(CLASS_DIT_PRESETS["tiny"])
    with pytest.raises(ConfigError, match="ClassDiT has no DDT head"):
        ClassDiT(CLASS_DIT_PRESETS["tiny-ddt"])
