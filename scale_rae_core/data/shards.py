"""Reading packed shards: the manifest, per-tar sample access, ``inspect`` and ``verify``.

A shard is a plain tar whose samples are ``<key>.json`` members (``conversations``, ``metadata``, optional
``image_filename`` naming an image member of the same tar), read in sorted-name order — the layout the
reference trainer reads. The manifest (``wds_manifest.json``) lists the tars; srae's manifests also carry
per-tar counts and checksums under ``shards``, but a reference manifest with only ``tars`` works too.

A tar in a manifest is a local path (relative to the manifest, or absolute; ``file://`` URLs too) or a remote
shard: a URL that the ``webdataset`` library's opener (``webdataset.gopen``) streams — ``https://``, ``hf://``,
``gs://``, or ``pipe:COMMAND`` (the command's standard output is the tar). Local tars are read with random
access (:class:`TarIndex`); remote ones sequentially (:class:`TarStream`), which needs their ``.json`` members
in sorted-name order (srae's and webdataset's writers write them so; a tar that is not is refused, not read in
another order) and each sample's image under the sample's key (``key.json`` + ``key.png``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from scale_rae_core.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, read_image
from scale_rae_core.data.sample import Sample, normalize_conversations
from scale_rae_core.errors import DataError

MANIFEST_NAME = "wds_manifest.json"

Shard = Path | str  # a local tar, or the URL of a remote one
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a scheme (two letters at least: not a drive letter)


def shard_location(raw: str, base: Path) -> Shard:
    """A tar named in a manifest: a URL stays a URL (``file://`` becomes its path), a relative path is taken
    relative to the manifest's folder ``base``."""
    if _URL.match(raw):
        if raw.startswith("file:"):
            return Path(unquote(urlparse(raw).path))
        return raw
    return Path(raw) if Path(raw).is_absolute() else base / raw


def shard_label(shard: Shard) -> str:
    """How problems name a shard: the file name of a local tar, the URL of a remote one."""
    return shard.name if isinstance(shard, Path) else shard


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's sample key convention: ``("dir/000042", "jpg")`` for ``dir/000042.jpg`` (the key is the name
    up to the first dot of its last part); None for a name without an extension or a hidden file."""
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def open_stream(url: str) -> IO[bytes]:
    """Open a remote shard for reading with ``webdataset.gopen`` (curl for http(s)/hf, a shell for ``pipe:``)."""
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb")
    except (OSError, ValueError) as err:
        raise DataError(f"{url}: cannot open ({err}); check the URL (https://, hf://, gs://, pipe:COMMAND)") from err


@dataclass
class Manifest:
    """A loaded manifest: the tar paths (resolved), and per-tar counts/checksums when it records them."""

    path: Path
    dataset_name: str
    tars: list[Shard]
    counts: list[int] | None
    sha256: list[str] | None
    total: int | None
    raw: dict[str, Any]


def manifest_path(path: Path) -> Path:
    """``path`` itself if it is a file, else ``path/wds_manifest.json``."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def _count(value: object, mpath: Path, key: str) -> int:
    """A per-tar sample count from a manifest: a non-negative integer, else one DataError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{mpath}: {key} = {value!r} is not a sample count (a whole number >= 0); re-run `srae data pack`")
    return value


def load_manifest(path: Path) -> Manifest:
    """Load a manifest given its path or its folder; raise :class:`DataError` if it is missing or malformed."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise DataError(f"{mpath}: manifest not found; pass a folder written by `srae data pack` or its manifest")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{mpath}: manifest is not valid JSON ({err}); re-run `srae data pack`") from err
    if not isinstance(raw, dict):
        raise DataError(f"{mpath}: manifest must be a JSON object with a 'tars' list")
    base = mpath.parent
    shards = raw.get("shards")
    if isinstance(shards, list) and shards and all(isinstance(s, dict) and "name" in s for s in shards):
        # srae manifest: names relative to the manifest, so the folder can be moved (or URLs).
        tars = [shard_location(str(s["name"]), base) for s in shards]
        counts = [_count(s.get("count"), mpath, f"shards[{i}].count") for i, s in enumerate(shards)]
        sha = [str(s.get("sha256", "")) for s in shards]
    elif isinstance(raw.get("tars"), list) and raw["tars"]:
        if not all(isinstance(t, str) and t for t in raw["tars"]):
            raise DataError(f"{mpath}: 'tars' must be a list of tar paths (strings); re-run `srae data pack`")
        tars = [shard_location(t, base) for t in raw["tars"]]
        per = raw.get("samples_per_tar")
        counts = None
        if isinstance(per, list) and len(per) == len(tars):
            counts = [_count(c, mpath, f"samples_per_tar[{i}]") for i, c in enumerate(per)]
        sha = None
    else:
        raise DataError(f"{mpath}: manifest lists no tars; re-run `srae data pack`")
    total = raw.get("total")
    return Manifest(
        path=mpath,
        dataset_name=str(raw.get("dataset_name", base.name)),
        tars=tars,
        counts=counts,
        sha256=sha,
        total=int(total) if isinstance(total, int) else None,
        raw=raw,
    )


def _image_name(data: bytes) -> Any:
    """The ``image_filename`` a sample's json names, or None (none named, or json ``decode_sample`` will report
    with the member name)."""
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return (obj.get("image_filename") or None) if isinstance(obj, dict) else None


class TarIndex:
    """Random access to the samples of one tar, by index in sorted ``.json`` name order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, mode="r:")
            members = self._tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as err:
            raise DataError(f"{self.path}: unreadable tar ({err}); re-pack or run `srae data verify`") from err
        self._members = {m.name: m for m in members if m.isfile()}
        self.json_names = sorted(n for n in self._members if n.endswith(".json"))

    def __len__(self) -> int:
        return len(self.json_names)

    def close(self) -> None:
        self._tar.close()

    def _read(self, name: str) -> bytes:
        f = self._tar.extractfile(self._members[name])
        assert f is not None
        return f.read()

    def raw(self, index: int) -> tuple[str, bytes, bytes | None]:
        """``(json member name, json bytes, image bytes or None)`` of sample ``index``."""
        name = self.json_names[index]
        data = self._read(name)
        image_name = _image_name(data)
        if image_name is None:
            return name, data, None
        if image_name not in self._members:
            raise DataError(f"{self.path}:{name}: image_filename {image_name!r} is not in the tar")
        return name, data, self._read(image_name)


class TarStream:
    """Forward-only access to the samples of a remote tar, by index in sorted ``.json`` name order.

    ``raw(index)`` takes non-decreasing indices; the samples before ``index`` are read past (their bytes go by,
    nothing is decoded). The stream holds one sample's members at a time. It refuses a tar whose ``.json``
    members are not in sorted order, so that sample ``i`` is the same sample :class:`TarIndex` would give.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._stream = open_stream(url)
        self._samples = self._read()
        self.next = 0  # the index of the sample the stream gives next

    def raw(self, index: int) -> tuple[str, bytes, bytes | None]:
        """``(json member name, json bytes, image bytes or None)`` of sample ``index``."""
        assert index >= self.next, f"a stream goes forward only (at {self.next}, asked for {index})"
        while True:
            try:
                name, data, group = next(self._samples)
            except StopIteration:
                raise DataError(
                    f"{self.url}: ends after {self.next} samples, sample {index} was asked for; the manifest's count "
                    "for it is wrong: check the shards with `srae data verify`"
                ) from None
            self.next += 1
            if self.next - 1 == index:
                break
        image_name = _image_name(data)
        if image_name is None:
            return name, data, None
        if image_name not in group:
            raise DataError(
                f"{self.url}:{name}: image_filename {image_name!r} is not under the sample's key; a streamed tar "
                "needs each image next to its json (key.json + key.png): re-pack with `srae data pack`"
            )
        return name, data, group[image_name]

    def close(self) -> None:
        self._samples.close()
        try:
            self._stream.close()
        except OSError:  # a pipe stopped early exits with SIGPIPE; what was read has been checked
            pass

    def _read(self) -> Iterator[tuple[str, bytes, dict[str, bytes]]]:
        """Yield ``(json name, json bytes, the members under its key)`` in stream order."""
        key: str | None = None
        group: dict[str, bytes] = {}
        last = ""
        try:
            with tarfile.open(fileobj=self._stream, mode="r|") as tf:
                for info in tf:
                    if not info.isfile():
                        continue
                    parts = split_key(info.name)
                    k = parts[0] if parts else info.name
                    if k != key:
                        last = yield from self._emit(group, last)
                        key, group = k, {}
                    f = tf.extractfile(info)
                    group[info.name] = f.read() if f is not None else b""
            yield from self._emit(group, last)
        except (OSError, tarfile.TarError, EOFError) as err:
            raise DataError(f"{self.url}: unreadable tar stream after {self.next} samples ({err}); check the "
                            "URL or command, and the shard with `srae data verify`") from err

    def _emit(self, group: dict[str, bytes], last: str) -> Iterator[tuple[str, bytes, dict[str, bytes]]]:
        for name in sorted(n for n in group if n.endswith(".json")):
            if name <= last:
                raise DataError(
                    f"{self.url}: {name} comes after {last}; a streamed tar must hold its samples in sorted order "
                    "(as `srae data pack` writes them): re-pack it, or read it from a local path"
                )
            last = name
            yield name, group[name], group
        return last


def open_shard(shard: Shard) -> TarIndex | TarStream:
    """Random access to a local tar, forward-only access to a remote one."""
    return TarIndex(shard) if isinstance(shard, Path) else TarStream(shard)


def decode_sample(
    where: str, name: str, data: bytes, image: bytes | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_image: bool = True,
) -> Sample:
    """Build a :class:`Sample` from a shard member's JSON and image bytes; ``where`` names the tar."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        turns = normalize_conversations(obj.get("conversations"))
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        im = read_image(image, max_pixels=max_pixels) if (image is not None and decode_image) else None
    except (ValueError, BadImage) as err:
        raise DataError(f"{where}:{name}: {err}; run `srae data verify` on the shards") from err
    return Sample(key=name[: -len(".json")], image=im, conversations=turns, metadata=meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ inspect


def inspect(path: Path, *, samples: int = 3) -> dict[str, Any]:
    """Summarise a packed dataset: per-shard counts, total, options, and the first ``samples`` decoded."""
    m = load_manifest(path)
    shards = []
    for i, tar in enumerate(m.tars):
        local = isinstance(tar, Path)
        shards.append({
            "name": shard_label(tar),
            "count": m.counts[i] if m.counts is not None else None,
            "bytes": tar.stat().st_size if local and tar.exists() else None,
        })
    shown: list[dict[str, Any]] = []
    for tar in m.tars:
        if len(shown) >= samples or (isinstance(tar, Path) and not tar.exists()):
            break
        index = open_shard(tar)
        try:
            for j in range(samples - len(shown)):
                if isinstance(index, TarIndex) and j >= len(index):
                    break
                try:
                    name, data, image = index.raw(j)
                except DataError:
                    if isinstance(index, TarStream) and index.next == j:
                        break  # a remote tar with fewer samples than asked for: its end
                    raise
                s = decode_sample(str(tar), name, data, image)
                shown.append({
                    "key": s.key,
                    "shard": shard_label(tar),
                    "image_size": list(s.image.size) if s.image is not None else None,
                    "conversations": s.conversations,
                    "metadata": s.metadata,
                })
        finally:
            index.close()
    total = m.total if m.total is not None else (sum(m.counts) if m.counts is not None else None)
    return {
        "manifest": str(m.path),
        "dataset_name": m.dataset_name,
        "format_version": m.raw.get("format_version"),
        "options": m.raw.get("options"),
        "shards": shards,
        "total": total,
        "skipped": m.raw.get("skipped"),
        "samples": shown,
    }


# ------------------------------------------------------------------------------------------------- verify


@dataclass
class Problem:
    file: str
    reason: str


@dataclass
class VerifyReport:
    manifest: Path
    shards: int = 0
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> VerifyReport:
    """Re-read every sample of every tar and report each problem found (never raises for a bad shard).

    Checks: tar readable; checksum as recorded; every ``.json`` parses into a valid sample; its image is in
    the tar and decodes; no image without a sample; per-tar counts and the total match the manifest. Each tar
    is read once, as a stream (the checksum is taken on the way), so remote shards are verified the same way.
    """
    m = load_manifest(path)
    report = VerifyReport(manifest=m.path, shards=len(m.tars))
    for i, tar in enumerate(m.tars):
        checked = _verify_tar(tar, report, max_pixels)
        if checked is None:
            continue
        found, digest = checked
        report.samples += found
        if m.sha256 is not None and m.sha256[i] and digest != m.sha256[i]:
            report.problems.append(Problem(shard_label(tar), "checksum differs from the manifest (changed after packing)"))
        if m.counts is not None and found != m.counts[i]:
            report.problems.append(Problem(shard_label(tar), f"holds {found} samples, the manifest says {m.counts[i]}"))
    if m.counts is not None and m.total is not None and sum(m.counts) != m.total:
        report.problems.append(Problem(m.path.name, f"total {m.total} != sum of per-tar counts {sum(m.counts)}"))
    if m.total is not None and report.samples != m.total:
        report.problems.append(Problem(m.path.name, f"found {report.samples} samples, the manifest says {m.total}"))
    return report


class _Hashing:
    """A read-only stream that hashes every byte read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        return data

    def finish(self) -> str:
        """Read the rest (a tar reader stops at the end-of-archive marker) and return the sha256."""
        while self.read(1 << 20):
            pass
        return self.h.hexdigest()


def _verify_tar(tar: Shard, report: VerifyReport, max_pixels: int) -> tuple[int, str] | None:
    """Check one tar; return its sample count (valid or not) and sha256, or ``None`` if it cannot be opened."""
    name = shard_label(tar)
    if isinstance(tar, Path) and not tar.is_file():
        report.problems.append(Problem(name, "missing"))
        return None
    try:
        raw = tar.open("rb") if isinstance(tar, Path) else open_stream(tar)
    except (OSError, DataError) as err:
        report.problems.append(Problem(name, f"cannot open ({err})"))
        return None
    stream = _Hashing(raw)
    try:
        count = _verify_members(stream, name, report, max_pixels)
        digest = stream.finish()
    except OSError as err:  # a remote stream that failed after the tar's end (e.g. the command's exit status)
        report.problems.append(Problem(name, f"unreadable tar stream ({err})"))
        return count, ""
    finally:
        try:
            raw.close()
        except OSError:
            pass
    return count, digest


def _verify_members(stream: _Hashing, name: str, report: VerifyReport, max_pixels: int) -> int:
    """Check every member of the tar in ``stream``; return the number of samples (``.json`` members)."""
    wanted: dict[str, str] = {}  # image member -> json member
    images: set[str] = set()
    seen: set[str] = set()
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                if member.name in seen:
                    report.problems.append(Problem(name, f"{member.name}: duplicate member"))
                seen.add(member.name)
                f = tf.extractfile(member)
                assert f is not None
                data = f.read()
                suffix = Path(member.name).suffix.lower()
                if member.name.endswith(".json"):
                    count += 1
                    try:
                        obj = json.loads(data)
                        if not isinstance(obj, dict):
                            raise ValueError("not a JSON object")
                        normalize_conversations(obj.get("conversations"))
                    except ValueError as err:
                        report.problems.append(Problem(name, f"{member.name}: bad sample JSON ({err})"))
                        continue
                    if obj.get("image_filename"):
                        wanted[str(obj["image_filename"])] = member.name
                elif suffix in IMAGE_EXTENSIONS:
                    images.add(member.name)
                    try:
                        read_image(data, max_pixels=max_pixels)
                    except BadImage as err:
                        report.problems.append(Problem(name, f"{member.name}: image does not decode ({err})"))
                else:
                    report.problems.append(Problem(name, f"{member.name}: unexpected member"))
    except (OSError, tarfile.TarError, EOFError) as err:
        report.problems.append(Problem(name, f"unreadable tar after {count} samples ({err})"))
        return count
    for image, owner in sorted(wanted.items()):
        if image not in images:
            report.problems.append(Problem(name, f"{owner}: image_filename {image!r} is not in the tar"))
    for image in sorted(images - set(wanted)):
        report.problems.append(Problem(name, f"{image}: image without a sample .json"))
    return count
