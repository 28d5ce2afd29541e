"""`srae tpu clear` engine on a fake /proc tree: no TPU, and no real process is ever signalled."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
from pathlib import Path

import pytest

from scale_rae_core.errors import BackendError
from scale_rae_core.ops import tpu_procs
from scale_rae_core.ops.tpu_clear import (
    all_workers_argv,
    all_workers_command,
    clear_tpu,
    render_report,
    run_all_workers,
)
from scale_rae_core.ops.tpu_procs import Roots, find_tpu_processes
from scale_rae_core.ops.xla_cache import resolve_cache_dir

ME = os.getuid()
OTHER = 65534 if ME != 65534 else 65533


def other_name() -> str:
    try:
        return pwd.getpwuid(OTHER).pw_name
    except KeyError:
        return str(OTHER)


def make_proc(
    roots: Roots, pid: int, uid: int, argv: list[str], targets: list[str], start: int = 1000
) -> Path:
    """A /proc/<pid> directory: status, cmdline, stat, and fd/<n> symlinks to ``targets``."""
    d = roots.proc / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "status").write_text(f"Name:\t{Path(argv[0]).name}\nState:\tS\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (d / "comm").write_text(Path(argv[0]).name + "\n")
    write_stat(d, pid, start)
    for i, target in enumerate(targets):
        os.symlink(target, d / "fd" / str(i))
    return d


def write_stat(d: Path, pid: int, start: int) -> None:
    # comm with a space and a paren, as the kernel may print it; starttime is field 22
    (d / "stat").write_text(f"{pid} (py thon) S " + " ".join(["0"] * 18) + f" {start} 0 0\n")


class FakeKill:
    """Stands in for os.kill: a signal ends the fake process by removing its /proc directory."""

    def __init__(self, roots: Roots, stubborn: tuple[int, ...] = (), unkillable: tuple[int, ...] = ()):
        self.roots, self.stubborn, self.unkillable = roots, stubborn, unkillable
        self.calls: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        assert pid != os.getpid()
        d = self.roots.proc / str(pid)
        if not d.exists():
            raise ProcessLookupError(pid)
        if sig == 0:
            return
        self.calls.append((pid, sig))
        if pid in self.unkillable or (sig == signal.SIGTERM and pid in self.stubborn):
            return
        shutil.rmtree(d)


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    r = Roots(proc=tmp_path / "proc", dev=tmp_path / "dev", lockfile=tmp_path / "tmp" / "libtpu_lockfile")
    r.proc.mkdir()
    (r.proc / "self").mkdir()  # non-numeric entries are ignored
    r.lockfile.parent.mkdir()
    return r


@pytest.fixture
def host(roots: Roots) -> Roots:
    """Two users' processes on a TPU VM, an unrelated one, and ourselves."""
    dev, lock = roots.dev, str(roots.lockfile)
    roots.lockfile.write_text("")
    make_proc(
        roots, 101, ME, ["python", "train.py", "--profile", "v4-8"], [f"{dev}/accel0", lock, "/dev/null"]
    )
    make_proc(roots, 102, ME, ["python", "-c", "worker"], [f"{dev}/vfio/0", f"{dev}/vfio/vfio", "pipe:[7]"])
    make_proc(roots, 201, OTHER, ["python3", "eval.py"], [f"{dev}/accel1"])
    make_proc(roots, 301, ME, ["bash"], ["/dev/null", "socket:[99]", f"{dev}/accelerometer"])
    make_proc(roots, os.getpid(), ME, ["pytest"], [f"{dev}/accel0"])
    return roots


def pids(procs) -> list[int]:
    return sorted(p.pid for p in procs)


# ---------------------------------------------------------------------------------------------------
# Scanning


def test_scan_finds_holders_of_both_generations_and_the_lock(host: Roots):
    scan = find_tpu_processes(host)
    by_pid = {p.pid: p for p in scan.processes}
    assert sorted(by_pid) == [101, 102, 201]  # not the unrelated 301, not ourselves
    assert by_pid[101].holds == tuple(sorted([f"{host.dev}/accel0", str(host.lockfile)]))
    assert by_pid[102].holds == (f"{host.dev}/vfio/0", f"{host.dev}/vfio/vfio")
    assert by_pid[101].command == "python train.py --profile v4-8"
    assert by_pid[101].user == pwd.getpwuid(ME).pw_name
    assert (by_pid[201].uid, by_pid[201].user) == (OTHER, other_name())
    assert by_pid[101].start_time == 1000
    assert scan.uninspectable == 0


def test_scan_unknown_uid_deleted_lock_and_empty_cmdline(roots: Roots):
    d = make_proc(roots, 7, 54321, ["x"], [f"{roots.lockfile} (deleted)"])
    (d / "cmdline").write_bytes(b"")
    (p,) = find_tpu_processes(roots).processes
    assert p.user == "54321"  # no passwd entry: the uid
    assert p.holds == (str(roots.lockfile),)
    assert p.argv == ("[x]",)


def test_scan_skips_vanished_and_unreadable_processes(roots: Roots, monkeypatch):
    make_proc(roots, 10, ME, ["python"], [f"{roots.dev}/accel0"])
    gone = make_proc(roots, 11, ME, ["python"], [f"{roots.dev}/accel0"])
    (gone / "status").unlink()  # exited between listing its fds and reading its status
    (gone / "cmdline").unlink()
    (roots.proc / "12").mkdir()  # exited before its fds were listed
    make_proc(roots, 13, OTHER, ["python"], [f"{roots.dev}/accel0"])
    make_proc(roots, 14, ME, ["python"], [f"{roots.dev}/accel2"])

    real_listdir, real_readlink = os.listdir, os.readlink

    def listdir(path):
        if Path(path) == roots.proc / "13" / "fd":
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)

    def readlink(path):
        if Path(path).parent == roots.proc / "14" / "fd":
            raise FileNotFoundError(2, "No such file")  # fd closed mid-scan
        return real_readlink(path)

    monkeypatch.setattr(tpu_procs.os, "listdir", listdir)
    monkeypatch.setattr(tpu_procs.os, "readlink", readlink)
    scan = find_tpu_processes(roots)
    assert pids(scan.processes) == [10]
    assert scan.uninspectable == 1


def test_scan_without_proc_is_a_backend_error(tmp_path: Path):
    with pytest.raises(BackendError, match="Linux TPU VM"):
        find_tpu_processes(Roots(proc=tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------
# Ending processes and the lock


def test_dry_run_lists_everything_and_ends_nothing(host: Roots):
    kill = FakeKill(host)
    report = clear_tpu(roots=host, kill=kill)
    assert report.dry_run
    assert kill.calls == []
    assert pids(report.found) == [101, 102, 201]
    assert pids(report.ended) == [101, 102]  # what --force would end
    assert [(p.pid, why) for p, why in report.skipped] == [(201, f"owned by {other_name()}")]
    assert report.lock_existed and not report.lock_removed  # 201 keeps the TPU busy
    assert host.lockfile.exists() and (host.proc / "101").exists()
    lines = render_report(report)
    assert "found 3 process(es) using the TPU:" in lines
    assert any(line.startswith("  pid 101 (") and "python train.py --profile v4-8" in line for line in lines)
    assert "would end pid 102 (" + pwd.getpwuid(ME).pw_name + "): SIGTERM, then SIGKILL after 5s" in lines
    assert f"skipped pid 201: owned by {other_name()}" in lines
    assert f"kept lock file {host.lockfile}: a live process still holds the TPU" in lines
    assert lines[-1] == "dry run: nothing changed; rerun with --force to do the above"


def test_force_ends_only_the_current_users_processes(host: Roots):
    kill = FakeKill(host)
    report = clear_tpu(force=True, roots=host, kill=kill, grace=0.5)
    assert kill.calls == [(101, signal.SIGTERM), (102, signal.SIGTERM)]
    assert pids(report.ended) == [101, 102] and report.failed == []
    assert (host.proc / "201").exists() and (host.proc / "301").exists()
    assert host.lockfile.exists() and not report.lock_removed  # 201 still holds a TPU device
    assert not report.ok  # the TPU is still busy (skipped process)
    lines = render_report(report)
    assert "ended pid 101 (" + pwd.getpwuid(ME).pw_name + ")" in lines
    assert not any(line.startswith("dry run") for line in lines)


def test_sigkill_for_survivors_and_failure_when_even_that_fails(roots: Roots):
    make_proc(roots, 1, ME, ["a"], [f"{roots.dev}/accel0"])
    make_proc(roots, 2, ME, ["b"], [f"{roots.dev}/accel1"])
    make_proc(roots, 3, ME, ["c"], [f"{roots.dev}/accel2"])
    kill = FakeKill(roots, stubborn=(2,), unkillable=(3,))
    report = clear_tpu(force=True, roots=roots, kill=kill, grace=0.1)
    assert kill.calls == [
        (1, signal.SIGTERM), (2, signal.SIGTERM), (3, signal.SIGTERM), (2, signal.SIGKILL), (3, signal.SIGKILL)
    ]  # fmt: skip
    assert pids(report.ended) == [1, 2]
    assert [(p.pid, why.split(" (")[0]) for p, why in report.failed] == [(3, "still running after SIGKILL")]
    assert "failed to end pid 3: still running after SIGKILL" in render_report(report)[-1]
    assert not report.ok


def test_process_that_exits_or_whose_pid_is_reused_before_the_signal_is_not_signalled(roots: Roots):
    make_proc(roots, 1, ME, ["a"], [f"{roots.dev}/accel0"])
    make_proc(roots, 2, ME, ["b"], [f"{roots.dev}/accel1"])
    inner = FakeKill(roots)

    def kill(pid: int, sig: int) -> None:
        if sig == 0 and pid == 1 and (roots.proc / "1").exists():
            shutil.rmtree(roots.proc / "1")  # exited on its own
        if sig == 0 and pid == 2:
            write_stat(roots.proc / "2", 2, start=5555)  # a new process got pid 2
        inner(pid, sig)

    report = clear_tpu(force=True, roots=roots, kill=kill, grace=0.1)
    assert inner.calls == []
    assert pids(report.ended) == [1, 2]


def test_permission_denied_kill_is_a_failure_not_a_crash(roots: Roots):
    make_proc(roots, 1, ME, ["a"], [f"{roots.dev}/accel0"])

    def kill(pid: int, sig: int) -> None:
        if sig:
            raise PermissionError(1, "Operation not permitted")

    report = clear_tpu(force=True, roots=roots, kill=kill, grace=0.1)
    assert [(p.pid, why) for p, why in report.failed] == [(1, "permission denied")]


def test_stale_lock_is_removed_only_with_force(roots: Roots):
    roots.lockfile.write_text("")
    make_proc(roots, 301, ME, ["bash"], ["/dev/null"])
    dry = clear_tpu(roots=roots, kill=FakeKill(roots))
    assert dry.lock_removed and roots.lockfile.exists()
    assert f"would remove stale lock file {roots.lockfile}" in render_report(dry)
    done = clear_tpu(force=True, roots=roots, kill=FakeKill(roots))
    assert done.lock_removed and not roots.lockfile.exists() and done.ok
    assert render_report(done) == ["no process is using the TPU", f"removed stale lock file {roots.lockfile}"]


def test_lock_held_by_an_ended_process_is_removed(roots: Roots):
    roots.lockfile.write_text("")
    make_proc(roots, 101, ME, ["python"], [str(roots.lockfile), f"{roots.dev}/accel0"])
    report = clear_tpu(force=True, roots=roots, kill=FakeKill(roots), grace=0.5)
    assert pids(report.ended) == [101] and report.lock_removed and not roots.lockfile.exists()


def test_lock_held_by_another_users_live_process_is_kept(roots: Roots):
    roots.lockfile.write_text("")
    make_proc(roots, 201, OTHER, ["python"], [str(roots.lockfile)])
    kill = FakeKill(roots)
    report = clear_tpu(force=True, roots=roots, kill=kill)
    assert kill.calls == [] and roots.lockfile.exists() and not report.lock_removed


def test_nothing_to_do(roots: Roots):
    report = clear_tpu(roots=roots, kill=FakeKill(roots))
    assert render_report(report) == ["no process is using the TPU", "dry run: nothing to do"]


# ---------------------------------------------------------------------------------------------------
# Compilation cache


def make_cache(path: Path, n: int = 3) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        (path / f"{i:016x}").write_bytes(b"x" * 100)
    return path


def test_cache_dir_resolution_order(tmp_path: Path):
    home = tmp_path / "home"
    env = {"XLA_PERSISTENT_CACHE_PATH": "/data/xla"}
    assert resolve_cache_dir("/explicit", env=env, home=home) == Path("/explicit")
    assert resolve_cache_dir(None, env=env, home=home) == Path("/data/xla")
    assert resolve_cache_dir(None, env={}, home=home) == home / ".cache" / "xla_cache"
    assert resolve_cache_dir("~/c", env={}, home=home) == home / "c"


def test_cache_cleared_only_with_force_and_directory_kept(roots: Roots, tmp_path: Path):
    cache = make_cache(tmp_path / "xla_cache")
    env = {"XLA_PERSISTENT_CACHE_PATH": str(cache)}
    home = tmp_path / "home"
    dry = clear_tpu(clear_cache=True, roots=roots, env=env, home=home, kill=FakeKill(roots))
    assert (dry.cache_dir, dry.cache_files, dry.cache_bytes) == (cache, 3, 300)
    assert len(list(cache.iterdir())) == 3
    assert f"would clear XLA compilation cache {cache} (3 file(s), 300 B)" in render_report(dry)
    done = clear_tpu(force=True, clear_cache=True, roots=roots, env=env, home=home, kill=FakeKill(roots))
    assert done.cache_cleared and done.cache_files == 3 and done.ok
    assert cache.is_dir() and list(cache.iterdir()) == []
    assert f"cleared XLA compilation cache {cache} (3 file(s), 300 B)" in render_report(done)
    untouched = clear_tpu(force=True, roots=roots, env=env, home=home, kill=FakeKill(roots))
    assert untouched.cache_dir is None and not untouched.cache_cleared


def test_missing_default_cache_is_reported_but_missing_explicit_one_is_an_error(roots: Roots, tmp_path: Path):
    home = tmp_path / "home"
    report = clear_tpu(force=True, clear_cache=True, roots=roots, env={}, home=home, kill=FakeKill(roots))
    assert f"no XLA compilation cache at {home}/.cache/xla_cache" in render_report(report)
    with pytest.raises(BackendError, match="does not exist"):
        clear_tpu(clear_cache=True, cache_dir=tmp_path / "typo", roots=roots, home=home)


def test_cache_guard_refuses_what_is_not_a_cache(roots: Roots, tmp_path: Path):
    home = tmp_path / "home"
    make_cache(home / "project" / "stuff")
    (tmp_path / "a_file").write_text("x")
    nested = make_cache(tmp_path / "nested")
    (nested / "sub").mkdir()
    for bad in [
        "/",
        "/tmp",
        str(home),
        str(home / "project"),
        os.getcwd(),
        str(tmp_path / "a_file"),
        str(nested),
    ]:
        with pytest.raises(BackendError, match="refusing to clear"):
            clear_tpu(force=True, clear_cache=True, cache_dir=bad, roots=roots, home=home)
    assert (home / "project" / "stuff").is_dir() and (nested / "sub").is_dir()
    with pytest.raises(BackendError, match="refusing to clear"):  # from the environment, too
        clear_tpu(clear_cache=True, roots=roots, env={"XLA_PERSISTENT_CACHE_PATH": str(home)}, home=home)


def test_cache_dir_without_clear_cache_is_an_error(roots: Roots, tmp_path: Path):
    with pytest.raises(BackendError, match="--clear-cache"):
        clear_tpu(cache_dir=tmp_path, roots=roots)


# ---------------------------------------------------------------------------------------------------
# Every worker of a pod


def test_all_workers_command_exact():
    assert all_workers_command("my-tpu", "us-central2-b") == (
        'gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all --command "srae tpu clear --force"'
    )
    assert all_workers_command("my-tpu", "europe-west4-a", "proj-1", ["--clear-cache", "--force"]) == (
        "gcloud compute tpus tpu-vm ssh my-tpu --zone europe-west4-a --project proj-1 --worker=all "
        '--command "srae tpu clear --force --clear-cache"'
    )
    assert all_workers_command("t", "z", extra_flags=["--clear-cache", "--cache-dir", "/mnt/x cache"]) == (
        "gcloud compute tpus tpu-vm ssh t --zone z --worker=all "
        "--command \"srae tpu clear --force --clear-cache --cache-dir '/mnt/x cache'\""
    )


def test_all_workers_refuses_recursion_and_missing_names():
    with pytest.raises(BackendError, match="--all-workers cannot be passed"):
        all_workers_command("t", "z", extra_flags=["--all-workers"])
    with pytest.raises(BackendError, match="--zone"):
        all_workers_command("t", "")


def test_run_all_workers_uses_the_runner():
    seen: list[list[str]] = []
    run_all_workers("t", "z", extra_flags=["--clear-cache"], runner=lambda argv: seen.append(argv) or 0)
    assert seen == [all_workers_argv("t", "z", extra_flags=["--clear-cache"])]
    assert seen[0][-2:] == ["--command", "srae tpu clear --force --clear-cache"]
    with pytest.raises(BackendError, match="status 255"):
        run_all_workers("t", "z", runner=lambda argv: 255)

    def no_gcloud(argv: list[str]) -> int:
        raise FileNotFoundError(2, "No such file", "gcloud")

    with pytest.raises(BackendError, match="gcloud not found"):
        run_all_workers("t", "z", runner=no_gcloud)
