"""Tables as ``srae data pack`` input: parquet files (pyarrow) and Hugging Face datasets (``datasets``).

Columns, told by their types and names (the usual Hugging Face layout), or named by the user:

* image: a column of the Hugging Face image type (a struct of ``bytes`` and ``path``) or of raw bytes; among
  several, the one named image / jpg / png / webp / img; ``--image-column`` names it;
* caption (format ``captions``): the text column named caption / text / txt / prompt / sentence;
  ``--caption-column`` names it;
* conversations (format ``conversations``, chosen when the table has it): a column ``conversations`` of
  reference-format turns (the LLaVA layout on the Hub);
* every other column of plain values (text, numbers, booleans) goes to the sample's metadata, except the
  ``__key__`` / ``__url__`` bookkeeping columns of the ``datasets`` WebDataset loader.

Rows are read in order; parquet files in sorted path order. The text columns are read while listing; the
images are read later by the packing process, forward in row order (:meth:`ParquetTable.images`), so only a
batch of rows is in memory at a time. An image cell without bytes but with a path (datasets built from local
files) uses that file: an absolute path as it is, a relative one against ``--image-root`` (default: the
input's folder). A streamed Hub dataset is read twice: once for the text columns, once for the images.

Parquet needs ``pyarrow`` (``pip install 'srae[parquet]'``); Hugging Face datasets need ``datasets``
(``pip install 'srae[hf]'``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scale_rae_core.data.entries import Entry, Fields, Input, RowImage, caption_variants, resolve_image
from scale_rae_core.data.images import BadImage
from scale_rae_core.data.sample import normalize_conversations
from scale_rae_core.errors import DataError

IMAGE_NAMES = ("image", "jpg", "png", "webp", "img", "jpeg")
CAPTION_NAMES = ("caption", "text", "txt", "prompt", "sentence")
CONVERSATIONS = "conversations"
_BATCH = 64  # rows per batch when reading images


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str | None
    conversations: str | None
    metadata: tuple[str, ...]


def table_entries(
    inp: Input, format: str | None, task: str, image_root: Path | None, fields: Fields
) -> tuple[str, list[Entry]]:
    """The format (given, or conversations when the table has that column) and one entry per row."""
    if format == "classes":
        raise DataError(f"{inp.label}: format 'classes' needs a folder of class folders, not a table")
    root = Path(image_root).resolve() if image_root is not None else inp.root
    tables = _open_tables(inp, root)
    columns = choose_columns(tables[0].schema, fields, format, tables[0].where)
    fmt = format or ("conversations" if columns.conversations else "captions")
    entries: list[Entry] = []
    for table in tables:
        table.column = columns.image
        text = [c for c in (columns.caption, columns.conversations, *columns.metadata) if c is not None]
        missing = [c for c in text + [columns.image] if c not in table.schema.names]
        if missing:
            raise DataError(f"{table.where}: has no column {missing[0]!r} (the first file has it); pack the files separately")
        for row, values in enumerate(table.rows(text)):
            entries.append(_entry(table, row, values, columns, fmt, task))
    return fmt, entries


def _entry(table: Any, row: int, values: dict[str, Any], columns: Columns, fmt: str, task: str) -> Entry:
    source = f"{table.name}[{row}]"
    meta = {c: values[c] for c in columns.metadata if values.get(c) is not None}
    if fmt == "conversations":
        try:
            turns = normalize_conversations(values.get(columns.conversations)) if columns.conversations else []
            if not turns:
                raise ValueError(f"no conversation turns in column {columns.conversations!r}")
        except ValueError as err:
            return Entry(source=source, reject=str(err))
        return Entry(source=source, image=RowImage(table, row, required=False), variants=[("", turns)], metadata=meta)
    caption = values.get(columns.caption) if columns.caption else None
    if not isinstance(caption, str) or not caption.strip():
        return Entry(source=source, reject=f"missing caption (column {columns.caption!r} is empty)")
    return Entry(source=source, image=RowImage(table, row), variants=caption_variants(caption.strip(), task), metadata=meta)


# ------------------------------------------------------------------------------------------------ columns


def _kind(t: Any) -> str:
    import pyarrow as pa

    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    if pa.types.is_struct(t) and any(f.name == "bytes" and any(b(f.type) for b in binary) for f in t):
        return "image"
    if any(b(t) for b in binary):
        return "image"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
        return "turns"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return "scalar"
    return "other"


def choose_columns(schema: Any, fields: Fields, format: str | None, where: str) -> Columns:
    """Pick the image / caption / conversations / metadata columns of ``schema``; DataError naming the flag."""
    kinds = {f.name: _kind(f.type) for f in schema}
    listing = ", ".join(f"{f.name} ({f.type})" for f in schema)

    def named(name: str, kind: str, flag: str) -> str:
        if name not in kinds:
            raise DataError(f"{where}: {flag} {name!r}: no such column; the columns are: {listing}")
        if kinds[name] != kind:
            what = "an image (bytes) column" if kind == "image" else "a text column"
            raise DataError(f"{where}: {flag} {name!r} is not {what}; the columns are: {listing}")
        return name

    if fields.image is not None:
        image = named(fields.image, "image", "--image-column")
    else:
        found = [n for n, k in kinds.items() if k == "image"]
        preferred = [n for n in IMAGE_NAMES if n in found]
        if len(found) == 1 or preferred:
            image = preferred[0] if preferred else found[0]
        elif found:
            raise DataError(f"{where}: several image columns ({', '.join(found)}); pick one with --image-column")
        else:
            raise DataError(f"{where}: no image column (bytes or an image struct); the columns are: {listing}; "
                            "name it with --image-column")
    wants_captions = format == "captions" or (format is None and fields.caption is not None)
    conversations = CONVERSATIONS if kinds.get(CONVERSATIONS) == "turns" and not wants_captions else None
    if fields.caption is not None:
        caption: str | None = named(fields.caption, "text", "--caption-column")
    elif conversations is None:
        caption = next((n for n in CAPTION_NAMES if kinds.get(n) == "text"), None)
    else:
        caption = None  # a conversations table: its text columns are metadata
    if caption is None and conversations is None:
        if format == "conversations":
            raise DataError(f"{where}: no {CONVERSATIONS!r} column of turns; the columns are: {listing}")
        raise DataError(f"{where}: no caption column (one of {', '.join(CAPTION_NAMES)}); the columns are: "
                        f"{listing}; name it with --caption-column")
    if format == "conversations" and conversations is None:
        raise DataError(f"{where}: no {CONVERSATIONS!r} column of turns; the columns are: {listing}")
    used = {image, caption, conversations}
    metadata = tuple(n for n, k in kinds.items() if k in ("text", "scalar") and n not in used and not n.startswith("__"))
    return Columns(image, caption if conversations is None else None, conversations, metadata)


# ------------------------------------------------------------------------------------------------- tables


def _cell_image(cell: Any, root: Path | None) -> bytes | Path | BadImage | None:
    """One image cell → encoded bytes, a file path, None (empty), or a BadImage with the reason."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        path = cell.get("path")
        if not path:
            return None
        if root is None and not Path(path).is_absolute():
            return BadImage(f"the image cell holds only a relative path ({path}); pass --image-root")
        try:
            return resolve_image(path, root or Path("/"))
        except ValueError as err:
            return BadImage(str(err))
    return bytes(cell) if cell else None


class ParquetTable:
    """One parquet file, read in batches with pyarrow."""

    def __init__(self, path: Path, name: str, root: Path | None) -> None:
        pq = _pyarrow(path)
        self.path, self.name, self.where, self.root = path, name, str(path), root
        try:
            self._file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError for a file that is not parquet
            raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {str(err)[:200]})") from None
        self.schema = self._file.schema_arrow
        self.column = ""

    def rows(self, columns: list[str]) -> Iterator[dict[str, Any]]:
        if not columns:  # pyarrow reads every column for columns=[]: count the rows instead
            yield from ({} for _ in range(self._file.metadata.num_rows))
            return
        for batch in self._file.iter_batches(batch_size=1024, columns=columns):
            yield from batch.to_pylist()

    def images(self, start: int) -> Iterator[bytes | Path | BadImage | None]:
        meta = self._file.metadata
        first, skip = 0, start
        while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
            skip -= meta.row_group(first).num_rows
            first += 1
        groups = list(range(first, meta.num_row_groups))
        for batch in self._file.iter_batches(batch_size=_BATCH, row_groups=groups, columns=[self.column]):
            cells = batch.column(0)
            for i in range(skip, len(cells)):
                yield _cell_image(cells[i].as_py(), self.root)
            skip = max(0, skip - len(cells))


class HFTable:
    """A Hugging Face dataset (a ``save_to_disk`` folder, or a streamed Hub / local dataset)."""

    def __init__(self, ds: Any, name: str, root: Path | None) -> None:
        self.ds, self.name, self.where, self.root = ds, name, name, root
        if ds.features is None:
            raise DataError(f"{name}: the dataset does not declare its columns (features); save it with "
                            "`datasets` (save_to_disk or push_to_hub) or pack its parquet files directly")
        self.schema = ds.features.arrow_schema
        self.column = ""

    def rows(self, columns: list[str]) -> Iterator[dict[str, Any]]:
        yield from self.ds.select_columns(columns)

    def images(self, start: int) -> Iterator[bytes | Path | BadImage | None]:
        import datasets

        ds = self.ds.select_columns([self.column])
        if isinstance(ds.features[self.column], datasets.Image):
            ds = ds.cast_column(self.column, datasets.Image(decode=False))
        for row in ds.skip(start) if start else ds:
            yield _cell_image(row[self.column], self.root)


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; install it with: pip install 'srae[parquet]'") from None
    return pq


def _open_tables(inp: Input, root: Path | None) -> list[Any]:
    if inp.kind == "parquet":
        base = inp.root
        return [ParquetTable(p, p.relative_to(base).as_posix() if base else p.name, root or p.parent) for p in inp.paths]
    try:
        import datasets
    except ImportError:
        raise DataError(f"{inp.label}: reading Hugging Face datasets needs `datasets`; install it with: "
                        "pip install 'srae[hf]'") from None
    datasets.disable_progress_bars()
    local = Path(inp.spec).expanduser()
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if inp.split not in ds:
                raise DataError(f"{local}: no split {inp.split!r} (it has {', '.join(ds)}); pass --split")
            return [HFTable(ds[inp.split], f"{local.name}:{inp.split}", root or local)]
        return [HFTable(ds, local.name, root or local)]
    try:
        ds = datasets.load_dataset(inp.spec, split=inp.split, streaming=True)
    except Exception as err:  # a missing repo or split, no network: datasets raises many kinds
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise DataError(f"{inp.label}: cannot open the dataset ({type(err).__name__}: {first}); check the repo id "
                        "or folder and --split, and that the Hub is reachable (HF_TOKEN for gated data sets)") from None
    local_root = local.resolve() if local.is_dir() else None
    return [HFTable(ds, f"{inp.spec}:{inp.split}", root or local_root)]
