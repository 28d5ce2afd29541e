"""Image batches in the ADM layout: an `.npz` whose `arr_0` is uint8 (N, H, W, 3), as guided-diffusion's evaluator
(and RAE's `sample_ddp.py` / `pack_images.py`) write and read them.

Reading streams `arr_0` in batches from the zip member (50 000 images at 256 px are 9.8 GB), after checking its
header: dtype uint8, C-order, shape (N, H, W, 3). Nothing is unpickled (`np.load(..., allow_pickle=False)` lists
the members; an object array is refused). A folder of images can stand in for samples (sorted paths, all one
size). Writing streams too, atomically (temp file + rename), so `srae data npz` and the sampler never hold the
whole batch in memory.

`center_crop_arr` is ADM's preprocessing of reference images: halve with a box filter while the short side is at
least twice the target, resize (bicubic) so the short side is the target, then crop the centre.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from scale_rae_core.data.images import IMAGE_EXTENSIONS, BadImage, read_image
from scale_rae_core.errors import DataError

ARRAY = "arr_0"


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop of an RGB image to (size, size, 3) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------------ reading


class ImageBatches(ABC):
    """N images of one size H x W, read in uint8 batches (B, H, W, 3)."""

    def __init__(self, path: Path, count: int, height: int, width: int) -> None:
        self.path, self.count, self.height, self.width = path, count, height, width

    @abstractmethod
    def batches(self, batch_size: int) -> Iterator[np.ndarray]: ...


class NpzImages(ImageBatches):
    """`arr_0` of an ADM `.npz`, streamed from the archive."""

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{ARRAY}.npy") as f:
            _read_header(f, self.path)
            per_image = self.height * self.width * 3
            for start in range(0, self.count, batch_size):
                b = min(batch_size, self.count - start)
                data = f.read(b * per_image)
                if len(data) != b * per_image:
                    raise DataError(f"{self.path}: {ARRAY} is truncated; rewrite the file")
                yield np.frombuffer(data, dtype=np.uint8).reshape(b, self.height, self.width, 3)


class FolderImages(ImageBatches):
    """Every image file below a folder, in sorted path order; all must have the first one's size."""

    def __init__(self, path: Path, files: list[Path], height: int, width: int) -> None:
        super().__init__(path, len(files), height, width)
        self.files = files

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.count, batch_size):
            yield np.stack([self._read(p) for p in self.files[start : start + batch_size]])

    def _read(self, file: Path) -> np.ndarray:
        arr = np.asarray(_load(file), dtype=np.uint8)
        if arr.shape != (self.height, self.width, 3):
            raise DataError(
                f"{file}: is {arr.shape[1]}x{arr.shape[0]}, the other images in {self.path} are "
                f"{self.width}x{self.height}; put images of one size in the folder (or make an npz with srae data npz --image-size)"
            )
        return arr


def _load(file: Path) -> Image.Image:
    try:
        return read_image(file)
    except BadImage as err:
        raise DataError(f"{file}: {err}; remove or replace the file") from err


def _read_header(f: IO[bytes], path: Path) -> tuple[int, int, int]:
    hint = "an ADM batch holds arr_0 as uint8 (N, H, W, 3); make one with srae data npz"
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as err:
        raise DataError(f"{path}: {ARRAY} is not a readable .npy array ({err}); {hint}") from err
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3:
        raise DataError(f"{path}: {ARRAY} is {dtype} {tuple(shape)}{' Fortran-order' if fortran else ''}; {hint}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def open_npz_images(path: str | Path) -> NpzImages:
    """An ADM batch; one-line `DataError` for anything else (not a zip, no `arr_0`, wrong dtype or shape)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an ADM .npz (arr_0 uint8 N x H x W x 3)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not an .npz archive ({type(err).__name__}); pass an ADM batch (arr_0 uint8 N x H x W x 3)") from err
    if ARRAY not in members:
        raise DataError(f"{path}: has no {ARRAY} (members: {', '.join(members) or 'none'}); pass an ADM batch with the images in arr_0")
    with zipfile.ZipFile(path) as zf, zf.open(f"{ARRAY}.npy") as f:
        n, h, w = _read_header(f, path)
    if n < 1:
        raise DataError(f"{path}: {ARRAY} holds no images")
    return NpzImages(path, n, h, w)


def list_images(folder: Path) -> list[Path]:
    """The image files below `folder`, sorted by path; at least one."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no images found; pass an ADM .npz or a folder of PNG/JPEG images")
    return files


def open_images(path: str | Path) -> ImageBatches:
    """An ADM `.npz`, or a folder of same-size images (sorted, recursive)."""
    path = Path(path)
    if path.is_dir():
        files = list_images(path)
        w, h = _load(files[0]).size
        return FolderImages(path, files, h, w)
    return open_npz_images(path)


# ------------------------------------------------------------------------------------------------ writing


class AdmNpzWriter:
    """Write N images of H x W into `arr_0` of a new `.npz`, batch by batch; the file appears only on `close()`."""

    def __init__(self, path: str | Path, count: int, height: int, width: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (count, height, width, 3)
        self.written = 0
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open(f"{ARRAY}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._member, header)

    def write(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise DataError(f"{self.path}: got images {images.dtype} {images.shape[1:]}, expected uint8 {self.shape[1:]}")
        if self.written + len(images) > self.shape[0]:
            raise DataError(f"{self.path}: more than the {self.shape[0]} announced images")
        self._member.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def close(self) -> Path:
        self._member.close()
        self._zip.close()
        if self.written != self.shape[0]:
            Path(self._tmp).unlink(missing_ok=True)
            raise DataError(f"{self.path}: {self.written} of {self.shape[0]} images were written; nothing was saved")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._member.close()
        self._zip.close()
        Path(self._tmp).unlink(missing_ok=True)


def folder_to_npz(folder: str | Path, out: str | Path, image_size: int | None = None) -> dict:
    """Pack the images below `folder` (sorted paths) into an ADM batch at `out`.

    With `image_size`, each image gets ADM's centre crop to that square (images already that square are kept as
    they are); without it, all images must share one size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass a folder of images")
    if image_size is not None and image_size < 1:
        raise DataError(f"--image-size must be a positive number of pixels, got {image_size}")
    files = list_images(folder)
    first = _load(files[0])
    h, w = (image_size, image_size) if image_size else (first.size[1], first.size[0])
    writer = AdmNpzWriter(out, len(files), h, w)
    try:
        for file in files:
            im = _load(file)
            if image_size is not None and im.size != (image_size, image_size):
                arr = center_crop_arr(im, image_size)
            else:
                arr = np.asarray(im, dtype=np.uint8)
            if arr.shape != (h, w, 3):
                raise DataError(
                    f"{file}: is {arr.shape[1]}x{arr.shape[0]}, not {w}x{h} like {files[0].name}; pass --image-size to crop all images to one size"
                )
            writer.write(arr[None])
    except BaseException:
        writer.abort()
        raise
    path = writer.close()
    return {"out": str(path), "count": len(files), "height": h, "width": w, "folder": str(folder)}
