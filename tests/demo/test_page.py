"""report.html: self-contained (data URIs, inline SVG, no scripts or network), well-formed, every image in it."""

from __future__ import annotations

import base64
import math
import re
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

from scale_rae_core.demo.page import (
    QA,
    AnsweredImage,
    Curve,
    ImageCell,
    ImageRow,
    Report,
    Table,
    line_plot_svg,
    render_html,
    write_report,
)

VOID = {"meta", "img", "br", "hr", "input", "link", "rect", "line", "polyline", "circle", "path"}


class _Checker(HTMLParser):
    """Tag balance (void and self-closing elements aside), and every img/src and external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


def check_html(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    assert not checker.problems and not checker.stack, (checker.problems, checker.stack)
    assert not checker.external, checker.external
    assert "<script" not in text.lower()
    return checker


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_report_embeds_every_image_curve_and_table(tmp_path):
    imgs = [_png(tmp_path / f"{i}.png", (40 * i, 10, 200)) for i in range(5)]
    report = Report(
        title="demo <run>",
        summary=[("synth", "27 images"), ("stage1", "2 steps")],
        grids=[("Generated", [ImageRow("a red circle", [ImageCell(imgs[0], "seed 0", True), ImageCell(imgs[1], "seed 1", False)]),
                              ImageRow("a blue square", [ImageCell(imgs[2], "seed 0")])])],
        answers=[AnsweredImage(imgs[3], "held-out 0", [QA("What colour is the shape?", "red", "red", True),
                                                       QA("Where is the shape?", "", "left", False)])],
        curves=[Curve("stage 1 training", {"loss": [(1, 3.0), (2, 2.5), (3, float("nan")), (4, 2.0)], "ce": [(1, 1.0), (4, 0.5)]}),
                Curve("decoder training", {"l1": [(10, 0.2), (20, 0.1)]}, log_y=True)],
        tables=[Table("Shapes benchmark", ["", "full"], [["first sample", "12.5%"], ["best of 4", "25.0%"]])],
    )
    path = write_report(tmp_path / "out" / "report.html", report)
    text = path.read_text()
    checker = check_html(text)
    # every image, once, as a decodable data URI with its own alt text
    assert len(checker.images) == 4 and text.count("data:image/png;base64,") == 4
    for img, src in zip(checker.images, [imgs[0], imgs[1], imgs[2], imgs[3]], strict=True):
        assert base64.b64decode(img["src"].split(",", 1)[1]) == src.read_bytes()
    assert [img["alt"] for img in checker.images] == [
        "a red circle: seed 0", "a red circle: seed 1", "a blue square: seed 0", "held-out 0"]
    assert 'class="ok"' in text and 'class="bad"' in text
    # curves: one svg per curve, one polyline per series, the NaN point dropped
    assert text.count("<svg") == 2 and text.count('class="series"') == 3
    loss_points = re.search(r'<polyline[^>]*points="([^"]+)"><title>loss</title>', text).group(1).split()
    assert len(loss_points) == 3
    assert "Shapes benchmark" in text and "<td class=num>25.0%</td>" in text
    assert "What colour is the shape?" in text and "expected left" in text
    assert "demo &lt;run&gt;" in text  # escaped
    assert not list(path.parent.glob(".*.tmp"))


def test_plot_axes_follow_the_data():
    svg = line_plot_svg(Curve("t", {"a": [(0, 0.0), (10, 1.0)]}), width=200, height=100)
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    (x0, y0), (x1, y1) = (tuple(map(float, p.split(","))) for p in points)
    assert x0 < x1 and y0 > y1  # left to right, rising upwards
    assert math.isclose(x0, 56) and math.isclose(x1, 200 - 12)
    empty = line_plot_svg(Curve("nothing", {"a": [(1, float("inf"))]}))
    assert "no data" in empty and "<polyline" not in empty
    log = line_plot_svg(Curve("log", {"a": [(1, 0.0), (2, 1.0), (3, 100.0)]}, log_y=True))
    assert len(re.search(r'points="([^"]+)"', log).group(1).split()) == 2  # y <= 0 cannot go on a log axis


def test_empty_report_is_still_valid():
    text = render_html(Report(title="empty"))
    check_html(text)
    assert "<h2>" not in text
