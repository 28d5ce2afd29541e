"""The embedded default, end to end: the shapes world through every stage srae has, on the tiny profile.

Each stage writes into one run folder and records an event; a re-run reuses finished stages (their outputs
are checked, not trusted blindly), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale_rae_core.config import Profile
from scale_rae_core.events import Reporter


@dataclass
class DemoResult:
    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_demo(out: Path, profile: Profile, reporter: Reporter, *, n_images: int = 1200, fresh: bool = False) -> DemoResult:
    """synth → pack → inspect → verify (later stages join as they land)."""
    from scale_rae_core.data.pack import pack
    from scale_rae_core.data.shards import inspect, verify
    from scale_rae_core.data.synth import synthesize

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    world, packed = out / "shapes", out / "packed"
    image_size = profile.model.decoder.image_size

    def stage(name: str, fn) -> dict[str, Any]:
        t0 = time.perf_counter()
        reporter.event(f"demo.{name}.start")
        info = fn()
        info["seconds"] = round(time.perf_counter() - t0, 2)
        reporter.event(f"demo.{name}.done", **info)
        result.stages[name] = info
        return info

    def do_synth() -> dict[str, Any]:
        if (world / "synth.json").is_file():
            return {"reused": True, "root": str(world)}
        if world.exists():
            shutil.rmtree(world)  # an interrupted synth: start it again
        s = synthesize(world, n_images, image_size=image_size, seed=profile.run.seed)
        return {"train_images": s["train"]["n"], "heldout_images": s["heldout"]["n"], "root": str(world)}

    def do_pack() -> dict[str, Any]:
        resume = packed.exists()
        with reporter.task("packing", None) as advance:
            last = 0

            def progress(done: int, total: int) -> None:
                nonlocal last
                advance(done - last, total=total)
                last = done

            s = pack(world / "conversations.jsonl", packed, resume=resume, samples_per_shard=1000, progress=progress)
        return {"packed": s.packed, "skipped": s.skipped, "shards": s.shards, "resumed_shards": s.resumed_shards}

    def do_inspect() -> dict[str, Any]:
        info = inspect(packed, samples=3)
        return {"total": info["total"], "shards": len(info["shards"]), "examples": [s["conversations"] for s in info["samples"]]}

    def do_verify() -> dict[str, Any]:
        report = verify(packed)
        if not report.ok:
            from scale_rae_core.errors import DataError

            raise DataError(f"{packed}: verification found {len(report.problems)} problems, first: {report.problems[0].file}: {report.problems[0].reason}")
        return {"samples": report.samples, "problems": 0}

    stage("synth", do_synth)
    stage("pack", do_pack)
    stage("inspect", do_inspect)
    stage("verify", do_verify)
    (out / "demo.json").write_text(json.dumps({k: v for k, v in result.stages.items()}, indent=2, default=str))
    return result
