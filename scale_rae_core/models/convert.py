"""Released decoders (RAE / Scale-RAE layout) -> our `Decoder`.

A released decoder is a plain `state_dict` of the reference `GeneralDecoder` saved as `model.pt`, usually
next to a Hugging Face `vit_mae` `config.json` (`nyu-visionx/siglip2_decoder`,
`nyu-visionx/webssl300m_decoder`); RAE-collections ships only `model.pt` (its config is a ViT-XL json).
Reference key names, for L layers (i < L):

    decoder_embed.{weight,bias}            -> embed.*
    trainable_cls_token                    -> cls_token
    decoder_pos_embed                      -> pos_embed
    decoder_layers.i.layernorm_before.*    -> blocks.i.norm1.*
    decoder_layers.i.attention.attention.{query,key,value}.*  -> blocks.i.attn.qkv.*  (concatenated q;k;v)
    decoder_layers.i.attention.output.dense.*                 -> blocks.i.attn.proj.*
    decoder_layers.i.layernorm_after.*     -> blocks.i.norm2.*
    decoder_layers.i.intermediate.dense.*  -> blocks.i.mlp.fc1.*
    decoder_layers.i.output.dense.*        -> blocks.i.mlp.fc2.*
    decoder_norm.*                         -> norm.*
    decoder_pred.*                         -> pred.*

Sizes come from the weights (the reference overwrites `hidden_size`, `patch_size` and `image_size` of the
json at run time, so those json fields are not trusted); the json supplies the head count and LN eps and is
cross-checked against the weights. Loading is strict: any missing or extra key is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.files import read_plain_state_dict
from scale_rae_core.models.decoder import (
    DECODER_PRESETS,
    Decoder,
    DecoderConfig,
    _strict_load,
    save_decoder,
)
from scale_rae_core.models.encoder import FAMILIES

# Which encoder each released decoder reads (used when the caller does not say).
RELEASED_DECODERS: dict[str, dict[str, str]] = {
    "nyu-visionx/siglip2_decoder": {
        "encoder_kind": "siglip2",
        "encoder_id": "google/siglip2-so400m-patch14-224",
    },
    "nyu-visionx/webssl300m_decoder": {
        "encoder_kind": "webssl-dino",
        "encoder_id": "facebook/webssl-dino300m-full2b-224",
    },
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
_LAYER_RE = re.compile(r"^decoder_layers\.(\d+)\.")


def released_key_names(num_layers: int) -> list[str]:
    """Every key a released `model.pt` with `num_layers` blocks must contain."""
    names = list(_TOP)
    for i in range(num_layers):
        for part in (*_LAYER, *(f"attention.attention.{n}" for n in _QKV)):
            names += [f"decoder_layers.{i}.{part}.weight", f"decoder_layers.{i}.{part}.bias"]
    return names


def _check_keys(state: dict[str, torch.Tensor], source: str) -> int:
    """Validate the key set strictly; return the number of layers."""
    indices = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    num_layers = max(indices) + 1 if indices else 0
    expected = set(released_key_names(num_layers))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{label} keys: {shown}")
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unexpected):
            hint = " (keys carry a DDP/compile prefix: extract the plain decoder state_dict first)"
        raise CheckpointError(f"{source}: not a released decoder state_dict; " + "; ".join(parts) + hint)
    if num_layers == 0:
        raise CheckpointError(f"{source}: the decoder has no decoder_layers.* weights")
    return num_layers


def released_to_srae(state: dict[str, torch.Tensor], source: str = "model.pt") -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a released decoder state_dict into our `Decoder` names; strict."""
    num_layers = _check_keys(state, source)
    out = {ours: state[ref] for ref, ours in _TOP.items()}
    for i in range(num_layers):
        pre = f"decoder_layers.{i}."
        for ref, ours in _LAYER.items():
            for t in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{t}"] = state[f"{pre}{ref}.{t}"]
        for t in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{t}"] = torch.cat(
                [state[f"{pre}attention.attention.{n}.{t}"] for n in _QKV]
            )
    return out


def srae_to_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `Decoder` state_dict -> the reference key names (for use with the reference code)."""
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


# ---------------------------------------------------------------------------------------------------------
# locating and reading the files


def _resolve(
    src: str | os.PathLike[str], subfolder: str | None, revision: str | None
) -> tuple[Path, Path | None, str | None]:
    """-> (model.pt, config.json or None, hub repo id or None) for a local file/dir or a hub repo."""
    local = Path(src)
    if local.is_file():
        cfg = local.parent / "config.json"
        return local, (cfg if cfg.is_file() else None), None
    if local.is_dir():
        root = local / subfolder if subfolder else local
        weights = root / "model.pt"
        if not weights.is_file():
            raise CheckpointError(
                f"{weights}: missing; a released decoder directory holds model.pt (+ config.json)"
            )
        cfg = root / "config.json"
        return weights, (cfg if cfg.is_file() else None), None
    repo = str(src)
    if repo.count("/") != 1 or repo.startswith((".", "/")):
        raise CheckpointError(
            f"{src}: no such file or directory, and not a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import hf_hub_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        weights = Path(hf_hub_download(repo, f"{prefix}model.pt", revision=revision))
    except Exception as e:
        raise CheckpointError(
            f"{repo}: cannot get {prefix}model.pt ({type(e).__name__}); check the repo id/subfolder, or "
            f"download it with `hf download {repo}` and pass the local directory"
        ) from e
    try:
        cfg_path: Path | None = Path(hf_hub_download(repo, f"{prefix}config.json", revision=revision))
    except Exception:  # RAE-collections has no per-decoder json: sizes come from the weights
        cfg_path = None
    return weights, cfg_path, repo


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    return read_plain_state_dict(path)


def _infer_config(
    state: dict[str, torch.Tensor], hf: dict[str, Any], source: str, num_layers: int
) -> dict[str, Any]:
    """Decoder sizes from the weights, with the head count / eps from the json, cross-checked."""
    D, C = state["decoder_embed.weight"].shape
    out_dim = state["decoder_pred.weight"].shape[0]
    p = math.isqrt(out_dim // 3)
    if p * p * 3 != out_dim:
        raise CheckpointError(f"{source}: decoder_pred has {out_dim} outputs, not 3*p*p for an integer p")
    num_patches = state["decoder_pos_embed"].shape[-2] - 1
    mlp = state["decoder_layers.0.intermediate.dense.weight"].shape[0]
    sizes = {"hidden_size": int(D), "num_layers": num_layers, "mlp_size": int(mlp)}
    for hf_key, ours in (
        ("decoder_hidden_size", "hidden_size"),
        ("decoder_num_hidden_layers", "num_layers"),
        ("decoder_intermediate_size", "mlp_size"),
    ):
        if hf_key in hf and int(hf[hf_key]) != sizes[ours]:
            raise CheckpointError(
                f"{source}: config.json {hf_key}={hf[hf_key]} but the weights have {sizes[ours]}; "
                "the json belongs to another decoder"
            )
    if isinstance(hf.get("patch_size"), int) and hf["patch_size"] != p:
        raise CheckpointError(
            f"{source}: config.json patch_size={hf['patch_size']} but decoder_pred implies {p}"
        )
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
    return dict(
        latent_dim=int(C),
        num_patches=int(num_patches),
        patch_size=p,
        num_heads=heads,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        preset=preset,
        **sizes,
    )


# ---------------------------------------------------------------------------------------------------------
# public entry points


def load_released_decoder(
    src: str | os.PathLike[str],
    *,
    encoder_kind: str | None = None,
    encoder_id: str | None = None,
    config: str | os.PathLike[str] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    attn_impl: str = "sdpa",
) -> Decoder:
    """A released decoder (local model.pt / directory / hub repo id) as our `Decoder`, loaded strictly.

    encoder_kind / encoder_id: the encoder the decoder reads; known released repos fill them in, otherwise
        `encoder_kind` is required (it fixes the pixel mean/std the output is de-normalised with).
    config: a `vit_mae` config.json to use when none sits next to model.pt.
    subfolder: path of the decoder inside a hub repo (RAE-collections: `decoders/dinov2/wReg_base/ViTXL_n08`).
    """
    weights, cfg_path, repo = _resolve(src, subfolder, revision)
    if config is not None:
        cfg_path = Path(config)
    hf: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            hf = json.loads(Path(cfg_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable decoder config.json ({e})") from e
    known = RELEASED_DECODERS.get(repo or "", {})
    kind = encoder_kind or known.get("encoder_kind")
    if kind is None:
        raise ConfigError(
            f"{src}: which encoder does this decoder read? pass encoder_kind= (one of {sorted(FAMILIES)})"
        )
    if kind not in FAMILIES:
        raise ConfigError(f"encoder_kind {kind!r} is unknown; use one of {sorted(FAMILIES)}")
    state = _read_state(weights)
    num_layers = _check_keys(state, str(weights))
    sizes = _infer_config(state, hf, str(weights), num_layers)
    cfg = DecoderConfig(
        **sizes,
        attn_impl=attn_impl,
        encoder_kind=kind,
        encoder_id=encoder_id or known.get("encoder_id", ""),
        pixel_mean=list(FAMILIES[kind].mean),
        pixel_std=list(FAMILIES[kind].std),
    )
    decoder = Decoder(cfg)
    _strict_load(
        decoder, {k: v.float() for k, v in released_to_srae(state, str(weights)).items()}, str(weights)
    )
    return decoder


def convert_released_decoder(
    src: str | os.PathLike[str], out_dir: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Convert a released decoder into our format (`config.json` + `model.safetensors` in `out_dir`).

    `kwargs` are those of `load_released_decoder`.
    """
    return save_decoder(load_released_decoder(src, **kwargs), out_dir)
