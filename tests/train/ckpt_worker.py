"""Training worker for the checkpoint tests: a tiny 2-block model, AdamW, warmup-cosine, gradient clipping.

Run as ``python ckpt_worker.py JOBS.json`` with one process, or once per rank with the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); :func:`launch` does either. Each job in the JSON
list runs on a freshly built model and optimizer::

    {"run_dir": ..., "steps": 6, "stop_at": 3, "resume": false, "noise": true, "out": "losses.json"}

* the data of step ``s`` is a global batch of 8 drawn from ``Generator().manual_seed(1000 + s)``; rank ``r``
  of ``W`` takes rows ``r·8/W … (r+1)·8/W``, so the loss trajectory does not depend on the world size;
* ``noise`` adds per-rank noise from the *global* python, numpy and torch RNGs (seeded ``1 + rank``), so a
  resumed run matches only if the RNG states were restored;
* ``stop_at`` saves a checkpoint after that many steps and ends the job; ``resume`` first loads the latest
  checkpoint of ``run_dir``; ``export`` (a folder) exports the model at the end of the job.

Rank 0 writes ``{"losses": [...], "lrs": [...], "start": ..., "resumed": {...}}`` to ``out``.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

GLOBAL_BATCH = 8
WIDTH = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Tiny(nn.Module):
    """A frozen "encoder", two blocks and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, WIDTH, generator=g)
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def build(backend: Any, gradient_checkpointing: bool = False) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from scale_rae_core.train.schedule import warmup_cosine_scheduler

    backend.seed_everything(0, per_rank=False)  # same initial weights on every rank
    model = Tiny()
    model = backend.shard_model(model, (Block,), [model.encoder])
    groups = [
        {"params": [p for p in model.blocks.parameters()], "lr": 1e-2, "betas": (0.9, 0.999)},
        {"params": [p for p in model.head.parameters()], "lr": 3e-2, "betas": (0.9, 0.95)},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, decay_end=6, min_lr_ratio=0.1)
    return model, optimizer, scheduler


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, rank: int, world: int,
               noise: bool = False) -> torch.Tensor:
    """One optimiser step on this rank's part of the global batch of ``step``; returns the local loss."""
    x, y = batch(step, rank, world)
    if noise:
        x = x + 0.1 * torch.randn_like(x) + 0.1 * random.random() + 0.1 * float(np.random.rand())
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_job(backend: Any, job: dict[str, Any]) -> None:
    from scale_rae_core.train.checkpoint import CheckpointManager

    model, optimizer, scheduler = build(backend)
    manager = CheckpointManager(job["run_dir"], keep=2, backend=backend)
    start, resumed = 0, None
    if job.get("resume"):
        latest = manager.latest()
        assert latest is not None, f"nothing to resume in {job['run_dir']}"
        resumed = manager.load(latest, model, optimizer, scheduler)
        start = resumed["step"]
        resumed = {k: v for k, v in resumed.items() if k != "path"}
    else:
        backend.seed_everything(1)  # per-rank noise streams
    losses, lrs = [], []
    stop = job.get("stop_at") or job["steps"]
    for step in range(start, stop):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        loss = train_step(model, optimizer, scheduler, step, backend.rank, backend.world_size, noise=job.get("noise", False))
        losses.append(backend.all_reduce_mean(loss).item())
    if job.get("stop_at"):
        manager.save(
            stop, model, optimizer, scheduler,
            data_position={"rank": backend.rank, "next_step": stop},
            metrics={"loss": losses[-1]},
            profile={"note": "ckpt_worker"},
        )
    if job.get("export"):
        manager.export(job["export"], model, {"width": WIDTH, "blocks": 2}, {"README.md": "tiny\n"})
    if backend.is_main:
        Path(job["out"]).write_text(json.dumps({"losses": losses, "lrs": lrs, "start": start, "resumed": resumed}))


def main(jobs_file: str) -> None:
    torch.set_num_threads(1)
    from scale_rae_core.backends import get_backend
    from scale_rae_core.config import BackendSettings

    world = int(os.environ.get("WORLD_SIZE", "1"))
    with get_backend(BackendSettings(kind="cpu", procs_per_node=world)) as backend:
        for job in json.loads(Path(jobs_file).read_text()):
            run_job(backend, job)


# --------------------------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], nprocs: int, timeout: float = 120) -> None:
    """Run ``script args`` in ``nprocs`` processes with the environment torchrun would set; raise with the
    output of the first failing rank."""
    root = Path(__file__).resolve().parents[2]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(key, None)
    if nprocs > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    procs = []
    for rank in range(nprocs):
        env = dict(base)
        if nprocs > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} of {script.name} exited {p.returncode}:\n{out[-4000:]}")


if __name__ == "__main__":
    main(sys.argv[1])
