"""Tiny inference fixtures: a random ScaleRAE export, the same weights in the released layout, a tiny decoder.

The model reads the seeded ``tiny-random`` SigLIP tower (64 px, 8 × 8 = 64 tokens × 192 channels); the LLM is the
tiny Qwen2 preset, the head the tiny DiT. Nothing is trained: the tests check plumbing, numbers and files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scale_rae_core.config import DiTSettings, EncoderSettings, LLMSettings
from scale_rae_core.models.adapters import srae_to_released_key
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
                   drop: tuple[str, ...] = ()) -> Path:
    """The model in the nyu-visionx/Scale-RAE-* layout: cambrian_qwen config.json, sharded safetensors + index."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {srae_to_released_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.llm.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    for key in drop:
        state.pop(key)
    state.update(extra or {})
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dit = model.cfg.dit
    cfg = dict(model.cfg.llm)
    theta = (cfg.pop("rope_parameters", None) or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg.update(rope_theta=theta, rope_scaling=None)  # the transformers-4.37 layout of the released configs
    cfg.update(
        model_type="cambrian_qwen", architectures=["ScaleRAEQwenForCausalLM"],
        mm_vision_tower_aux_list=[tower], mm_vision_tower_aux_token_len_list=[N], vision_tower_aux_token_len_list=[N],
        mm_hidden_size=C, vision_hidden_size=C, mm_projector_type="mlp2x_gelu", mm_use_im_start_end=True,
        vision_loss="diffusion-loss", vision_loss_mode="query", diffusion_model_channels=C,
        diffusion_model_hidden_size=dit.hidden, diffusion_model_depth=dit.depth, diffusion_model_heads=dit.heads,
        diffusion_model_z_channels=dit.cond_dim, diffusion_class_dropout_prob=0.1, diffusion_split_per_token=N,
    )
    (out / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(str(out))
    return out


def write_export(model: ScaleRAE, tok, out: Path) -> Path:
    return save_export(model, tok, out)
