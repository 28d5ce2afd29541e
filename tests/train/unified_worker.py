"""torchrun worker for the multi-process unified-training tests (see test_unified.py).

``python -m torch.distributed.run --nproc-per-node N unified_worker.py JOB.json`` with JOB =
``{"data", "run", "out", "procs", "stop_at"?, "resume"?}``; rank 0 writes ``{"losses": [...]}`` to ``out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from scale_rae_core.train import unified, unified_eval
from tests.train.unified_helpers import list_source, tiny_profile


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    unified.open_source = list_source  # the in-memory reader with a known rank split
    unified_eval.open_source = list_source
    result = unified.train_unified(
        tiny_profile(f"data.eval={Path(job['data']).parent / 'heldout' / 'conversations.jsonl'}", procs=job["procs"]), "stage1", job["data"], job["run"],
        resume=job.get("resume", False), stop_at=job.get("stop_at"),
    )
    import os

    if os.environ.get("RANK", "0") == "0":
        Path(job["out"]).write_text(json.dumps({"losses": result.losses, "records": result.records}))


if __name__ == "__main__":
    main()
