"""Two file primitives every writer and loader of weights shares: atomic writes, and safe state-dict reads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from scale_rae_core.errors import CheckpointError


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


def read_plain_state_dict(path: Path, expected: str = "a plain state_dict (name -> tensor)") -> dict[str, torch.Tensor]:
    """A ``torch.save``-d ``{name: tensor}`` file, loaded with ``weights_only=True`` (never an arbitrary pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected {expected}")
    return state
