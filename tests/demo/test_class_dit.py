"""The demo's class-conditional stage (``demo.class_dit``): a DiT^DH on the demo's latents, its samples judged by
the shapes reader, FID against the held-out renders, the encoder's linear probe, the grid and the report, the
quality bar, and continuing an interrupted stage. The slow tests read the session's tiny demo run (two DiT steps:
far below the bar)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scale_rae_core.config import load_profile
from scale_rae_core.demo.class_dit import run_class_dit
from scale_rae_core.demo.context import Ctx, DemoOptions
from scale_rae_core.errors import ConfigError
from scale_rae_core.eval.features import get_feature_net
from scale_rae_core.events import Reporter
from scale_rae_core.shapes.scorer import read_class
from scale_rae_core.shapes.synth import SHAPE_CLASSES
from tests.demo.runs import PER_CLASS, demo, own_copy, statuses
from tests.demo.test_page import check_html


def _record(out) -> dict:
    return json.loads((out / "stages" / "dit.json").read_text())


@pytest.mark.slow
def test_the_record_has_accuracy_fid_with_its_network_and_the_probe(first_run):
    out, text = first_run
    record = _record(out)
    info = record["info"]
    n = 12 * PER_CLASS
    assert record["status"] == "done" and info["steps"] == 2 and info["samples"] == n and info["per_class"] == PER_CLASS
    assert info["sampler_steps"] == 2 and info["sampler"] == "heun"
    results = json.loads((out / "dit" / "results.json").read_text())
    rows = results["samples"]
    assert results["classes"] == list(SHAPE_CLASSES) and len(rows) == n
    assert all(sum(r["class"] == c for r in rows) == PER_CLASS for c in SHAPE_CLASSES)  # equal labels
    for r in rows[:12]:  # the verdicts are the reader's, on the PNGs
        assert r["read"] == read_class(Image.open(out / "dit" / "samples" / r["png"])) and r["ok"] == (r["read"] == r["class"])
    assert info["class_accuracy"] == round(sum(r["ok"] for r in rows) / n, 4) == round(results["accuracy"], 4)
    assert set(info["class_accuracy_per_class"]) == set(SHAPE_CLASSES)
    for part, index in (("colour", 0), ("shape", -1)):  # the class split into its two attributes
        right = sum(bool(r["read"]) and r["read"].split("_")[index] == r["class"].split("_")[index] for r in rows)
        assert info[f"{part}_accuracy"] == round(right / n, 4) >= info["class_accuracy"]

    fid = json.loads((out / "dit" / "fid.json").read_text())
    assert info["fid"] == round(fid["fid"], 3) and info["fid"] > 0 and np.isfinite(info["fid"])
    assert info["fid_network"] == fid["network"] == get_feature_net(None).label  # the test extra: EfficientNet-Lite0
    assert info["fid_reference_images"] == fid["num_reference"] == 3 and fid["num_samples"] == n  # the held-out renders
    probe = json.loads((out / "dit" / "probe.json").read_text())
    assert info["probe_top1"] == round(probe["top1"], 4) and 0.0 <= info["probe_top1"] <= 1.0
    assert info["probe_heldout_images"] == probe["num_heldout"] >= 1 and probe["num_classes"] == 12
    assert "class accuracy" in text and f"FID {fid['fid']:.2f} vs 3 held-out renders [{fid['network']}]" in text


@pytest.mark.slow
def test_the_grid_has_a_row_per_class_in_the_png_and_the_report(first_run):
    out, _ = first_run
    rows = json.loads((out / "dit" / "results.json").read_text())["samples"]
    grid = np.asarray(Image.open(out / "dit" / "grid.png").convert("RGB"))
    assert grid.shape == (12 * 64, PER_CLASS * 64, 3)  # 12 rows x PER_CLASS tiles of 64 px
    for i, c in enumerate(SHAPE_CLASSES):
        mine = [r for r in rows if r["class"] == c]
        for j, r in enumerate(mine):
            tile = np.asarray(Image.open(out / "dit" / "samples" / r["png"]).convert("RGB"))
            assert np.array_equal(grid[64 * i : 64 * (i + 1), 64 * j : 64 * (j + 1)], tile), (c, j)
    text = (out / "report.html").read_text()
    alts = [img["alt"] for img in check_html(text).images]
    for c in SHAPE_CLASSES:
        ok = sum(r["ok"] for r in rows if r["class"] == c)
        label = f"{c} ({ok}/{PER_CLASS} read as {c})"
        assert f'<div class="label">{label}</div>' in text  # each row is labelled with its class
        assert sum(alt.startswith(f"{label}: #") for alt in alts) == PER_CLASS
    assert "Class-conditional DiT^DH (RAE stage 2)" in text and "encoder linear probe" in text


@pytest.mark.slow
def test_a_class_accuracy_below_the_bar_is_reported_as_missed(first_run):
    out, text = first_run
    quality = {q["key"]: q for q in json.loads((out / "demo.json").read_text())["quality"]}
    q = quality["class_accuracy"]
    assert q["stage"] == "dit" and q["value"] == _record(out)["info"]["class_accuracy"] < 0.9  # two DiT steps
    assert q["ok"] is False and q["minimum"] == 0.9
    assert f"quality    class-conditional DiT: class accuracy of its samples (shapes reader): {q['value']:.4g} " \
           "(bar >= 0.9) BELOW BAR" in text
    report = (out / "report.html").read_text()
    assert "class-conditional DiT: class accuracy of its samples (shapes reader)" in report


@pytest.mark.slow
def test_an_interrupted_class_stage_continues_and_a_new_setting_reruns_only_it(first_run, tmp_path, monkeypatch):
    import scale_rae_core.demo.class_dit as class_dit

    out = own_copy(first_run, tmp_path)
    real = class_dit.sample_class_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(class_dit, "sample_class_model", interrupted)
    demo(out, "--set", "dit_training.steps=3", code=130)  # trains 3 steps, interrupted while sampling
    assert _record(out)["status"] == "running"
    monkeypatch.setattr(class_dit, "sample_class_model", real)
    demo(out, "--set", "dit_training.steps=3")
    status = statuses(out)
    assert status["dit"] == "continued" and _record(out)["info"]["steps"] == 3
    assert {n for n, s in status.items() if s != "reused"} == {"inspect", "dit", "report"}
    train_events = [json.loads(line)["event"] for line in (out / "dit" / "train" / "events.jsonl").read_text().splitlines()]
    assert "train_dit.resume" in train_events  # the trainer continued from its checkpoint, it did not start over


def test_the_stage_refuses_another_number_of_classes(tmp_path):
    profile = load_profile("tiny-cpu", ["dit_training.num_classes=10"])
    ctx = Ctx(tmp_path, profile, Reporter(), DemoOptions())
    with pytest.raises(ConfigError, match="dit_training.num_classes = 10, but the shapes world has 12 classes "
                                          r"\(colour x shape\); set it to 12"):
        run_class_dit(ctx, False)
