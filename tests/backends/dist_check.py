"""Run under ``torchrun --nproc-per-node 2``: checks the cpu backend's collectives and FSDP2 sharding on gloo.

Usage: ``torchrun --standalone --nproc-per-node 2 tests/backends/dist_check.py OUT.json [--checkpointing]``.
Rank 0 writes what it saw to OUT.json; the test compares it with a single-process run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scale_rae_core.backends import get_backend  # noqa: E402
from scale_rae_core.config import BackendSettings  # noqa: E402
from tests.train.ckpt_worker import GLOBAL_BATCH, Block, Tiny, batch  # noqa: E402


def main(out: str, checkpointing: bool) -> None:
    torch.set_num_threads(1)
    settings = BackendSettings(kind="cpu", procs_per_node=int(os.environ["WORLD_SIZE"]), gradient_checkpointing=checkpointing)
    with get_backend(settings) as be:
        seen: dict = {
            "rank": be.rank,
            "world_size": be.world_size,
            "local_rank": be.local_rank,
            "distributed": be.distributed,
            "device": str(be.device),
            "mean_of_ranks": be.all_reduce_mean(torch.tensor(float(be.rank))).item(),
            "mean_of_int_ranks": be.all_reduce_mean(torch.tensor(be.rank)).item(),
        }
        be.seed_everything(0, per_rank=False)
        model = Tiny()
        calls = {"n": 0}

        def count(module, args):
            calls["n"] += 1

        for block in model.blocks:
            block.register_forward_pre_hook(count)
        be.shard_model(model, (Block,), [model.encoder])
        seen["dtensor_params"] = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
        seen["plain_params"] = sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor))
        seen["encoder_requires_grad"] = model.encoder.weight.requires_grad
        seen["state_dict_keys"] = sorted(model.state_dict())

        x, y = batch(0, be.rank, be.world_size)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        seen["block_forward_calls"] = calls["n"]  # 2 blocks; 4 when activations are recomputed
        seen["loss"] = be.all_reduce_mean(loss).item()
        seen["grads"] = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if p.grad is not None}
        seen["global_batch"] = GLOBAL_BATCH
        be.barrier()
        if be.is_main:
            Path(out).write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], "--checkpointing" in sys.argv[2:])
