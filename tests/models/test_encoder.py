"""Frozen encoders: tiny random transformers checkpoints saved with save_pretrained, loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.encoder import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig, FrozenEncoder

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
NUM_REGISTERS = 3  # not RAE's 4: the count must come from the config


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial LayerNorm affines, so 'affine removed' and 'affine kept' give different tokens."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_(0.0, 0.5)


def make_checkpoints(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    dirs = {k: root / k for k in ("siglip2", "dinov2-reg", "webssl-dino", "mae")}
    text = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=SMALL))  # full model, as on the hub
    dreg = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, num_register_tokens=NUM_REGISTERS))
    dino = Dinov2Model(Dinov2Config(**SMALL))
    mae = ViTMAEForPreTraining(
        ViTMAEConfig(
            **SMALL,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=64,
        )
    )
    for kind, model in (("siglip2", siglip), ("dinov2-reg", dreg), ("webssl-dino", dino), ("mae", mae)):
        _randomise_norms(model)
        model.save_pretrained(dirs[kind])
    (dirs["siglip2"] / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 32, "width": 32}})
    )
    return dirs


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("encoders"))


def _normalised(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("kind", ["siglip2", "dinov2-reg", "webssl-dino", "mae"])
def test_shapes_frozen_and_deterministic(ckpts, kind):
    enc = FrozenEncoder(EncoderConfig(kind, str(ckpts[kind])))
    assert (enc.input_size, enc.grid, enc.num_tokens, enc.hidden_size) == (32, (4, 4), 16, 32)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()  # the backbone must stay in eval mode
    assert enc.training and not enc.backbone.training
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    z1, z2 = enc(x), enc(x)
    assert z1.shape == (2, 16, 32)
    assert not z1.requires_grad
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["siglip2", "dinov2-reg", "mae"])
def test_affine_free_ln_standardises_every_token(ckpts, kind):
    z = FrozenEncoder(EncoderConfig(kind, str(ckpts[kind])))(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_siglip_is_last_block_output_plus_parameter_free_ln(ckpts):
    enc = FrozenEncoder(EncoderConfig("siglip2", str(ckpts["siglip2"])))
    x = torch.rand(2, 3, 32, 32)
    raw = SiglipVisionModel.from_pretrained(ckpts["siglip2"]).eval()
    with torch.no_grad():
        hidden = raw(_normalised(x, [0.5] * 3, [0.5] * 3), output_hidden_states=True).hidden_states[-1]
    expected = F.layer_norm(hidden, (32,), eps=1e-6)
    torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [-2, -3, 1, 0])
def test_siglip_select_layer_is_that_hidden_state_plus_parameter_free_ln(ckpts, layer):
    """The reference's SigLIP tower: hidden_states[mm_vision_select_layer] (L + 1 states: embeddings, then each
    block), then the same parameter-free LN; post_layernorm is never applied."""
    enc = FrozenEncoder(EncoderConfig("siglip2", str(ckpts["siglip2"]), select_layer=layer))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(layer + 5))
    raw = SiglipVisionModel.from_pretrained(ckpts["siglip2"]).eval()
    with torch.no_grad():
        states = raw(_normalised(x, [0.5] * 3, [0.5] * 3), output_hidden_states=True).hidden_states
    assert len(states) == 3  # 2 blocks
    tokens = enc(x)
    torch.testing.assert_close(tokens, F.layer_norm(states[layer], (32,), eps=1e-6), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tokens, F.layer_norm(states[-1], (32,), eps=1e-6), atol=1e-3)
    assert len(enc.backbone.encoder.layers) == (layer if layer >= 0 else 3 + layer)  # the blocks after it are gone


def test_select_layer_errors_are_one_line(ckpts):
    with pytest.raises(ConfigError, match=r"select_layer -4 is outside the 3 hidden states of its 2 blocks; use -1"):
        FrozenEncoder(EncoderConfig("siglip2", str(ckpts["siglip2"]), select_layer=-4))
    with pytest.raises(ConfigError, match=r"select_layer = -2 but kind 'webssl-dino' always reads its last layer"):
        FrozenEncoder(EncoderConfig("webssl-dino", str(ckpts["webssl-dino"]), select_layer=-2))


def test_dinov2_reg_drops_cls_and_configured_registers(ckpts):
    enc = FrozenEncoder(EncoderConfig("dinov2-reg", str(ckpts["dinov2-reg"])))
    assert enc.num_prefix_tokens == 1 + NUM_REGISTERS
    x = torch.rand(1, 3, 32, 32)
    raw = Dinov2WithRegistersModel.from_pretrained(ckpts["dinov2-reg"]).eval()
    with torch.no_grad():
        out = raw(_normalised(x, IMAGENET_MEAN, IMAGENET_STD), output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == 1 + NUM_REGISTERS + 16
    expected = F.layer_norm(
        out.hidden_states[-1][:, 1 + NUM_REGISTERS :], (32,), eps=raw.config.layer_norm_eps
    )
    torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)


def test_webssl_keeps_dinov2_affine_norm(ckpts):
    enc = FrozenEncoder(EncoderConfig("webssl-dino", str(ckpts["webssl-dino"])))
    x = torch.rand(1, 3, 32, 32)
    raw = Dinov2Model.from_pretrained(ckpts["webssl-dino"]).eval()
    with torch.no_grad():
        expected = raw(_normalised(x, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 1:]
    z = enc(x)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    assert z.mean(-1).abs().max() > 0.1  # the affine LN is kept: tokens are not standardised


def test_mae_keeps_all_tokens_in_raster_order(ckpts):
    enc = FrozenEncoder(EncoderConfig("mae", str(ckpts["mae"])))
    x = torch.rand(2, 3, 32, 32)
    raw = ViTMAEModel.from_pretrained(ckpts["mae"], mask_ratio=0.0).eval()
    with torch.no_grad():
        # A random shuffle (mask_ratio 0) gathers the tokens in shuffled order; undo it with ids_restore.
        out = raw(_normalised(x, IMAGENET_MEAN, IMAGENET_STD), output_hidden_states=True)
    hidden = out.hidden_states[-1][:, 1:]
    index = out.ids_restore.unsqueeze(-1).expand(-1, -1, 32)
    unshuffled = torch.gather(hidden, 1, index)
    expected = F.layer_norm(unshuffled, (32,), eps=raw.config.layer_norm_eps)
    torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)


def test_resize_is_bicubic_to_square_input(ckpts):
    enc = FrozenEncoder(EncoderConfig("siglip2", str(ckpts["siglip2"])))
    x = torch.rand(1, 3, 48, 40)  # non-square: squashed to 32x32
    resized = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(enc(x), enc(resized), atol=1e-6, rtol=0)


def test_preprocessor_config_sets_mean_std_and_size(ckpts, tmp_path):
    src = ckpts["dinov2-reg"]
    dst = tmp_path / "dreg"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    proc = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
        "crop_size": {"height": 16, "width": 16},
    }
    (dst / "preprocessor_config.json").write_text(json.dumps({**proc, "do_center_crop": True}))
    enc = FrozenEncoder(EncoderConfig("dinov2-reg", str(dst)))
    assert enc.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert enc.std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert (enc.input_size, enc.num_tokens) == (16, 4)
    assert enc(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32)
    # explicit input_size wins; family defaults apply without a preprocessor file
    enc = FrozenEncoder(EncoderConfig("dinov2-reg", str(src), input_size=48))
    assert (enc.num_tokens, enc.mean.flatten().tolist()) == (36, pytest.approx(list(IMAGENET_MEAN)))


def test_errors_name_the_problem(ckpts, tmp_path):
    with pytest.raises(ConfigError, match="clip"):
        FrozenEncoder(EncoderConfig("clip", str(ckpts["mae"])))
    with pytest.raises(CheckpointError, match="model_type 'dinov2'"):
        FrozenEncoder(EncoderConfig("mae", str(ckpts["webssl-dino"])))
    with pytest.raises(CheckpointError, match="missing-dir"):
        FrozenEncoder(EncoderConfig("mae", str(tmp_path / "missing-dir")))
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        FrozenEncoder(EncoderConfig("mae", str(ckpts["mae"]), input_size=36))


@pytest.mark.parametrize("kind", ["siglip2", "mae", "webssl-dino"])
def test_input_size_other_than_the_checkpoint_interpolates_positions(ckpts, kind):
    # RAE runs MAE (trained at 224) at 256; here 32 -> 48 gives a 6x6 grid.
    enc = FrozenEncoder(EncoderConfig(kind, str(ckpts[kind]), input_size=48))
    z = enc(torch.rand(2, 3, 48, 48))
    assert (enc.grid, z.shape) == ((6, 6), (2, 36, 32))
    assert torch.isfinite(z).all()
