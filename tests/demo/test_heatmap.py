"""The confusion heat map: one cell per (asked, seen), shaded by its share of the row, read back from the PNG."""

from __future__ import annotations

import io

from PIL import Image

from scale_rae_core.demo.heatmap import GRID, HIGH, LOW, heatmap_layout, heatmap_png, shade

COUNTS = {"red": {"red": 6, "blue": 2, "none": 0},   # row shares 0.75, 0.25, 0
          "blue": {"red": 1, "blue": 1, "none": 2},  # 0.25, 0.25, 0.5
          "green": {"red": 0, "blue": 3, "none": 0}}  # 0, 1, 0


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def test_every_cell_is_shaded_by_its_share_of_the_row():
    image = Image.open(io.BytesIO(heatmap_png("colour", COUNTS))).convert("RGB")
    layout = heatmap_layout("colour", COUNTS)
    assert image.size == layout.size and (layout.n_rows, layout.n_cols) == (3, 3)
    shades, rates = {}, {}
    for r, row in enumerate(COUNTS.values()):
        for c, n in enumerate(row.values()):
            x0, y0, x1, y1 = layout.cell(r, c)
            assert image.getpixel((x0, y0)) == image.getpixel((x1, y1)) == GRID  # the cell's outline
            inside = image.getpixel((x0 + 2, y0 + 2))
            assert inside == shade(n / sum(row.values()))
            middle = {image.getpixel((x, (y0 + y1) // 2)) for x in range(x0 + 2, x1 - 1)}
            assert len(middle) > 1  # the count is written across the cell's middle
            shades[r, c], rates[r, c] = _luminance(inside), n / sum(row.values())
    # darker where the share is higher, equal where it is equal: the shading orders as the rates do
    cells = sorted(rates, key=rates.get)
    for a, b in zip(cells, cells[1:], strict=False):
        assert (shades[a] > shades[b]) if rates[a] < rates[b] else (shades[a] == shades[b])
    assert image.getpixel(layout.cell(0, 2)[:2]) == GRID and shade(0.0) == LOW and shade(1.0) == HIGH
    assert image.getpixel((layout.cell(2, 1)[0] + 2, layout.cell(2, 1)[1] + 2)) == HIGH  # 3 of 3
    # nothing is drawn right of the last column or below the last row
    x1, y1 = layout.cell(2, 2)[2:]
    assert {image.getpixel((x, y1 + 2)) for x in range(image.width)} == {(255, 255, 255)}
    assert {image.getpixel((x1 + 2, y)) for y in range(layout.cell(0, 0)[1], y1)} == {(255, 255, 255)}


def test_an_empty_row_is_white_and_a_long_title_widens_the_picture():
    counts = {"circle": {"circle": 0, "none": 0}}
    image = Image.open(io.BytesIO(heatmap_png("x", counts))).convert("RGB")
    x0, y0, _, _ = heatmap_layout("x", counts).cell(0, 0)
    assert image.getpixel((x0 + 2, y0 + 2)) == LOW  # no samples: share 0
    title = "a title much wider than the two cells of this table, as a caption may be"
    assert heatmap_layout(title, counts).size[0] > heatmap_layout("x", counts).size[0] + 200
