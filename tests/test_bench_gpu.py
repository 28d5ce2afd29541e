"""benchmarks/bench_gpu.py --tiny: every row of the GPU suite is computed on the CPU, finite (the script cannot rot)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    "bf16 matmul peak, measured (TFLOP/s)",
    "memory bandwidth, measured (GB/s)",
    "stage 1, tiny + DiT tiny, seq 96, batch 2, FSDP2, checkpointing off",
    "stage 1, tiny + DiT tiny, seq 96, batch 2, FSDP2, checkpointing on",
    "decoder tiny, 16 px, batch 2",
    "generate, batch 1: srae (bf16 weights, KV cache, batched CFG)",
    "generate, batch 8: srae (bf16 weights, KV cache, batched CFG)",
    "generate, batch 1: reference-like loop (fp32, no KV cache, 1 × batch 1)",
    "generate, batch 8: reference-like loop (fp32, no KV cache, 8 × batch 1)",
]


def test_bench_gpu_tiny_prints_every_row_with_finite_numbers():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--threads", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 1 and not set(cells[1]) <= set("-:"):
            rows[cells[0]] = cells[1:]
    assert [r for r in rows if r not in ("machine", "training", "generation")] == ROWS
    for name in ROWS:
        cells = rows[name]
        numbers = [float(c.split()[0]) for c in cells if c != "–"]
        assert numbers and all(math.isfinite(x) and x > 0 for x in numbers), (name, cells)
        if "srae" in name:  # both floors are computed for srae's path; the reference-like rows have none
            assert len(numbers) == 5, cells
        elif "reference-like" in name:
            assert cells[2:] == ["–", "–", "–"]
