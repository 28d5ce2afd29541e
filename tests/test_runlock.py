"""The per-folder lock: one writer per --out, a one-line refusal naming the holder, stale locks taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scale_rae_core.errors import DataError
from scale_rae_core.runlock import LOCK_NAME, FolderInUseError, RunLock, locked

REPO = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    with RunLock(tmp_path / "run") as first:
        assert first.held and (tmp_path / "run" / LOCK_NAME).is_file()
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(FolderInUseError) as err:
            RunLock(tmp_path / "run", flag="--out").acquire()
        msg = str(err.value)
        assert "\n" not in msg and f"pid {os.getpid()}" in msg and "choose another --out" in msg
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released and removed
    with RunLock(tmp_path / "run"):  # free again
        pass


def test_a_lock_file_left_by_a_killed_holder_is_taken_over(tmp_path):
    """kill -9 of the holder: the kernel drops its flock, the file stays behind and is stale."""
    run = tmp_path / "run"
    code = "import sys, time; from scale_rae_core.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=f"pid {proc.pid}"):
            RunLock(run).acquire()
        proc.kill()
        proc.wait()
        assert (run / LOCK_NAME).is_file()  # left behind
        with RunLock(run) as lock:
            assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid() and lock.held
    finally:
        if proc.poll() is None:
            proc.kill()


def test_locked_is_a_no_op_off_the_main_rank(tmp_path):
    with locked(tmp_path / "a", enabled=False) as lock:
        assert lock is None and not (tmp_path / "a").exists()
    with locked(None) as lock:
        assert lock is None


def test_pack_refuses_a_folder_another_pack_is_writing_and_leaves_it_alone(tmp_path):
    from scale_rae_core.data.pack import pack
    from tests.data.test_pack import caption_folder

    src = caption_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    with RunLock(out):
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(FolderInUseError, match="is in use by"):
            pack(src, out)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written, no events file
    s = pack(src, out)  # free again
    assert s.packed == 6 and not (out / LOCK_NAME).exists()


def test_a_failed_pack_writes_no_events_file_into_a_foreign_folder(tmp_path):
    from scale_rae_core.data.pack import EVENTS_NAME, pack
    from scale_rae_core.events import Reporter
    from tests.data.test_pack import caption_folder

    src = caption_folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with Reporter(out / EVENTS_NAME) as rep, pytest.raises(DataError, match="not empty"):
        pack(src, out, reporter=rep)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not (tmp_path / "out.events.jsonl").exists()


def test_the_lock_waits_for_nobody(tmp_path):
    """Refusal is immediate (non-blocking), not a hang."""
    with RunLock(tmp_path):
        t0 = time.monotonic()
        with pytest.raises(FolderInUseError):
            RunLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 1.0


_MAIN_LOCK_WORKER = """
import os, sys
from pathlib import Path
from scale_rae_core.backends.cpu_cuda import CpuCudaBackend
from scale_rae_core.config import BackendSettings
from scale_rae_core.runlock import FolderInUseError, hold_on_main

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
with CpuCudaBackend(BackendSettings(procs_per_node=2)) as backend:
    try:
        lock = hold_on_main(folder, backend)
        result = f"held main={backend.is_main} file={lock.lock is not None}"
        backend.barrier()
        lock.release()
    except FolderInUseError as err:
        result = f"refused: {err}"
    (out / f"rank{backend.rank}.txt").write_text(result)
"""


def test_a_job_agrees_on_its_main_process_lock(tmp_path):
    """Two processes: only the main one takes the lock; when it is refused, every process is (none goes on)."""
    from tests.train.ckpt_worker import launch

    worker = tmp_path / "worker.py"
    worker.write_text(_MAIN_LOCK_WORKER)
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    with RunLock(run):
        launch(worker, [str(run), str(out)], nprocs=2)
    main, other = (out / "rank0.txt").read_text(), (out / "rank1.txt").read_text()
    assert main.startswith(f"refused: {run} is in use by ") and f"pid {os.getpid()}" in main
    assert other.startswith(f"refused: {run} is in use by another srae command (the main process was refused)")
    launch(worker, [str(run), str(out)], nprocs=2)
    assert (out / "rank0.txt").read_text() == "held main=True file=True"
    assert (out / "rank1.txt").read_text() == "held main=False file=False"
    assert not (run / LOCK_NAME).exists()
