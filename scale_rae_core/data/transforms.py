"""Resizing and encoding images for packing (they are read by :mod:`scale_rae_core.data.images`).

``encode_image`` uses fixed encoder settings so the same pixels always give the same bytes (with one Pillow
build), which is what makes packing deterministic.
"""

from __future__ import annotations

import io

from PIL import Image

CODECS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


def resize_max_side(im: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink ``im`` so its longer side is ``max_side``, keeping the aspect ratio; never enlarge.

    ``None`` keeps the image as it is. The shorter side is rounded to the nearest pixel (at least 1).
    """
    if max_side is None:
        return im
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if w >= h:
        size = (max_side, size[1])
    else:
        size = (size[0], max_side)
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)


def encode_image(im: Image.Image, codec: str, quality: int = 95) -> bytes:
    """Encode an RGB image with fixed settings; ``codec`` is "png", "jpg" or "webp"."""
    if im.info:  # drop EXIF/ICC/text chunks carried over from the source; only pixels are stored
        im = im.copy()
        im.info = {}
    buf = io.BytesIO()
    if codec == "png":
        im.save(buf, format="PNG", compress_level=6, optimize=False)
    elif codec == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    elif codec == "webp":
        im.save(buf, format="WEBP", quality=quality, method=4, lossless=False, exact=False)
    else:
        raise AssertionError(f"unvalidated codec {codec!r}")
    return buf.getvalue()
