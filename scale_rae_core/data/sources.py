"""What ``srae data pack`` reads, as one ordered list of :class:`Entry` per input.

An entry is one image (or a text-only conversation) with the samples to write for it. Order is fixed (sorted
paths, file order, tar member order, row order), so packing is deterministic. An input item that cannot be
used becomes an entry with ``reject`` set, keeping its place in the order, and ends up in ``rejects.jsonl``;
only problems with the input as a whole raise :class:`DataError`.

Inputs (:func:`open_input`):
  files    a folder of images (+ same-stem ``.txt`` captions, or class folders), a CSV with ``image,caption``
           columns, a JSONL of ``{"image", "caption"}`` or of reference records ``{"image", "conversations",
           "metadata"}``, or a ``.json`` array of either (the LLaVA / Cambrian layout ``[{"id", "image",
           "conversations"}]``);
  wds      WebDataset tars (``key.jpg`` + ``key.txt`` and/or ``key.json``; :mod:`.wds_source`): one tar, a
           folder of tars, or a brace pattern ``shards-{000..009}.tar``;
  parquet  parquet files with an image column and a caption or conversations column (:mod:`.table_source`);
  hf       a Hugging Face dataset through ``datasets``: a ``save_to_disk`` folder, a folder of ``.arrow``
           files, or ``hf:REPO_ID`` / ``hf:FOLDER`` streamed with ``--split``.

Formats (what the records hold): ``captions`` (each caption makes a generation and/or an understanding
sample, ``task``), ``conversations`` (reference-format turns), ``classes`` (a class-folder tree; the label goes
to metadata).

Image paths in CSV / JSONL / JSON records: a relative path is resolved against the image root (``image_root``,
else the file's folder) and must stay inside it (``../x.png`` and symlinks pointing out are rejected); an
absolute path is used as it is. Images found by walking a folder must lie inside that folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scale_rae_core.data.entries import Entry, Fields, Input, caption_variants, resolve_image
from scale_rae_core.data.images import IMAGE_EXTENSIONS
from scale_rae_core.data.json_array import first_char, iter_json_array
from scale_rae_core.data.sample import reference_record
from scale_rae_core.errors import DataError

FORMATS = ("captions", "conversations", "classes")
TASKS = ("generation", "understanding", "both")

HF_PREFIXES = ("hf://datasets/", "hf:")
_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


# ------------------------------------------------------------------------------------------------- inputs


def open_input(given: str | Path, split: str = "train") -> Input:
    """Resolve what the user passed to ``srae data pack``; raise :class:`DataError` if it cannot be read."""
    text = str(given)
    for prefix in HF_PREFIXES:
        if text.startswith(prefix) and len(text) > len(prefix):
            spec = text[len(prefix) :]
            return Input("hf", text, root=None, spec=spec, split=split)
    if _BRACES.search(text):
        return _pattern_input(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: input not found; pass a folder, a .csv / .jsonl / .json file, WebDataset .tar files "
            "(or a brace pattern shards-{000..009}.tar), .parquet files, or hf:REPO_ID"
        )
    path = path.resolve()
    if path.is_dir():
        return _folder_input(path, split)
    name = path.name.lower()
    if name.endswith(_COMPRESSED_TARS):
        raise DataError(f"{path}: compressed tars are not read; decompress it to a plain .tar first")
    if name.endswith(".tar"):
        return Input("wds", str(path), (path,), path.parent)
    if name.endswith(".parquet"):
        return Input("parquet", str(path), (path,), path.parent)
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        return Input("files", str(path), (path,), path.parent)
    raise DataError(
        f"{path}: unsupported input; pass a folder, a .csv / .jsonl / .json file, .tar or .parquet files, or hf:REPO_ID"
    )


def _pattern_input(pattern: str) -> Input:
    from webdataset.shardlists import expand_urls

    paths = [Path(p).expanduser() for p in expand_urls(pattern)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{pattern}: {len(missing)} of the {len(paths)} files it names are missing, e.g. {missing[0]}")
    kinds = {"wds" if p.name.endswith(".tar") else "parquet" if p.name.endswith(".parquet") else "" for p in paths}
    if len(kinds) != 1 or "" in kinds:
        raise DataError(f"{pattern}: a pattern must name only .tar files or only .parquet files")
    resolved = tuple(p.resolve() for p in paths)
    return Input(kinds.pop(), pattern, resolved, Path(os.path.commonpath([p.parent for p in resolved])))


def _folder_input(path: Path, split: str) -> Input:
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return Input("hf", str(path), (path,), path, spec=str(path), split=split)
    tars: list[Path] = []
    parquets: list[Path] = []
    arrow = False
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            lower = name.lower()
            if name.startswith("."):
                continue
            if Path(lower).suffix in IMAGE_EXTENSIONS:
                return Input("files", str(path), (path,), path)
            if lower.endswith(".tar"):
                tars.append(Path(dirpath) / name)
            elif lower.endswith(".parquet"):
                parquets.append(Path(dirpath) / name)
            arrow |= lower.endswith(".arrow")
    key = lambda p: p.relative_to(path).as_posix()  # noqa: E731
    if tars:
        return Input("wds", str(path), tuple(sorted(tars, key=key)), path)
    if parquets:
        return Input("parquet", str(path), tuple(sorted(parquets, key=key)), path)
    if arrow:  # e.g. the datasets cache: opened (and streamed) by `datasets` like a Hub repo
        return Input("hf", str(path), (path,), path, spec=str(path), split=split)
    return Input("files", str(path), (path,), path)  # no images: detect_format names what a folder needs


def read_input(
    inp: Input, format: str | None, task: str, image_root: Path | None = None, fields: Fields = Fields()
) -> tuple[str, list[Entry]]:
    """The format (``format``, or detected) and every entry of ``inp`` in packing order, rejects included."""
    if inp.kind == "wds":
        from scale_rae_core.data.wds_source import wds_entries

        fmt, entries = wds_entries(inp, format, task, fields)
    elif inp.kind in ("parquet", "hf"):
        from scale_rae_core.data.table_source import table_entries

        fmt, entries = table_entries(inp, format, task, image_root, fields)
    else:
        fmt = format or detect_format(inp.paths[0])
        entries = list_entries(inp.paths[0], fmt, task, image_root, fields)
    return fmt, [_writable(e) for e in entries]


def _writable(e: Entry) -> Entry:
    """``e``, or a reject if its text cannot be written as UTF-8 (a JSON ``\\ud800`` escape decodes to a lone
    surrogate, which no UTF-8 file can hold)."""
    if e.reject is None:
        try:
            json.dumps([e.variants, e.metadata], ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return Entry(source=e.source, reject="text holds a lone surrogate (a \\ud800-\\udfff escape), not valid Unicode")
    return e


def entries_digest(entries: list[Entry]) -> str:
    """A fingerprint of the listing, so a resumed pack can tell that its input has not changed."""
    h = hashlib.sha256()
    for e in entries:
        row = [e.source, str(e.image), e.variants, e.metadata, e.reject]
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- files inputs


def detect_format(path: Path) -> str:
    """Guess the format of a folder, CSV, JSONL or JSON file; raise :class:`DataError` when it cannot be told."""
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
    if suffix == ".json" and first_char(path) == "[":
        for obj in iter_json_array(path):
            if isinstance(obj, dict) and "conversations" in obj:
                return "conversations"
            if isinstance(obj, dict) and "caption" in obj:
                return "captions"
        raise DataError(
            f"{path}: cannot tell the format (no element of the array has 'conversations' or 'caption'); "
            "pass --format captions|conversations"
        )
    with path.open("rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict) and "conversations" in obj:
                return "conversations"
            if isinstance(obj, dict) and "caption" in obj:
                return "captions"
    raise DataError(
        f"{path}: cannot tell the format (no line has 'conversations' or 'caption'); "
        "pass --format captions|conversations"
    )


def list_entries(
    path: Path, fmt: str, task: str, image_root: Path | None = None, fields: Fields = Fields()
) -> list[Entry]:
    """Every entry of the folder / CSV / JSONL / JSON file at ``path`` in packing order (rejects in place)."""
    if fmt == "classes":
        if not path.is_dir():
            raise DataError(f"{path}: format 'classes' needs a folder of class folders")
        return list(_class_entries(path))
    if path.is_dir():
        if fmt == "conversations":
            raise DataError(f"{path}: format 'conversations' needs a .jsonl or .json file, not a folder")
        return list(_caption_folder_entries(path, task))
    root = (image_root or path.parent).resolve()
    if path.suffix.lower() == ".csv":
        if fmt != "captions":
            raise DataError(f"{path}: a CSV holds captions; pass --format captions")
        return list(_caption_csv_entries(path, root, task, fields))
    rows = _json_array_rows(path) if first_char(path) == "[" else _jsonl_rows(path)
    if fmt == "captions":
        return list(_caption_record_entries(rows, root, task, fields))
    return list(_conversation_entries(rows, root))


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


def _json_array_rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """Yield ``(source, object, reject)`` for each element of a JSON array file (source ``name[index]``)."""
    for index, obj in enumerate(iter_json_array(path)):
        source = f"{path.name}[{index}]"
        if not isinstance(obj, dict):
            yield source, None, f"element is a JSON {type(obj).__name__}, not an object"
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


def _csv_rows(path: Path, image_key: str, caption_key: str) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
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
            if image_key not in columns or caption_key not in columns:
                raise DataError(
                    f"{path}: needs a header with {image_key!r} and {caption_key!r} columns, found {columns}; "
                    "name yours with --image-column / --caption-column"
                )
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


def _caption_csv_entries(path: Path, root: Path, task: str, fields: Fields) -> Iterator[Entry]:
    image_key, caption_key = fields.image or "image", fields.caption or "caption"
    for source, row, reject in _csv_rows(path, image_key, caption_key):
        if reject is not None:
            yield Entry(source=source, reject=reject)
            continue
        try:
            image = resolve_image(row.get(image_key), root)
            caption = (row.get(caption_key) or "").strip()
            if not caption:
                raise ValueError("missing caption")
        except ValueError as err:
            yield Entry(source=source, reject=str(err))
            continue
        yield Entry(source=source, image=image, variants=caption_variants(caption, task))


def _caption_record_entries(
    rows: Iterator[tuple[str, Any, str | None]], root: Path, task: str, fields: Fields
) -> Iterator[Entry]:
    image_key, caption_key = fields.image or "image", fields.caption or "caption"
    for source, obj, reject in rows:
        if reject is not None:
            yield Entry(source=source, reject=reject)
            continue
        try:
            image = resolve_image(obj.get(image_key), root)
            caption = obj.get(caption_key)
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError("missing caption")
        except ValueError as err:
            yield Entry(source=source, reject=str(err))
            continue
        yield Entry(source=source, image=image, variants=caption_variants(caption.strip(), task))


def _conversation_entries(rows: Iterator[tuple[str, Any, str | None]], root: Path) -> Iterator[Entry]:
    """Reference records (JSONL) or LLaVA elements (JSON array); a record's ``id`` is kept in its metadata."""
    for source, obj, reject in rows:
        if reject is not None:
            yield Entry(source=source, reject=reject)
            continue
        try:
            turns, meta, raw_image = reference_record(obj)
            if not turns:
                raise ValueError("no conversation turns")
            image = None if raw_image is None else resolve_image(raw_image, root)
        except ValueError as err:
            yield Entry(source=source, reject=str(err))
            continue
        if isinstance(obj.get("id"), (str, int)) and "id" not in meta:
            meta = {"id": obj["id"], **meta}
        yield Entry(source=source, image=image, variants=[("", turns)], metadata=meta)
