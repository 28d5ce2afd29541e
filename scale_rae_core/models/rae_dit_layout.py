"""RAE's released stage-2 checkpoints (`stage2_model.pt`: DiT^DH-XL at 256 / 512 px, the DiT^DH-S autoguidance
model) -> srae's `ClassDiT` / `DiTwDDTHead`, loaded strictly.

The files are `torch.save` pickles. They are read with `weights_only=True` only, so no code in them can run, and
must hold either a state dict or a dict whose `"ema"` (preferred, as RAE's `instantiate_from_config` prefers it)
or `"model"` entry is one — the shapes RAE's trainer saves (`{step, epoch, model, ema, optimizer, scheduler}`).
Anything else is refused with one line.

Key layout (RAE `src/stage2/models/{lightningDiT,DDT}.py`) -> srae (`models/class_dit.py`):

    LightningDiT: identical names (x_embedder.proj, t_embedder.{W,mlp}, y_embedder.embedding_table, pos_embed,
                  feat_rope.freqs_{cos,sin}, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.w12,mlp.w3,
                  adaLN_modulation.1}, final_layer.{norm_final,linear,adaLN_modulation.1})
    DiTwDDTHead:  blocks.i (i < depth)          -> blocks.i
                  blocks.i (i >= depth)         -> head_blocks.(i − depth)
                  enc_feat_rope.freqs_{cos,sin} -> feat_rope.freqs_{cos,sin}
                  dec_feat_rope.freqs_{cos,sin} -> head_rope.freqs_{cos,sin}
                  everything else (s_embedder, x_embedder, s_projector, t_embedder, y_embedder, pos_embed,
                  final_layer) unchanged
    both:         a leading `module.` (DDP) or `_orig_mod.` (torch.compile) wrapper prefix is removed.

The architecture is not stored in the file; pass the preset it was trained as (RAE's sampling configs:
DiT^DH-XL `DiTDH-XL` with grid 16 at 256 px or 32 at 512 px, guidance model `DiTDH-S`; 1000 classes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.class_dit import ClassDiffusionModel, ClassDiTConfig, build_class_dit

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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused pickle global, a zip error, ...: all mean "not a plain weights file"
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(err).__name__}); srae never "
            "unpickles code — re-save it as torch.save(model.state_dict()) in a trusted environment"
        ) from err
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


def load_rae_stage2(
    path: str | Path, cfg: ClassDiTConfig, device: torch.device | str = "cpu"
) -> ClassDiffusionModel:
    """Build the model `cfg` describes and load RAE's file at `path` into it strictly (eval mode)."""
    state = state_dict_from_rae(read_rae_state_dict(path), cfg)
    model = build_class_dit(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the configured model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); pass the preset it was trained as "
            "(DiTDH-XL for stage2_model.pt, DiTDH-S for the guidance model) and its grid"
        )
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{path}: {len(bad)} tensors differ in shape from the configured model, e.g. {k} "
            f"{tuple(state[k].shape)} vs {tuple(expected[k].shape)}; check the preset, grid and num_classes"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
