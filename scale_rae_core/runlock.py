"""One writer per output folder: an advisory lock that training, ``data pack``, ``scale`` and ``verify`` take on
the folder they write, so two commands pointed at the same ``--out`` cannot interleave their files.

The lock is ``OUT/.srae.lock``, held with ``fcntl.flock`` for as long as the command runs and holding
``{"pid", "host", "command", "since"}`` of its holder, so a refusal names who has it::

    error: runs/s1 is in use by `srae train stage1` (pid 4242 on host gpu-3, since 2026-12-01 10:14:03 UTC);
    wait for it to end, or choose another --out

Stale locks: the kernel drops a ``flock`` when its process ends, however it ends (``kill -9`` included), so a
lock file left behind by a dead holder is simply taken over. The file is removed on a clean release; a taker
checks after locking that the path still names the file it locked, so a release racing a take cannot hand the
folder to two holders. ``flock`` is local to one machine on some network file systems: a multi-node run takes
the lock on its main process only (:func:`hold_on_main`, every process agreeing on the outcome), which is what
guards against a second launch into the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scale_rae_core.errors import SraeError

if TYPE_CHECKING:
    from scale_rae_core.backends.base import Backend

LOCK_NAME = ".srae.lock"


class FolderInUseError(SraeError):
    """Another srae command holds the folder's lock."""


def _command() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:3]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(a for a in args if not a.startswith("-"))


def _describe(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = holder.get("since")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(since))}" if isinstance(since, (int, float)) else ""
    command = holder.get("command")
    who = f"`{command}` " if command else ""
    return f"{who}(pid {pid} on host {host}{when})"


class RunLock:
    """The lock of one folder; use as ``with RunLock(out, flag="--out"):`` (or :func:`locked`)."""

    def __init__(self, folder: str | os.PathLike[str], *, flag: str = "--out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.flag = flag
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`FolderInUseError` naming the holder (one line). Creates the folder."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise FolderInUseError(
                    f"{self.folder} is in use by {_describe(holder)}; wait for it to end, or choose another {self.flag}"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed while we were taking it: try the new file
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "since": round(time.time(), 3)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            raw = os.pread(fd, 4096, 0)
            holder = json.loads(raw.decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiting taker re-checks the inode
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(folder: str | os.PathLike[str] | None, *, flag: str = "--out", enabled: bool = True) -> Iterator[RunLock | None]:
    """``with locked(out):`` — the folder's lock for the block; a no-op when ``enabled`` is False (non-main ranks)
    or ``folder`` is None."""
    if folder is None or not enabled:
        yield None
        return
    with RunLock(folder, flag=flag) as lock:
        yield lock


class MainLock:
    """A folder's lock held by a job's main process on behalf of all its processes (:func:`hold_on_main`).

    :meth:`acquire` and :meth:`release` are *collective*: every process calls them, and when the main process is
    refused every process raises :class:`FolderInUseError` (the main one naming the holder), so no process goes on
    to write. Taking it again while held is a no-op. ``backend`` None: a single process. A ``with`` block releases
    it at its end.
    """

    def __init__(self, folder: str | os.PathLike[str], backend: Backend | None, *, flag: str = "--out") -> None:
        self.folder, self.backend, self.flag = Path(folder), backend, flag
        self.lock = RunLock(folder, flag=flag) if backend is None or backend.is_main else None
        self.held = False

    def acquire(self) -> MainLock:
        if self.held:
            return self
        refusal: FolderInUseError | None = None
        if self.lock is not None:
            try:
                self.lock.acquire()
            except FolderInUseError as err:
                refusal = err
        if self.backend is not None and self.backend.distributed:
            import torch

            flag = torch.tensor(0.0 if refusal is None else 1.0, device=self.backend.device)
            if float(self.backend.all_reduce_mean(flag)) > 0 and refusal is None:
                self.release()
                raise FolderInUseError(
                    f"{self.folder} is in use by another srae command (the main process was refused); wait for it "
                    f"to end, or choose another {self.flag}"
                )
        if refusal is not None:
            raise refusal
        self.held = True
        return self

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.held = False

    def __enter__(self) -> MainLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_on_main(folder: str | os.PathLike[str], backend: Backend | None, *, flag: str = "--out") -> MainLock:
    """*Collective.* Take ``folder``'s lock on the main process for the whole job; release with ``.release()``."""
    return MainLock(folder, backend, flag=flag).acquire()
