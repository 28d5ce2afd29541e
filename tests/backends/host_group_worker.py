"""One host process of a two-process host group: ``python host_group_worker.py RANK WORLD OUT.json``.

Starts :func:`scale_rae_core.backends.base.start_host_group` from MASTER_ADDR / MASTER_PORT in the environment,
sums the ranks with gloo, passes a barrier and writes what it saw to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scale_rae_core.backends.base import start_host_group  # noqa: E402


def main(rank: int, world: int, out: str) -> None:
    start_host_group(rank, world, what="test")
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    dist.barrier()
    Path(out).write_text(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": total.item()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
