"""diffusers ``AutoencoderRAE`` (config.json + ``diffusion_pytorch_model.safetensors``) <->
:class:`~scale_rae_core.models.decoder.Decoder` + :class:`~scale_rae_core.models.stats.LatentStats`, both ways."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.adapters.rae_decoder import released_decoder_to_srae, srae_decoder_to_released

if TYPE_CHECKING:
    from scale_rae_core.models.stats import LatentStats


# diffusers >= 0.42 (`models/autoencoders/autoencoder_rae.py`): a folder or repo with config.json
# (`_class_name: "AutoencoderRAE"`) and `diffusion_pytorch_model.safetensors` (or shards + its index) holding
#
#     encoder.*                           the frozen encoder: the transformers model of `encoder_type` (dinov2:
#                                         Dinov2WithRegistersModel, siglip2: SiglipVisionModel, mae: ViTMAEModel),
#                                         built from config with 64-wide heads, its final-norm affine removed
#     encoder_mean, encoder_std           (1, 3, 1, 1) pixel normalisation     -> DecoderConfig.pixel_mean / pixel_std
#     _latents_mean, _latents_std         latent normalisation, broadcast over z -> LatentStats (below)
#     decoder.<released name>             the RAE decoder under the released `model.pt` names (the map in rae_decoder.py), except
#       decoder_layers.i.attention.to_{q,k,v}.*  for  attention.attention.{query,key,value}.*
#       decoder_layers.i.attention.to_out.0.*    for  attention.output.dense.*
#     (decoder_pos_embed is not saved: diffusers recomputes it as sincos_pos_embed_2d(D, g, base_grid=16))
#
# What srae's `Decoder` covers: the decoder and the latent statistics. The encoder is srae's own frozen encoder of
# the same kind (`encoder.*` is not read); `noise_tau` and `use_encoder_loss` are training settings. Refused: an
# output that is not 3 channels. Latents: diffusers decodes z as z / scaling_factor * (std + 1e-5) + mean, over
# z (B, C, h, w) when `reshape_to_2d` else (B, N, C); srae's LatentStats(mean, var = ((std + 1e-5) / scaling_factor)²,
# eps = 0) over tokens (N, C) is the same map.
#
# Writing one (srae -> diffusers) needs the encoder's transformers weights too, and an encoder diffusers can rebuild
# from its config: dinov2-reg or mae, 64-wide heads and the other sizes of the transformers defaults. (diffusers
# 0.42's siglip2 encoder does not build against transformers 5, whose SiglipVisionModel has no `vision_model`, so
# siglip decoders are read but not written.) A decoder whose position table differs from diffusers' (token grids
# other than 16 × 16, unless it came from diffusers) or whose LayerNorm eps is not 1e-12 is refused.

DIFFUSERS_CLASS = "AutoencoderRAE"
DIFFUSERS_VERSION = "0.42.0"  # the first diffusers with AutoencoderRAE, written as `_diffusers_version`
DIFFUSERS_BASE_GRID = 16  # get_2d_sincos_pos_embed's base_size
DIFFUSERS_STD_EPS = 1e-5
DIFFUSERS_LN_EPS = 1e-12  # RAEDecoder's LayerNorms (AutoencoderRAE does not pass another)
# diffusers encoder_type -> srae encoder kind; and back, for the kinds srae writes (see above)
DIFFUSERS_ENCODERS = {"dinov2": "dinov2-reg", "siglip2": "siglip2", "mae": "mae"}
SRAE_TO_DIFFUSERS_ENCODER = {"dinov2-reg": "dinov2", "mae": "mae"}
_DIFFUSERS_ATTENTION = {"to_q": "attention.query", "to_k": "attention.key", "to_v": "attention.value",
                        "to_out.0": "output.dense"}
_RELEASED_ATTENTION = {v: k for k, v in _DIFFUSERS_ATTENTION.items()}
_DIFFUSERS_ATTENTION_RE = re.compile(r"^decoder_layers\.(\d+)\.attention\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
_RELEASED_ATTENTION_RE = re.compile(r"^decoder_layers\.(\d+)\.attention\.(attention\.query|attention\.key|"
                                    r"attention\.value|output\.dense)\.(weight|bias)$")


def is_diffusers_rae_config(hf: Mapping[str, Any]) -> bool:
    return hf.get("_class_name") == DIFFUSERS_CLASS


def diffusers_decoder_config(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """An AutoencoderRAE config.json -> ``DecoderConfig`` fields (all but ``encoder_id`` and ``attn_impl``)."""
    from scale_rae_core.models.encoder import IMAGENET_MEAN, IMAGENET_STD

    kind = DIFFUSERS_ENCODERS.get(str(hf.get("encoder_type", "dinov2")))
    if kind is None:
        raise CheckpointError(f"{source}: encoder_type '{hf['encoder_type']}' is unknown; AutoencoderRAE has {sorted(DIFFUSERS_ENCODERS)}")
    if int(hf.get("num_channels", 3)) != 3:
        raise CheckpointError(f"{source}: num_channels = {hf['num_channels']}; srae's decoder writes 3-channel (RGB) images only")
    try:
        grid = int(hf.get("encoder_input_size", 224)) // int(hf.get("encoder_patch_size", 14))
        sizes = dict(latent_dim=int(hf.get("encoder_hidden_size", 768)), num_patches=grid * grid,
                     patch_size=int(hf.get("patch_size", 16)), hidden_size=int(hf.get("decoder_hidden_size", 512)),
                     num_layers=int(hf.get("decoder_num_hidden_layers", 8)),
                     num_heads=int(hf.get("decoder_num_attention_heads", 16)),
                     mlp_size=int(hf.get("decoder_intermediate_size", 2048)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: a size in config.json is not a number ({exc}); fix the AutoencoderRAE config") from None
    mean, std = hf.get("encoder_norm_mean") or list(IMAGENET_MEAN), hf.get("encoder_norm_std") or list(IMAGENET_STD)
    return dict(sizes, layer_norm_eps=DIFFUSERS_LN_EPS, encoder_kind=kind,
                pixel_mean=[float(v) for v in mean], pixel_std=[float(v) for v in std])


def diffusers_to_released_key(key: str) -> str | None:
    """``decoder.*`` of an AutoencoderRAE -> the released decoder name; None for every other tensor."""
    if not key.startswith("decoder."):
        return None
    key = key[len("decoder."):]
    m = _DIFFUSERS_ATTENTION_RE.match(key)
    return f"decoder_layers.{m[1]}.attention.{_DIFFUSERS_ATTENTION[m[2]]}.{m[3]}" if m else key


def released_to_diffusers_key(key: str) -> str:
    """Inverse of :func:`diffusers_to_released_key`."""
    m = _RELEASED_ATTENTION_RE.match(key)
    if m:
        key = f"decoder_layers.{m[1]}.attention.{_RELEASED_ATTENTION[m[2]]}.{m[3]}"
    return "decoder." + key


def diffusers_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The position table diffusers' RAEDecoder recomputes, as srae's ``pos_embed`` buffer (1, 1 + g², dim)."""
    from scale_rae_core.models.decoder import sincos_pos_embed_2d

    return sincos_pos_embed_2d(dim, grid, base_grid=DIFFUSERS_BASE_GRID).unsqueeze(0)


def diffusers_decoder_to_srae(state: Mapping[str, torch.Tensor], dim: int, grid: int, source: str) -> dict[str, torch.Tensor]:
    """The ``decoder.*`` tensors of an AutoencoderRAE -> srae ``Decoder`` names (q/k/v fused, position table added)."""
    released = {name: v for k, v in state.items() if (name := diffusers_to_released_key(k)) is not None}
    released["decoder_pos_embed"] = diffusers_pos_embed(dim, grid)
    return released_decoder_to_srae(released, source)


def srae_decoder_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """srae ``Decoder`` tensors -> the ``decoder.*`` tensors of an AutoencoderRAE (no position table: recomputed)."""
    released = srae_decoder_to_released(state)
    return {released_to_diffusers_key(k): v for k, v in released.items() if k != "decoder_pos_embed"}


def _broadcast(value: torch.Tensor, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
    try:
        return torch.broadcast_to(value.float(), shape).contiguous()
    except RuntimeError:
        raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, which does not broadcast over latents "
                              f"{shape}; this is not a working AutoencoderRAE") from None


def diffusers_latent_stats(
    mean: torch.Tensor, std: torch.Tensor, hf: Mapping[str, Any], grid: int, channels: int, source: str
) -> LatentStats | None:
    """``_latents_mean`` / ``_latents_std`` (+ ``scaling_factor``) -> srae's token statistics; None for identity."""
    from scale_rae_core.models.stats import LatentStats

    scaling = float(hf.get("scaling_factor", 1.0))
    if mean.numel() == 1 and std.numel() == 1 and float(mean) == 0.0 and float(std) == 1.0 and scaling == 1.0:
        return None  # the defaults: z is decoded as z * (1 + 1e-5), which srae's decoder path does not repeat
    if hf.get("reshape_to_2d", True):
        shape = (channels, grid, grid)
        mean, std = (_broadcast(t, shape, n, source).flatten(1).T.contiguous()  # (C, h, w) -> (h·w, C)
                     for t, n in ((mean, "_latents_mean"), (std, "_latents_std")))
    else:
        shape = (grid * grid, channels)
        mean, std = _broadcast(mean, shape, "_latents_mean", source), _broadcast(std, shape, "_latents_std", source)
    return LatentStats(mean=mean, var=((std + DIFFUSERS_STD_EPS) / scaling).square(), eps=0.0)


def srae_stats_to_diffusers(stats: LatentStats, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """srae token statistics (N, C) -> AutoencoderRAE ``latents_mean`` / ``latents_std`` over (C, h, w)."""
    std = (stats.var + stats.eps).sqrt() - DIFFUSERS_STD_EPS
    to_chw = lambda t: t.float().T.reshape(-1, grid, grid).contiguous()  # noqa: E731 - (h·w, C) -> (C, h, w)
    return to_chw(stats.mean), to_chw(std)
# ----------------------------------------------------------------------------------------------------
# srae's class-DiT model folder (`srae train dit`): model.safetensors (the EMA weights) + config.json + stats
