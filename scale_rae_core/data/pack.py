"""``srae data pack``: turn captioned images, conversations or class folders into training shards.

Inputs: image folders, CSV / JSONL / JSON (LLaVA) files, WebDataset tars, parquet files and Hugging Face
datasets (:mod:`scale_rae_core.data.sources`).

Output (read by srae's readers and by the reference trainer's WebDataset loader)::

    out/shard-000000.tar ...   members <key>.json + <key>.<ext>, in key order
    out/wds_manifest.json      dataset_name, tars, samples_per_tar, total, shards (name/count/bytes/sha256),
                               samples_per_tar_assumption, estimated_total_samples, options, format_version
    out/rejects.jsonl          one {"source", "image"?, "reason"} per input that was skipped

A sample's JSON is ``{"conversations": [...], "metadata": {...}, "image_filename": "<key>.<ext>",
"source": "<input>"}``. Keys are the input's position (``000000042``; ``000000042_gen`` / ``_und`` with
``task="both"``, which writes a generation and an understanding sample per captioned image).

Deterministic: inputs are listed in a fixed order, images are encoded with fixed settings, tar members have
fixed mtime/owner/mode, and worker processes only decode/resize/encode — the parent writes results in input
order — so the same inputs and options give byte-identical shards for any ``workers``. Image files and tar
members are read by the workers; images held in table rows (parquet, datasets) are read by the parent, forward
in row order, while at most ``4 * workers`` chunks of them are in flight.

Resumable: a shard is written as ``.tar.tmp`` and renamed when complete; after each rename the progress (the
finished shards with size and sha256, the input position and the rejects.jsonl length) is saved atomically to
``.srae_pack_state.json``. ``resume=True`` keeps the finished shards that still match their checksum, drops
everything after them and continues; the result is the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import signal
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from scale_rae_core.data.entries import Entry, Fields, Input, RowImage, TarMember
from scale_rae_core.data.images import DEFAULT_MAX_PIXELS, BadImage, read_image
from scale_rae_core.data.shards import MANIFEST_NAME, _sha256
from scale_rae_core.data.sources import FORMATS, TASKS, entries_digest, open_input, read_input
from scale_rae_core.data.transforms import CODECS, encode_image, resize_max_side
from scale_rae_core.errors import DataError
from scale_rae_core.events import Reporter
from scale_rae_core.runlock import LOCK_NAME, locked

FORMAT_VERSION = 1
STATE_NAME = ".srae_pack_state.json"
REJECTS_NAME = "rejects.jsonl"
EVENTS_NAME = "pack.events.jsonl"
SHARD_NAME = "shard-{:06d}.tar"
_TAR_BLOCK = 512

Progress = Callable[[int, int], None]


@dataclass
class PackSummary:
    """What a pack produced. ``packed`` counts samples (two per image with ``task="both"``)."""

    out: Path
    manifest: Path
    format: str
    shards: int
    packed: int
    skipped: int
    bytes: int
    resumed_shards: int
    seconds: float


def pack(
    input: Path | str,
    out: Path,
    *,
    format: str | None = None,
    task: str = "both",
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    image_size: int | None = None,
    codec: str = "png",
    quality: int = 95,
    workers: int = 1,
    resume: bool = False,
    dataset_name: str | None = None,
    image_root: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
    progress: Progress | None = None,
    reporter: Reporter | None = None,
) -> PackSummary:
    """Pack ``input`` into tar shards under ``out``; see the module docstring for the layout.

    ``input`` is anything :func:`~scale_rae_core.data.sources.open_input` resolves (a path, a brace pattern of
    tars or parquet files, ``hf:REPO_ID``). ``format`` is "captions", "conversations" or "classes" (detected
    when ``None``). ``task`` picks the conversations made from captions. ``image_size`` shrinks images so their
    longer side is at most that (``None`` keeps them). A shard holds at most ``samples_per_shard`` samples and
    is at most ``max_shard_bytes`` on disk (unless one sample alone is larger). ``image_root`` is where
    relative image paths of records are resolved and must stay (default: the file's folder); absolute paths
    are used as they are. ``image_column`` / ``caption_column`` name the image and caption of tables, tars
    and CSV / JSON records whose names are not the usual ones; ``split`` is the split of a Hugging Face
    dataset. ``progress(done, total)`` is called after each input item. ``reporter`` gets the
    ``pack.start`` / ``pack.done`` events (the CLI logs them to ``out/pack.events.jsonl``), emitted only once
    ``out`` is known to be ours. ``out`` is locked for the whole pack (:mod:`scale_rae_core.runlock`).
    """
    start = time.perf_counter()
    out = Path(out)
    codec = _check_options(format, task, samples_per_shard, max_shard_bytes, image_size, codec, quality, workers, max_pixels)
    source = open_input(input, split)
    if image_root is not None and not Path(image_root).is_dir():
        raise DataError(f"--image-root {image_root}: not a folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose an empty output directory")
    reporter = reporter or Reporter()
    fields = Fields(image=image_column, caption=caption_column)
    with locked(out):
        summary = _pack_locked(source, out, format, task, samples_per_shard, max_shard_bytes, image_size, codec,
                               quality, workers, resume, dataset_name, image_root, max_pixels, fields, progress,
                               reporter, start)
    reporter.event("pack.done", packed=summary.packed, skipped=summary.skipped, shards=summary.shards,
                   bytes=summary.bytes, seconds=summary.seconds)
    return summary


def _pack_locked(
    input: Input, out: Path, format: str | None, task: str, samples_per_shard: int, max_shard_bytes: int,
    image_size: int | None, codec: str, quality: int, workers: int, resume: bool, dataset_name: str | None,
    image_root: Path | None, max_pixels: int, fields: Fields, progress: Progress | None, reporter: Reporter,
    start: float,
) -> PackSummary:
    fmt, entries = read_input(input, format, task, Path(image_root) if image_root else None, fields)
    if not entries:
        raise DataError(f"{input.label}: nothing to pack (no images or samples found)")
    options = {
        "input": input.label,
        "format": fmt,
        "task": task,
        "codec": codec,
        "quality": quality,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
        "max_pixels": max_pixels,
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "dataset_name": dataset_name or out.resolve().name,
        "entries": len(entries),
        "entries_sha256": entries_digest(entries),
    }
    # Recorded only when they matter, so packs of plain files keep the options of earlier versions (--resume).
    if input.kind != "files":
        options["input_kind"] = input.kind
    if input.kind == "hf":
        options["split"] = input.split
    if fields.image is not None or fields.caption is not None:
        options["image_column"], options["caption_column"] = fields.image, fields.caption

    shards, done = _prepare_out(out, options, resume)
    reporter.event("pack.start", input=input.label, out=str(out), workers=workers, resume=resume,
                   resumed_shards=len(shards))
    resumed = len(shards)
    if done:
        return _summary(out, fmt, shards, resumed, start)
    state = {"format_version": FORMAT_VERSION, "options": options, "shards": shards}
    _write_shards(entries, out, state, workers, (image_size, codec, quality, max_pixels), progress)
    shards = state["shards"]
    if not shards:
        (out / STATE_NAME).unlink(missing_ok=True)
        raise DataError(
            f"{input.label}: nothing packed, all {len(entries)} inputs were rejected; see {out / REJECTS_NAME}"
        )
    _write_manifest(out, options, shards)
    (out / STATE_NAME).unlink(missing_ok=True)
    return _summary(out, fmt, shards, resumed, start)


def _write_shards(entries: list[Entry], out: Path, state: dict[str, Any], workers: int,
                  encoding: _EncodeOptions, progress: Progress | None) -> None:
    """Encode ``entries`` from where the shards in ``state`` end and write them into new shards (each one
    recorded in ``state`` as it closes) and their rejects into ``rejects.jsonl``."""
    options, shards = state["options"], state["shards"]
    first, first_sub = shards[-1]["end"] if shards else (0, 0)
    rejects_bytes = shards[-1]["rejects_bytes"] if shards else 0
    with (out / REJECTS_NAME).open("ab") as rejects:
        rejects.truncate(rejects_bytes)
        rejects.seek(rejects_bytes)
        writer: _ShardWriter | None = None
        for i, entry, result in _encoded(entries, first, workers, encoding):
            if entry.reject is not None or isinstance(result, str):
                rejects.write(_reject_line(entry, result))
            else:
                for sub in range(first_sub if i == first else 0, len(entry.variants)):
                    members, size = _sample_members(entry, sub, f"{i:09d}{entry.variants[sub][0]}", result, options["codec"])
                    if writer is not None and (writer.count >= options["samples_per_shard"]
                                               or _tar_size(writer.bytes + size) > options["max_shard_bytes"]):
                        _finish(writer, state, out, (i, sub), rejects)
                        writer = None
                    if writer is None:
                        writer = _ShardWriter(out / SHARD_NAME.format(len(state["shards"])))
                    writer.add(members, size)
            if progress is not None:
                progress(i + 1, len(entries))
        if writer is not None:
            _finish(writer, state, out, (len(entries), 0), rejects)


def _reject_line(entry: Entry, result: bytes | str | None) -> bytes:
    """The ``rejects.jsonl`` line of an input that cannot be packed: its source, image and the reason."""
    line = {"source": entry.source}
    if entry.image is not None:
        line["image"] = str(entry.image)
    line["reason"] = entry.reject if entry.reject is not None else result
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def _sample_members(entry: Entry, sub: int, key: str, image: bytes | None, ext: str) -> tuple[list[tuple[str, bytes]], int]:
    """The tar members of one sample (``KEY.json`` first, then ``KEY.<ext>`` with the encoded image) and their
    size in the tar."""
    obj: dict[str, Any] = {"conversations": entry.variants[sub][1], "metadata": entry.metadata}
    members = []
    if image is not None:
        obj["image_filename"] = f"{key}.{ext}"
        members.append((f"{key}.{ext}", image))
    obj["source"] = entry.source
    members.insert(0, (f"{key}.json", json.dumps(obj, ensure_ascii=False).encode()))
    return members, sum(_member_bytes(len(data)) for _, data in members)


# ------------------------------------------------------------------------------------------------ options


def _check_options(
    format: str | None, task: str, samples_per_shard: int, max_shard_bytes: int, image_size: int | None,
    codec: str, quality: int, workers: int, max_pixels: int,
) -> str:
    if format is not None and format not in FORMATS:
        raise DataError(f"--format {format!r}: unknown; use one of {', '.join(FORMATS)}")
    if task not in TASKS:
        raise DataError(f"--task {task!r}: unknown; use one of {', '.join(TASKS)}")
    if codec not in CODECS:
        raise DataError(f"--codec {codec!r}: unknown; use png, jpg or webp")
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    if max_shard_bytes < tarfile.RECORDSIZE:
        raise DataError(f"--shard-bytes {max_shard_bytes}: must be at least {tarfile.RECORDSIZE}")
    if image_size is not None and image_size < 1:
        raise DataError(f"--image-size {image_size}: must be a positive number of pixels")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: must be between 1 and 100")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    if max_pixels < 1:
        raise DataError(f"--max-pixels {max_pixels}: must be at least 1")
    return CODECS[codec]


# --------------------------------------------------------------------------------------- output directory


def _prepare_out(out: Path, options: dict[str, Any], resume: bool) -> tuple[list[dict[str, Any]], bool]:
    """Make ``out`` ready; return the finished shards to keep and whether the pack is already complete."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if not present:
        return [], False
    if not resume:
        raise DataError(f"{out}: not empty; pass --resume to continue an interrupted pack, or choose an empty directory")
    ours = {MANIFEST_NAME, STATE_NAME, REJECTS_NAME, MANIFEST_NAME + ".tmp", STATE_NAME + ".tmp", EVENTS_NAME, LOCK_NAME}
    foreign = [n for n in present if n not in ours and not _is_shard_name(n)]
    if foreign:
        raise DataError(f"{out}: holds files srae did not write ({foreign[0]}); choose an empty directory")
    previous: dict[str, Any] | None = None
    complete = False
    for name in (STATE_NAME, MANIFEST_NAME):
        if (out / name).is_file():
            try:
                previous = json.loads((out / name).read_text(encoding="utf-8"))
            except ValueError:
                raise DataError(f"{out / name}: unreadable; delete {out} and pack again") from None
            complete = name == MANIFEST_NAME
            break
    shards: list[dict[str, Any]] = []
    if previous is not None:
        old = previous.get("options", {})
        changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
        if changed:
            raise DataError(
                f"{out}: was packed with different inputs/options ({', '.join(changed)}); "
                "use the same ones to resume, or choose an empty directory"
            )
        for shard in previous.get("shards", []):
            path = out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"] or _sha256(path) != shard["sha256"]:
                complete = False
                break
            shards.append(shard)
    if complete:
        return shards, True
    # Keep the verified prefix; everything after it is rewritten.
    keep = {s["name"] for s in shards}
    for name in present:
        if _is_shard_name(name) and name not in keep:
            (out / name).unlink()
    for name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp", STATE_NAME + ".tmp"):
        (out / name).unlink(missing_ok=True)
    state = {"format_version": FORMAT_VERSION, "options": options, "shards": shards}
    _atomic_write_json(out / STATE_NAME, state)
    return shards, False


def _is_shard_name(name: str) -> bool:
    return name.startswith("shard-") and (name.endswith(".tar") or name.endswith(".tar.tmp"))


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out: Path, options: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    counts = [s["count"] for s in shards]
    total = sum(counts)
    rejects = out / REJECTS_NAME
    skipped = sum(1 for _ in rejects.open("rb")) if rejects.exists() else 0
    manifest = {
        "format": "srae-wds",
        "format_version": FORMAT_VERSION,
        "dataset_name": options["dataset_name"],
        "tars": [str((out / s["name"]).resolve()) for s in shards],
        "samples_per_tar": counts,
        "total": total,
        # Read by the reference trainer: its length estimate is (#tars x assumption).
        "samples_per_tar_assumption": math.ceil(total / len(shards)),
        "estimated_total_samples": total,
        "skipped": skipped,
        "shards": shards,
        "options": options,
    }
    _atomic_write_json(out / MANIFEST_NAME, manifest)


def _summary(out: Path, fmt: str, shards: list[dict[str, Any]], resumed: int, start: float) -> PackSummary:
    rejects = out / REJECTS_NAME
    skipped = sum(1 for _ in rejects.open("rb")) if rejects.exists() else 0
    return PackSummary(
        out=out,
        manifest=out / MANIFEST_NAME,
        format=fmt,
        shards=len(shards),
        packed=sum(s["count"] for s in shards),
        skipped=skipped,
        bytes=sum(s["bytes"] for s in shards),
        resumed_shards=resumed,
        seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------------------------------------- shards


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + math.ceil(size / _TAR_BLOCK) * _TAR_BLOCK


def _tar_size(content: int) -> int:
    """File size of a tar with ``content`` bytes of headers, data and end marker (padded to 10 KiB records)."""
    return math.ceil(content / tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardWriter:
    """A tar being written under a temporary name, with fixed member metadata."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._file = self.tmp.open("wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.bytes = 2 * _TAR_BLOCK  # end-of-archive marker

    def add(self, members: list[tuple[str, bytes]], size: int) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.bytes += size

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)


def _finish(
    writer: _ShardWriter, state: dict[str, Any], out: Path, end: tuple[int, int], rejects: Any
) -> None:
    """Complete a shard and record the progress that a resume starts from."""
    writer.close()
    rejects.flush()
    os.fsync(rejects.fileno())
    state["shards"].append({
        "name": writer.path.name,
        "count": writer.count,
        "bytes": writer.path.stat().st_size,
        "sha256": _sha256(writer.path),
        "end": list(end),
        "rejects_bytes": rejects.tell(),
    })
    _atomic_write_json(out / STATE_NAME, state)


# ------------------------------------------------------------------------------------------------ workers

_EncodeOptions = tuple[int | None, str, int, int]
# What a worker gets for one input: an image file, a tar member it reads itself, encoded bytes read by the
# parent, a reason the parent already has for rejecting it, or None (no image).
ImageJob = Path | TarMember | bytes | BadImage | None


def _encode(job: tuple[ImageJob, _EncodeOptions]) -> bytes | str | None:
    """Decode, check, resize and encode one image: the encoded bytes, a reject reason, or None (no image)."""
    source, (image_size, codec, quality, max_pixels) = job
    if source is None:
        return None
    if isinstance(source, BadImage):
        return str(source)
    try:
        if isinstance(source, TarMember):
            try:
                source = source.read()
            except OSError as err:
                return f"unreadable tar member ({err.strerror or err})"
        im = read_image(source, max_pixels=max_pixels)
        return encode_image(resize_max_side(im, image_size), codec, quality)
    except BadImage as err:
        return str(err)
    except Exception as err:  # whatever one image does, it costs that image only (a reject), never the pack
        return f"cannot use the image ({type(err).__name__}: {str(err)[:200]})"


def _encode_chunk(jobs: list[tuple[ImageJob, _EncodeOptions]]) -> list[bytes | str | None]:
    return [_encode(job) for job in jobs]


class _RowImages:
    """The images of table rows (:class:`RowImage`), read forward in row order: one pass per table, restarted
    only when an earlier row is asked for."""

    def __init__(self) -> None:
        self.table: object | None = None
        self.rows: Iterator[bytes | Path | BadImage | None] = iter(())
        self.next = 0

    def __call__(self, ref: RowImage) -> ImageJob:
        if ref.table is not self.table or ref.row < self.next:
            self.table, self.rows, self.next = ref.table, ref.table.images(ref.row), ref.row
        try:
            while self.next < ref.row:
                next(self.rows)
                self.next += 1
            cell = next(self.rows)
        except StopIteration:
            raise DataError(f"{ref}: the table ended before this row; it changed while packing, pack again") from None
        self.next += 1
        if cell is None and ref.required:
            return BadImage("no image (the image cell is empty)")
        return cell


def _jobs(entries: list[Entry], first: int, opts: _EncodeOptions) -> Iterator[tuple[ImageJob, _EncodeOptions]]:
    rows = _RowImages()
    for e in entries[first:]:
        if e.image is None or e.reject is not None:
            yield None, opts
        elif isinstance(e.image, RowImage):
            yield rows(e.image), opts
        else:
            yield e.image, opts


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker as soon as the packing process is gone, also after ``kill -9``
    (which runs no clean-up in the parent). Linux: the kernel's parent-death signal; everywhere: a watchdog
    thread that polls the parent id once a second."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="srae-pack-parent-watch", daemon=True).start()


def _encoded(
    entries: list[Entry], first: int, workers: int, opts: _EncodeOptions
) -> Iterator[tuple[int, Entry, bytes | str | None]]:
    """Yield ``(index, entry, encoded image | reject reason | None)`` from ``first`` on, in input order.

    With ``workers > 1`` chunks of images are encoded in worker processes, at most ``4 * workers`` chunks
    in flight (bounded memory: jobs are made lazily); results are still yielded strictly in input order.
    """
    jobs = _jobs(entries, first, opts)
    if workers == 1:
        for i, job in enumerate(jobs, start=first):
            yield i, entries[i], _encode(job)
        return
    size = max(1, min(16, (len(entries) - first) // (4 * workers)))
    chunks = iter(lambda: list(islice(jobs, size)), [])
    # fork where the platform has it: no re-import of the caller's __main__ (which spawn needs and which
    # fails for stdin/notebook callers); a worker that dies makes the pool raise instead of hanging.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    i = first
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[Future[list[bytes | str | None]]] = deque()
        more = True
        while pending or more:
            while more and len(pending) < 4 * workers:
                chunk = next(chunks, None)
                if chunk is None:
                    more = False
                else:
                    pending.append(pool.submit(_encode_chunk, chunk))
            if not pending:
                break
            try:
                results = pending.popleft().result()
            except BrokenProcessPool as err:
                raise DataError(f"an image worker died ({err}); retry with --workers 1 to see which input") from err
            for result in results:
                yield i, entries[i], result
                i += 1
