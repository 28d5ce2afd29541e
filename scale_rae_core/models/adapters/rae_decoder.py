"""Released RAE / Scale-RAE decoder (``model.pt``, the reference ``GeneralDecoder``) <->
:class:`~scale_rae_core.models.decoder.Decoder`: key maps, checks and sizes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.decoder import DECODER_PRESETS
from scale_rae_core.models.io import key_mismatch

#
#     decoder_embed.{weight,bias}            -> embed.*
#     trainable_cls_token                    -> cls_token
#     decoder_pos_embed                      -> pos_embed
#     decoder_layers.i.layernorm_before.*    -> blocks.i.norm1.*
#     decoder_layers.i.attention.attention.{query,key,value}.*  -> blocks.i.attn.qkv.*  (concatenated q;k;v)
#     decoder_layers.i.attention.output.dense.*                 -> blocks.i.attn.proj.*
#     decoder_layers.i.layernorm_after.*     -> blocks.i.norm2.*
#     decoder_layers.i.intermediate.dense.*  -> blocks.i.mlp.fc1.*
#     decoder_layers.i.output.dense.*        -> blocks.i.mlp.fc2.*
#     decoder_norm.*                         -> norm.*
#     decoder_pred.*                         -> pred.*

# Which encoder each released decoder reads (used when the caller does not say).
RELEASED_DECODERS: dict[str, dict[str, str]] = {
    "nyu-visionx/siglip2_decoder": {"encoder_kind": "siglip2", "encoder_id": "google/siglip2-so400m-patch14-224"},
    "nyu-visionx/webssl300m_decoder": {"encoder_kind": "webssl-dino", "encoder_id": "facebook/webssl-dino300m-full2b-224"},
}

_TOP = {
    "decoder_embed.weight": "embed.weight",
    "decoder_embed.bias": "embed.bias",
    "trainable_cls_token": "cls_token",
    "decoder_pos_embed": "pos_embed",
    "decoder_norm.weight": "norm.weight",
    "decoder_norm.bias": "norm.bias",
    "decoder_pred.weight": "pred.weight",
    "decoder_pred.bias": "pred.bias",
}
_LAYER = {  # reference suffix -> ours (qkv handled separately)
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = ("query", "key", "value")
_DECODER_LAYER_RE = re.compile(r"^decoder_layers\.(\d+)\.")


def released_decoder_keys(num_layers: int) -> list[str]:
    """Every key a released ``model.pt`` with ``num_layers`` blocks must contain."""
    names = list(_TOP)
    for i in range(num_layers):
        for part in (*_LAYER, *(f"attention.attention.{n}" for n in _QKV)):
            names += [f"decoder_layers.{i}.{part}.weight", f"decoder_layers.{i}.{part}.bias"]
    return names


def check_released_decoder(state: Mapping[str, torch.Tensor], source: str) -> int:
    """Validate the key set strictly; return the number of layers."""
    indices = {int(m.group(1)) for k in state if (m := _DECODER_LAYER_RE.match(k))}
    num_layers = max(indices) + 1 if indices else 0
    expected = set(released_decoder_keys(num_layers))
    missing, unknown = expected - set(state), set(state) - expected
    if missing or unknown:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unknown):
            hint = " (keys carry a DDP/compile prefix: extract the plain decoder state_dict first)"
        raise CheckpointError(key_mismatch(source, "a released decoder", "pass the decoder's own model.pt",
                                           unknown=unknown, missing=missing, hint=hint))
    if num_layers == 0:
        raise CheckpointError(f"{source}: the decoder has no decoder_layers.* weights")
    return num_layers


def released_decoder_to_srae(state: Mapping[str, torch.Tensor], source: str = "model.pt") -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a released decoder state dict into our ``Decoder`` names; strict."""
    num_layers = check_released_decoder(state, source)
    out = {ours: state[ref] for ref, ours in _TOP.items()}
    for i in range(num_layers):
        pre = f"decoder_layers.{i}."
        for ref, ours in _LAYER.items():
            for t in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{t}"] = state[f"{pre}{ref}.{t}"]
        for t in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{t}"] = torch.cat([state[f"{pre}attention.attention.{n}.{t}"] for n in _QKV])
    return out


def srae_decoder_to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``Decoder`` state dict -> the reference key names (for use with the reference code)."""
    inverse_top = {v: k for k, v in _TOP.items()}
    inverse_layer = {v: k for k, v in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        assert m is not None, key
        i, mod, t = m.groups()
        if mod == "attn.qkv":
            for name, chunk in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"decoder_layers.{i}.attention.attention.{name}.{t}"] = chunk.clone()
        else:
            out[f"decoder_layers.{i}.{inverse_layer[mod]}.{t}"] = value
    return out


def released_decoder_sizes(
    state: Mapping[str, torch.Tensor], hf: dict[str, Any], source: str, num_layers: int
) -> dict[str, Any]:
    """Decoder sizes from the weights, with the head count / LN eps from the ``vit_mae`` json, cross-checked.

    The reference overwrites ``hidden_size``, ``patch_size`` and ``image_size`` of the json at run time, so those
    json fields are not trusted; without a json (RAE-collections) a size preset fixes the head count.
    """
    D, C = state["decoder_embed.weight"].shape
    out_dim = state["decoder_pred.weight"].shape[0]
    p = math.isqrt(out_dim // 3)
    if p * p * 3 != out_dim:
        raise CheckpointError(f"{source}: decoder_pred has {out_dim} outputs, not 3*p*p for an integer p")
    num_patches = state["decoder_pos_embed"].shape[-2] - 1
    mlp = state["decoder_layers.0.intermediate.dense.weight"].shape[0]
    sizes = {"hidden_size": int(D), "num_layers": num_layers, "mlp_size": int(mlp)}
    for hf_key, ours in (("decoder_hidden_size", "hidden_size"), ("decoder_num_hidden_layers", "num_layers"),
                         ("decoder_intermediate_size", "mlp_size")):
        if hf_key in hf and int(hf[hf_key]) != sizes[ours]:
            raise CheckpointError(
                f"{source}: config.json {hf_key}={hf[hf_key]} but the weights have {sizes[ours]}; "
                "the json belongs to another decoder"
            )
    if isinstance(hf.get("patch_size"), int) and hf["patch_size"] != p:
        raise CheckpointError(f"{source}: config.json patch_size={hf['patch_size']} but decoder_pred implies {p}")
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise CheckpointError(f"{source}: only hidden_act='gelu' with qkv_bias=true is supported")
    if "decoder_num_attention_heads" in hf:
        heads = int(hf["decoder_num_attention_heads"])
        preset = next((n for n, s in DECODER_PRESETS.items() if s == {**sizes, "num_heads": heads}), "")
    else:
        preset = next((n for n, s in DECODER_PRESETS.items() if all(s[k] == v for k, v in sizes.items())), "")
        if not preset:
            raise ConfigError(
                f"{source}: no config.json gives decoder_num_attention_heads and the sizes {sizes} match no "
                f"preset; pass config=<vit_mae config.json>"
            )
        heads = DECODER_PRESETS[preset]["num_heads"]
    return dict(latent_dim=int(C), num_patches=int(num_patches), patch_size=p, num_heads=heads,
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), preset=preset, **sizes)
