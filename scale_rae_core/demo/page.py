"""report.html: one self-contained page (images as base64 data URIs, plots as inline SVG; no scripts, no network).

The page is built from plain data (``Report``), so any run that can fill it gets the same page: ``srae demo``
fills it from its run folder. Sections, each shown only when it has content: a summary table, image grids
(one row per prompt), images with their question/answer pairs, line plots, tables and captioned pictures made
in memory (``Picture``: PNG bytes, such as the benchmark's confusion heat maps).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass
class Curve:
    """One plot: named series of (x, y) points (non-finite points are left out)."""

    title: str
    series: dict[str, list[tuple[float, float]]]
    x_label: str = "step"
    log_y: bool = False


@dataclass
class ImageCell:
    path: Path
    caption: str
    ok: bool | None = None  # a green / red frame when judged


@dataclass
class ImageRow:
    title: str
    cells: list[ImageCell]


@dataclass
class QA:
    question: str
    answer: str
    expected: str | None = None
    correct: bool | None = None


@dataclass
class AnsweredImage:
    path: Path
    title: str
    qa: list[QA]


@dataclass
class Picture:
    """A PNG made in memory (not a file), shown with its caption."""

    png: bytes
    caption: str


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    title: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    grids: list[tuple[str, list[ImageRow]]] = field(default_factory=list)  # (section title, rows)
    answers: list[AnsweredImage] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    pictures: list[tuple[str, list[Picture]]] = field(default_factory=list)  # (section title, pictures)


def data_uri(path: Path) -> str:
    """The file as a ``data:`` URI."""
    return _uri(Path(path).read_bytes(), MIME.get(Path(path).suffix.lower(), "application/octet-stream"))


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_plot_svg(curve: Curve, width: int = 520, height: int = 280) -> str:
    """An inline ``<svg>`` line plot of ``curve`` with axes, ticks and a legend."""
    left, right, top, bottom = 56, 12, 28, 40
    pts = {
        name: [(float(x), float(y)) for x, y in points
               if math.isfinite(x) and math.isfinite(y) and (y > 0 or not curve.log_y)]
        for name, points in curve.series.items()
    }
    pts = {k: v for k, v in pts.items() if v}
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(curve.title)}">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(curve.title)}</text>']
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12">no data</text></svg>')
        return "".join(out)

    def ty(y: float) -> float:
        return math.log10(y) if curve.log_y else y

    xs = [x for v in pts.values() for x, _ in v]
    ys = [ty(y) for v in pts.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (ty(y) - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _ticks(y0, y1):
        yy = top + (1 - (t - y0) / (y1 - y0)) * ph
        label = _fmt(10 ** t if curve.log_y else t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end" font-size="10">{label}</text>')
    for t in _ticks(x0, x1):
        xx = left + (t - x0) / (x1 - x0) * pw
        out.append(f'<text x="{xx:.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{html.escape(curve.x_label)}</text>')
    for i, (name, points) in enumerate(pts.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(points))
        out.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}">'
                   f'<title>{html.escape(name)}</title></polyline>')
        ly = top + 12 + 14 * i
        out.append(f'<line x1="{left + pw - 90}" x2="{left + pw - 74}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>'
                   f'<text x="{left + pw - 70}" y="{ly}" font-size="11">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;font-size:13px}
th{background:#f5f5f5}td.num{text-align:right}
.row{display:flex;gap:10px;align-items:flex-start;margin:8px 0;flex-wrap:wrap}
.row .label{width:220px;font-size:13px}
figure{margin:0;text-align:center;font-size:11px}figure img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #ccc}
figure.picture img{width:auto;height:auto;border:none;image-rendering:auto}
img.ok{border-color:#2ca02c}img.bad{border-color:#d62728}
.qa{display:flex;gap:14px;margin:10px 0}.qa img{width:128px;height:128px;image-rendering:pixelated}
.good{color:#2ca02c}.wrong{color:#d62728}
"""


def _img(path: Path, alt: str, ok: bool | None = None) -> str:
    cls = "" if ok is None else (' class="ok"' if ok else ' class="bad"')
    return f'<img src="{data_uri(path)}" alt="{html.escape(alt)}"{cls}>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i else ""}>{html.escape(str(c))}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: Report) -> str:
    """The page as a string."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(report.title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(report.title)}</h1>"]
    if report.summary:
        parts.append("<h2>Summary</h2>" + _table(["stage", "result"], [[k, v] for k, v in report.summary]))
    for table in report.tables:
        parts.append(f"<h2>{html.escape(table.title)}</h2>" + _table(table.header, table.rows))
    for title, pictures in report.pictures:
        figures = "".join(f'<figure class="picture"><img src="{_uri(p.png, "image/png")}" alt="{html.escape(p.caption)}">'
                          f"<figcaption>{html.escape(p.caption)}</figcaption></figure>" for p in pictures)
        parts.append(f'<h2>{html.escape(title)}</h2><div class="row">{figures}</div>')
    for title, rows in report.grids:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for row in rows:
            cells = "".join(f"<figure>{_img(c.path, f'{row.title}: {c.caption}', c.ok)}<figcaption>{html.escape(c.caption)}"
                            "</figcaption></figure>" for c in row.cells)
            parts.append(f'<div class="row"><div class="label">{html.escape(row.title)}</div>{cells}</div>')
    if report.answers:
        parts.append("<h2>Understanding (held-out images)</h2>")
        for item in report.answers:
            lines = []
            for qa in item.qa:
                mark = "" if qa.correct is None else (' <span class="good">✓</span>' if qa.correct else ' <span class="wrong">✗</span>')
                expected = "" if qa.expected is None else f" <small>(expected {html.escape(qa.expected)})</small>"
                lines.append(f"<li>{html.escape(qa.question)} → <b>{html.escape(qa.answer or '∅')}</b>{expected}{mark}</li>")
            parts.append(f'<div class="qa">{_img(item.path, item.title)}<div><div>{html.escape(item.title)}</div>'
                         f'<ul>{"".join(lines)}</ul></div></div>')
    if report.curves:
        parts.append("<h2>Training curves</h2>" + "".join(line_plot_svg(c) for c in report.curves))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path, report: Report) -> Path:
    """Write ``report`` as one HTML file at ``path`` (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    tmp.replace(path)
    return path
