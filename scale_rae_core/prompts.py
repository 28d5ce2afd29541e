"""Every wording srae puts in front of a model, and the markers inside them.

Training data and inference have to agree word for word: a model trained on "Generate an image of a red
circle." is asked the same way by the demo, and the self-verification question it learned is the one the
scaling loop asks. So each wording is written once, here, and read by the data writers (``data.entries``,
the shapes world), the inference and scaling code and the tiny tokenizer's corpus.

This module imports nothing from srae: every floor of the package may read it.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------
# Markers
# ----------------------------------------------------------------------------------------------------

IMAGE_MARKER = "<image>"  # where an image goes in a conversation's text; never a token itself
IMAGE_START = "<im_start>"  # the token that opens an image's N positions (added to the LLM's tokenizer)
IMAGE_END = "<im_end>"  # ... and the one that closes them
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."  # the system turn of the Qwen chat template


def with_images(question: str, n_images: int = 1) -> str:
    """``question`` after ``n_images`` image markers, one per line (the reference's ``<image>\\n{question}``)."""
    return f"{IMAGE_MARKER}\n" * n_images + question


# ----------------------------------------------------------------------------------------------------
# Requests and questions
# ----------------------------------------------------------------------------------------------------

# The generation request: `srae scale` sends it for every prompt (and records it in each run's metadata), and
# `srae data pack` turns a caption into a generation sample with it.
GENERATION_REQUEST = "Generate an image of {prompt}"
CAPTION_QUESTION = "Describe this image."  # answered with a caption; self-verification scores the prompt's likelihood
VERIFY_QUESTION = "Does this image align with the prompt: {prompt}?"  # answered yes/no (self-verification)

# ----------------------------------------------------------------------------------------------------
# The shapes world (``scale_rae_core.shapes``): its captions, requests and questions
# ----------------------------------------------------------------------------------------------------

SHAPES_QUESTIONS: tuple[tuple[str, str], ...] = (  # (question, the attribute that answers it)
    ("What colour is the shape?", "colour"),
    ("What shape is in the image?", "shape"),
    ("Where is the shape?", "position"),
    ("Is the shape large or small?", "size"),
)
SHAPES_WHERE = {"left": "on the left", "center": "in the center", "right": "on the right"}  # position -> words
SHAPES_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape} {where} on a {background} background",
    "a {size} {colour} {shape} {where}, on a plain {background} background",
)
SHAPES_GENERATION_TEMPLATES: tuple[str, ...] = (
    "Generate an image of {caption}.",
    "Generate an image of {caption}",  # GENERATION_REQUEST, what `srae scale` sends (no full stop)
    "Draw {caption}.",
    "Create a picture of {caption}.",
)
# What the demo's generate stage asks: the first generation template, the form of the world's training prompts.
DEMO_GENERATION_REQUEST = "Generate an image of {prompt}."
