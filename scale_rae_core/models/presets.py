"""LLM size presets: a tiny random Qwen2 for CPU runs, and the real Qwen2.5 shapes for counting.

``model.llm.preset`` names one of :data:`LLM_PRESETS`. With ``model.llm.path = ""`` the unified trainer builds
a randomly initialised ``Qwen2ForCausalLM`` from it (the ``tiny`` profile does); with a path the pretrained
checkpoint's own config wins and the preset only documents the expected size. The Qwen2.5 entries copy the
released ``config.json`` values, so :func:`count_llm_params` (built on the meta device, no memory) gives
the real parameter counts: 0.494 B, 1.544 B and 7.616 B.

The tiny preset's vocabulary ships with the package (:data:`TINY_TOKENIZER`): a byte-level BPE trained on the
shapes world's words plus some generic English, made by ``scale_rae_core.shapes.vocab``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen2Config

from scale_rae_core.errors import ConfigError

TINY_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer"  # the tiny preset's tokenizer

LLM_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the tiny profile: 4 layers of width 128, GQA 4 q / 2 kv heads (head_dim 32).
    # vocab_size is set from the tokenizer when the model is built.
    "tiny": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, vocab_size=512,
    ),
    # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, vocab_size=151936,
    ),
    # Qwen/Qwen2.5-1.5B-Instruct (the backbone of Scale-RAE-Qwen1.5B_DiT2.4B)
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, vocab_size=151936,
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, vocab_size=152064,
    ),
}


def llm_config(preset: str, vocab_size: int | None = None) -> Qwen2Config:
    """The ``Qwen2Config`` of a preset; ``vocab_size`` overrides the preset's (e.g. ``len(tokenizer)``)."""
    if preset not in LLM_PRESETS:
        raise ConfigError(f"model.llm.preset = '{preset}' is unknown; choose one of {', '.join(LLM_PRESETS)}")
    kwargs = dict(LLM_PRESETS[preset])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    return Qwen2Config(**kwargs)


def count_llm_params(preset: str) -> int:
    """Parameters of a preset's ``Qwen2ForCausalLM`` (tied embeddings counted once), built on the meta device."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(llm_config(preset))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
