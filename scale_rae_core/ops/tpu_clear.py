"""Free a TPU VM left busy by a killed run: the engine behind ``srae tpu clear``.

When a training process dies badly, the TPU stays claimed: a leftover process still has a TPU device file or
``/tmp/libtpu_lockfile`` open, or the lock file is left behind and the next run stops with "TPU in use by pid
...". The reference's ``clear.py`` starts a fresh JAX client and hopes; :func:`clear_tpu` instead

1. finds the processes that hold a TPU device file or the libtpu lock (``ops.tpu_procs``),
2. with ``force``, ends those owned by the current user (SIGTERM, a grace period, then SIGKILL),
3. removes the lock file once nothing live holds it (or a TPU device),
4. optionally empties the persistent XLA compilation cache (``ops.xla_cache``),

and returns a :class:`ClearReport` that :func:`render_report` turns into lines. Without ``force`` nothing
is changed and the report says what ``--force`` would do. Only the standard library is used: this must
work on a VM whose Python environment is the broken thing (no torch_xla or jax import).

For a pod slice, :func:`all_workers_command` builds the ``gcloud ... ssh --worker=all`` line that runs
``srae tpu clear --force`` on every worker, and :func:`run_all_workers` runs it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scale_rae_core.errors import BackendError
from scale_rae_core.ops.tpu_procs import Kill, Roots, TpuProcess, end_processes, find_tpu_processes
from scale_rae_core.ops.xla_cache import cache_files, check_cache_dir, resolve_cache_dir

Runner = Callable[[list[str]], int]  # runs an argv, returns its exit status


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
    ``clear_cache`` empties the compilation cache (``xla_cache.resolve_cache_dir``), keeping the directory.
    ``kill`` (``os.kill``'s signature) and ``roots`` exist for tests.
    """
    if cache_dir is not None and not clear_cache:
        raise BackendError("--cache-dir only applies together with --clear-cache; add --clear-cache")
    home = Path.home() if home is None else home
    cache_path = resolve_cache_dir(cache_dir, env=env, home=home) if clear_cache else None
    cache_real = check_cache_dir(cache_path, home) if cache_path is not None else None
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
    if force:
        report.ended, report.failed = end_processes(mine, roots, kill, grace)
        remaining = find_tpu_processes(roots, self_pid=self_pid).processes
    else:
        report.ended = mine
        remaining = [p for p, _ in report.skipped]
    if report.lock_existed and not remaining:  # stale once nothing live holds it or a TPU device
        _remove_lock(report, roots.lockfile, force)
    if cache_real is not None and cache_real.is_dir():
        _empty_cache(report, cache_real, force)
    return report


def _remove_lock(report: ClearReport, lockfile: Path, force: bool) -> None:
    if not force:
        report.lock_removed = True  # what --force would do
        return
    try:
        lockfile.unlink()
        report.lock_removed = True
    except FileNotFoundError:
        pass
    except OSError as err:
        report.errors.append(f"could not remove {lockfile}: {err.strerror}")


def _empty_cache(report: ClearReport, real: Path, force: bool) -> None:
    """Count the cache's files and, with ``force``, delete them (the folder stays)."""
    files = cache_files(real)
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
            report.errors.append(f"could not remove {kept} file(s) in {report.cache_dir}")
    report.cache_cleared = True


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
