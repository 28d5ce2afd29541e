"""``report.html`` from a demo folder: what each stage left on disk, as a ``report.Report`` (what exists is
shown, what is missing is left out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scale_rae_core.demo import STAGE_NAMES, _jsonl, _read_record, check_bars


def build_report(out: Path) -> Any:
    """The demo folder's results as a ``report.Report``: what exists is shown, what is missing is left out."""
    from scale_rae_core.eval.shapes_bench import table_rows
    from scale_rae_core.report import QA, AnsweredImage, Curve, ImageCell, ImageRow, Report, Table

    out = Path(out)
    report = Report(title=f"srae demo — {out.resolve().name}")
    for path in sorted((out / "stages").glob("*.json"), key=lambda p: _order(p.stem)):
        record = _read_record(path) or {}
        if record.get("status") == "done" and path.stem != "report":
            report.summary.append((path.stem, str(record["info"].get("summary", ""))))

    generated = _jsonl_or_json(out / "generate" / "results.json")
    if generated:
        rows: dict[str, list[ImageCell]] = {}
        for r in generated:
            rows.setdefault(r["prompt"], []).append(
                ImageCell(out / "generate" / r["png"], f"seed {r['seed']}", r["full"]))
        report.grids.append(("Generated images (frame: green = the pixel scorer finds every attribute of the prompt)",
                             [ImageRow(p, cells) for p, cells in rows.items()]))
    bench_path = out / "eval_shapes.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    if bench:
        g = bench["generation"]
        rows_b = [ImageRow(p["prompt"], [ImageCell(Path(s["png"]), f"s{s['index']}" + (" ★" if s["index"] == p["selected"] else ""),
                                                   s["full"]) for s in p["samples"] if Path(s["png"]).is_file()])
                  for p in g["prompts"]]
        report.grids.append((f"Benchmark samples ({g['k']} per prompt; ★ = the model's own pick by {g['selector']})", rows_b))
        report.tables.append(Table("Shapes benchmark", ["", "colour", "shape", "position", "colour+shape", "full / accuracy"],
                                   [list(r) for r in table_rows(bench)]))
    for item in _jsonl_or_json(out / "understand" / "answers.json"):
        if not Path(item["image"]).is_file():
            continue
        report.answers.append(AnsweredImage(Path(item["image"]), Path(item["image"]).name,
                                            [QA(q["question"], q["answer"], q["expected"], q["correct"]) for q in item["qa"]]))
    dec = _steps(_jsonl(out / "decoder" / "events.jsonl"), "train_decoder.step")
    if dec:
        report.curves.append(Curve("decoder training", {k: [(r["step"], r[k]) for r in dec if k in r] for k in ("loss", "l1")}))
    s1 = {r["step"]: r for r in _jsonl(out / "stage1" / "metrics.jsonl") if "loss" in r}
    if s1:
        rows_s1 = [s1[k] for k in sorted(s1)]
        report.curves.append(Curve("stage 1 training", {k: [(r["step"], r[k]) for r in rows_s1] for k in ("loss", "ce", "flow")}))
        held = {k: [(r["step"], r[k]) for r in rows_s1 if k in r] for k in ("eval_flow", "eval_flow_mismatched")}
        if all(held.values()):  # the gap between the two is what the prompt tells the head
            report.curves.append(Curve("stage 1 held-out flow loss: own prompt vs another sample's prompt", held))
    done = {p.stem: (_read_record(p) or {}) for p in (out / "stages").glob("*.json")}
    quality = check_bars({name: r["info"] for name, r in done.items() if r.get("status") == "done"})
    if quality:
        report.tables.append(Table("Quality bars", ["bar", "value", "minimum", "met"],
                                   [[q["label"], f"{q['value']:.4g}", f"{q['minimum']:.4g}", "yes" if q["ok"] else "no"]
                                    for q in quality]))
    return report


def _order(name: str) -> int:
    return STAGE_NAMES.index(name) if name in STAGE_NAMES else len(STAGE_NAMES)


def _jsonl_or_json(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def _steps(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Step events of one kind, the last record per step (a resumed run repeats the steps after its checkpoint)."""
    by_step = {e["step"]: e for e in events if e.get("event") == name}
    return [by_step[k] for k in sorted(by_step)]
