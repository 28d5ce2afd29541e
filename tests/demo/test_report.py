"""report.html from a demo folder holding only a synthetic benchmark record (no demo run, no model): the table
with its intervals, and the confusion heat maps drawn from the record's counts."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

from scale_rae_core.demo.heatmap import heatmap_layout, heatmap_png, shade
from scale_rae_core.demo.page import render_html
from scale_rae_core.demo.report import build_report
from scale_rae_core.demo.stages import STAGE_NAMES
from tests.demo.test_page import check_html
from tests.shapes.records import prompt_row, record

ROWS = [("a red circle on the left", [("red", "circle", "left"), ("blue", "circle", "left")]),
        ("a blue square on the center", [("blue", "triangle", "center"), (None, None, None)])]


def _report(tmp_path, bench):
    (tmp_path / "eval_shapes.json").write_text(json.dumps(bench))
    return render_html(build_report(tmp_path, STAGE_NAMES))


def test_the_report_shows_the_intervals_and_a_heat_map_per_attribute(tmp_path, monkeypatch):
    def no_judging(*args, **kwargs):
        raise AssertionError("the report must read the record's counts, not judge images again")

    monkeypatch.setattr("scale_rae_core.shapes.scorer.read_image", no_judging)
    bench = record([prompt_row(p, seen) for p, seen in ROWS])
    # the record's counts, not the readings: change one count and the picture follows it
    bench["generation"]["confusion"]["colour"]["red"] = {"red": 7, "green": 0, "blue": 1, "yellow": 0, "none": 0}
    text = _report(tmp_path, bench)
    checker = check_html(text)
    assert "Shapes benchmark (95% intervals in brackets)" in text
    assert "<td class=num>50.0% [9.5, 90.5]</td>" in text  # first sample, colour: 1 of 2 prompts, Wilson
    assert "what the reader saw for what was asked (10 samples)" in text
    pictures = {img["alt"].split(":")[0]: img for img in checker.images}
    assert sorted(pictures) == ["colour", "position", "shape"]
    for attribute, counts in bench["generation"]["confusion"].items():
        png = base64.b64decode(pictures[attribute]["src"].split(",", 1)[1])
        title = f"{attribute}: asked (rows) vs seen (columns)"
        assert png == heatmap_png(title, counts)
    colour = Image.open(io.BytesIO(base64.b64decode(pictures["colour"]["src"].split(",", 1)[1]))).convert("RGB")
    layout = heatmap_layout("colour: asked (rows) vs seen (columns)", bench["generation"]["confusion"]["colour"])
    x0, y0, _, _ = layout.cell(0, 0)  # asked red, seen red: 7 of 8 in the record
    assert colour.getpixel((x0 + 2, y0 + 2)) == shade(7 / 8)
    assert (layout.n_rows, layout.n_cols) == (2, 5)  # red and blue asked; four colours and "none" seen


def test_a_record_from_before_the_intervals_still_makes_its_report(tmp_path):
    text = _report(tmp_path, record([prompt_row(p, seen) for p, seen in ROWS], with_intervals=False))
    checker = check_html(text)
    assert "<td class=num>50.0%</td>" in text and "what the reader saw" not in text and not checker.images
