"""Reading images: the one door every image comes in by, for packing, training and inference.

    read_image(path or bytes) -> PIL RGB, 8 bits per channel      (refuses what cannot be used, see below)
    square_pixels(rgb, S)     -> (3, S, S) float32 in [0, 1]        (the one image -> tensor preprocessing)

``read_image`` opens a path (regular files only: a FIFO or a device named ``a.png`` is refused at once, never
read, so it cannot block) or encoded bytes, refuses empty files, non-images, truncated or corrupt files and
decompression bombs (by the pixel count in the header, before anything is decoded), fully decodes, applies the
EXIF orientation and converts to 8-bit RGB:

* transparency (RGBA, LA, PA, a palette with a transparent colour) is composited over white;
* 16-bit samples (``I;16*``) are scaled by 255 / 65535, so a 0..65535 gradient stays a gradient (Pillow's own
  ``convert("RGB")`` saturates everything above 255 to white);
* 32-bit integer samples (``I``) are scaled from the sample depth the file declares (TIFF BitsPerSample), else
  16 bits when every value fits in 0..65535 (16-bit PGM/PPM decode to ``I``), else 31 bits (negatives are 0);
* float samples (``F``) are intensities in [0, 1]: scaled by 255, values outside clipped;
* palette, grey, bilevel, CMYK and YCbCr images convert the usual way.

Every refusal is a :class:`BadImage` (a ``DataError``) whose message is the reason only (``pack`` writes it to
``rejects.jsonl``); :func:`open_image_file` is the variant for a file a user named, whose message names it.

``square_pixels`` squashes an image to S × S with Pillow's bicubic filter (antialiased when shrinking, as the
SigLIP processor does) and returns it as a float tensor. Training (``unified``) and inference (``understand``,
self-verification on images) both use it, so the model reads the same pixels in both.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from scale_rae_core.errors import DataError

if TYPE_CHECKING:  # torch is imported by the tensor helpers only, so packing never loads it
    import torch

# Pillow's own default bomb threshold (~89.5 Mpx, a 9459×9459 image); Pillow itself refuses above twice that.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(DataError):
    """An input image that cannot be used; ``str(err)`` is the reason (without the file name)."""


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; a FIFO or device is refused without reading from it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once, unread
    except OSError as err:
        raise BadImage(f"unreadable file: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImage("not a regular file (a folder, FIFO, socket or device)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as err:
        raise BadImage(f"unreadable file: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _pillow_bomb() -> BadImage:
    """Pillow's own refusal (above twice its ``MAX_IMAGE_PIXELS``, before our limit is checked), in our words."""
    return BadImage(f"decompression bomb: more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels (Pillow's hard limit)")


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode ``data`` after checking its header's pixel count; EXIF orientation applied."""
    with warnings.catch_warnings():
        # Our own pixel limit decides; Pillow's warning would only duplicate it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise _pillow_bomb() from None
        except UnidentifiedImageError:
            raise BadImage("not an image (Pillow cannot identify it)") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"corrupt image header: {err}") from None
        w, h = im.size
        if w < 1 or h < 1:
            raise BadImage(f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        try:
            im.load()
            return ImageOps.exif_transpose(im)
        except Image.DecompressionBombError:
            raise _pillow_bomb() from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
            raise BadImage(f"truncated or corrupt image: {err}") from None


def _integer_bits(im: Image.Image, values: np.ndarray) -> int:
    """Significant bits of a 32-bit integer (mode ``I``) image: declared by the file, else read off the values."""
    declared = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample: an int or a tuple per sample
    if isinstance(declared, tuple):
        declared = declared[0] if declared else None
    if isinstance(declared, int) and 1 <= declared <= 32:
        return min(declared, 31)
    return 16 if values.size == 0 or (values.min() >= 0 and values.max() <= 65535) else 31


def _deep_to_grey8(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image -> mode ``L``, scaled (not clipped) to 0..255."""
    values = np.asarray(im)
    if im.mode == "F":
        scaled = np.nan_to_num(values.astype(np.float64), nan=0.0) * 255.0  # float intensities live in [0, 1]
    else:
        bits = 16 if im.mode.startswith("I;16") else _integer_bits(im, values)
        scaled = values.astype(np.float64) * (255.0 / (2**bits - 1))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def as_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB: transparency over white, deep samples scaled (see the module docstring)."""
    if im.mode == "RGB":
        return im
    if im.mode == "F" or im.mode.startswith("I"):
        im = _deep_to_grey8(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise BadImage(f"image mode {im.mode} cannot be converted to RGB ({err})") from None


def read_image(source: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check, fully decode and return ``source`` (a path or encoded bytes) as an 8-bit RGB image.

    Raises :class:`BadImage` for a path that is not a regular file, an empty, unreadable, non-image,
    truncated/corrupt or oversized (``max_pixels``) input, or a mode that has no RGB form.
    """
    data = source if isinstance(source, bytes) else _read_regular_file(Path(source))
    if not data:
        raise BadImage("empty file")
    return as_rgb(_decode(data, max_pixels))


def open_image_file(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`read_image` for a file a user named: the one-line error names the file and what to pass."""
    if not Path(path).exists():
        raise DataError(f"image {path}: not found; pass an image file (png, jpg, webp, ...)")
    try:
        return read_image(path, max_pixels=max_pixels)
    except BadImage as err:
        raise DataError(f"image {path}: {err}; pass another image file") from None


def to_tensor(im: Image.Image) -> torch.Tensor:
    """An image (made RGB by :func:`as_rgb`) -> (3, H, W) float32 in [0, 1]."""
    import torch

    rgb = np.asarray(as_rgb(im), dtype=np.uint8).copy()  # (H, W, 3)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


def square_pixels(im: Image.Image, size: int) -> torch.Tensor:
    """An image -> (3, size, size) float32 in [0, 1]: RGB, squashed to a square with bicubic (antialiased)."""
    rgb = as_rgb(im)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return to_tensor(rgb)


def to_square_tensor(im: Image.Image, size: int, *, train: bool) -> torch.Tensor:
    """PIL RGB -> [3, size, size] float32 in [0, 1]: shorter side to `size` (bicubic), then a square crop (random
    from torch's global RNG when ``train``, centred otherwise)."""
    import torch

    w, h = im.size
    if min(w, h) != size:
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = im.size
    if train:
        top = int(torch.randint(0, h - size + 1, (1,)))
        left = int(torch.randint(0, w - size + 1, (1,)))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    if (w, h) != (size, size):
        im = im.crop((left, top, left + size, top + size))
    return to_tensor(im)  # (3, S, S)
