"""Released decoders (reference `GeneralDecoder` state_dict in model.pt + vit_mae config.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.adapters.rae_decoder import released_decoder_to_srae, srae_decoder_to_released
from scale_rae_core.models.convert import convert_decoder, load_released_decoder
from scale_rae_core.models.decoder import load_decoder

C, D, LAYERS, HEADS, MLP, P, N = 24, 32, 2, 4, 48, 4, 16


def released_state(layers: int = LAYERS, dim: int = D) -> dict[str, torch.Tensor]:
    """Random weights under the reference key names, written out by hand."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd = {
        "decoder_embed.weight": r(dim, C),
        "decoder_embed.bias": r(dim),
        "trainable_cls_token": r(1, 1, dim),
        "decoder_pos_embed": r(1, N + 1, dim),
        "decoder_norm.weight": 1 + r(dim),
        "decoder_norm.bias": r(dim),
        "decoder_pred.weight": r(P * P * 3, dim),
        "decoder_pred.bias": r(P * P * 3),
    }
    for i in range(layers):
        pre = f"decoder_layers.{i}."
        for name in ("query", "key", "value"):
            sd[pre + f"attention.attention.{name}.weight"] = r(dim, dim)
            sd[pre + f"attention.attention.{name}.bias"] = r(dim)
        sd[pre + "attention.output.dense.weight"] = r(dim, dim)
        sd[pre + "attention.output.dense.bias"] = r(dim)
        sd[pre + "layernorm_before.weight"] = 1 + r(dim)
        sd[pre + "layernorm_before.bias"] = r(dim)
        sd[pre + "layernorm_after.weight"] = 1 + r(dim)
        sd[pre + "layernorm_after.bias"] = r(dim)
        sd[pre + "intermediate.dense.weight"] = r(MLP, dim)
        sd[pre + "intermediate.dense.bias"] = r(MLP)
        sd[pre + "output.dense.weight"] = r(dim, MLP)
        sd[pre + "output.dense.bias"] = r(dim)
    return sd


def hf_config(**overrides) -> dict:
    cfg = {
        "model_type": "vit_mae",
        "hidden_size": 768,  # overwritten with the encoder width at run time by the reference: not trusted
        "patch_size": "SHOULD BE RELOADED",
        "image_size": 224,
        "decoder_hidden_size": D,
        "decoder_num_hidden_layers": LAYERS,
        "decoder_num_attention_heads": HEADS,
        "decoder_intermediate_size": MLP,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "layer_norm_eps": 1e-12,
    }
    return {**cfg, **overrides}


def write_released(root: Path, sd: dict, config: dict | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.save(sd, root / "model.pt")
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def reference_forward(sd: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The released decoder's maths written out directly on the released tensors (eps 1e-12)."""
    B = z.shape[0]

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)

    x = torch.cat([sd["trainable_cls_token"].expand(B, -1, -1), lin(z, "decoder_embed")], 1)
    x = x + sd["decoder_pos_embed"]
    for i in range(LAYERS):
        pre = f"decoder_layers.{i}."
        h = ln(x, pre + "layernorm_before")
        q, k, v = (
            lin(h, pre + f"attention.attention.{n}").view(B, N + 1, HEADS, -1).transpose(1, 2)
            for n in ("query", "key", "value")
        )
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(D // HEADS)).softmax(-1) @ v
        x = x + lin(att.transpose(1, 2).reshape(B, N + 1, D), pre + "attention.output.dense")
        h = ln(x, pre + "layernorm_after")
        x = x + lin(F.gelu(lin(h, pre + "intermediate.dense")), pre + "output.dense")
    out = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]  # (B, N, p*p*3)
    g = int(N**0.5)
    out = out.view(B, g, g, P, P, 3).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(B, 3, g * P, g * P)


def test_released_decoder_loads_strictly_and_matches_reference_maths(tmp_path):
    sd = released_state()
    src = write_released(tmp_path / "released", sd, hf_config())
    dec = load_released_decoder(src, encoder_kind="siglip2", encoder_id="google/siglip2-so400m-patch14-224")
    cfg = dec.cfg
    assert (cfg.latent_dim, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_size) == (
        C,
        D,
        LAYERS,
        HEADS,
        MLP,
    )
    assert (cfg.patch_size, cfg.num_patches, cfg.image_size) == (P, N, 16)
    assert (cfg.pixel_mean, cfg.pixel_std) == ([0.5] * 3, [0.5] * 3)
    z = torch.randn(2, N, C)
    with torch.no_grad():
        torch.testing.assert_close(dec(z), reference_forward(sd, z), atol=1e-5, rtol=1e-5)


def test_convert_then_reload_gives_identical_outputs(tmp_path):
    src = write_released(tmp_path / "released", released_state(), hf_config())
    released = load_released_decoder(src / "model.pt", encoder_kind="webssl-dino")
    out = convert_decoder(src, tmp_path / "ours", encoder_kind="webssl-dino")
    ours = load_decoder(out)
    assert ours.cfg == released.cfg and ours.cfg.encoder_kind == "webssl-dino"
    z = torch.randn(2, N, C)
    with torch.no_grad():
        torch.testing.assert_close(ours(z), released(z), rtol=0, atol=0)


def test_missing_and_extra_keys_are_named(tmp_path):
    sd = released_state()
    del sd["decoder_layers.1.attention.attention.key.bias"]
    sd["decoder_layers.0.attention.mask_token"] = torch.zeros(1)
    src = write_released(tmp_path / "bad", sd, hf_config())
    with pytest.raises(CheckpointError) as err:
        load_released_decoder(src, encoder_kind="siglip2")
    msg = str(err.value)
    assert "missing keys: decoder_layers.1.attention.attention.key.bias" in msg
    assert "unknown keys: decoder_layers.0.attention.mask_token" in msg
    assert "\n" not in msg


def test_long_key_lists_are_truncated_and_prefixes_explained(tmp_path):
    sd = {f"module.{k}": v for k, v in released_state().items()}
    src = write_released(tmp_path / "ddp", sd, hf_config())
    with pytest.raises(CheckpointError, match=r"more\).*prefix") as err:
        load_released_decoder(src, encoder_kind="siglip2")
    assert len(str(err.value)) < 1200


def test_sizes_come_from_weights_and_json_is_cross_checked(tmp_path):
    src = write_released(tmp_path / "a", released_state(), hf_config(decoder_num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="decoder_num_hidden_layers=3"):
        load_released_decoder(src, encoder_kind="siglip2")
    src = write_released(tmp_path / "b", released_state(), hf_config(patch_size=8))
    with pytest.raises(CheckpointError, match="patch_size=8"):
        load_released_decoder(src, encoder_kind="siglip2")


def test_without_json_heads_come_from_a_matching_preset(tmp_path):
    # RAE-collections ships model.pt alone; sizes equal to a preset (here "tiny": 64/2/4/128) fix the heads.
    sd = released_state(dim=64)
    for i in range(LAYERS):
        sd[f"decoder_layers.{i}.intermediate.dense.weight"] = torch.zeros(128, 64)
        sd[f"decoder_layers.{i}.intermediate.dense.bias"] = torch.zeros(128)
        sd[f"decoder_layers.{i}.output.dense.weight"] = torch.zeros(64, 128)
    dec = load_released_decoder(write_released(tmp_path / "p", sd, None), encoder_kind="dinov2-reg")
    assert (dec.cfg.preset, dec.cfg.num_heads, dec.cfg.pixel_mean) == ("tiny", 4, [0.485, 0.456, 0.406])
    with pytest.raises(ConfigError, match="decoder_num_attention_heads"):
        load_released_decoder(write_released(tmp_path / "q", released_state(), None), encoder_kind="mae")


def test_user_errors(tmp_path):
    src = write_released(tmp_path / "r", released_state(), hf_config())
    with pytest.raises(ConfigError, match="encoder_kind"):
        load_released_decoder(src)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_released_decoder(tmp_path)  # a directory without model.pt
    torch.save({"weights": [torch.zeros(1)]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="plain state_dict"):
        load_released_decoder(tmp_path / "odd.pt", encoder_kind="mae")


def test_half_precision_release_loads_as_float32(tmp_path):
    sd = {k: v.half() for k, v in released_state().items()}
    dec = load_released_decoder(write_released(tmp_path / "h", sd, hf_config()), encoder_kind="mae")
    assert dec.embed.weight.dtype == torch.float32
    torch.testing.assert_close(dec.embed.weight, sd["decoder_embed.weight"].float(), rtol=0, atol=0)


def test_renaming_is_a_bijection():
    sd = released_state()
    ours = released_decoder_to_srae(sd)
    assert ours["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    back = srae_decoder_to_released(ours)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
