"""The XLA backend on CPU PJRT with 4 virtual devices (the XLA test lane; skipped where torch_xla is absent).

Run: PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 .venv-xla/bin/python -m pytest -m xla tests/xla
"""

from __future__ import annotations

import copy

import pytest
import torch

from scale_rae_core.config import BackendSettings, MeshSettings
from scale_rae_core.flow.transport import FlowMatching
from scale_rae_core.models.dit import DiTBlock, DiTConfig, LightningDiT

pytestmark = pytest.mark.xla


@pytest.fixture(scope="module")
def backend():
    from scale_rae_core.backends.xla import XlaBackend

    return XlaBackend(BackendSettings(kind="xla", nodes=1, devices_per_node=4, mesh=MeshSettings(fsdp=-1, tp=1)))


def _tiny_dit() -> LightningDiT:
    torch.manual_seed(0)
    model = LightningDiT(DiTConfig(in_channels=8, grid=4, hidden=32, depth=2, heads=4, cond_dim=32, class_dropout_prob=0.0))
    # the head is zero-initialised (outputs 0): perturb so gradients and losses are informative
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 8, 4, 4, generator=g)
    cond = torch.randn(n, 16, 32, generator=g)
    t = torch.rand(n, generator=g)
    noise = torch.randn(n, 8, 4, 4, generator=g)
    return x0, cond, t, noise


def _xla_step(backend, model, opt, batch) -> float:
    """One flow-matching training step of ``model`` on the host ``batch`` (x0, cond, t, noise), on the chips."""
    x0, cond, t, noise = (backend.shard_batch(v) for v in batch)
    loss = FlowMatching(shift=2.0).loss(model, x0, cond, t=t, noise=noise).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    backend.mark_step()
    return loss.item()


def test_mesh_comes_from_the_profile(backend):
    assert backend.num_devices == 4 and backend.mesh.mesh_shape == (4, 1)
    assert backend.mesh.axis_names == ("fsdp", "tp")


def test_wrong_device_count_is_one_line_error():
    from scale_rae_core.backends.xla import XlaBackend
    from scale_rae_core.errors import BackendError

    with pytest.raises(BackendError, match="expects 8 XLA devices .* runtime sees 4"):
        XlaBackend(BackendSettings(kind="xla", nodes=2, devices_per_node=4))


def test_loss_parity_with_cpu_and_no_recompilation(backend):
    fm = FlowMatching(shift=2.0)
    x0, cond, t, noise = _batch()
    cpu_model = _tiny_dit()
    xla_model = backend.shard_model(copy.deepcopy(cpu_model), (DiTBlock,))

    cpu_losses, xla_losses, compiles = [], [], []
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=1e-3)
    xla_opt = torch.optim.AdamW(xla_model.parameters(), lr=1e-3)
    for _ in range(5):
        loss = fm.loss(cpu_model, x0, cond, t=t, noise=noise).mean()
        loss.backward()
        cpu_opt.step()
        cpu_opt.zero_grad()
        cpu_losses.append(loss.item())

        xla_losses.append(_xla_step(backend, xla_model, xla_opt, (x0, cond, t, noise)))
        compiles.append(backend.compile_count())

    assert xla_losses == pytest.approx(cpu_losses, rel=1e-4, abs=1e-5)
    assert compiles[-1] == compiles[2], f"recompiled after warm-up: {compiles}"


def test_the_train_state_saves_in_one_graph_and_loads_with_its_sharding(backend, monkeypatch):
    """Saving gathers the sharded state to the host in one graph per bucket (the chips' exact values; a second
    save compiles nothing). Loading it into a freshly sharded model keeps every parameter's and AdamW moment's FSDP
    sharding (before the fix a load left them replicated: the whole state on every chip), the next step's loss is
    the saving run's, and that step reuses its compiled graph."""
    import torch_xla

    spec = torch_xla._XLAC._get_xla_sharding_spec
    batch = _batch()

    def step(model, opt) -> float:
        return _xla_step(backend, model, opt, batch)

    def layout(model, opt) -> dict[str, tuple[str, ...]]:
        return {n: (spec(p), *(spec(opt.state[p][m]) for m in ("exp_avg", "exp_avg_sq")))
                for n, p in model.named_parameters() if p.requires_grad}

    def sharded_dit():  # without the null condition, which no step trains here (no condition dropout)
        model = backend.shard_model(_tiny_dit(), (DiTBlock,))
        for name, p in model.named_parameters():
            p.requires_grad_("dropout_embedding" not in name)
        return model

    model = sharded_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        step(model, opt)
    saved, sharded = backend.train_state(model, opt), layout(model, opt)
    assert sum("devices=[4" in s[0] for s in sharded.values()) >= len(sharded) // 2  # FSDP: the matrices are split
    # the host copies are the chips' values (a sharded tensor's own .cpu() is the reference); a second save
    # compiles nothing (its gathers reuse one graph); a bucket limit below a tensor's size gathers one at a time
    assert all(torch.equal(saved["model"][k.replace("_orig_module.", "")], v.detach().cpu())
               for k, v in model.state_dict().items())
    compiled = backend.compile_count()
    second = backend.train_state(model, opt)
    assert backend.compile_count() == compiled, "a second save compiled new graphs"
    monkeypatch.setattr("scale_rae_core.backends.xla.GATHER_BUCKET_BYTES", 1)
    for host in (second, backend.train_state(model, opt)):
        assert all(torch.equal(host["model"][k], v) for k, v in saved["model"].items())
        assert all(torch.equal(host["optim"]["state"][k][m], saved["optim"]["state"][k][m])
                   for k in saved["optim"]["state"] for m in ("exp_avg", "exp_avg_sq", "step"))
    expected = step(model, opt)

    again = sharded_dit()
    again_opt = torch.optim.AdamW(again.parameters(), lr=1e-3)
    backend.load_train_state(again, again_opt, saved)
    assert layout(again, again_opt) == sharded
    compiled = backend.compile_count()
    assert step(again, again_opt) == pytest.approx(expected, rel=1e-6)
    assert backend.compile_count() == compiled, "the step after a resume compiled a new graph"


def test_gradient_checkpointing_gives_the_same_loss():
    from scale_rae_core.backends.xla import XlaBackend

    plain = XlaBackend(BackendSettings(kind="xla", devices_per_node=4))
    ckpt = XlaBackend(BackendSettings(kind="xla", devices_per_node=4, gradient_checkpointing=True))
    fm = FlowMatching(shift=2.0)
    x0, cond, t, noise = _batch()
    losses = []
    for be in (plain, ckpt):
        model = be.shard_model(_tiny_dit(), (DiTBlock,))
        xb = [be.shard_batch(v) for v in (x0, cond, t, noise)]
        loss = fm.loss(model, xb[0], xb[1], t=xb[2], noise=xb[3]).mean()
        loss.backward()
        be.mark_step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_device_rng_state_round_trips_the_full_64_bit_seed(backend):
    import torch_xla.core.xla_model as xm

    xm.set_rng_state(2**64 - 5)
    state = backend.device_rng_state()
    xm.set_rng_state(1)
    backend.set_device_rng_state(state)
    assert int(xm.get_rng_state()) == 2**64 - 5


def test_shard_batch_makes_the_host_batch_its_part_of_one_global_array(backend):
    """Single host: the global batch is the host's, its rows split over the 4 chips in order (minibatch input)."""
    import torch_xla

    rows = torch.arange(24.0).view(8, 3)
    batch = backend.shard_batch(rows)
    assert tuple(batch.shape) == (8, 3) and torch.equal(batch.cpu(), rows)
    assert torch_xla._XLAC._get_xla_sharding_spec(batch) == "{devices=[4,1]0,1,2,3}"
    import torch_xla.distributed.spmd as xs

    shards = [s.data for s in sorted(xs.wrap_if_sharded(batch).local_shards, key=lambda s: s.indices[0].start)]
    assert [s.tolist() for s in shards] == [rows[2 * i:2 * i + 2].tolist() for i in range(4)]
    assert backend.shard_batch(torch.tensor(3.0)).cpu().item() == 3.0  # a scalar is just moved
    from scale_rae_core.errors import BackendError

    with pytest.raises(BackendError, match="a host batch of 6 rows does not split over this host's 4 chips"):
        backend.shard_batch(torch.zeros(6, 2))


def test_a_tensor_parallel_mesh_takes_the_host_batch_over_every_chip():
    from scale_rae_core.backends.xla import XlaBackend

    be = XlaBackend(BackendSettings(kind="xla", devices_per_node=4, mesh=MeshSettings(fsdp=2, tp=2)))
    rows = torch.arange(16.0).view(8, 2)
    batch = be.shard_batch(rows)
    assert torch.equal(batch.cpu(), rows) and float((batch * 2).sum().cpu()) == float(rows.sum() * 2)


def test_one_host_needs_no_process_group(backend):
    import torch.distributed as dist

    assert not backend.distributed and not dist.is_initialized()
    backend.barrier()  # nothing to wait for
    assert backend.all_reduce_mean(torch.tensor([2.0, 4.0])).tolist() == [2.0, 4.0]


CPU_SINGLE_PROCESS = (
    "torch_xla 2.9's CPU PJRT runtime is single-process: two processes started with PJRT_DEVICE=CPU and the "
    "multi-process environment (PJRT_LOCAL_PROCESS_RANK/COUNT, RANK, WORLD_SIZE, MASTER_ADDR, XLA_COORDINATOR_PORT) "
    "each report xr.process_count() == 1, so a two-host SPMD job cannot be formed on CPU; the multi-host path "
    "(minibatch input, host group, barrier) runs only on a TPU slice"
)


def test_two_host_processes_on_cpu_pjrt(tmp_path):
    """Two SPMD host processes on CPU PJRT, if the runtime forms the job; skipped with the reason otherwise."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    worker = Path(__file__).with_name("multihost_worker.py")
    procs = []
    for rank in range(2):
        env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "PJRT_LOCAL_PROCESS_RANK": str(rank),
               "PJRT_LOCAL_PROCESS_COUNT": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0]),
               "XLA_COORDINATOR_PORT": str(ports[1])}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"{rank}.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    if all(s["process_count"] == 1 for s in seen):
        pytest.skip(CPU_SINGLE_PROCESS)
    assert sorted(s["process_index"] for s in seen) == [0, 1]
    for s in seen:  # each host gave 4 rows of 3; the global batch holds both hosts' rows once
        assert s["global_shape"] == [8, 3] and s["global_sum"] == 3 * sum(range(8)) and s["barrier"]
