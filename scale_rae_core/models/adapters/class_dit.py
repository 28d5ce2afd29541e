"""Class-conditional DiTs: RAE's released stage-2 checkpoints (``stage2_model.pt``, DiT^DH / LightningDiT) and the
model folders ``srae train dit`` writes (format ``srae-class-dit``) -> :class:`~scale_rae_core.models.class_dit.ClassDiT` /
``DiTwDDTHead``, both loaded strictly in one place."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scale_rae_core.errors import CheckpointError
from scale_rae_core.files import check_format, read_weights_only

if TYPE_CHECKING:
    from scale_rae_core.models.class_dit import ClassDiffusionModel, ClassDiTConfig


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
    check_format(info, CLASS_DIT_FORMAT, CLASS_DIT_VERSION, f"{folder}/config.json", "an srae class-DiT model", fix)
    cfg = ClassDiTConfig(**info["class_dit"])
    with torch.device("meta"):
        model = build_class_dit(cfg)
    model.to_empty(device="cpu")
    model.reset_fixed_buffers()
    load_state(model, read_safetensors([folder / WEIGHTS_FILE], fix=fix), source=str(folder / WEIGHTS_FILE), fix=fix,
               what="its config.json")
    return model.to(device).eval(), info
