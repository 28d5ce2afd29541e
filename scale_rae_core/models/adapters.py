"""External checkpoint layouts -> srae's modules: key maps and config translation, one section per family.

* **Released Scale-RAE** (``nyu-visionx/Scale-RAE-*``, a ``ScaleRAEQwenForCausalLM`` state dict + ``cambrian_qwen``
  config.json) -> :class:`~scale_rae_core.models.scale_rae.ScaleRAE`.
* **Released RAE / Scale-RAE decoder** (``model.pt``, the reference ``GeneralDecoder``) ->
  :class:`~scale_rae_core.models.decoder.Decoder`.
* **ImageReward** (``ImageReward.pt``: timm-style BLIP ViT + BLIP ``med.py`` BERT + reward MLP) ->
  :class:`~scale_rae_core.scale.imagereward.ImageReward`.
* **Released RAE stage-2 DiT** (``stage2_model.pt``: DiT^DH / LightningDiT, class-conditional) ->
  :class:`~scale_rae_core.models.class_dit.DiTwDDTHead` / ``ClassDiT`` (read weights-only, loaded strictly); next
  to it, :func:`load_class_dit` for the class-DiT model folders ``srae train dit`` writes (format
  ``srae-class-dit``), so both kinds of class DiT load in one place.
* **diffusers AutoencoderRAE** (``config.json`` + ``diffusion_pytorch_model.safetensors``) <->
  :class:`~scale_rae_core.models.decoder.Decoder` + :class:`~scale_rae_core.models.stats.LatentStats`, both ways.

The model files hold only the models; the loaders (``infer/loading.py``, ``models/convert.py``,
``scale/imagereward.py``) read the files and load strictly through :func:`scale_rae_core.models.io.load_state`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.files import read_weights_only
from scale_rae_core.models.decoder import DECODER_PRESETS
from scale_rae_core.models.io import key_mismatch

if TYPE_CHECKING:
    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.models.class_dit import ClassDiffusionModel, ClassDiTConfig
    from scale_rae_core.models.scale_rae import ScaleRAEConfig
    from scale_rae_core.models.stats import LatentStats

# ====================================================================================================
# Released Scale-RAE
# ====================================================================================================
#
# The causal LM holds the Qwen2 model under `model.`, the image modules beside it (`model.mm_projector`,
# `model.latent_queries`, `diff_head_projector` at the top) and `diff_head` (the rectified-flow wrapper) whose
# `model` is the LightningDiT; the DiT's own names already match ours.

REFERENCE_DIT_PREFIX = "diff_head.model."

# reference prefix -> UnifiedLM prefix; first match wins (the image modules sit under `model.` there)
_LM_PREFIXES = (
    ("model.mm_projector.", "mm_projector."),
    ("model.latent_queries", "latent_queries"),
    ("diff_head_projector.", "diff_head_projector."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)


def from_reference_key(key: str) -> str | None:
    """A reference key (``model.mm_projector.0.weight``) -> the :class:`UnifiedLM` key (``mm_projector.0.weight``);
    None for keys that module does not own (``diff_head.*`` etc.)."""
    for ref, ours in _LM_PREFIXES:
        if key.startswith(ref):
            return ours + key[len(ref):]
    return None


def to_reference_key(key: str) -> str:
    """A :class:`UnifiedLM` key -> the reference key (inverse of :func:`from_reference_key`)."""
    for ref, ours in _LM_PREFIXES:
        if key.startswith(ours):
            return ref + key[len(ours):]
    raise KeyError(f"{key} is not a UnifiedLM parameter name")


def dit_state_dict_from_reference(
    state: Mapping[str, torch.Tensor], prefix: str = REFERENCE_DIT_PREFIX
) -> dict[str, torch.Tensor]:
    """The LightningDiT part of a released state dict, keyed as ``LightningDiT`` names them (``prefix`` stripped;
    ``""`` for a bare DiT state dict)."""
    out = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not out:
        raise CheckpointError(
            f"no DiT weights under the prefix '{prefix}' in the checkpoint; pass the prefix its keys use"
        )
    return out


def released_to_srae_key(key: str) -> str | None:
    """A released checkpoint key -> our ``ScaleRAE`` key (None: not part of the model)."""
    if key.startswith(REFERENCE_DIT_PREFIX):
        return "diff_head." + key[len(REFERENCE_DIT_PREFIX):]
    ours = from_reference_key(key)
    return None if ours is None else "lm." + ours


def srae_to_released_key(key: str) -> str:
    """Inverse of :func:`released_to_srae_key` (for writing the released layout)."""
    if key.startswith("diff_head."):
        return REFERENCE_DIT_PREFIX + key[len("diff_head."):]
    if key.startswith("lm."):
        return to_reference_key(key[len("lm."):])
    raise KeyError(f"{key} is not a ScaleRAE parameter name")


def encoder_from_tower(tower: str) -> EncoderSettings:
    """``mm_vision_tower_aux_list[0]`` (e.g. ``google/siglip2-so400m-patch14-224-interp256``) -> encoder section."""
    from scale_rae_core.config import EncoderSettings

    path = re.sub(r"(-interp\d+|-res\d+)+$", "", tower)
    low = path.lower()
    if "siglip" in low:
        return EncoderSettings(kind="siglip2", path=path)
    if "webssl" in low or "dino" in low:
        return EncoderSettings(kind="webssl-dino", path=path)
    raise CheckpointError(
        f"config.json mm_vision_tower_aux_list[0] = '{tower}' is not a SigLIP-2 or WebSSL-DINO tower; only those "
        "released encoders are supported"
    )


def _check_released_mode(hf: dict[str, Any], where: str) -> None:
    if hf.get("vision_loss_mode", "query") != "query" or hf.get("vision_loss", "diffusion-loss") != "diffusion-loss":
        raise CheckpointError(
            f"{where}: vision_loss '{hf.get('vision_loss')}' / vision_loss_mode '{hf.get('vision_loss_mode')}' is not "
            "supported; only diffusion-loss in query mode (the released models) is"
        )
    if hf.get("dit_cls", "DiT") != "DiT":
        raise CheckpointError(f"{where}: dit_cls '{hf['dit_cls']}' is not supported; only LightningDiT ('DiT') is")
    if hf.get("diffusion_norm_stats_path"):
        raise CheckpointError(f"{where}: diffusion_norm_stats_path is set; models with head-internal normalisation are not supported")
    if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{where}: mm_projector_type '{hf['mm_projector_type']}' is not supported; only mlp2x_gelu is")


def released_config(hf: dict[str, Any], where: str = "config.json") -> tuple[ScaleRAEConfig, EncoderSettings]:
    """A released ``cambrian_qwen`` config.json -> our model config and its encoder.

    Read as the reference reads them: ``mm_vision_select_layer`` picks the SigLIP hidden state (the reference's
    DINO tower ignores it: always the last layer); ``diffusion_class_dropout_prob = 0`` means a head without the
    learned null vector (the reference creates it only above 0), so such a model cannot be guided.
    """
    from transformers import Qwen2Config

    from scale_rae_core.models.dit import DiTConfig
    from scale_rae_core.models.llm import UnifiedLMConfig
    from scale_rae_core.models.scale_rae import ScaleRAEConfig

    def need(key: str) -> Any:
        if key not in hf:
            raise CheckpointError(f"{where}: key '{key}' is missing; this is not a released Scale-RAE query-mode model")
        return hf[key]

    _check_released_mode(hf, where)
    towers = need("mm_vision_tower_aux_list")
    if not isinstance(towers, list) or len(towers) != 1:
        raise CheckpointError(f"{where}: mm_vision_tower_aux_list must name exactly one encoder, got {towers!r}")
    encoder = encoder_from_tower(str(towers[0]))
    select = hf.get("mm_vision_select_layer", -1)
    if not isinstance(select, int) or isinstance(select, bool):
        raise CheckpointError(f"{where}: mm_vision_select_layer = {select!r} is not an integer layer index")
    if encoder.kind in ("siglip", "siglip2"):
        encoder = encoder.model_copy(update={"select_layer": select})
    tokens = int((hf.get("mm_vision_tower_aux_token_len_list") or hf.get("vision_tower_aux_token_len_list") or [256])[0])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{where}: {tokens} image tokens is not a square grid")
    channels = int(hf.get("diffusion_model_channels", hf.get("mm_hidden_size", 1152)))
    if int(hf.get("mm_hidden_size", channels)) != channels:
        raise CheckpointError(f"{where}: mm_hidden_size {hf['mm_hidden_size']} != diffusion_model_channels {channels}")
    z = int(need("diffusion_model_z_channels"))
    if z == 0:
        raise CheckpointError(f"{where}: diffusion_model_z_channels = 0 (no condition projector) is not supported")
    # Qwen2 fields; released configs predate transformers 5 and keep rope_theta at the top level
    qwen_keys = set(Qwen2Config().to_dict()) | {"rope_theta"}
    qwen_keys -= {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "rope_parameters"}
    # rope_scaling is left out: the reference forces it to None, which is the default
    llm = Qwen2Config(**{k: v for k, v in hf.items() if k in qwen_keys}).to_dict()
    dropout = float(hf.get("diffusion_class_dropout_prob", 0.1))
    dit = DiTConfig(
        in_channels=channels,
        grid=grid,
        hidden=int(need("diffusion_model_hidden_size")),
        depth=int(need("diffusion_model_depth")),
        heads=int(need("diffusion_model_heads")),
        cond_dim=z,
        class_dropout_prob=dropout,
        null_condition=dropout > 0,
    )
    lm = UnifiedLMConfig(encoder_channels=channels, num_image_tokens=tokens, z_channels=z)
    cfg = ScaleRAEConfig(
        llm=llm, lm=lm, dit=dit, shift_base_dim=int(hf.get("diffusion_base_dim") or 4096),
        encoder={"kind": encoder.kind, "path": encoder.path, "input_size": None, "hidden_size": channels, "num_tokens": tokens,
                 **({"select_layer": encoder.select_layer} if encoder.select_layer != -1 else {})},
    )
    return cfg, encoder


def to_released_config(cfg: ScaleRAEConfig, tower: str, select_layer: int = -1) -> dict[str, Any]:
    """Our model config -> a ``cambrian_qwen`` config.json in the released layout (the inverse of
    :func:`released_config`), for the encoder ``tower`` (``mm_vision_tower_aux_list[0]``)."""
    llm = dict(cfg.llm)
    theta = (llm.pop("rope_parameters", None) or {}).get("rope_theta", llm.get("rope_theta", 10000.0))
    llm.update(rope_theta=theta, rope_scaling=None)  # the transformers-4.37 layout of the released configs
    dit, tokens, channels = cfg.dit, cfg.lm.num_image_tokens, cfg.lm.encoder_channels
    return {
        **llm, "model_type": "cambrian_qwen", "architectures": ["ScaleRAEQwenForCausalLM"],
        "mm_vision_tower_aux_list": [tower], "mm_vision_tower_aux_token_len_list": [tokens],
        "vision_tower_aux_token_len_list": [tokens], "mm_vision_select_layer": select_layer,
        "mm_hidden_size": channels, "vision_hidden_size": channels, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": True, "vision_loss": "diffusion-loss", "vision_loss_mode": "query",
        "diffusion_model_channels": channels, "diffusion_model_hidden_size": dit.hidden,
        "diffusion_model_depth": dit.depth, "diffusion_model_heads": dit.heads,
        "diffusion_model_z_channels": dit.cond_dim, "diffusion_class_dropout_prob": dit.class_dropout_prob,
        "diffusion_split_per_token": tokens, "diffusion_base_dim": cfg.shift_base_dim,
    }


# ====================================================================================================
# Released RAE / Scale-RAE decoder (model.pt)
# ====================================================================================================
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


# ====================================================================================================
# ImageReward (ImageReward.pt)
# ====================================================================================================
#
#     blip.visual_encoder.cls_token                   -> vision.embeddings.class_embedding
#     blip.visual_encoder.pos_embed                   -> vision.embeddings.position_embedding
#     blip.visual_encoder.patch_embed.proj.*          -> vision.embeddings.patch_embedding.*
#     blip.visual_encoder.blocks.i.norm1.*            -> vision.encoder.layers.i.layer_norm1.*
#     blip.visual_encoder.blocks.i.attn.qkv.*         -> vision.encoder.layers.i.self_attn.qkv.*
#     blip.visual_encoder.blocks.i.attn.proj.*        -> vision.encoder.layers.i.self_attn.projection.*
#     blip.visual_encoder.blocks.i.norm2.*            -> vision.encoder.layers.i.layer_norm2.*
#     blip.visual_encoder.blocks.i.mlp.fc{1,2}.*      -> vision.encoder.layers.i.mlp.fc{1,2}.*
#     blip.visual_encoder.norm.*                      -> vision.post_layernorm.*
#     blip.text_encoder.<name>                        -> text.<name>  (same names: embeddings.*,
#                                                        encoder.layer.i.{attention,crossattention}.*, ...)
#     blip.text_encoder.embeddings.position_ids       -> checked to be 0..P-1, not stored (a buffer)
#     blip.vision_proj.*, blip.text_proj.*            -> vision_proj.*, text_proj.* (BLIP's contrastive heads)
#     mlp.layers.{0,2,4,6,7}.*                        -> mlp.layers.{0,2,4,6,7}.* (dropouts at 1, 3, 5)

_VISION = "blip.visual_encoder."
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
IMAGEREWARD_POSITION_IDS = "blip.text_encoder.embeddings.position_ids"


def imagereward_to_local(key: str) -> str | None:
    """Our ``ImageReward`` parameter name for a public ``ImageReward.pt`` key; None for a key the map does not know."""
    if key.startswith(_VISION):
        rest = key[len(_VISION):]
        if rest in _VISION_TOP:
            return "vision." + _VISION_TOP[rest]
        m = _BLOCK_RE.match(rest)
        if m and m.group(2) in _VISION_BLOCK:
            return f"vision.encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"
        return None
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    for head in ("blip.vision_proj.", "blip.text_proj."):
        if key.startswith(head):
            return key[len("blip."):]
    if key.startswith("mlp.layers."):
        return key
    return None


def imagereward_to_public(key: str) -> str:
    """The public ``ImageReward.pt`` key of one of our parameter names (inverse of :func:`imagereward_to_local`)."""
    if key.startswith("vision."):
        rest = key[len("vision."):]
        for public, ours in _VISION_TOP.items():
            if rest == ours:
                return _VISION + public
        m = _LAYER_RE.match(rest)
        assert m, key
        block = {ours: public for public, ours in _VISION_BLOCK.items()}[m.group(2)]
        return f"{_VISION}blocks.{m.group(1)}.{block}.{m.group(3)}"
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    if key.startswith(("vision_proj.", "text_proj.")):
        return "blip." + key
    assert key.startswith("mlp.layers."), key
    return key


def imagereward_sizes(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Vision sizes, the contrastive width and the reward-MLP widths read from public weights (missing keys are
    reported by the strict load)."""
    if f"{_VISION}patch_embed.proj.weight" not in state or f"{_VISION}pos_embed" not in state:
        raise CheckpointError(f"{source}: no {_VISION}patch_embed.proj.weight / pos_embed; not an ImageReward.pt state dict")
    width, _, patch, _ = state[f"{_VISION}patch_embed.proj.weight"].shape
    grid = int(round((state[f"{_VISION}pos_embed"].shape[1] - 1) ** 0.5))
    layers = 1 + max((int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(_VISION)}blocks\.(\d+)\.", k))),
                     default=-1)
    mlp_key = f"{_VISION}blocks.0.mlp.fc1.weight"
    sizes: dict[str, Any] = {
        "vision_width": int(width),
        "patch_size": int(patch),
        "image_size": int(grid * patch),
        "vision_layers": int(layers),
        "vision_mlp": int(state[mlp_key].shape[0]) if mlp_key in state else 4 * int(width),
    }
    if "blip.vision_proj.weight" in state:
        sizes["embed_dim"] = int(state["blip.vision_proj.weight"].shape[0])
    linear = sorted(int(m.group(1)) for k in state if (m := re.match(r"^mlp\.layers\.(\d+)\.weight$", k)))
    if len(linear) > 1:
        sizes["head_widths"] = tuple(int(state[f"mlp.layers.{i}.weight"].shape[0]) for i in linear[:-1])
    return sizes


# ====================================================================================================
# Released RAE stage-2 DiT
# ====================================================================================================
# RAE's released stage-2 checkpoints (`stage2_model.pt`: DiT^DH-XL at 256 / 512 px, the DiT^DH-S autoguidance
# model) -> srae's `ClassDiT` / `DiTwDDTHead`, loaded strictly.
#
# The files are `torch.save` pickles. They are read with `weights_only=True` only, so no code in them can run, and
# must hold either a state dict or a dict whose `"ema"` (preferred, as RAE's `instantiate_from_config` prefers it)
# or `"model"` entry is one — the shapes RAE's trainer saves (`{step, epoch, model, ema, optimizer, scheduler}`).
# Anything else is refused with one line.
#
# Key layout (RAE `src/stage2/models/{lightningDiT,DDT}.py`) -> srae (`models/class_dit.py`):
#
#     LightningDiT: identical names (x_embedder.proj, t_embedder.{W,mlp}, y_embedder.embedding_table, pos_embed,
#                   feat_rope.freqs_{cos,sin}, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.w12,mlp.w3,
#                   adaLN_modulation.1}, final_layer.{norm_final,linear,adaLN_modulation.1})
#     DiTwDDTHead:  blocks.i (i < depth)          -> blocks.i
#                   blocks.i (i >= depth)         -> head_blocks.(i − depth)
#                   enc_feat_rope.freqs_{cos,sin} -> feat_rope.freqs_{cos,sin}
#                   dec_feat_rope.freqs_{cos,sin} -> head_rope.freqs_{cos,sin}
#                   everything else (s_embedder, x_embedder, s_projector, t_embedder, y_embedder, pos_embed,
#                   final_layer) unchanged
#     both:         a leading `module.` (DDP) or `_orig_mod.` (torch.compile) wrapper prefix is removed.
#
# The architecture is not stored in the file; pass the preset it was trained as (RAE's sampling configs:
# DiT^DH-XL `DiTDH-XL` with grid 16 at 256 px or 32 at 512 px, guidance model `DiTDH-S`; 1000 classes).

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
NESTED_KEYS = ("ema", "model")  # in order of preference
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ROPES = {"enc_feat_rope.": "feat_rope.", "dec_feat_rope.": "head_rope."}


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_rae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in an RAE stage-2 file: a state dict, or the `ema` (else `model`) state dict of a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass the path of RAE's stage2_model.pt")
    obj = read_weights_only(path, fix="srae never unpickles code; re-save it as torch.save(model.state_dict()) in a trusted environment")
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        found = ", ".join(sorted(map(str, obj))[:6]) or "nothing"
    else:
        found = type(obj).__name__
    raise CheckpointError(
        f"{path}: expected a state dict or a checkpoint with an 'ema' or 'model' state dict, found {found}"
    )


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def state_dict_from_rae(state: Mapping[str, torch.Tensor], cfg: ClassDiTConfig) -> dict[str, torch.Tensor]:
    """Rename a released RAE state dict to srae's names (see the module docstring); values are not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = _strip_wrappers(key)
        if cfg.has_head:
            block = _BLOCK.match(key)
            if block and int(block[1]) >= cfg.depth:
                key = f"head_blocks.{int(block[1]) - cfg.depth}.{block[2]}"
            for old, new in _ROPES.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
        if key in out:
            raise CheckpointError(f"checkpoint key {key!r} appears twice once wrapper prefixes are removed")
        out[key] = value
    return out


def latents_from_state(state: Mapping[str, torch.Tensor], cfg: ClassDiTConfig) -> ClassDiTConfig:
    """`cfg` with in_channels, grid and num_classes read from a (renamed) state dict: its patch embedding
    (D, C, 1, 1), its positions (1, g², D) and its label table (K + 1 rows with the null class)."""
    from dataclasses import replace

    try:
        channels = int(state["x_embedder.proj.weight"].shape[1])
        tokens = int(state["pos_embed"].shape[1])
        rows = int(state["y_embedder.embedding_table.weight"].shape[0])
    except (KeyError, IndexError):
        raise CheckpointError("the checkpoint has no x_embedder.proj.weight / pos_embed / y_embedder table; "
                              "pass an RAE stage-2 DiT (stage2_model.pt)") from None
    grid = math.isqrt(tokens)
    return replace(cfg, in_channels=channels, grid=grid, num_classes=rows - int(cfg.class_dropout_prob > 0))


def load_rae_stage2(
    path: str | Path, cfg: ClassDiTConfig, device: torch.device | str = "cpu", *, fit_latents: bool = False
) -> ClassDiffusionModel:
    """Build the model `cfg` describes and load RAE's file at `path` into it strictly (eval mode).

    ``fit_latents``: take in_channels, grid and num_classes from the file (:func:`latents_from_state`), so a size
    preset is enough (DiTDH-XL at 256 or 512 px).
    """
    from scale_rae_core.models.class_dit import build_class_dit
    from scale_rae_core.models.io import load_state

    state = state_dict_from_rae(read_rae_state_dict(path), cfg)
    if fit_latents:
        cfg = latents_from_state(state, cfg)
    model = build_class_dit(cfg)
    load_state(model, state, source=str(path), what="the configured class DiT",
               fix="pass the preset it was trained as (DiTDH-XL for stage2_model.pt, DiTDH-S for the guidance model), "
                   "its grid and num_classes")
    return model.to(device).eval()


# ====================================================================================================

# diffusers AutoencoderRAE
# ====================================================================================================
# diffusers >= 0.42 (`models/autoencoders/autoencoder_rae.py`): a folder or repo with config.json
# (`_class_name: "AutoencoderRAE"`) and `diffusion_pytorch_model.safetensors` (or shards + its index) holding
#
#     encoder.*                           the frozen encoder: the transformers model of `encoder_type` (dinov2:
#                                         Dinov2WithRegistersModel, siglip2: SiglipVisionModel, mae: ViTMAEModel),
#                                         built from config with 64-wide heads, its final-norm affine removed
#     encoder_mean, encoder_std           (1, 3, 1, 1) pixel normalisation     -> DecoderConfig.pixel_mean / pixel_std
#     _latents_mean, _latents_std         latent normalisation, broadcast over z -> LatentStats (below)
#     decoder.<released name>             the RAE decoder under the released `model.pt` names (map above), except
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
# ----------------------------------------------------------------------------------------------------
#
#     config.json   {"format": "srae-class-dit", "version": 1, "preset": "DiTDH-XL", "class_dit": {ClassDiTConfig},
#                    "latents": {"encoder": {kind, path, input_size}, "decoder": spec, "image_size": S,
#                                "shape": [C, g, g], "stats": "latent_stats.safetensors" | null, "shift_base_dim": 4096},
#                    "classes": [names] | null, "training": {...}}

CLASS_DIT_FORMAT = "srae-class-dit"
CLASS_DIT_VERSION = 1
CLASS_DIT_STATS = "latent_stats.safetensors"


def is_class_dit_folder(path: str | Path) -> bool:
    import json

    config = Path(path).expanduser() / "config.json"
    try:
        return json.loads(config.read_text()).get("format") == CLASS_DIT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_class_dit(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ClassDiffusionModel, dict[str, Any]]:
    """The class DiT of an ``srae train dit`` model folder, loaded strictly (eval mode), and its config.json."""
    import json

    from scale_rae_core.models.class_dit import ClassDiTConfig, build_class_dit
    from scale_rae_core.models.io import WEIGHTS_FILE, load_state, read_safetensors

    folder = Path(folder).expanduser()
    fix = "pass the model folder `srae train dit` exported (RUN/model)"
    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: no readable config.json ({type(exc).__name__}); {fix}") from None
    if not isinstance(info, dict) or info.get("format") != CLASS_DIT_FORMAT:
        raise CheckpointError(f"{folder}: config.json is not an srae class-DiT model ({CLASS_DIT_FORMAT}); {fix}")
    if info.get("version", 0) > CLASS_DIT_VERSION:
        raise CheckpointError(f"{folder}: class-DiT format version {info['version']} is newer than this srae; upgrade srae")
    cfg = ClassDiTConfig(**info["class_dit"])
    with torch.device("meta"):
        model = build_class_dit(cfg)
    model.to_empty(device="cpu")
    model.reset_fixed_buffers()
    load_state(model, read_safetensors([folder / WEIGHTS_FILE], fix=fix), source=str(folder / WEIGHTS_FILE), fix=fix,
               what="its config.json")
    return model.to(device).eval(), info
