"""The processes that hold a TPU: find them in ``/proc`` and end them (the first half of ``srae tpu clear``).

A leftover process (a dataloader worker, an orphaned ``xmp.spawn`` child) still has ``/dev/accel*`` (TPU v2-v4)
or ``/dev/vfio/*`` (v5e, v5p, v6e) open, or the libtpu lock. :func:`find_tpu_processes` reads the
``/proc/<pid>/fd`` symlinks; :func:`end_processes` sends SIGTERM, waits, then SIGKILL, and never signals a pid
that was reused meanwhile. Standard library only.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scale_rae_core.errors import BackendError

Kill = Callable[[int, int], None]  # os.kill's signature: (pid, signal)

_ACCEL = re.compile(r"accel\d+")
_POLL_S = 0.05


@dataclass(frozen=True)
class Roots:
    """Where the host's process table, device files and libtpu lock live (tests point them at tmp)."""

    proc: Path = Path("/proc")
    dev: Path = Path("/dev")
    lockfile: Path = Path("/tmp/libtpu_lockfile")


@dataclass(frozen=True)
class TpuProcess:
    """A process holding a TPU device file or the libtpu lock."""

    pid: int
    uid: int
    user: str
    argv: tuple[str, ...]
    holds: tuple[str, ...]  # device / lock paths, as the fd links name them, sorted
    start_time: int | None = None  # /proc/<pid>/stat field 22, to notice a reused pid

    @property
    def command(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class Scan:
    """Result of :func:`find_tpu_processes`."""

    processes: list[TpuProcess]
    uninspectable: int  # processes whose fds could not be read (other users' when not root)


# ----------------------------------------------------------------------------------------------------
# Scanning /proc


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _tpu_target(target: str, roots: Roots) -> str | None:
    """The TPU device or lock an fd link points at, or None."""
    target = target.removesuffix(" (deleted)")
    if target == str(roots.lockfile):
        return target
    try:
        rel = Path(target).relative_to(roots.dev)
    except ValueError:
        return None
    parts = rel.parts
    if (len(parts) == 1 and _ACCEL.fullmatch(parts[0])) or (len(parts) >= 2 and parts[0] == "vfio"):
        return target
    return None


def _start_time(pid_dir: Path) -> int | None:
    """Field 22 of /proc/<pid>/stat (after the parenthesised comm, which may hold spaces)."""
    try:
        stat = (pid_dir / "stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _read_process(pid: int, pid_dir: Path, holds: list[str]) -> TpuProcess | None:
    """Owner and command line of a process; None if it vanished meanwhile."""
    try:
        status = (pid_dir / "status").read_text()
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return None
    uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), None)
    if uid_line is None:
        return None
    uid = int(uid_line.split()[1])  # real uid: the one kill(2) permission is checked against
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    if not argv:  # zombie or kernel thread: show the short name, as ps does
        try:
            argv = (f"[{(pid_dir / 'comm').read_text().strip()}]",)
        except OSError:
            argv = ("[?]",)
    return TpuProcess(pid, uid, _user_name(uid), argv, tuple(sorted(set(holds))), _start_time(pid_dir))


def find_tpu_processes(roots: Roots = Roots(), *, self_pid: int | None = None) -> Scan:
    """Processes (other than ``self_pid``, default ours) with a TPU device file or the libtpu lock open.

    Processes that vanish mid-scan are left out; ones whose fds cannot be read are counted in
    ``Scan.uninspectable``.
    """
    if not roots.proc.is_dir():
        raise BackendError(
            f"{roots.proc} not found: `srae tpu clear` runs on a Linux TPU VM (or pass --all-workers)"
        )
    me = os.getpid() if self_pid is None else self_pid
    found: list[TpuProcess] = []
    uninspectable = 0
    try:
        entries = sorted(int(name) for name in os.listdir(roots.proc) if name.isdigit())
    except OSError as err:
        raise BackendError(f"cannot list {roots.proc}: {err.strerror}") from err
    for pid in entries:
        if pid == me:
            continue
        pid_dir = roots.proc / str(pid)
        try:
            fds = os.listdir(pid_dir / "fd")
        except PermissionError:
            uninspectable += 1
            continue
        except OSError:  # vanished, or not a process directory
            continue
        holds: list[str] = []
        for fd in fds:
            try:
                target = os.readlink(pid_dir / "fd" / fd)
            except OSError:  # fd closed meanwhile
                continue
            hit = _tpu_target(target, roots)
            if hit is not None:
                holds.append(hit)
        if holds and (proc := _read_process(pid, pid_dir, holds)) is not None:
            found.append(proc)
    return Scan(found, uninspectable)


# ----------------------------------------------------------------------------------------------------
# Ending processes


def _alive(proc: TpuProcess, roots: Roots, kill: Kill) -> bool:
    """Still running, and still the same process (not a zombie, pid not reused)."""
    try:
        kill(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, but not ours to signal
    pid_dir = roots.proc / str(proc.pid)
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2 :].split()[:1] if ")" in stat else []
    if state == ["Z"]:
        return False
    return proc.start_time is None or _start_time(pid_dir) == proc.start_time


def _wait_gone(procs: list[TpuProcess], roots: Roots, kill: Kill, timeout: float) -> list[TpuProcess]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit; returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p, roots, kill)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        alive = [p for p in alive if _alive(p, roots, kill)]
    return alive


def _signal(proc: TpuProcess, sig: int, kill: Kill) -> str | None:
    """Send ``sig``; returns "gone" if it already exited, an error text, or None when sent."""
    try:
        kill(proc.pid, sig)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "permission denied"
    return None


def end_processes(
    procs: list[TpuProcess], roots: Roots, kill: Kill, grace: float
) -> tuple[list[TpuProcess], list[tuple[TpuProcess, str]]]:
    """SIGTERM, wait ``grace`` s, SIGKILL survivors, wait 1 s more. Returns (ended, failed)."""
    ended: list[TpuProcess] = []
    failed: list[tuple[TpuProcess, str]] = []
    signalled: list[TpuProcess] = []
    for proc in procs:
        if not _alive(proc, roots, kill):
            ended.append(proc)  # exited since the scan; never signal a reused pid
            continue
        outcome = _signal(proc, signal.SIGTERM, kill)
        if outcome == "gone":
            ended.append(proc)
        elif outcome is not None:
            failed.append((proc, outcome))
        else:
            signalled.append(proc)
    survivors = _wait_gone(signalled, roots, kill, grace)
    killed: list[TpuProcess] = []
    for proc in survivors:
        outcome = _signal(proc, signal.SIGKILL, kill)
        if outcome is None:
            killed.append(proc)
        elif outcome != "gone":
            failed.append((proc, f"SIGKILL: {outcome}"))
    stuck = _wait_gone(killed, roots, kill, 1.0)
    failed += [(p, "still running after SIGKILL (stuck in the driver? reboot the VM)") for p in stuck]
    failed_pids = {p.pid for p, _ in failed}
    ended += [p for p in signalled if p.pid not in failed_pids]
    return ended, failed
