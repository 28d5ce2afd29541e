"""Stage-1 quality on the shapes world with the tiny-cpu profile: does the tiny unified model learn?

Synthesises the shapes world (default 1000 images, 10 % held out), packs the training conversations, runs
``srae train stage1`` (the engine function) for at most ``--minutes`` and prints, every ``--every`` steps,
the held-out answer CE of understanding samples (CE over the answer word only) and the held-out flow loss
of generation samples (fixed t and noise), plus the training losses. Targets: answer CE < 0.1 and the flow
loss well below its step-0 value.

    python benchmarks/bench_stage1.py --work /tmp/bench-stage1 [--threads 2] [--set stage1.steps=300 ...]

OpenMP threads sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE`` unless set): on a
machine shared with other jobs, spinning threads of two processes starve each other and a step of the tiny
model took 12.8 s instead of 0.6 s (2 cores, two 2-thread trainers); alone, passive waiting costs ~0.1 s/step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/srae-bench-stage1"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=25, help="steps between evaluations")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the training run")
    ap.add_argument("--set", action="append", default=[], help="profile override (repeatable)")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads its OpenMP runtime
    import torch

    torch.set_num_threads(args.threads)
    from scale_rae_core.config import load_profile
    from scale_rae_core.data.pack import pack
    from scale_rae_core.shapes.synth import synthesize
    from scale_rae_core.train.unified import train_unified

    shutil.rmtree(args.work, ignore_errors=True)
    world, packed = args.work / "shapes", args.work / "packed"
    t0 = time.perf_counter()
    synthesize(world, args.images, image_size=64, seed=0, split_heldout=0.1)
    pack(world / "conversations.jsonl", packed)
    prep = time.perf_counter() - t0

    overrides = [f"output.log_every={args.every}", "output.progress=false", "checkpoint.every_steps=100000",
                 f"data.eval={world / 'heldout' / 'conversations.jsonl'}", *args.set]
    profile = load_profile("tiny-cpu", overrides)
    steps = profile.stage1.steps
    # Stop early (as if preempted) when the step time says the budget would be exceeded.
    load_start = os.getloadavg()[0]
    t1 = time.perf_counter()
    probe = train_unified(profile, "stage1", packed, args.work / "run", stop_at=min(10, steps))
    # Every shapes-world sample holds one image, so a step's time is batch / images_per_s (the probe's setup,
    # model build and step-0 evaluation excluded; step 1 is a warm-up).
    per_step = sum(profile.stage1.global_batch_size / r["images_per_s"] for r in probe.records[1:]) / max(len(probe.records) - 1, 1)
    left = args.minutes * 60 - (time.perf_counter() - t1) - 15  # 15 s for the resume's setup and the export
    budget_steps = probe.step + int(left / per_step * 0.95)  # 5 % for the evaluations every --every steps
    stop = min(steps, budget_steps)
    result = train_unified(profile, "stage1", packed, args.work / "run", resume=True, stop_at=stop)
    train_s = time.perf_counter() - t1

    records = [json.loads(line) for line in (args.work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_answer_ce" in r]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPU cores; load average {load_start:.2f} at the start, "
          f"{load} (1/5/15 min) at the end; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"shapes world: {args.images} images ({prep:.0f} s to synthesise + pack); profile tiny-cpu "
          f"+ {args.set or 'no overrides'}; {torch.get_num_threads()} threads")
    print(f"trained {result.step}/{steps} steps in {train_s / 60:.1f} min ({train_s / max(result.step, 1):.2f} s/step), "
          f"skipped {result.summary['skipped']}")
    print(f"{'step':>6} {'train loss':>10} {'train ce':>9} {'train flow':>10} {'eval answer ce':>15} {'eval flow':>10} {'eval gen ce':>11}")
    for r in evals:
        print(f"{r['step']:>6} {r.get('loss', float('nan')):>10.4f} {r.get('ce', float('nan')):>9.4f} "
              f"{r.get('flow', float('nan')):>10.4f} {r['eval_answer_ce']:>15.4f} {r['eval_flow']:>10.4f} {r['eval_gen_ce']:>11.4f}")
    first, last = evals[0], evals[-1]
    ok_ce = last["eval_answer_ce"] < 0.1
    ok_flow = last["eval_flow"] < 0.7 * first["eval_flow"]
    print(f"answer CE {last['eval_answer_ce']:.4f} < 0.1: {'PASS' if ok_ce else 'FAIL'}; flow {first['eval_flow']:.4f} -> "
          f"{last['eval_flow']:.4f} (< 70 % of step 0): {'PASS' if ok_flow else 'FAIL'}")


if __name__ == "__main__":
    main()
