"""Free a TPU VM left busy by a killed run: the engine behind ``srae tpu clear``.

When a training process dies badly, the TPU stays claimed: a leftover process (a dataloader worker, an
orphaned ``xmp.spawn`` child) still has ``/dev/accel*`` (TPU v2-v4) or ``/dev/vfio/*`` (v5e, v5p, v6e)
open, or ``/tmp/libtpu_lockfile`` is left behind and the next run stops with "TPU in use by pid ...".
The reference's ``clear.py`` starts a fresh JAX client and hopes; this module instead

1. finds the processes that hold a TPU device file or the libtpu lock (``/proc/<pid>/fd`` symlinks),
2. with ``force``, ends those owned by the current user (SIGTERM, a grace period, then SIGKILL),
3. removes the lock file once nothing live holds it (or a TPU device),
4. optionally empties the persistent XLA compilation cache,

and returns a :class:`ClearReport` that :func:`render_report` turns into lines. Without ``force`` nothing
is changed and the report says what ``--force`` would do. Only the standard library is used: this must
work on a VM whose Python environment is the broken thing (no torch_xla or jax import).

For a pod slice, :func:`all_workers_command` builds the ``gcloud ... ssh --worker=all`` line that runs
``srae tpu clear --force`` on every worker, and :func:`run_all_workers` runs it.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scale_rae_core.errors import BackendError

#: Environment variable torch_xla reads at import to turn on its persistent compilation cache
#: (``torch_xla.runtime.initialize_cache``). torch_xla has no default location: without the variable it
#: caches nothing on disk.
CACHE_ENV = "XLA_PERSISTENT_CACHE_PATH"
#: Where srae looks when neither ``cache_dir`` nor ``XLA_PERSISTENT_CACHE_PATH`` is given.
DEFAULT_CACHE_DIR = "~/.cache/xla_cache"

Kill = Callable[[int, int], None]  # os.kill's signature: (pid, signal)
Runner = Callable[[list[str]], int]  # runs an argv, returns its exit status

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


@dataclass
class ClearReport:
    """What :func:`clear_tpu` found and did; in a dry run, ``ended``/``lock_removed``/``cache_cleared``
    describe what ``force=True`` would do."""

    dry_run: bool
    found: list[TpuProcess] = field(default_factory=list)
    ended: list[TpuProcess] = field(default_factory=list)
    skipped: list[tuple[TpuProcess, str]] = field(default_factory=list)  # (process, reason)
    failed: list[tuple[TpuProcess, str]] = field(default_factory=list)  # still running after SIGKILL, ...
    uninspectable: int = 0
    lockfile: Path = Roots.lockfile
    lock_existed: bool = False
    lock_removed: bool = False
    cache_dir: Path | None = None  # set when cache clearing was asked for
    cache_cleared: bool = False
    cache_files: int = 0
    cache_bytes: int = 0
    errors: list[str] = field(default_factory=list)  # things that could not be done (no crash)
    grace: float = 5.0

    @property
    def ok(self) -> bool:
        """True when nothing failed and, after a forced run, no process still holds the TPU."""
        return not self.failed and not self.errors and (self.dry_run or not self.skipped)


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


def _end_processes(
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


# ----------------------------------------------------------------------------------------------------
# Compilation cache


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


def _check_cache_dir(path: Path, home: Path) -> Path:
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


def _cache_files(real: Path) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for entry in os.scandir(real):
        try:
            files.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        except OSError:
            continue
    return files


# ----------------------------------------------------------------------------------------------------
# The command


def clear_tpu(
    *,
    force: bool = False,
    clear_cache: bool = False,
    cache_dir: Path | str | None = None,
    roots: Roots = Roots(),
    kill: Kill = os.kill,
    grace: float = 5.0,
    self_pid: int | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> ClearReport:
    """Find what holds the TPU and, with ``force``, free it (see the module docstring).

    Only processes owned by the current user are ended; others are reported as skipped. The lock file
    is removed when it exists and, after ending processes, no live process holds it or a TPU device.
    ``clear_cache`` empties the compilation cache (:func:`resolve_cache_dir`), keeping the directory.
    ``kill`` (``os.kill``'s signature) and ``roots`` exist for tests.
    """
    if cache_dir is not None and not clear_cache:
        raise BackendError("--cache-dir only applies together with --clear-cache; add --clear-cache")
    home = Path.home() if home is None else home
    cache_path = resolve_cache_dir(cache_dir, env=env, home=home) if clear_cache else None
    cache_real = _check_cache_dir(cache_path, home) if cache_path is not None else None
    if cache_dir is not None and cache_real is not None and not cache_real.is_dir():
        raise BackendError(f"--cache-dir {cache_dir} does not exist; pass the XLA cache directory")

    scan = find_tpu_processes(roots, self_pid=self_pid)
    me = os.getuid()
    report = ClearReport(
        dry_run=not force,
        found=scan.processes,
        uninspectable=scan.uninspectable,
        lockfile=roots.lockfile,
        lock_existed=roots.lockfile.exists() or roots.lockfile.is_symlink(),
        cache_dir=cache_path,
        grace=grace,
    )
    mine = [p for p in scan.processes if p.uid == me]
    report.skipped = [(p, f"owned by {p.user}") for p in scan.processes if p.uid != me]

    # Processes.
    if force:
        report.ended, report.failed = _end_processes(mine, roots, kill, grace)
        remaining = find_tpu_processes(roots, self_pid=self_pid).processes
    else:
        report.ended = mine
        remaining = [p for p, _ in report.skipped]

    # Lock file: stale once nothing live holds it or a TPU device.
    if report.lock_existed and not remaining:
        if force:
            try:
                roots.lockfile.unlink()
                report.lock_removed = True
            except FileNotFoundError:
                pass
            except OSError as err:
                report.errors.append(f"could not remove {roots.lockfile}: {err.strerror}")
        else:
            report.lock_removed = True

    # Compilation cache.
    if cache_real is not None and cache_real.is_dir():
        files = _cache_files(cache_real)
        report.cache_files = len(files)
        report.cache_bytes = sum(size for _, size in files)
        if force:
            kept = 0
            for path, size in files:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    kept += 1
                    report.cache_bytes -= size
            report.cache_files -= kept
            if kept:
                report.errors.append(f"could not remove {kept} file(s) in {cache_path}")
        report.cache_cleared = True
    return report


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def render_report(report: ClearReport) -> list[str]:
    """Human-readable lines saying what :func:`clear_tpu` found and did (or, dry run, would do)."""
    lines: list[str] = []
    if report.found:
        lines.append(f"found {len(report.found)} process(es) using the TPU:")
        for p in report.found:
            lines.append(f"  pid {p.pid} ({p.user}): {p.command}  [holds {', '.join(p.holds)}]")
    else:
        lines.append("no process is using the TPU")
        if report.uninspectable:
            lines.append(
                f"  ({report.uninspectable} process(es) of other users could not be inspected; "
                "run with sudo to see them)"
            )
    for p in report.ended:
        if report.dry_run:
            lines.append(f"would end pid {p.pid} ({p.user}): SIGTERM, then SIGKILL after {report.grace:g}s")
        else:
            lines.append(f"ended pid {p.pid} ({p.user})")
    for p, reason in report.skipped:
        lines.append(f"skipped pid {p.pid}: {reason}")
    for p, reason in report.failed:
        lines.append(f"failed to end pid {p.pid}: {reason}")
    if report.lock_removed:
        verb = "would remove" if report.dry_run else "removed"
        lines.append(f"{verb} stale lock file {report.lockfile}")
    elif report.lock_existed:
        lines.append(f"kept lock file {report.lockfile}: a live process still holds the TPU")
    if report.cache_dir is not None:
        if report.cache_cleared:
            what = f"{report.cache_files} file(s), {_size(report.cache_bytes)}"
            verb = "would clear" if report.dry_run else "cleared"
            lines.append(f"{verb} XLA compilation cache {report.cache_dir} ({what})")
        else:
            lines.append(f"no XLA compilation cache at {report.cache_dir}")
    lines += [f"error: {e}" for e in report.errors]
    if report.dry_run:
        acts = report.ended or report.lock_removed or (report.cache_cleared and report.cache_files)
        if acts:
            lines.append("dry run: nothing changed; rerun with --force to do the above")
        else:
            lines.append("dry run: nothing to do")
    return lines


# ----------------------------------------------------------------------------------------------------
# Every worker of a pod slice


def all_workers_argv(
    tpu_name: str,
    zone: str,
    project: str | None = None,
    extra_flags: Sequence[str] = (),
    *,
    executable: str = "srae",
) -> list[str]:
    """The gcloud argv that runs ``srae tpu clear --force [extra_flags]`` on every worker."""
    if not tpu_name or not zone:
        raise BackendError(
            "--all-workers needs the TPU name and --zone (as in `gcloud compute tpus tpu-vm list`)"
        )
    bad = [
        f
        for f in extra_flags
        if f.split("=")[0] in ("--all-workers", "--run", "--tpu", "--zone", "--project")
    ]
    if bad:
        raise BackendError(f"{bad[0]} cannot be passed on to the workers; drop it from the worker flags")
    remote = shlex.join([executable, "tpu", "clear", "--force", *(f for f in extra_flags if f != "--force")])
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, "--zone", zone]
    if project:
        argv += ["--project", project]
    return [*argv, "--worker=all", "--command", remote]


def _double_quote(s: str) -> str:
    return '"' + re.sub(r'([\\"$`])', r"\\\1", s) + '"'


def all_workers_command(
    tpu_name: str,
    zone: str,
    project: str | None = None,
    extra_flags: Sequence[str] = (),
    *,
    executable: str = "srae",
) -> str:
    """:func:`all_workers_argv` as one shell line to print, e.g.
    ``gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all --command "srae tpu clear --force"``.
    """
    argv = all_workers_argv(tpu_name, zone, project, extra_flags, executable=executable)
    return " ".join([*map(shlex.quote, argv[:-1]), _double_quote(argv[-1])])


def _run(argv: list[str]) -> int:
    return subprocess.run(argv, check=False).returncode


def run_all_workers(
    tpu_name: str,
    zone: str,
    project: str | None = None,
    extra_flags: Sequence[str] = (),
    *,
    executable: str = "srae",
    runner: Runner = _run,
) -> None:
    """Run :func:`all_workers_argv` (its output streams through); BackendError if gcloud fails."""
    argv = all_workers_argv(tpu_name, zone, project, extra_flags, executable=executable)
    try:
        code = runner(argv)
    except FileNotFoundError as err:
        raise BackendError(
            "gcloud not found on PATH: install the Google Cloud SDK, or run the command printed "
            "without --run on each worker"
        ) from err
    if code != 0:
        raise BackendError(f"gcloud exited with status {code} on at least one worker; see its output above")
