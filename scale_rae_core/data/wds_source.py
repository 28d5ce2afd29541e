"""WebDataset tars as ``srae data pack`` input: the BLIP3o / cc12m / LAION layout.

A tar holds samples as consecutive members sharing a key, the WebDataset convention: ``dir/000042.jpg``,
``dir/000042.txt``, ``dir/000042.json`` are sample ``dir/000042`` (the key is the name up to the first dot of
its last part; the rest is the extension). What srae takes from a sample:

* the image: the member whose last extension is an image type (jpg, png, webp, ...); ``--image-column EXT``
  picks one when a sample holds several;
* ``captions``: the text of ``key.txt`` (BLIP3o, img2dataset, LAION: the caption), else the first of the
  JSON fields ``caption``, ``text``, ``prompt`` in ``key.json``; ``--caption-column NAME`` names a member
  extension or a JSON field instead. The rest of ``key.json`` becomes the sample's metadata;
* ``conversations``: ``key.json`` holding reference-format ``conversations`` (+ ``metadata``), with the
  sample's image when it has one.

Tars are read in the given order (sorted by path for a folder), samples in member order. Images are not read
here: an entry points at the member's bytes (:class:`~scale_rae_core.data.entries.TarMember`), which the
image worker reads. A tar that breaks off (a truncated download) keeps the samples before the break and adds
one reject for the rest.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scale_rae_core.data.entries import Entry, Fields, Input, TarMember, caption_variants
from scale_rae_core.data.images import IMAGE_EXTENSIONS
from scale_rae_core.data.sample import reference_record
from scale_rae_core.data.shards import split_key
from scale_rae_core.errors import DataError

CAPTION_MEMBERS = ("txt",)
JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
_IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def wds_entries(inp: Input, format: str | None, task: str, fields: Fields) -> tuple[str, list[Entry]]:
    """The format (given, or told from the first sample) and the entries of every tar of ``inp``, in order."""
    if format == "classes":
        raise DataError(f"{inp.label}: format 'classes' needs a folder of class folders, not WebDataset tars")
    fmt = format or _detect(inp)
    entries: list[Entry] = []
    for tar in inp.paths:
        label = tar.relative_to(inp.root).as_posix() if inp.root is not None else tar.name
        for key, members, reject in _samples(tar):
            source = f"{label}:{key}" if key else label
            if reject is not None:
                entries.append(Entry(source=source, reject=reject))
                continue
            entries.append(_entry(source, tar, members, fmt, task, fields))
    return fmt, entries


def _detect(inp: Input) -> str:
    for tar in inp.paths:
        for _, members, reject in _samples(tar):
            if reject is None:
                obj = _json(members)
                return "conversations" if isinstance(obj, dict) and "conversations" in obj else "captions"
    raise DataError(f"{inp.label}: the tars hold no samples (no members named key.ext); check the files")


Members = dict[str, tuple[tarfile.TarInfo, bytes | None]]  # extension -> (member, text data or None for images)


def _samples(tar: Path) -> Iterator[tuple[str, Members, str | None]]:
    """Yield ``(key, members, reject)`` per sample of ``tar``, in member order; text members are read here."""
    try:
        tf = tarfile.open(tar, mode="r:")
    except (OSError, tarfile.TarError) as err:
        yield "", {}, f"unreadable tar ({err}); re-download it or drop it from the input"
        return
    key: str | None = None
    members: Members = {}
    count = 0
    size = tar.stat().st_size
    with tf:
        try:
            for info in tf:
                parts = split_key(info.name) if info.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield key, members, None
                        count += 1
                    key, members = parts[0], {}
                if info.offset_data + info.size > size:  # tarfile ends quietly at a cut; the cut member tells
                    yield key, {}, f"the tar breaks off inside {info.name} after {count} samples; re-download it"
                    return
                ext = parts[1]
                if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS:
                    members[ext] = (info, None)
                else:
                    f = tf.extractfile(info)
                    members[ext] = (info, f.read() if f is not None else b"")
        except (OSError, tarfile.TarError, EOFError) as err:
            yield key or "", {}, f"the tar breaks off after {count} samples ({err}); re-download it"
            return
    if key is not None:
        yield key, members, None


def _json(members: Members) -> Any:
    """The sample's ``.json`` member decoded, None if it has none; ``ValueError`` if it does not parse."""
    if "json" not in members:
        return None
    try:
        return json.loads(members["json"][1] or b"")
    except (ValueError, RecursionError) as err:
        raise ValueError(f"json member does not parse: {type(err).__name__}: {str(err)[:200]}") from None


def _entry(source: str, tar: Path, members: Members, fmt: str, task: str, fields: Fields) -> Entry:
    try:
        obj = _json(members)
        image = _image(tar, members, fields)
        if fmt == "conversations":
            if not isinstance(obj, dict) or "conversations" not in obj:
                raise ValueError("no 'conversations' in the json member")
            turns, meta, _ = reference_record(obj)
            if not turns:
                raise ValueError("no conversation turns")
            return Entry(source=source, image=image, variants=[("", turns)], metadata=meta)
        if image is None:
            raise ValueError(f"no image member (one of {', '.join(sorted(_IMAGE_EXTS))})")
        caption, meta = _caption(members, obj, fields)
    except ValueError as err:
        return Entry(source=source, reject=str(err))
    return Entry(source=source, image=image, variants=caption_variants(caption, task), metadata=meta)


def _image(tar: Path, members: Members, fields: Fields) -> TarMember | None:
    if fields.image is not None:
        found = [fields.image] if fields.image in members else []
    else:
        found = [ext for ext in members if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS]
    if len(found) > 1:
        raise ValueError(f"{len(found)} images ({', '.join(found)}); pick one with --image-column")
    if not found:
        return None
    info = members[found[0]][0]
    return TarMember(tar, info.name, info.offset_data, info.size)


def _caption(members: Members, obj: Any, fields: Fields) -> tuple[str, dict[str, Any]]:
    """The caption and the metadata (the JSON member less the caption field) of a captions sample."""
    meta = dict(obj) if isinstance(obj, dict) else {}
    names = (fields.caption,) if fields.caption is not None else CAPTION_MEMBERS + JSON_CAPTION_FIELDS
    for name in names:
        if name in members and name != "json":
            try:
                text = (members[name][1] or b"").decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"caption member .{name} is not UTF-8") from None
        elif isinstance(meta.get(name), str):
            text = meta.pop(name).strip()
        else:
            continue
        if text:
            return text, meta
    if fields.caption is not None:
        raise ValueError(f"missing caption (no member .{fields.caption} and no json field {fields.caption!r})")
    raise ValueError("missing caption (no .txt member and no json caption / text / prompt field)")
