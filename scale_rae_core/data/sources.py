"""What ``srae data pack`` reads: captioned images, reference-format conversations, or class folders.

Each input becomes an ordered list of :class:`Entry` — one image (or a text-only conversation) with the
samples to write for it. Order is fixed (sorted paths, or file order for CSV/JSONL), so packing is
deterministic. An input that cannot be used becomes an entry with ``reject`` set, keeping its place in the
order, and ends up in ``rejects.jsonl``; only problems with the input as a whole raise :class:`DataError`.

Formats:
  ``captions``       a folder of images with same-stem ``.txt`` captions, a CSV with ``image,caption``
                     columns, or a JSONL of ``{"image", "caption"}``; image paths relative to the file.
  ``conversations``  a JSONL in the reference trainer's format ``{"image", "conversations", "metadata"}``.
  ``classes``        an ImageNet-style tree ``root/<label>/<image>``; conversations are empty.

Every image must lie inside the image root (the input folder, or the CSV/JSONL's folder unless
``image_root`` is given): ``../x.png``, absolute paths elsewhere and symlinks pointing out are rejected.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale_rae_core.data.images import IMAGE_EXTENSIONS
from scale_rae_core.data.sample import reference_record
from scale_rae_core.errors import DataError
from scale_rae_core.prompts import CAPTION_QUESTION, GENERATION_REQUEST, IMAGE_MARKER, with_images

FORMATS = ("captions", "conversations", "classes")
TASKS = ("generation", "understanding", "both")


@dataclass
class Entry:
    """One input item: an image (or none, for a text-only conversation) and the samples made from it.

    ``variants`` holds ``(key_suffix, conversations)`` per sample to write; ``task="both"`` gives two.
    """

    source: str
    image: Path | None = None
    variants: list[tuple[str, list[dict[str, str]]]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    reject: str | None = None


def detect_format(path: Path) -> str:
    """Guess the input format of ``path``; raise :class:`DataError` when it cannot be told."""
    if path.is_dir():
        top_images = False
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            here = Path(dirpath)
            for name in filenames:
                p = here / name
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    if p.with_suffix(".txt").exists():
                        return "captions"
                    top_images |= here == path
        if top_images:
            return "captions"
        if any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir()):
            return "classes"
        raise DataError(f"{path}: no images found; pass a folder of images with .txt captions or class folders")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "captions"
    if suffix in (".jsonl", ".json"):
        with path.open("rb") as f:
            for raw in f:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "conversations" in obj:
                    return "conversations"
                if isinstance(obj, dict) and "caption" in obj:
                    return "captions"
        raise DataError(
            f"{path}: cannot tell the format (no line has 'conversations' or 'caption'); "
            "pass --format captions|conversations"
        )
    raise DataError(f"{path}: unsupported input; pass a folder, a .csv or a .jsonl file")


def list_entries(
    path: Path, fmt: str, task: str, image_root: Path | None = None
) -> list[Entry]:
    """Every entry of the input at ``path`` in packing order (rejected ones included, in place)."""
    if fmt == "classes":
        if not path.is_dir():
            raise DataError(f"{path}: format 'classes' needs a folder of class folders")
        return list(_class_entries(path))
    if fmt == "captions":
        if path.is_dir():
            return list(_caption_folder_entries(path, task))
        root = (image_root or path.parent).resolve()
        if path.suffix.lower() == ".csv":
            return list(_caption_csv_entries(path, root, task))
        return list(_caption_jsonl_entries(path, root, task))
    if fmt == "conversations":
        if path.is_dir():
            raise DataError(f"{path}: format 'conversations' needs a .jsonl file, not a folder")
        return list(_conversation_entries(path, (image_root or path.parent).resolve()))
    raise AssertionError(fmt)


def entries_digest(entries: list[Entry]) -> str:
    """A fingerprint of the listing, so a resumed pack can tell that its input has not changed."""
    h = hashlib.sha256()
    for e in entries:
        row = [e.source, str(e.image), e.variants, e.metadata, e.reject]
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


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


# ---------------------------------------------------------------------------------------------- helpers


def _walk_images(root: Path) -> Iterator[tuple[str, Path | None, str | None]]:
    """Yield ``(relative path, resolved path, reject reason)`` for every image under ``root``, sorted.

    Hidden files and folders are ignored; symlinked folders are not followed (and are reported).
    """
    found: list[tuple[str, Path | None, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            if (here / d).is_symlink():
                rel = (here / d).relative_to(root).as_posix()
                found.append((rel, None, "symlinked folder not followed; copy its images into the input"))
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = p.relative_to(root).as_posix()
            resolved = p.resolve()
            if not resolved.is_relative_to(root):
                found.append((rel, None, f"path escapes the input root {root} (symlink to {resolved})"))
            else:
                found.append((rel, resolved, None))
    found.sort(key=lambda t: t[0])
    yield from found


def _resolve_image(raw: Any, root: Path) -> Path:
    """Resolve an image path from a CSV/JSONL row against ``root``; ``ValueError`` with the reason."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("missing image path")
    if "\0" in raw:
        raise ValueError("image path contains a NUL character")
    p = Path(raw)
    candidate = p if p.is_absolute() else root / p
    try:
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"path escapes the input root {root}: {raw}")
        if not resolved.is_file():
            raise ValueError(f"image file not found: {raw}")
    except OSError as err:  # e.g. a name longer than the file system allows
        raise ValueError(f"image path unusable ({err.strerror or type(err).__name__}): {raw[:200]}") from None
    return resolved


def _read_caption(txt: Path) -> str:
    if not txt.is_file():
        raise ValueError(f"missing caption ({txt.name} not found)")
    try:
        caption = txt.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"caption {txt.name} is not UTF-8") from err
    if not caption:
        raise ValueError(f"missing caption ({txt.name} is empty)")
    return caption


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """Yield ``(source, object, reject)`` for each non-blank line; unparseable lines come with a reason."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            source = f"{path.name}:{lineno}"
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as err:
                yield source, None, f"line is not valid JSON: {type(err).__name__}: {str(err)[:200]}"
                continue
            if not isinstance(obj, dict):
                yield source, None, f"line is a JSON {type(obj).__name__}, not an object"
                continue
            yield source, obj, None


# ---------------------------------------------------------------------------------------------- formats


def _class_entries(root: Path) -> Iterator[Entry]:
    root = root.resolve()
    labels = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not labels:
        raise DataError(f"{root}: no class folders; format 'classes' expects <root>/<label>/<image>")
    index = {label: i for i, label in enumerate(labels)}
    for rel, image, reject in _walk_images(root):
        parts = rel.split("/")
        if reject is None and len(parts) < 2:
            reject = "image is not inside a class folder"
        meta = {"label": parts[0], "class_index": index.get(parts[0], -1)} if len(parts) > 1 else {}
        yield Entry(source=rel, image=image, variants=[("", [])], metadata=meta, reject=reject)


def _caption_folder_entries(root: Path, task: str) -> Iterator[Entry]:
    root = root.resolve()
    for rel, image, reject in _walk_images(root):
        if reject is not None:
            yield Entry(source=rel, reject=reject)
            continue
        assert image is not None
        try:
            caption = _read_caption((root / rel).with_suffix(".txt"))
        except ValueError as err:
            yield Entry(source=rel, reject=str(err))
            continue
        yield Entry(source=rel, image=image, variants=caption_variants(caption, task))


CSV_FIELD_LIMIT = 16 << 20  # characters per CSV field; a longer field rejects its row (Python's default is 128 Ki)


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Yield ``(source, row, reject)`` per CSV row: a row that is not UTF-8 or does not parse (a field over
    :data:`CSV_FIELD_LIMIT`, a stray quote) is rejected on its own and the rows after it are still read."""
    limit = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        # surrogateescape: a row with bytes that are not UTF-8 still parses; it is rejected below, alone
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            try:
                columns = reader.fieldnames or []
            except csv.Error as err:
                raise DataError(f"{path}: the header row does not parse as CSV ({err})") from None
            if "image" not in columns or "caption" not in columns:
                raise DataError(f"{path}: needs a header with 'image' and 'caption' columns, found {columns}")
            while True:
                line = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    yield f"{path.name}:{line}", None, f"row does not parse as CSV: {err}"
                    continue
                source = f"{path.name}:{reader.line_num}"
                if any(_not_utf8(v) for v in row.values()):
                    yield source, None, "row is not UTF-8 text"
                    continue
                yield source, row, None
    finally:
        csv.field_size_limit(limit)


def _not_utf8(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]  # extra cells land in a list under the None key
    return any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in values)


def _caption_csv_entries(path: Path, root: Path, task: str) -> Iterator[Entry]:
    for source, row, reject in _csv_rows(path):
        if reject is not None:
            yield Entry(source=source, reject=reject)
            continue
        try:
            image = _resolve_image(row.get("image"), root)
            caption = (row.get("caption") or "").strip()
            if not caption:
                raise ValueError("missing caption")
        except ValueError as err:
            yield Entry(source=source, reject=str(err))
            continue
        yield Entry(source=source, image=image, variants=caption_variants(caption, task))


def _caption_jsonl_entries(path: Path, root: Path, task: str) -> Iterator[Entry]:
    for source, obj, reject in _jsonl_rows(path):
        if reject is not None:
            yield Entry(source=source, reject=reject)
            continue
        try:
            image = _resolve_image(obj.get("image"), root)
            caption = obj.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError("missing caption")
        except ValueError as err:
            yield Entry(source=source, reject=str(err))
            continue
        yield Entry(source=source, image=image, variants=caption_variants(caption.strip(), task))


def _conversation_entries(path: Path, root: Path) -> Iterator[Entry]:
    for source, obj, reject in _jsonl_rows(path):
        if reject is not None:
            yield Entry(source=source, reject=reject)
            continue
        try:
            turns, meta, raw_image = reference_record(obj)
            if not turns:
                raise ValueError("no conversation turns")
            image = None if raw_image is None else _resolve_image(raw_image, root)
        except ValueError as err:
            yield Entry(source=source, reject=str(err))
            continue
        yield Entry(source=source, image=image, variants=[("", turns)], metadata=meta)
