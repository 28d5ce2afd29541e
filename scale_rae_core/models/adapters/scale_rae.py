"""Released Scale-RAE (``nyu-visionx/Scale-RAE-*``: a ``ScaleRAEQwenForCausalLM`` state dict + a ``cambrian_qwen``
config.json) <-> :class:`~scale_rae_core.models.scale_rae.ScaleRAE`: key maps and config translation."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from scale_rae_core.errors import CheckpointError

if TYPE_CHECKING:
    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.models.scale_rae import ScaleRAEConfig


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
