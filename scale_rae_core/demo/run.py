"""The demo runner: each stage in order, reused, continued or started over (see the package docstring)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale_rae_core.config import Profile
from scale_rae_core.demo.bars import QUALITY_BARS, Bar, check_bars
from scale_rae_core.demo.context import Ctx, DemoOptions, Stage
from scale_rae_core.demo.records import read_record, remove, write_record
from scale_rae_core.demo.stages import STAGE_NAMES, STAGES
from scale_rae_core.errors import ConfigError, SraeError
from scale_rae_core.events import Reporter

# The recipe of the bundled model: profile overrides applied before the user's --set, plus the stage-2 stage
# (DemoOptions.finetune): stage 1 for 3,000 steps (the demo: 1,500), then stage 2 at the same flow weight (the
# profile's words_weight in both). The demo's 1,500 steps reach colour+shape 92–94% per sample at three training
# seeds (BENCHMARKS.md); the bundled bar is 95%.
BUNDLED_RECIPE: tuple[str, ...] = ("stage1.steps=3000", "stage2.steps=1000", "stage2.flow_weight=12")


@dataclass
class DemoResult:
    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "continued" | "reused"
    quality: list[dict[str, Any]] = field(default_factory=list)


def run_demo(
    out: Path, profile: Profile, reporter: Reporter, *, options: DemoOptions | None = None, fresh: bool = False,
    redo: tuple[str, ...] | list[str] = (), strict: bool = False, command: str = "srae demo",
    on_stage: Callable[[str, str, dict[str, Any]], None] | None = None, bars: tuple[Bar, ...] = QUALITY_BARS,
) -> DemoResult:
    """Run (or continue) the demo in ``out``; ``on_stage(name, status, info)`` is called after each stage.

    ``command``: the command line that makes this run's model, recorded in ``OUT/model/ABOUT.json``. ``bars``: the
    quality bars the run is judged by (``bars.INSTALL_BARS`` for a model meant to become the bundled one)."""
    options = options or DemoOptions()
    unknown = [name for name in redo if name not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"--redo {unknown[0]}: unknown stage; choose from {', '.join(STAGE_NAMES)}")
    profile.check_runtime()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, profile, reporter, options, command)
    result = DemoResult(out)
    enabled = {stage.name for stage in STAGES if stage.enabled(ctx)}
    for stage in STAGES:
        if stage.name not in enabled:
            continue
        info, status = _run_stage(ctx, stage, enabled, forced=stage.name in redo)
        result.stages[stage.name] = info
        result.status[stage.name] = status
        if on_stage is not None:
            on_stage(stage.name, status, info)
    result.quality = check_bars(result.stages, bars)
    summary = {**result.stages, "status": result.status, "quality": result.quality}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    missed = [q for q in result.quality if not q["ok"]]
    if strict and missed:
        q = missed[0]
        raise SraeError(f"quality bar missed: {q['label']} = {q['value']:.4g} {'<=' if q['strict'] else '<'} "
                        f"{q['minimum']:.4g}; {q['fix']} (details in {out / 'demo.json'})")
    return result


def _run_stage(ctx: Ctx, stage: Stage, enabled: set[str], *, forced: bool) -> tuple[dict[str, Any], str]:
    """Reuse, continue or (re)run one stage -> (its info, "reused" | "continued" | "ran")."""
    stages_dir = ctx.out / "stages"
    record_path = stages_dir / f"{stage.name}.json"
    record = read_record(record_path)
    # what the output depends on: the stage's own settings, and which output of each stage it needs it read
    after = {n: (read_record(stages_dir / f"{n}.json") or {}).get("stamp") for n in stage.needs if n in enabled}
    inputs = json.loads(json.dumps({**stage.inputs(ctx), "after": after}, default=str))
    same = record is not None and record.get("inputs") == inputs
    if (not stage.always and not forced and same and record.get("status") == "done"
            and all(p.exists() for p in stage.outputs(ctx))):
        ctx.reporter.event(f"demo.{stage.name}.reused", **_fields(record["info"]))
        return record["info"], "reused"
    resume = not forced and same and record.get("status") == "running"
    workdir = stage.workdir(ctx)
    if not resume and workdir is not None:
        remove(workdir)  # start over: nothing half-made or stale may mix in
    write_record(record_path, {"status": "running", "inputs": inputs})
    ctx.reporter.event(f"demo.{stage.name}.start", resume=resume)
    t0 = time.perf_counter()
    info = stage.run(ctx, resume)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    write_record(record_path, {"status": "done", "inputs": inputs, "info": info, "stamp": time.time_ns()})
    ctx.reporter.event(f"demo.{stage.name}.done", **_fields(info))
    return info, "continued" if resume else "ran"


def _fields(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("examples",)}
