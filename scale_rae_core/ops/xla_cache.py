"""The persistent XLA compilation cache: where it is, whether a folder looks like one, and the files in it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from scale_rae_core.errors import BackendError

#: Environment variable torch_xla reads at import to turn on its persistent compilation cache
#: (``torch_xla.runtime.initialize_cache``). torch_xla has no default location: without the variable it
#: caches nothing on disk.
CACHE_ENV = "XLA_PERSISTENT_CACHE_PATH"
#: Where srae looks when neither ``cache_dir`` nor ``XLA_PERSISTENT_CACHE_PATH`` is given.
DEFAULT_CACHE_DIR = "~/.cache/xla_cache"


def resolve_cache_dir(
    cache_dir: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Path:
    """``cache_dir`` if given, else ``$XLA_PERSISTENT_CACHE_PATH``, else ``~/.cache/xla_cache``."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    raw = str(cache_dir) if cache_dir is not None else env.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    if raw == "~" or raw.startswith("~/"):
        raw = str(home) + raw[1:]
    return Path(raw)


def check_cache_dir(path: Path, home: Path) -> Path:
    """The resolved path if it looks like an XLA compilation cache; else a BackendError naming it.

    A torch_xla (and JAX) persistent cache is a flat directory of files named by hash, so anything that
    is a filesystem top level, the home or working directory or one of their parents, or holds
    subdirectories or symlinks, is refused.
    """
    real = path.resolve()
    protected = {home.resolve(), Path.cwd().resolve()}
    hint = "pass --cache-dir with the directory XLA_PERSISTENT_CACHE_PATH points at"
    if len(real.parts) < 3 or any(p == real or real in p.parents for p in protected):
        raise BackendError(f"refusing to clear {path}: it is not an XLA cache directory; {hint}")
    if real.exists() and not real.is_dir():
        raise BackendError(f"refusing to clear {path}: it is a file, not a cache directory; {hint}")
    if real.is_dir():
        odd = next((e for e in os.scandir(real) if e.is_symlink() or e.is_dir(follow_symlinks=False)), None)
        if odd is not None:
            raise BackendError(
                f"refusing to clear {path}: it holds {odd.name}/, and an XLA cache is a flat directory "
                f"of files; {hint}"
            )
    return real


def cache_files(real: Path) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for entry in os.scandir(real):
        try:
            files.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        except OSError:
            continue
    return files
