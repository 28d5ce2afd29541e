"""Pixel decoder: layout, position table, attention paths, presets and our checkpoint format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.decoder import (
    DECODER_PRESETS,
    Decoder,
    DecoderConfig,
    load_decoder,
    patchify,
    save_decoder,
    sincos_pos_embed_2d,
    unpatchify,
)


def tiny(**kw) -> DecoderConfig:
    return DecoderConfig.from_preset("tiny", latent_dim=32, num_patches=16, patch_size=4, **kw)


def test_forward_shape_and_init():
    dec = Decoder(tiny())
    assert dec(torch.randn(2, 16, 32)).shape == (2, 3, 16, 16)
    assert dec.cfg.image_size == 16
    assert torch.count_nonzero(dec.cls_token) == 0  # zero-initialised, trainable
    assert dec.cls_token.requires_grad
    assert "pos_embed" not in dict(dec.named_parameters())  # fixed table, not trained
    with pytest.raises(ValueError, match=r"\[B, 16, 32\]"):
        dec(torch.randn(2, 9, 32))


def test_unpatchify_puts_channel_fastest_inside_a_patch():
    p, h = 2, 3
    x = torch.arange(1 * h * h * p * p * 3, dtype=torch.float32).view(1, h * h, p * p * 3)
    img = unpatchify(x, p)
    assert img.shape == (1, 3, h * p, h * p)
    for i, j, a, b, c in [(0, 0, 0, 0, 0), (0, 0, 0, 1, 2), (1, 2, 1, 0, 1), (2, 1, 1, 1, 2)]:
        n, k = i * h + j, (a * p + b) * 3 + c  # token n = row-major; within a patch (row a, col b, channel c)
        assert img[0, c, i * p + a, j * p + b] == x[0, n, k]
    torch.testing.assert_close(patchify(img, p), x, rtol=0, atol=0)


def test_sincos_table_mae_layout():
    dim, g = 16, 3
    table = sincos_pos_embed_2d(dim, g)
    assert table.shape == (1 + g * g, dim)
    assert torch.count_nonzero(table[0]) == 0  # CLS row
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    i, j = 2, 1  # row 2, column 1 -> token 7
    expected = torch.cat([(j * omega).sin(), (j * omega).cos(), (i * omega).sin(), (i * omega).cos()])
    torch.testing.assert_close(table[1 + i * g + j], expected.float())
    assert torch.unique(table[1:], dim=0).shape[0] == g * g  # every position distinct


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    a = Decoder(tiny(attn_impl="sdpa"))
    b = Decoder(tiny(attn_impl="eager"))
    b.load_state_dict(a.state_dict())
    z = torch.randn(2, 16, 32)
    torch.testing.assert_close(a(z), b(z), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_trainable_parameter():
    dec = Decoder(tiny())
    dec(torch.randn(2, 16, 32)).square().mean().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in dec.named_parameters() if n != "cls_token"
    )


@pytest.mark.parametrize(("name", "millions"), [("B", 86.2), ("L", 303.9), ("XL", 415.1)])
def test_presets_match_reference_parameter_counts(name, millions):
    # RAE's table: input width 768, patch 16, 256 tokens; the fixed position table is not counted.
    with torch.device("meta"):
        dec = Decoder(DecoderConfig.from_preset(name, latent_dim=768))
    assert round(sum(p.numel() for p in dec.parameters()) / 1e6, 1) == millions


def test_every_preset_builds_and_unknown_preset_is_an_error():
    for name, sizes in DECODER_PRESETS.items():
        with torch.device("meta"):
            dec = Decoder(DecoderConfig.from_preset(name, latent_dim=64))
        assert len(dec.blocks) == sizes["num_layers"]
    with pytest.raises(ConfigError, match="'H'"):
        DecoderConfig.from_preset("H", latent_dim=64)
    with pytest.raises(ConfigError, match="num_heads"):
        DecoderConfig(latent_dim=8, hidden_size=64, num_heads=5)
    with pytest.raises(ConfigError, match="square"):
        DecoderConfig(latent_dim=8, num_patches=15)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    dec = Decoder(tiny(encoder_kind="siglip2", encoder_id="org/enc"))
    with torch.no_grad():
        dec.cls_token.normal_()
    out = save_decoder(dec, tmp_path / "dec")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    meta = json.loads((out / "config.json").read_text())
    assert (meta["format"], meta["encoder_id"], meta["preset"], meta["num_patches"]) == (
        "srae-decoder",
        "org/enc",
        "tiny",
        16,
    )
    back = load_decoder(out)
    assert back.cfg == dec.cfg
    z = torch.randn(2, 16, 32)
    torch.testing.assert_close(back(z), dec(z), rtol=0, atol=0)


def test_load_errors_name_the_file_and_key(tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_decoder(Decoder(tiny()), tmp_path / "dec")
    weights = load_file(out / "model.safetensors")
    save_file({**weights, "blocks.9.extra": torch.zeros(1)}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown keys: blocks\.9\.extra"):
        load_decoder(out)
    save_file({k: v for k, v in weights.items() if k != "norm.bias"}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: norm\.bias"):
        load_decoder(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_decoder(out)
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "depth": 3}))
    with pytest.raises(CheckpointError, match="'depth'"):
        load_decoder(out)
    (out / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    with pytest.raises(CheckpointError, match="srae convert decoder"):
        load_decoder(out)
    with pytest.raises(CheckpointError, match="config.json"):
        load_decoder(tmp_path / "nowhere")


def test_image_size_follows_grid_and_patch():
    cfg = DecoderConfig(latent_dim=8, num_patches=256, patch_size=14, hidden_size=64, num_heads=4)
    assert (cfg.grid, cfg.image_size) == (16, 224)  # Scale-RAE: 256 tokens, p=14 -> 224 px
    assert math.isqrt(cfg.num_patches) == cfg.grid
