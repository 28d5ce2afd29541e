"""Checkpoints: exact resume in 1 and 2 processes, resume across world sizes, atomic saves, retention,
one-line errors, safe loading, and full-model export."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scale_rae_core.backends import get_backend
from scale_rae_core.config import BackendSettings
from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.io import export_model
from scale_rae_core.train.checkpoint import MARKER, CheckpointManager, step_dir_name
from scale_rae_core.train.rng import load_rng_state, save_rng_state
from tests.train import ckpt_worker
from tests.train.ckpt_worker import Tiny, build, launch, run_job, train_step

WORKER = Path(ckpt_worker.__file__)


@pytest.fixture
def backend():
    with get_backend(BackendSettings(kind="cpu")) as be:
        yield be


def _losses(path: Path) -> list[float]:
    return json.loads(path.read_text())["losses"]


def _train_steps(model, optimizer, scheduler, steps: range) -> list[float]:
    return [train_step(model, optimizer, scheduler, step, 0, 1).item() for step in steps]


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# --------------------------------------------------------------------------------------------- trajectories


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    """In this process: 6 uninterrupted steps and 3 steps + save, with RNG noise and without. Then a fresh
    process resumes the noisy run for the last 3 steps."""
    tmp = tmp_path_factory.mktemp("one")
    jobs = [
        {"run_dir": str(tmp / "full"), "steps": 6, "noise": True, "out": str(tmp / "full.json")},
        {"run_dir": str(tmp / "a"), "steps": 6, "stop_at": 3, "noise": True, "out": str(tmp / "a1.json")},
        {"run_dir": str(tmp / "det_full"), "steps": 6, "out": str(tmp / "det_full.json")},
        {"run_dir": str(tmp / "d"), "steps": 6, "stop_at": 3, "out": str(tmp / "d1.json")},
    ]
    torch.set_num_threads(1)
    with get_backend(BackendSettings(kind="cpu")) as be:
        for job in jobs:
            run_job(be, job)
    (tmp / "resume.json").write_text(json.dumps(
        [{"run_dir": str(tmp / "a"), "steps": 6, "resume": True, "noise": True, "out": str(tmp / "a2.json")}]
    ))
    launch(WORKER, [str(tmp / "resume.json")], nprocs=1)
    return tmp


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, one_proc):
    """Two gloo processes: 6 steps, 3 steps + save (noisy), 3 deterministic steps + save + export. Then two
    fresh processes resume the noisy run, and resume the 1-process deterministic checkpoint."""
    tmp = tmp_path_factory.mktemp("two")
    first = [
        {"run_dir": str(tmp / "full"), "steps": 6, "noise": True, "out": str(tmp / "full.json")},
        {"run_dir": str(tmp / "b"), "steps": 6, "stop_at": 3, "noise": True, "out": str(tmp / "b1.json")},
        {"run_dir": str(tmp / "e"), "steps": 6, "stop_at": 3, "out": str(tmp / "e1.json"), "export": str(tmp / "export")},
    ]
    shutil.copytree(one_proc / "d", tmp / "d")
    second = [
        {"run_dir": str(tmp / "b"), "steps": 6, "resume": True, "noise": True, "out": str(tmp / "b2.json")},
        {"run_dir": str(tmp / "d"), "steps": 6, "resume": True, "out": str(tmp / "d2.json")},
    ]
    (tmp / "first.json").write_text(json.dumps(first))
    (tmp / "second.json").write_text(json.dumps(second))
    launch(WORKER, [str(tmp / "first.json")], nprocs=2)
    launch(WORKER, [str(tmp / "second.json")], nprocs=2)
    return tmp


def test_resume_in_a_fresh_process_repeats_the_uninterrupted_losses(one_proc):
    full = _losses(one_proc / "full.json")
    resumed = _losses(one_proc / "a1.json") + _losses(one_proc / "a2.json")
    assert len(full) == 6
    assert resumed == full  # bitwise: weights, Adam moments, LR schedule and RNG all restored
    record = json.loads((one_proc / "a2.json").read_text())
    assert record["start"] == 3
    assert record["resumed"]["data_position"] == {"rank": 0, "next_step": 3}
    assert record["resumed"]["rng_restored"] is True
    assert record["lrs"] == json.loads((one_proc / "full.json").read_text())["lrs"][3:]


@pytest.mark.dist
def test_resume_with_two_processes_repeats_the_uninterrupted_losses(two_proc):
    full = _losses(two_proc / "full.json")
    resumed = _losses(two_proc / "b1.json") + _losses(two_proc / "b2.json")
    assert resumed == pytest.approx(full, abs=1e-6)
    record = json.loads((two_proc / "b2.json").read_text())
    assert record["resumed"]["world_size"] == 2
    assert record["resumed"]["data_positions"] == [{"rank": 0, "next_step": 3}, {"rank": 1, "next_step": 3}]
    shards = sorted(p.name for p in (two_proc / "b" / "checkpoints" / step_dir_name(3)).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.dist
def test_checkpoint_from_two_processes_resumes_in_one(two_proc, one_proc, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(two_proc / "e", keep=2, backend=backend)
    info = manager.load(manager.latest(), model, optimizer, scheduler)
    assert info["step"] == 3 and info["world_size"] == 2
    assert info["data_position"] is None  # the layout changed: the caller decides how to restart the data
    assert len(info["data_positions"]) == 2
    tail = _train_steps(model, optimizer, scheduler, range(3, 6))
    first = _losses(two_proc / "e1.json")
    reference = _losses(one_proc / "det_full.json")
    assert first + tail == pytest.approx(reference, rel=1e-5, abs=1e-6)


@pytest.mark.dist
def test_checkpoint_from_one_process_resumes_in_two(two_proc, one_proc):
    resumed = _losses(one_proc / "d1.json") + _losses(two_proc / "d2.json")
    assert resumed == pytest.approx(_losses(one_proc / "det_full.json"), rel=1e-5, abs=1e-6)


@pytest.mark.dist
def test_export_from_two_processes_is_a_full_state_dict(two_proc, one_proc, backend):
    state = load_file(str(two_proc / "export" / "model.safetensors"))
    fresh = Tiny()
    fresh.load_state_dict(state, strict=True)
    assert json.loads((two_proc / "export" / "config.json").read_text()) == {"width": 16, "blocks": 2}
    assert (two_proc / "export" / "README.md").read_text() == "tiny\n"
    # the exported weights are those of the checkpoint at step 3 (loaded here in one process)
    model, _, _ = build(backend)
    CheckpointManager(two_proc / "e", keep=2, backend=backend).load(two_proc / "e" / "checkpoints" / step_dir_name(3), model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- layout, retention, atomicity


def test_layout_is_tensors_plus_json_and_safetensors(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    _train_steps(model, optimizer, scheduler, range(2))
    manager = CheckpointManager(tmp_path, keep=3, backend=backend)
    path = manager.save(2, model, optimizer, scheduler, data_position={"shard": 4, "offset": 17},
                        metrics={"loss": 0.5}, profile={"run": {"name": "t"}})
    assert path == tmp_path / "checkpoints" / "step-00000002"
    meta = json.loads((path / MARKER).read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["format"] == "srae-checkpoint"
    state = json.loads((path / "state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 2
    assert "lr_lambdas" not in state["scheduler"]
    assert json.loads((path / "profile.json").read_text()) == {"run": {"name": "t"}}
    assert json.loads((path / "data" / "rank-00000.json").read_text()) == {"shard": 4, "offset": 17}
    with safe_open(str(path / "rng" / "rank-00000.safetensors"), framework="pt") as f:
        assert {"python", "numpy", "torch_cpu"} <= set(f.keys())
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def test_optimizer_moments_and_param_groups_are_restored(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    _train_steps(model, optimizer, scheduler, range(3))
    manager = CheckpointManager(tmp_path, keep=1, backend=backend)
    manager.save(3, model, optimizer, scheduler)

    model2, optimizer2, scheduler2 = build(backend)
    manager.load(manager.latest(), model2, optimizer2, scheduler2)
    for p, q in zip(optimizer.param_groups[0]["params"], optimizer2.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][key], optimizer2.state[q][key], rtol=0, atol=0)
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert optimizer2.param_groups[1]["betas"] == (0.9, 0.95)  # tuples survive the JSON round trip
    assert scheduler2.last_epoch == 3
    assert not model2.encoder.weight.requires_grad


def test_retention_keeps_the_newest_k(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=2, backend=backend)
    for step in (1, 2, 3, 4):
        manager.save(step, model, optimizer, scheduler)
        assert len(manager.complete()) == min(step, 2)
    assert [s for s, _ in manager.complete()] == [3, 4]
    manager.save(4, model, optimizer, scheduler)  # saving the same step again replaces it
    assert [s for s, _ in manager.complete()] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


def test_interrupted_saves_are_ignored_and_cleaned(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=5, backend=backend)
    good = manager.save(2, model, optimizer, scheduler)
    ckpts = tmp_path / "checkpoints"
    # killed while writing shards: only the .tmp dir exists
    partial = ckpts / "step-00000003.tmp"
    shutil.copytree(good, partial)
    (partial / MARKER).unlink()
    # a step dir without the marker (the marker is always written last)
    no_marker = ckpts / "step-00000004"
    shutil.copytree(good, no_marker)
    (no_marker / MARKER).unlink()

    assert [s for s, _ in manager.complete()] == [2]
    with pytest.raises(CheckpointError) as err:
        manager.load(no_marker, *build(backend))
    _assert_one_line(err, str(no_marker), "incomplete")
    with pytest.raises(CheckpointError) as err:
        manager.load(partial, *build(backend))
    _assert_one_line(err, "incomplete")

    assert manager.latest() == good
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    info = manager.load(good, *build(backend))
    assert info["step"] == 2


# --------------------------------------------------------------------------------------------- errors and safety


def test_missing_and_corrupt_checkpoints_give_one_line_errors(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=5, backend=backend)
    assert manager.latest() is None

    with pytest.raises(CheckpointError) as err:
        manager.load(tmp_path / "nope", model, optimizer, scheduler)
    _assert_one_line(err, str(tmp_path / "nope"), "does not exist")

    path = manager.save(1, model, optimizer, scheduler)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        manager.load(broken, model, optimizer, scheduler)
    _assert_one_line(err, "meta.json", "unreadable")

    shutil.rmtree(broken)
    shutil.copytree(path, broken)
    (broken / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError) as err:
        manager.load(broken, model, optimizer, scheduler)
    _assert_one_line(err, str(broken), "do not load")

    shutil.rmtree(broken)
    shutil.copytree(path, broken)
    (broken / "state.json").unlink()
    with pytest.raises(CheckpointError) as err:
        manager.load(broken, model, optimizer, scheduler)
    _assert_one_line(err, "state.json", "missing")


def test_a_checkpoint_of_another_model_is_refused(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=1, backend=backend)
    path = manager.save(1, model, optimizer, scheduler)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError) as err:
        manager.load(path, other)
    _assert_one_line(err, str(path), "model settings")


def test_model_only_checkpoint(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    _train_steps(model, optimizer, scheduler, range(2))
    manager = CheckpointManager(tmp_path, keep=1, backend=backend)
    path = manager.save(2, model)
    fresh, opt2, _ = build(backend)
    with pytest.raises(CheckpointError) as err:
        manager.load(path, fresh, opt2)
    _assert_one_line(err, "no optimizer state")
    manager.load(path, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_checkpoint_index_with_foreign_pickle_is_refused(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=1, backend=backend)
    path = manager.save(1, model, optimizer, scheduler)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError) as err:
        manager.load(path, model, optimizer, scheduler)
    _assert_one_line(err, "refusing to load")
    assert not marker.exists()


def _plant_bytes_entry(backend, path: Path, marker: Path) -> str:
    """Rewrite the checkpoint at ``path`` so that one model entry is a pickled object (a DCP "bytes" entry) whose
    unpickling would create ``marker``; returns that entry's key."""
    import torch.distributed.checkpoint as dcp

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    model, optimizer, _ = build(backend)
    state = backend.train_state(model, optimizer)
    key = next(iter(state["model"]))
    state["model"][key] = Evil()
    for f in path.glob("*.distcp"):
        f.unlink()
    (path / ".metadata").unlink()
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    assert not marker.exists()
    return f"model.{key}"


def test_checkpoint_with_a_pickled_bytes_entry_is_refused_without_running_it(tmp_path, backend, capfd):
    """DCP would torch.load(weights_only=False) a "bytes" entry: the index naming one is refused in one line."""
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=1, backend=backend)
    path = manager.save(1, model, optimizer, scheduler)
    marker = tmp_path / "pwned"
    _plant_bytes_entry(backend, path, marker)
    capfd.readouterr()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        manager.load(path, model, optimizer, scheduler)
    _assert_one_line(err, "not plain DCP metadata", "BytesStorageMetadata", "untrusted")
    assert not marker.exists()
    for name, value in model.state_dict().items():  # nothing was loaded into the model either
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    out, errout = capfd.readouterr()
    assert "Traceback" not in out + errout  # no DCP logging of the refusal


def test_the_load_planner_refuses_bytes_entries_on_its_own(tmp_path, backend):
    """Defence in depth: even with DCP's own index reader, the planner never unpickles a bytes entry."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    from scale_rae_core.train.checkpoint import _TensorsOnlyPlanner

    model, optimizer, scheduler = build(backend)
    path = CheckpointManager(tmp_path, keep=1, backend=backend).save(1, model, optimizer, scheduler)
    marker = tmp_path / "pwned"
    key = _plant_bytes_entry(backend, path, marker)
    tensors = {"model": dict(model.state_dict())}
    with pytest.raises((CheckpointError, CheckpointException)) as err:
        dcp.load(tensors, storage_reader=FileSystemReader(str(path)), planner=_TensorsOnlyPlanner(), no_dist=True)
    assert "pickled bytes" in str(err.value) and key in str(err.value)
    assert not marker.exists()


def test_non_json_state_is_refused_with_the_key(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=1, backend=backend)
    with pytest.raises(CheckpointError) as err:
        manager.save(1, model, optimizer, scheduler, metrics={"bad": object()})
    _assert_one_line(err, "metrics.bad")


def test_keep_must_be_positive(tmp_path, backend):
    with pytest.raises(CheckpointError, match="checkpoint.keep"):
        CheckpointManager(tmp_path, keep=0, backend=backend)


# --------------------------------------------------------------------------------------------- rng


def test_rng_state_round_trips_through_safetensors(tmp_path, backend):
    backend.seed_everything(5)
    path = tmp_path / "rng.safetensors"
    save_rng_state(path, backend)
    first = (random.random(), random.gauss(0, 1), float(np.random.rand()), np.random.randn(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_rng_state(path, backend)
    again = (random.random(), random.gauss(0, 1), float(np.random.rand()), np.random.randn(), torch.rand(3))
    assert first[:4] == again[:4]
    assert torch.equal(first[4], again[4])
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as err:
        load_rng_state(path, backend)
    _assert_one_line(err, str(path))


# --------------------------------------------------------------------------------------------- export


def test_export_writes_a_loadable_full_model(tmp_path, backend):
    model, optimizer, scheduler = build(backend)
    _train_steps(model, optimizer, scheduler, range(2))
    manager = CheckpointManager(tmp_path / "run", keep=1, backend=backend)
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"vocab": 3}')
    out = manager.export(tmp_path / "model", model, {"width": 16, "betas": (0.9, 0.95)},
                         {"tokenizer.json": tok, "NOTE.txt": "hello", "blob.bin": b"\x00\x01"})
    assert sorted(p.name for p in out.iterdir()) == ["NOTE.txt", "blob.bin", "config.json", "model.safetensors", "tokenizer.json"]
    fresh = Tiny()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert json.loads((out / "config.json").read_text()) == {"width": 16, "betas": {"__tuple__": [0.9, 0.95]}}
    assert (out / "tokenizer.json").read_text() == '{"vocab": 3}'

    # exporting again replaces the directory atomically and leaves no temporary folders behind
    export_model(out, {"w": torch.ones(2)}, {"v": 2})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_handles_tied_weights(tmp_path):
    emb = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    out = export_model(tmp_path / "tied", model.state_dict(), {})
    state = load_file(str(out / "model.safetensors"))
    fresh = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 4), "head": torch.nn.Linear(4, 5, bias=False)})
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh["head"].weight, emb.weight.detach())


def test_export_of_an_empty_state_dict_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as err:
        export_model(tmp_path / "x", {}, {})
    _assert_one_line(err, "empty")
    assert not (tmp_path / "x").exists()



def test_a_resave_killed_between_its_two_renames_keeps_a_complete_copy(tmp_path, backend):
    """Saving step 2 again moves the old copy to .old, then the new one into place: killed in between, the .old
    copy is the only complete one and latest() puts it back (with a complete or a partial new copy beside it)."""
    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(tmp_path, keep=5, backend=backend)
    good = manager.save(2, model, optimizer, scheduler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = tmp_path / "checkpoints"
    for new_copy_complete in (True, False):
        shutil.copytree(good, ckpts / "step-00000002.tmp")
        if not new_copy_complete:
            (ckpts / "step-00000002.tmp" / MARKER).unlink()
        (ckpts / "step-00000002").rename(ckpts / "step-00000002.old")  # killed right after the first rename
        assert manager.complete() == []
        assert manager.latest() == good
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
        fresh = build(backend)
        assert manager.load(good, *fresh)["step"] == 2
        assert all(torch.equal(fresh[0].state_dict()[k], v) for k, v in expected.items())
    # killed after the second rename: the new copy is in place, the old one is removed
    shutil.copytree(good, ckpts / "step-00000002.old")
    assert manager.latest() == good and sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]


def test_checkpoint_and_export_files_get_the_umask_modes(tmp_path, backend):
    import os

    model, optimizer, scheduler = build(backend)
    old = os.umask(0o027)
    try:
        step = CheckpointManager(tmp_path / "run", keep=2, backend=backend).save(1, model, optimizer, scheduler)
        out = export_model(tmp_path / "export", {"w": torch.ones(2)}, {"format": "x"})
    finally:
        os.umask(old)
    files = [p for p in [*step.rglob("*"), *out.rglob("*")] if p.is_file()]
    assert {p.name for p in files} >= {"meta.json", "state.json", "rank-00000.safetensors", "model.safetensors"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o640"}  # not mkstemp's / safetensors' 0600
    assert {oct(p.stat().st_mode & 0o777) for p in [step, *step.rglob("*"), out] if p.is_dir()} == {"0o750"}


def test_a_model_with_non_finite_tensors_is_not_exported(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor w holds NaN or inf; refusing to write a broken model"):
        export_model(tmp_path / "export", {"w": torch.tensor([1.0, float("nan")])}, {"format": "x"})
    assert not (tmp_path / "export").exists() and not list(tmp_path.iterdir())
