"""The cpu/cuda backend: one plain process, and two gloo processes under torchrun with FSDP2."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from scale_rae_core.backends import get_backend
from scale_rae_core.backends.base import Backend
from scale_rae_core.backends.cpu_cuda import CpuCudaBackend
from scale_rae_core.config import BackendSettings
from scale_rae_core.errors import BackendError
from tests.train.ckpt_worker import Block, Tiny, batch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _grads(model: torch.nn.Module, checkpointing: bool) -> tuple[float, dict[str, list], int]:
    calls = {"n": 0}
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    with get_backend(BackendSettings(kind="cpu", gradient_checkpointing=checkpointing)) as be:
        be.shard_model(model, (Block,), [model.encoder])
        x, y = batch(0, 0, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
    grads = {n: p.grad.tolist() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls["n"]


def test_single_process_is_plain():
    with get_backend(BackendSettings(kind="cpu")) as be:
        assert isinstance(be, CpuCudaBackend) and isinstance(be, Backend)
        assert (be.rank, be.world_size, be.local_rank, be.is_main, be.distributed) == (0, 1, 0, True, False)
        assert be.device == torch.device("cpu")
        t = torch.tensor([1.0, 3.0])
        mean = be.all_reduce_mean(t)
        assert torch.equal(mean, t) and mean is not t
        be.barrier()
        be.mark_step()
        model = Tiny()
        names = sorted(model.state_dict())
        assert be.shard_model(model, (Block,), [model.encoder]) is model
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert sorted(model.state_dict()) == names
        assert not model.encoder.weight.requires_grad and model.head.weight.requires_grad
        assert be.device_rng_state() == {}


def test_autocast_follows_precision():
    x = torch.randn(2, 4)
    layer = torch.nn.Linear(4, 4)
    with get_backend(BackendSettings(kind="cpu", precision="fp32")) as be, be.autocast():
        assert layer(x).dtype == torch.float32
        assert be.compute_dtype == torch.float32
    with get_backend(BackendSettings(kind="cpu", precision="bf16")) as be, be.autocast():
        assert layer(x).dtype == torch.bfloat16
        assert be.compute_dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # master weights stay fp32


def test_gradient_checkpointing_recomputes_blocks_and_keeps_names_and_grads():
    torch.manual_seed(0)
    plain = Tiny()
    ckpt = Tiny()
    ckpt.load_state_dict(plain.state_dict())
    loss_a, grads_a, calls_a = _grads(plain, checkpointing=False)
    loss_b, grads_b, calls_b = _grads(ckpt, checkpointing=True)
    assert (calls_a, calls_b) == (2, 4)  # each block's forward runs again during backward
    assert sorted(ckpt.state_dict()) == sorted(plain.state_dict())
    assert loss_a == loss_b
    assert grads_a == grads_b
    assert "encoder.weight" not in grads_b  # frozen


def test_compile_is_applied_per_block_in_place():
    model = Tiny()
    with get_backend(BackendSettings(kind="cpu", compile=True)) as be:
        be.shard_model(model, (Block,), [model.encoder])
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model.head._compiled_call_impl is None
    assert "blocks.0.fc.weight" in model.state_dict()


def test_seed_everything_offsets_by_rank_unless_asked_not_to(monkeypatch):
    with get_backend(BackendSettings(kind="cpu")) as be:
        assert be.seed_everything(7) == 7
        first = (random.random(), float(np.random.rand()), torch.rand(1).item())
        be.seed_everything(7)
        assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first
    fake = CpuCudaBackend.__new__(CpuCudaBackend)
    fake._rank = 3
    assert fake.seed_everything(7) == 10
    assert fake.seed_everything(7, per_rank=False) == 7


def test_world_size_mismatch_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BackendError) as err:
        get_backend(BackendSettings(kind="cpu"))
    msg = str(err.value)
    assert "\n" not in msg and "WORLD_SIZE is 2" in msg and "--nproc-per-node 1" in msg
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(BackendError, match="WORLD_SIZE='two'"):
        get_backend(BackendSettings(kind="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU is visible")
def test_cuda_without_a_gpu_is_a_backend_error():
    with pytest.raises(BackendError, match="no CUDA device"):
        get_backend(BackendSettings(kind="cuda"))


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_xla_without_torch_xla_is_a_backend_error():
    with pytest.raises(BackendError) as err:
        get_backend(BackendSettings(kind="xla"))
    assert "\n" not in str(err.value) and "xla" in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_single_process():
    with get_backend(BackendSettings(kind="cuda", precision="bf16")) as be:
        assert be.device == torch.device("cuda", 0)
        model = be.shard_model(Tiny(), (Block,))
        assert model.head.weight.device.type == "cuda" and model.head.weight.dtype == torch.float32
        with be.autocast():
            assert model(torch.randn(2, 16, device=be.device)).dtype == torch.bfloat16
        assert set(be.device_rng_state()) == {"cuda"}


@pytest.mark.dist
def test_two_processes_under_torchrun_shard_with_fsdp2(tmp_path):
    out = tmp_path / "seen.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "backends" / "dist_check.py"), str(out), "--checkpointing"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(out.read_text())

    assert (seen["rank"], seen["world_size"], seen["local_rank"], seen["distributed"]) == (0, 2, 0, True)
    assert seen["device"] == "cpu"
    assert seen["mean_of_ranks"] == 0.5 and seen["mean_of_int_ranks"] == 0.5
    assert seen["plain_params"] == ["encoder.bias", "encoder.weight"]  # frozen: replicated, not sharded
    assert "blocks.0.fc.weight" in seen["dtensor_params"] and "head.weight" in seen["dtensor_params"]
    assert seen["encoder_requires_grad"] is False
    assert seen["block_forward_calls"] == 4  # activation checkpointing composes with FSDP2

    # the same global batch in one process gives the same loss and (all-reduced) gradients
    torch.manual_seed(0)
    model = Tiny()
    assert seen["state_dict_keys"] == sorted(model.state_dict())
    loss, grads, _ = _grads(model, checkpointing=False)
    assert seen["loss"] == pytest.approx(loss, rel=1e-6)
    assert set(seen["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(torch.tensor(seen["grads"][name]), torch.tensor(grad), rtol=1e-5, atol=1e-6, msg=name)


def test_host_group_starts_from_master_addr_without_an_accelerator(tmp_path):
    """The XLA backend's host-side group (gloo, TCPStore at MASTER_ADDR served by the process on that address)."""
    import socket

    from scale_rae_core.backends.base import _is_local_address

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "backends" / "host_group_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(r), "2", str(tmp_path / f"{r}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert seen == [{"rank": 0, "world": 2, "sum": 1.0}, {"rank": 1, "world": 2, "sum": 1.0}]
    # which process serves the store: the one that owns the address (loopback: rank 0)
    assert _is_local_address("127.0.0.1") and not _is_local_address("192.0.2.1")  # TEST-NET-1 is nobody's


def test_host_group_needs_master_addr_and_a_port_number(monkeypatch):
    from scale_rae_core.backends.base import start_host_group

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(BackendError, match=r"^v5p: 2 host processes need MASTER_ADDR \(the internal IP of worker 0\)"):
        start_host_group(0, 2, what="v5p")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(BackendError, match=r"^v5p: MASTER_PORT='http' is not a port number"):
        start_host_group(0, 2, what="v5p")
