"""``report.html`` from a demo folder: what each stage left on disk, as a ``page.Report`` (what exists is
shown, what is missing is left out)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scale_rae_core.demo.bars import check_bars
from scale_rae_core.demo.heatmap import heatmap_png
from scale_rae_core.demo.page import QA, AnsweredImage, Curve, ImageCell, ImageRow, Picture, Report, Table
from scale_rae_core.demo.records import read_jsonl, read_record
from scale_rae_core.shapes.bench import table_rows


def build_report(out: Path, stage_order: Sequence[str]) -> Report:
    """The demo folder's results as a ``page.Report``; the summary lists the finished stages in ``stage_order``."""
    out = Path(out)
    report = Report(title=f"srae demo — {out.resolve().name}")
    records = {p.stem: read_record(p) or {} for p in (out / "stages").glob("*.json")}
    done = {name: r["info"] for name, r in records.items() if r.get("status") == "done"}
    order = {name: i for i, name in enumerate(stage_order)}
    for name in sorted(done, key=lambda n: order.get(n, len(order))):
        if name != "report":
            report.summary.append((name, str(done[name].get("summary", ""))))
    _add_generated(report, out)
    _add_class_dit(report, out / "dit", done.get("dit"))
    _add_benchmark(report, out / "eval_shapes.json")
    _add_answers(report, out / "understand" / "answers.json")
    _add_curves(report, out)
    quality = check_bars(done)
    if quality:
        report.tables.append(Table("Quality bars", ["bar", "value", "minimum", "met"],
                                   [[q["label"], f"{q['value']:.4g}", f"{q['minimum']:.4g}", "yes" if q["ok"] else "no"]
                                    for q in quality]))
    return report


def _add_generated(report: Report, out: Path) -> None:
    rows: dict[str, list[ImageCell]] = {}
    for r in _json_list(out / "generate" / "results.json"):
        rows.setdefault(r["prompt"], []).append(ImageCell(out / "generate" / r["png"], f"seed {r['seed']}", r["full"]))
    if rows:
        report.grids.append(("Generated images (frame: green = the pixel scorer finds every attribute of the prompt)",
                             [ImageRow(p, cells) for p, cells in rows.items()]))


def _add_class_dit(report: Report, folder: Path, info: dict[str, Any] | None) -> None:
    """The class-conditional stage: its numbers, and its samples as one labelled row per class."""
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else None
    if not results or not info:
        return
    report.tables.append(Table("Class-conditional DiT^DH (RAE stage 2)", ["measure", "value"], [
        ["class accuracy of the samples (shapes reader)", f"{100 * info['class_accuracy']:.1f}% of {info['samples']}"],
        [f"FID vs {info['fid_reference_images']} held-out renders [{info['fid_network']}]", f"{info['fid']:.2f}"],
        ["encoder linear probe, top-1 on its held-out split", f"{100 * info['probe_top1']:.1f}% "
                                                              f"({info['probe_heldout_images']} images)"],
        ["recipe", f"{info['preset']}, {info['steps']} steps; {info['sampler']} {info['sampler_steps']} steps, "
                   f"guidance {info['guidance']:g}"],
    ]))
    rows = []
    for c in results["classes"]:
        mine = [r for r in results["samples"] if r["class"] == c]
        cells = [ImageCell(folder / "samples" / r["png"], f"#{r['index']}: {r['read'] or 'no shape'}", r["ok"])
                 for r in mine]
        rows.append(ImageRow(f"{c} ({sum(r['ok'] for r in mine)}/{len(mine)} read as {c})", cells))
    report.grids.append(("Class-conditional samples, one row per class (frame: green = the shapes reader sees the "
                         "class)", rows))


def _add_benchmark(report: Report, path: Path) -> None:
    bench = json.loads(path.read_text()) if path.is_file() else None
    if not bench:
        return
    g = bench["generation"]
    rows = [ImageRow(p["prompt"], [ImageCell(Path(s["png"]), f"s{s['index']}" + (" ★" if s["index"] == p["selected"] else ""),
                                             s["full"]) for s in p["samples"] if Path(s["png"]).is_file()])
            for p in g["prompts"]]
    report.grids.append((f"Benchmark samples ({g['k']} per prompt; ★ = the model's own pick by {g['selector']})", rows))
    report.tables.append(Table("Shapes benchmark (95% intervals in brackets)",
                               ["", "colour", "shape", "position", "colour+shape", "full / accuracy"],
                               [list(r) for r in table_rows(bench)]))
    _add_confusion(report, g)


def _add_confusion(report: Report, generation: dict[str, Any]) -> None:
    """Per attribute, what the reader saw in the benchmark's samples for what was asked, as heat maps (the counts
    of the eval record; a record written before it had them shows none)."""
    confusion = generation.get("confusion")
    if not confusion:
        return
    n = sum(sum(row.values()) for row in next(iter(confusion.values())).values())
    report.pictures.append((
        f"Shapes benchmark: what the reader saw for what was asked ({n} samples)",
        [Picture(heatmap_png(f"{attribute}: asked (rows) vs seen (columns)", counts),
                 f"{attribute}: each cell counts the samples; its shade is the share of its row; "
                 "'none' = no shape seen")
         for attribute, counts in confusion.items() if counts],
    ))


def _add_answers(report: Report, path: Path) -> None:
    for item in _json_list(path):
        image = Path(item["image"])
        if image.is_file():
            report.answers.append(AnsweredImage(image, image.name, [QA(q["question"], q["answer"], q["expected"],
                                                                       q["correct"]) for q in item["qa"]]))


def _add_curves(report: Report, out: Path) -> None:
    dec = _steps(read_jsonl(out / "decoder" / "events.jsonl"), "train_decoder.step")
    if dec:
        report.curves.append(Curve("decoder training", {k: [(r["step"], r[k]) for r in dec if k in r] for k in ("loss", "l1")}))
    dit = [r for r in read_jsonl(out / "dit" / "train" / "metrics.jsonl") if "loss" in r]
    if dit:
        report.curves.append(Curve("class-conditional DiT^DH training", {"flow loss": [(r["step"], r["loss"]) for r in dit]}))
    s1 = {r["step"]: r for r in read_jsonl(out / "stage1" / "metrics.jsonl") if "loss" in r}
    if s1:
        rows = [s1[k] for k in sorted(s1)]
        report.curves.append(Curve("stage 1 training", {k: [(r["step"], r[k]) for r in rows] for k in ("loss", "ce", "flow")}))
        held = {k: [(r["step"], r[k]) for r in rows if k in r] for k in ("eval_flow", "eval_flow_mismatched")}
        if all(held.values()):  # the gap between the two is what the prompt tells the head
            report.curves.append(Curve("stage 1 held-out flow loss: own prompt vs another sample's prompt", held))


def _json_list(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def _steps(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Step events of one kind, the last record per step (a resumed run repeats the steps after its checkpoint)."""
    by_step = {e["step"]: e for e in events if e.get("event") == name}
    return [by_step[k] for k in sorted(by_step)]
