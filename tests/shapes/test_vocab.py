"""The tiny LLM preset's tokenizer: the shipped files are what the shapes world's corpus makes."""

from __future__ import annotations

import json

from scale_rae_core.models.presets import TINY_TOKENIZER
from scale_rae_core.prompts import SHAPES_QUESTIONS, VERIFY_QUESTION
from scale_rae_core.shapes.vocab import shapes_world_words, tiny_tokenizer


def test_the_shipped_tiny_tokenizer_is_the_one_the_shapes_world_makes(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "chat_template.jinja"):  # after a wording change: python -m scale_rae_core.shapes.vocab
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER / name).read_bytes(), name
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == json.loads(
        (TINY_TOKENIZER / "tokenizer_config.json").read_text())
    assert len(tok) == 517  # 512 BPE entries, 3 Qwen specials, <im_start> and <im_end>


def test_the_corpus_holds_every_wording_of_the_world():
    words = shapes_world_words()
    assert {q for q, _ in SHAPES_QUESTIONS} <= set(words) and "a red" in words and "light gray" in words
    assert VERIFY_QUESTION.replace("{prompt}", "") in words
