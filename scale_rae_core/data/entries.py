"""What one input item becomes for ``srae data pack``: an :class:`Entry` (an image reference and the samples made
from it), shared by every reader (``sources`` for files, ``wds_source`` for WebDataset tars, ``table_source`` for
parquet files and Hugging Face datasets)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scale_rae_core.prompts import CAPTION_QUESTION, GENERATION_REQUEST, IMAGE_MARKER, with_images


@dataclass(frozen=True)
class TarMember:
    """An image stored as a member of a local tar: its data is the ``size`` bytes at ``offset``."""

    tar: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"

    def read(self) -> bytes:
        with self.tar.open("rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: the tar ends inside this member")
        return data


class ImageTable(Protocol):
    """A table whose rows hold images (a parquet file, a Hugging Face dataset), read forward in row order."""

    name: str

    def images(self, start: int) -> Iterator[bytes | Path | None]:
        """The image of every row from ``start`` on: encoded bytes, a file path, or None for an empty cell.
        A cell that cannot be used yields a ``BadImage`` instance instead (its text is the reject reason)."""
        ...


@dataclass(frozen=True)
class RowImage:
    """The image in row ``row`` of ``table``; the packing process reads it (in row order) when it is due.
    ``required``: an empty cell is a reject (a caption needs its image) rather than a text-only sample."""

    table: ImageTable
    row: int
    required: bool = True

    def __str__(self) -> str:
        return f"{self.table.name}#{self.row}"


ImageRef = Path | TarMember | RowImage

@dataclass
class Entry:
    """One input item: an image (or none, for a text-only conversation) and the samples made from it.

    ``variants`` holds ``(key_suffix, conversations)`` per sample to write; ``task="both"`` gives two.
    """

    source: str
    image: ImageRef | None = None
    variants: list[tuple[str, list[dict[str, str]]]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    reject: str | None = None


@dataclass(frozen=True)
class Fields:
    """Where the image and the caption are, when the input's own names are not the usual ones: a column of a
    parquet file / dataset, a member extension or JSON field of a WebDataset sample, a CSV / JSON key."""

    image: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Input:
    """What ``srae data pack`` was given, resolved: its kind (see the module docstring) and where it is.

    ``paths``: the file or folder (files), the tars or parquet files in order (wds, parquet), or the
    ``save_to_disk`` folder (hf, when local). ``spec`` is what ``datasets`` opens for hf; ``label`` is
    recorded in the manifest; ``root`` is the folder that sources are named relative to.
    """

    kind: str
    label: str
    paths: tuple[Path, ...] = ()
    root: Path | None = None
    spec: str = ""
    split: str = "train"


def caption_variants(caption: str, task: str) -> list[tuple[str, list[dict[str, str]]]]:
    """The samples a caption makes: a generation and/or an understanding conversation."""
    gen = [
        {"from": "human", "value": GENERATION_REQUEST.format(prompt=caption)},
        {"from": "gpt", "value": IMAGE_MARKER},
    ]
    und = [{"from": "human", "value": with_images(CAPTION_QUESTION)}, {"from": "gpt", "value": caption}]
    if task == "generation":
        return [("", gen)]
    if task == "understanding":
        return [("", und)]
    return [("_gen", gen), ("_und", und)]


def resolve_image(raw: Any, root: Path) -> Path:
    """Resolve an image path from a record: an absolute path as it is, a relative one against ``root`` (and it
    must stay inside ``root``); ``ValueError`` with the reason."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("missing image path")
    if "\0" in raw:
        raise ValueError("image path contains a NUL character")
    p = Path(raw)
    try:
        resolved = p.resolve() if p.is_absolute() else (root / p).resolve()
        if not p.is_absolute() and not resolved.is_relative_to(root):
            raise ValueError(f"path escapes the input root {root}: {raw} (absolute paths are used as they are)")
        if not resolved.is_file():
            raise ValueError(f"image file not found: {raw}")
    except OSError as err:  # e.g. a name longer than the file system allows
        raise ValueError(f"image path unusable ({err.strerror or type(err).__name__}): {raw[:200]}") from None
    return resolved
