"""One host of a two-host SPMD job on CPU PJRT: ``python multihost_worker.py OUT.json`` (environment from the test).

Writes what the runtime reports (process count and index). When the runtime really forms a two-process job, it
also starts the XLA backend, gives ``shard_batch`` this host's rows (host h: rows h·4 … h·4 + 3) and writes the global
batch's shape and sum and that the barrier passed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch_xla.runtime as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(out: str) -> None:
    xr.use_spmd()
    seen: dict = {"process_count": xr.process_count(), "process_index": xr.process_index(),
                  "devices": xr.global_runtime_device_count()}
    if seen["process_count"] == 2:
        from scale_rae_core.backends.xla import XlaBackend
        from scale_rae_core.config import BackendSettings

        local = xr.addressable_runtime_device_count()
        be = XlaBackend(BackendSettings(kind="xla", nodes=2, devices_per_node=local))
        rows = torch.arange(4.0) + 4 * be.rank
        batch = be.shard_batch(rows[:, None].repeat(1, 3))  # this host's (4, 3) -> the global (8, 3)
        seen |= {"global_shape": list(batch.shape), "global_sum": float(batch.sum().cpu())}
        be.barrier()
        seen["barrier"] = True
        be.close()
    Path(out).write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
