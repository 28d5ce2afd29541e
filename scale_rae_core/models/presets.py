"""LLM size presets: a tiny random Qwen2 for CPU runs, and the real Qwen2.5 shapes for counting.

``model.llm.preset`` names one of :data:`LLM_PRESETS`. With ``model.llm.path = ""`` the unified trainer builds
a randomly initialised ``Qwen2ForCausalLM`` from it (the ``tiny`` profile does); with a path the pretrained
checkpoint's own config wins and the preset only documents the expected size. The Qwen2.5 entries copy the
released ``config.json`` values, so :func:`count_llm_params` (built on the meta device, no memory) gives
the real parameter counts: 0.494 B, 1.544 B and 7.616 B.

A tiny vocabulary comes from :func:`tiny_tokenizer`: a byte-level BPE trained on the shapes world's words
plus some generic English (deterministic: the same files every time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, Qwen2Config

from scale_rae_core.errors import ConfigError

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

# Generic words the tiny tokenizer learns besides the shapes world (chat filler, common questions).
GENERIC_WORDS = (
    "the a an of in on at to and or is are was it this that what which where how why who there here "
    "image picture photo draw generate create show describe colour color shape size position background "
    "yes no left right center top bottom small large big little one two three please thank you hello "
    "can could would should do does answer question object objects with without plain light dark"
).split()


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


def shapes_world_words() -> list[str]:
    """Every text the shapes world writes (names, templates, questions), for the tiny tokenizer's BPE."""
    from scale_rae_core.data import synth
    from scale_rae_core.scale.questions import CAPTION_QUESTION, VERIFY_QUESTION

    words: list[str] = []
    for table in (synth.COLOURS, synth.SHAPES, synth.POSITIONS, synth.SIZES, synth.BACKGROUNDS):
        words += [f"{prefix}{name}" for name in table for prefix in ("", "a ")]  # also with a leading space
    words += list(synth.WHERE.values())
    words += [q for q, _ in synth.QUESTIONS]
    words += [CAPTION_QUESTION, VERIFY_QUESTION.replace("{prompt}", ""), "yes", "no"]
    words += [t.replace("{", "").replace("}", "") for t in (*synth.CAPTION_TEMPLATES, *synth.GENERATION_TEMPLATES)]
    return words


def tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """The tiny profile's tokenizer (with ``<im_start>``/``<im_end>``), written to ``out_dir`` and reloaded."""
    from scale_rae_core.models.tokenizer import build_tiny_tokenizer

    # Repeat the world's words so BPE merges them into whole-word tokens before the generic ones.
    corpus = shapes_world_words() * 4 + [f"a {w}" for w in GENERIC_WORDS]
    return build_tiny_tokenizer(corpus, out_dir, vocab_size=vocab_size)
