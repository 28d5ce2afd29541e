"""Benchmark-style understanding: N questions as N `srae understand IMAGE QUESTION` process starts (each loads the
model again: what a VQA suite needed before `--questions-file`) against one `srae understand --questions-file`
process that loads the model once and answers in batches. Both run the bundled shapes model on the same N rendered
shapes-world images and questions; the script checks that both give the same answers.

    python benchmarks/bench_understand.py [--n 16] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ("What colour is the shape?", "What shape is in the image?", "Where is the shape?",
             "Is the shape large or small?")


def write_questions(folder: Path, n: int) -> Path:
    """``n`` shapes-world images and one question each -> ``folder/Q.jsonl`` (image paths relative to it)."""
    import random

    from scale_rae_core.shapes.synth import random_spec, render

    rng = random.Random(0)
    (folder / "img").mkdir(parents=True)
    lines = []
    for k in range(n):
        render(random_spec(rng)).save(folder / "img" / f"{k}.png")
        lines.append({"id": str(k), "image": f"img/{k}.png", "question": QUESTIONS[k % len(QUESTIONS)]})
    path = folder / "Q.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def srae(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run([shutil.which("srae") or "srae", *args], env=env, capture_output=True, text=True, check=True)
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="questions")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        questions = write_questions(folder / "q", args.n)
        items = [json.loads(line) for line in questions.read_text().splitlines()]

        start = time.perf_counter()
        one_by_one = [srae(["understand", str(questions.parent / it["image"]), it["question"], "--out", str(folder / "one"),
                            "--max-new-tokens", str(args.max_new_tokens), "-q"], env).splitlines()[0] for it in items]
        loop_s = time.perf_counter() - start

        answers = folder / "answers.jsonl"
        start = time.perf_counter()
        srae(["understand", "--questions-file", str(questions), "--out", str(answers), "--batch-size",
              str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens), "-q"], env)
        batch_s = time.perf_counter() - start
        batched = [json.loads(line)["answer"] for line in answers.read_text().splitlines()]

    agree = sum(a == b for a, b in zip(one_by_one, batched, strict=True))
    load = os.getloadavg()[0]
    print(f"# bundled shapes model, CPU, OMP_NUM_THREADS={args.threads}, {os.cpu_count()} cores, load {load:.2f}, "
          f"python {sys.version.split()[0]}")
    print("| questions | N process starts (s) | questions/s | one --questions-file call (s) | questions/s | speed-up | same answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.n} | {loop_s:.1f} | {args.n / loop_s:.2f} | {batch_s:.1f} | {args.n / batch_s:.2f} | "
          f"{loop_s / batch_s:.1f}x | {agree}/{args.n} |")


if __name__ == "__main__":
    main()
