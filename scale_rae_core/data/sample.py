"""One training sample, as both readers yield it, and the conversation format they share.

A conversation is the reference trainer's list of turns ``[{"from": "human" | "gpt", "value": str}]``;
``<image>`` in a turn marks where the sample's image goes (in a ``human`` turn it is a context image for
understanding, in a ``gpt`` turn an answer image to generate). ``role/content`` turns (``user`` /
``assistant``) are accepted on input and normalised to ``from/value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class Sample:
    """A sample: its key, at most one RGB image, the conversation and free-form metadata.

    ``position`` is set by :class:`scale_rae_core.data.webdataset.WebDatasetReader` to
    ``(epoch, slot, index)`` so a training loop that reads through DataLoader workers can report what it
    consumed (see that module); other producers leave it ``None``.
    """

    key: str
    image: Image.Image | None
    conversations: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    position: tuple[int, int, int] | None = None


def normalize_conversations(raw: Any) -> list[dict[str, str]]:
    """Return ``raw`` as ``[{"from", "value"}]`` turns; raise ``ValueError`` with a one-line reason.

    Accepts ``from/value`` and ``role/content`` turns with roles human/user and gpt/assistant. A ``system``
    turn, another role, a non-string value or a missing key is refused rather than guessed at.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"conversations must be a list of turns, got {type(raw).__name__}")
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise ValueError(f"conversation turn {i} is {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"conversation turn {i} has role {role!r}; use human/user or gpt/assistant")
        if not isinstance(value, str):
            raise ValueError(f"conversation turn {i} has no string 'value' (or 'content')")
        turns.append({"from": _ROLES[role], "value": value})
    return turns


def reference_record(obj: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any], str | None]:
    """One reference-format JSONL object → (conversation turns, metadata, image path or None).

    ``image`` may be a path, a one-element list, empty or absent; more than one image raises ValueError (srae
    samples hold one image, as the reference scripts use), and so does metadata that is not an object.
    """
    turns = normalize_conversations(obj.get("conversations"))
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata must be a JSON object")
    image = obj.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise ValueError(f"{len(image)} images; an srae sample holds one image")
        image = image[0] if image else None
    return turns, meta, None if image in (None, "") else image
