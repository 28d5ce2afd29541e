"""A confusion table as a small heat-map PNG (PIL only) for report.html.

Rows are the values asked, columns the values seen; each cell is shaded by its share of the row (white = none
of the row, dark blue = all of it) and shows its count. The row labels sit on the left, the column labels on
top, "asked \\ seen" in the corner and the title above.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

CELL = 52  # side of one cell, pixels
PAD = 6
TITLE_HEIGHT = 20
HEADER_HEIGHT = 20
LOW, HIGH = (255, 255, 255), (8, 48, 107)  # the shade of a rate of 0 and of 1
GRID = (190, 190, 190)
CORNER = "asked \\ seen"


@dataclass(frozen=True)
class HeatmapLayout:
    """Where each part of the picture goes: ``label_width`` of row labels, then ``n_cols`` cells per row."""

    n_rows: int
    n_cols: int
    label_width: int
    title_width: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return (max(PAD + self.label_width + self.n_cols * CELL, PAD + self.title_width) + PAD,
                TITLE_HEIGHT + HEADER_HEIGHT + self.n_rows * CELL + PAD)

    def cell(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The box (x0, y0, x1, y1) of cell (``row``, ``col``), both edges inside it."""
        x0 = PAD + self.label_width + col * CELL
        y0 = TITLE_HEIGHT + HEADER_HEIGHT + row * CELL
        return x0, y0, x0 + CELL - 1, y0 + CELL - 1


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=12)


def heatmap_layout(title: str, counts: dict[str, dict[str, int]]) -> HeatmapLayout:
    """The layout of ``counts`` (``{asked: {seen: n}}``, every row with the same columns) under ``title``."""
    font, draw = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [*counts, CORNER]
    width = max(int(draw.textlength(label, font=font)) for label in labels) + PAD
    columns = next(iter(counts.values()), {})
    return HeatmapLayout(len(counts), len(columns), width, int(draw.textlength(title, font=font)))


def shade(rate: float) -> tuple[int, int, int]:
    """The cell colour of a row share in [0, 1]: from ``LOW`` to ``HIGH`` in a straight line."""
    return tuple(round(lo + (hi - lo) * rate) for lo, hi in zip(LOW, HIGH, strict=True))  # type: ignore[return-value]


def heatmap_png(title: str, counts: dict[str, dict[str, int]]) -> bytes:
    """``counts`` (``{asked: {seen: n}}``, every row with the same columns, in order) drawn as a PNG."""
    layout = heatmap_layout(title, counts)
    font = _font()
    image = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((PAD, 3), title, fill=(0, 0, 0), font=font)
    columns = list(next(iter(counts.values()), {}))
    header_y = TITLE_HEIGHT + HEADER_HEIGHT // 2
    draw.text((PAD, header_y), CORNER, fill=(90, 90, 90), font=font, anchor="lm")
    for c, name in enumerate(columns):
        x0, _, x1, _ = layout.cell(0, c)
        draw.text(((x0 + x1) / 2, header_y), name, fill=(0, 0, 0), font=font, anchor="mm")
    for r, (asked, row) in enumerate(counts.items()):
        total = sum(row.values())
        _, y0, _, y1 = layout.cell(r, 0)
        draw.text((PAD, (y0 + y1) / 2), asked, fill=(0, 0, 0), font=font, anchor="lm")
        for c, seen in enumerate(columns):
            rate = row[seen] / total if total else 0.0
            box = layout.cell(r, c)
            draw.rectangle(box, fill=shade(rate), outline=GRID)
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), str(row[seen]), font=font, anchor="mm",
                      fill=(255, 255, 255) if rate > 0.5 else (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
