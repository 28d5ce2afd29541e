"""Image loading, resizing and encoding for packing and reading.

``load_image`` is the one door images come in by: it refuses empty files, non-images, truncated or corrupt
files and decompression bombs (by the pixel count in the header, before anything is decoded) with a
:class:`BadImage` whose message is the reason written to ``rejects.jsonl``. Images come out as RGB with the
EXIF orientation applied; transparency is composited over white.

``encode_image`` uses fixed encoder settings so the same pixels always give the same bytes (with one Pillow
build), which is what makes packing deterministic.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default bomb threshold (~89.5 Mpx, a 9459×9459 image); Pillow itself refuses above twice that.
DEFAULT_MAX_PIXELS = 89_478_485

CODECS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class BadImage(ValueError):
    """An input image that cannot be used; ``str(err)`` is the reason."""


def load_image(source: Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and return ``source`` (a path or encoded bytes) as an RGB image.

    Raises :class:`BadImage` for an empty, unreadable, non-image, truncated/corrupt or oversized input.
    """
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as err:
            raise BadImage(f"unreadable file: {err.strerror or err}") from err
    else:
        data = source
    if not data:
        raise BadImage("empty file")
    with warnings.catch_warnings():
        # Our own pixel limit decides; Pillow's warning would only duplicate it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise BadImage(f"decompression bomb: {err}") from err
        except UnidentifiedImageError as err:
            raise BadImage("not an image (Pillow cannot identify it)") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"corrupt image header: {err}") from err
        w, h = im.size
        if w < 1 or h < 1:
            raise BadImage(f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as err:
            raise BadImage(f"decompression bomb: {err}") from err
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
            raise BadImage(f"truncated or corrupt image: {err}") from err
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Return ``im`` as RGB; transparent pixels are composited over white."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


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
