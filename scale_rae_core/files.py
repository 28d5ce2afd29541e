"""File primitives every writer and loader of weights shares: atomic writes, output folders, strict JSON, fsync,
and safe reads of torch files.

:func:`read_weights_only` is the one ``torch.load`` in srae: always ``weights_only=True`` (tensors and plain
containers, never an arbitrary pickle), always to CPU, with a one-line error naming the file.

Modes: what srae writes gets the modes a plain ``open`` / ``mkdir`` would give under the process's umask (0644 /
0755 under the usual 022), although temporary files (``mkstemp``, 0600), temporary folders (``mkdtemp``, 0700)
and safetensors' writer (0600) start private: :func:`atomic_write` and :func:`apply_umask` put that right before
a file or folder is renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import CheckpointError, DataError, SraeError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything below it) the mode a plain ``open`` / ``mkdir`` would have:
    0666 / 0777 less the umask."""
    mask = current_umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for p in targets:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a half-written file. The file gets
    the mode a plain ``open`` would give it (the temporary one is private)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_text(path: Path, flag: str) -> str:
    """A UTF-8 text file the user gave with ``flag``; one line naming the flag, the file and the first bad byte
    when it is not UTF-8 (or cannot be read)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{flag} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        "save it as UTF-8") from None
    except IsADirectoryError:
        raise DataError(f"{flag} {path} is a folder; pass a text file") from None


def output_folder(path: Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents), or raise one line naming ``flag`` and what is wrong:
    a file is in the way, no permission, or a place no folder can be made (e.g. under /proc)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path} is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"{flag} {path}: a file is in the way of this folder path; pass another folder") from None
    except PermissionError:
        raise DataError(f"{flag} {path}: no permission to create this folder; pass a writable folder") from None
    except OSError as exc:
        raise DataError(f"{flag} {path}: cannot create this folder ({exc.strerror or type(exc).__name__}); "
                        "pass a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: this folder is not writable; pass a writable folder")
    return path


def _non_finite(value: Any, where: str) -> str | None:
    """The first place in a JSON tree that holds NaN or ±inf, as ``a.b[2]``; None when all numbers are finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(the value)"
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, v in items:
        found = _non_finite(v, key)
        if found is not None:
            return found
    return None


def finite_json(data: Any, what: str, **dumps: Any) -> str:
    """``json.dumps(data, allow_nan=False)``: a NaN or inf never becomes invalid JSON silently. ``what`` (the file)
    and the offending key are named in the one-line error."""
    where = _non_finite(data, "")
    if where is not None:
        raise DataError(f"{what}: {where} is not a finite number; nothing was written (the values it records "
                        "went NaN or infinite: check the settings that produced them)")
    return json.dumps(data, allow_nan=False, **dumps)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (best effort where the filesystem cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_format(record: Any, fmt: str, version: int, where: str, what: str, fix: str,
                 error: type[SraeError] = CheckpointError) -> dict[str, Any]:
    """``record`` (parsed JSON) must be an object with ``"format": fmt`` and a ``"version"`` this srae reads (at most
    ``version``; absent counts as 0) -> it. Else one line naming ``where``: ``what`` it is not and ``fix``, or that
    its version is newer than this srae's."""
    if not isinstance(record, dict) or record.get("format") != fmt:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise error(f"{where} is not {what} (format {got!r}, expected {fmt!r}); {fix}")
    found = record.get("version", 0)
    if not isinstance(found, int) or found > version:
        raise error(f"{where} has format version {found!r}, newer than this srae reads ({version}); upgrade srae")
    return record


def read_weights_only(path: Path, *, fix: str = "", error: type[SraeError] = CheckpointError) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; ``error`` (one line, naming the file) when it cannot."""
    tail = f"; {fix}" if fix else ""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: not found{tail}") from None
    except Exception as e:  # pickle, zip or weights_only refusals of many types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise error(f"{path}: cannot read as a weights-only torch file ({type(e).__name__}: {first}){tail}") from None


def read_plain_state_dict(
    path: Path,
    expected: str = "a plain state_dict (name -> tensor)",
    *,
    fix: str = "",
    inner: str | None = None,
    allow_none: bool = False,
) -> dict[str, Any]:
    """A ``torch.save``-d ``{name: tensor}`` file, read with :func:`read_weights_only`.

    ``inner``: when the file holds ``{inner: {name: tensor}, ...}`` (a training checkpoint), take that dict.
    ``allow_none``: values may also be None (e.g. RAE's ``stat.pt`` with ``mean=None``).
    """
    state = read_weights_only(path, fix=fix)
    if inner is not None and isinstance(state, dict) and isinstance(state.get(inner), dict):
        state = state[inner]
    ok = (torch.Tensor, type(None)) if allow_none else torch.Tensor
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, ok) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected {expected}" + (f"; {fix}" if fix else ""))
    return state


def read_plain_tensor(path: Path, expected: str = "a tensor", *, fix: str = "",
                      error: type[SraeError] = CheckpointError) -> torch.Tensor:
    """A ``torch.save``-d single tensor, read with :func:`read_weights_only`."""
    value = read_weights_only(path, fix=fix, error=error)
    if not isinstance(value, torch.Tensor):
        raise error(f"{path}: holds a {type(value).__name__}, not {expected}" + (f"; {fix}" if fix else ""))
    return value
