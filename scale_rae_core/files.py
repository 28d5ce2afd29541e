"""File primitives every writer and loader of weights shares: atomic writes, fsync, and safe reads of torch files.

:func:`read_weights_only` is the one ``torch.load`` in srae: always ``weights_only=True`` (tensors and plain
containers, never an arbitrary pickle), always to CPU, with a one-line error naming the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.errors import CheckpointError, SraeError


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
