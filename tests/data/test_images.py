"""The one image reader: deep samples scaled, EXIF, alpha over white, non-files and bombs refused in one line."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from scale_rae_core.data.images import BadImage, open_image_file, read_image, square_pixels, to_tensor
from scale_rae_core.errors import DataError

GRADIENT16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))  # (8, 256), mean 32767.5


def _saved(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _grey(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im).astype(np.float64)
    assert im.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_gradient_keeps_its_gradient(fmt):
    im = read_image(_saved(Image.fromarray(GRADIENT16), fmt))
    grey = _grey(im)
    assert grey.mean() == pytest.approx(127.5, abs=0.5)  # Pillow's convert("RGB") gives ~254: saturated
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and (np.diff(grey[0]) >= 0).all()


def test_16_bit_pgm_decoding_to_mode_i_and_32_bit_integer_tiff():
    pgm = b"P5\n256 8\n65535\n" + GRADIENT16.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"  # 16-bit data in a 32-bit mode
    assert _grey(read_image(pgm)).mean() == pytest.approx(127.5, abs=0.5)
    wide = np.tile(np.linspace(0, 2**31 - 1, 256).astype(np.int32), (8, 1))
    grey = _grey(read_image(_saved(Image.fromarray(wide), "TIFF")))  # BitsPerSample 32
    assert grey.mean() == pytest.approx(127.5, abs=0.5) and grey[0, -1] == 255


def test_float_tiff_in_0_1_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))
    ramp[0, -1] = 3.0  # out of range: clipped to white
    ramp[1, 0] = np.nan
    raw = _saved(Image.fromarray(ramp, mode="F"), "TIFF")
    assert np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).mean() < 2  # what convert() alone makes of it
    grey = _grey(read_image(raw))
    assert grey.mean() == pytest.approx(127.5, abs=0.5)
    assert grey[0, -1] == 255 and grey[1, 0] == 0 and grey[2, 128] == round(128 / 255 * 255)


def test_exif_rotated_jpeg_is_turned_upright():
    im = Image.new("RGB", (64, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = read_image(_saved(im, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (32, 64)
    top, bottom = np.asarray(out)[4, 16], np.asarray(out)[-4, 16]
    assert top[0] > 200 and top[2] < 60  # the red half is on top after the turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    out = np.asarray(read_image(_saved(rgba, "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255)  # fully transparent: white, not the hidden red
    assert tuple(out[0, 1]) == (255, 0, 0)
    assert tuple(out[0, 2]) == (127, 127, 127)
    la = Image.new("LA", (2, 2), (0, 0))
    assert tuple(np.asarray(read_image(_saved(la, "PNG")))[0, 0]) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    assert tuple(np.asarray(read_image(_saved(pal, "PNG", transparency=1)))[0, 0]) == (255, 255, 255)


def test_palette_and_cmyk_become_rgb():
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert tuple(np.asarray(read_image(_saved(pal, "PNG")))[0, 0]) == (10, 20, 30)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    assert tuple(np.asarray(read_image(_saved(cmyk, "TIFF")))[0, 0]) == (255, 0, 0)


def test_a_fifo_named_like_an_image_is_refused_at_once(tmp_path):
    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_image(fifo)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    start = time.perf_counter()
    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_image blocked on a FIFO")
    assert time.perf_counter() - start < 2
    assert isinstance(outcome[0], BadImage) and "not a regular file" in str(outcome[0])
    with pytest.raises(DataError) as err:
        open_image_file(fifo)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"image {fifo}: not a regular file")
    with pytest.raises(BadImage, match="not a regular file"):
        read_image(tmp_path)  # a folder


def _bomb_png() -> bytes:
    """A valid 16x16 PNG whose header claims 100000x100000 pixels."""
    data = bytearray(_saved(Image.new("RGB", (16, 16)), "PNG"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_a_decompression_bomb_is_one_data_error_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    with pytest.raises(DataError) as err:
        open_image_file(bomb)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"image {bomb}: decompression bomb")
    small = tmp_path / "small.png"
    small.write_bytes(_saved(Image.new("RGB", (24, 16)), "PNG"))
    with pytest.raises(BadImage, match=r"^decompression bomb: 24x16 = 384 pixels exceeds the limit of 100$"):
        read_image(small, max_pixels=100)
    with pytest.raises(DataError, match="not found"):
        open_image_file(tmp_path / "missing.png")
    for data, reason in ((b"", "empty file"), (b"not an image", "not an image")):
        with pytest.raises(BadImage, match=reason):
            read_image(data)


def test_square_pixels_squashes_with_antialiasing():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: an antialiased 4x shrink averages them to grey
    x = square_pixels(Image.fromarray(stripes), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert (x - 0.5).abs().max() < 0.05
    wide = Image.fromarray(np.full((10, 40, 3), 200, np.uint8))
    y = square_pixels(wide, 16)  # squashed, not cropped
    assert y.shape == (3, 16, 16) and torch.allclose(y, torch.full_like(y, 200 / 255))
    same = Image.fromarray(stripes[:16, :16])
    torch.testing.assert_close(square_pixels(same, 16), to_tensor(same), rtol=0, atol=0)  # no resize at size
