"""ImageReward (``ImageReward.pt``: timm-style BLIP ViT + BLIP ``med.py`` BERT + reward MLP) <->
:class:`~scale_rae_core.scale.imagereward.ImageReward`: key maps and sizes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from scale_rae_core.errors import CheckpointError

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
