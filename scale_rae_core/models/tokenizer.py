"""A tiny Qwen2.5-style tokenizer, built offline, for tests and smoke runs.

It has the structure of the real Qwen2.5 tokenizer, only with a vocabulary of a few hundred entries:
byte-level BPE behind Qwen's pre-tokenisation regex (so every string encodes and decodes exactly and
``"\\n"`` is its own token), the Qwen special tokens appended after the BPE vocabulary
(``<|endoftext|>`` = pad, ``<|im_start|>``, ``<|im_end|>`` = end of a chat turn) and the Qwen chat
template. With ``image_tokens=True`` the image markers ``<im_start>`` / ``<im_end>`` are appended after
them, exactly where :func:`scale_rae_core.models.llm.add_image_tokens` puts them on the real tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from scale_rae_core.prompts import DEFAULT_SYSTEM_MESSAGE, IMAGE_END, IMAGE_START

# Qwen2's pre-tokenisation regex (split text into words, numbers, punctuation runs and newline runs).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# The Qwen2.5 chat template without the tool-calling branches: a default system turn when the
# conversation has none, one `<|im_start|>{role}\n{content}<|im_end|>\n` block per message and an
# optional open assistant header.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer(
    words: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    image_tokens: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``words``, save it to ``out_dir`` and load it back with AutoTokenizer.

    ``vocab_size`` bounds the BPE vocabulary (the 256 byte symbols plus merges learned from ``words``);
    the special tokens come after it. The returned tokenizer is the one reloaded from disk, so what a
    test sees is what ``AutoTokenizer.from_pretrained(out_dir)`` gives offline.
    """
    # The chat-template words join the corpus so role headers are a few tokens, not one per byte.
    corpus = [*words, "system", "user", "assistant", DEFAULT_SYSTEM_MESSAGE]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    # Specials after the BPE vocabulary, in Qwen's order.
    bpe.add_special_tokens([PAD_TOKEN, TURN_START, TURN_END])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        eos_token=TURN_END,
        additional_special_tokens=[TURN_START, TURN_END],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    if image_tokens:
        tok.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))
