"""Tiny inference fixtures: a random ScaleRAE export, the same weights in the released layout, a tiny decoder.

The model reads the seeded ``tiny-random`` SigLIP tower (64 px, 8 × 8 = 64 tokens × 192 channels); the LLM is the
tiny Qwen2 preset, the head the tiny DiT. Nothing is trained: the tests check plumbing, numbers and files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scale_rae_core.config import DiTSettings, EncoderSettings, LLMSettings
from scale_rae_core.models.adapters import srae_to_released_key, to_released_config
from scale_rae_core.models.scale_rae import ScaleRAE, build_llm, save_export, scale_rae_config

ENCODER = EncoderSettings(kind="siglip", path="tiny-random", input_size=64)
C, GRID = 192, 8
N = GRID * GRID


def build_tiny(tmp: Path) -> tuple[ScaleRAE, object]:
    torch.manual_seed(0)
    llm, tok = build_llm(LLMSettings(path="", preset="tiny"), tmp / "tok")
    cfg = scale_rae_config(llm, DiTSettings(preset="tiny"), ENCODER, C, GRID)
    model = ScaleRAE(cfg, llm=llm).eval()
    with torch.no_grad():  # a trained-looking head: non-zero outputs and a non-trivial null condition
        for p in model.diff_head.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model, tok


def write_decoder(out: Path) -> Path:
    from scale_rae_core.models.build import build_encoder
    from scale_rae_core.models.decoder import Decoder, save_decoder
    from scale_rae_core.models.rae import decoder_config_for

    torch.manual_seed(1)
    encoder = build_encoder(ENCODER)
    return save_decoder(Decoder(decoder_config_for(encoder, "tiny", patch_size=8)), out)


def write_released(model: ScaleRAE, tok, out: Path, tower: str, shards: int = 2, extra: dict | None = None,
                   drop: tuple[str, ...] = (), dtype: torch.dtype | None = None, config: dict | None = None,
                   tied_head: bool = False) -> Path:
    """The model in the nyu-visionx/Scale-RAE-* layout: cambrian_qwen config.json, sharded safetensors + index.

    ``dtype``: store every floating tensor in it; ``config``: keys to set in config.json; ``tied_head``: keep
    ``lm_head.weight`` in the files of a tied model too."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {srae_to_released_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.llm.get("tie_word_embeddings") and not tied_head:
        state.pop("lm_head.weight", None)
    for key in drop:
        state.pop(key)
    state.update(extra or {})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = to_released_config(model.cfg, tower) | (config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(str(out))
    return out


def write_export(model: ScaleRAE, tok, out: Path) -> Path:
    return save_export(model, tok, out)
