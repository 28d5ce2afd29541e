"""The tiny LLM preset's tokenizer: a byte-level BPE trained on the shapes world's words plus generic English.

The tiny profile (``model.llm.path = ""``) loads it from the package (``models.presets.TINY_TOKENIZER``), so the
model floor needs nothing from the shapes world; this module is how those files are made, and a test checks
that :func:`tiny_tokenizer` still writes exactly them. Deterministic: the same files every time. Rewrite the
shipped copy after changing a wording of the world::

    python -m scale_rae_core.shapes.vocab
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from scale_rae_core.prompts import (
    CAPTION_QUESTION,
    SHAPES_CAPTION_TEMPLATES,
    SHAPES_GENERATION_TEMPLATES,
    SHAPES_QUESTIONS,
    SHAPES_WHERE,
    VERIFY_QUESTION,
)
from scale_rae_core.shapes.synth import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

# Generic words the tiny tokenizer learns besides the shapes world (chat filler, common questions).
GENERIC_WORDS = (
    "the a an of in on at to and or is are was it this that what which where how why who there here "
    "image picture photo draw generate create show describe colour color shape size position background "
    "yes no left right center top bottom small large big little one two three please thank you hello "
    "can could would should do does answer question object objects with without plain light dark"
).split()


def shapes_world_words() -> list[str]:
    """Every text the shapes world writes (names, templates, questions), for the tiny tokenizer's BPE."""
    words: list[str] = []
    for table in (COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS):
        words += [f"{prefix}{name}" for name in table for prefix in ("", "a ")]  # also with a leading space
    words += list(SHAPES_WHERE.values())
    words += [q for q, _ in SHAPES_QUESTIONS]
    words += [CAPTION_QUESTION, VERIFY_QUESTION.replace("{prompt}", ""), "yes", "no"]
    words += [t.replace("{", "").replace("}", "") for t in (*SHAPES_CAPTION_TEMPLATES, *SHAPES_GENERATION_TEMPLATES)]
    return words


def tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train the tiny tokenizer (with ``<im_start>``/``<im_end>``), write it to ``out_dir`` and reload it."""
    from scale_rae_core.models.tokenizer import build_tiny_tokenizer

    # Repeat the world's words so BPE merges them into whole-word tokens before the generic ones.
    corpus = shapes_world_words() * 4 + [f"a {w}" for w in GENERIC_WORDS]
    return build_tiny_tokenizer(corpus, out_dir, vocab_size=vocab_size)


if __name__ == "__main__":
    from scale_rae_core.models.presets import TINY_TOKENIZER

    tiny_tokenizer(TINY_TOKENIZER)
    print(f"wrote {TINY_TOKENIZER}")
