"""torchrun worker for the 2-process DiT tests (see test_dit.py).

``python -m torch.distributed.run --nproc-per-node 2 dit_worker.py JOBS.json``: each job is
``{"kind": "train", "data", "run", "steps", "out", "stop_at"?, "resume"?}`` (rank 0 writes ``{"records": [...]}`` to
``out``) or ``{"kind": "cache", "data", "cache"}``. The worker opens the process group once for all jobs (a gloo
group initialised again in the same process can hang its rendezvous); the backends then use it without owning it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scale_rae_core.backends import backend_for
from scale_rae_core.train.dit import train_dit
from scale_rae_core.train.latent_cache import cache_latents
from tests.train.test_dit import tiny_profile


def main() -> None:
    torch.set_num_threads(1)
    procs = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    for job in json.loads(Path(sys.argv[1]).read_text()):
        profile = tiny_profile(f"dit_training.steps={job.get('steps', 4)}")
        profile.backend.procs_per_node = procs  # after loading: only the DiT's batch plan must split over them
        profile.backend.dist_backend = "gloo"
        if job["kind"] == "cache":
            with backend_for(profile.backend) as backend:
                cache_latents(profile, job["data"], job["cache"], backend, chunk_size=8, batch_size=8)
            continue
        result = train_dit(profile, job["data"], job["run"], resume=job.get("resume", False), stop_at=job.get("stop_at"))
        if result.is_main:
            Path(job["out"]).write_text(json.dumps({"records": result.records}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
