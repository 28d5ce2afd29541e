"""Images for decoder training, latent statistics and reconstruction eval: packed shards or an image folder.

`open_images(path, ...)` returns a resumable stream of `(pixels [3, S, S] in [0, 1], position)`:

* a packed dataset (a folder with `wds_manifest.json`, or the manifest itself) is read with
  `WebDatasetReader` (split across ranks, exact resume position); samples without an image are skipped
  (a conversations pack repeats each image once per sample, so an image may come several times);
* any other folder is an image folder (a class-folder tree or a flat folder): every image file below it,
  in sorted path order, shuffled per epoch by `Random(seed, epoch)` when training, split contiguously across
  ranks (drop-last, so every rank sees the same count).

Images are read by `data.images.read_image` (the reader packing and inference use), resized (bicubic) so the
shorter side is `image_size`, then cropped to a square: at random when `train`, centred otherwise (the RAE
reconstruction-eval convention; no squashing, so eval sees shapes undistorted as in training). (RAE resizes to 1.5x before its random crop; at the shapes world's 64 px the
crop would cut shapes off, so the resize target is the crop size here.) Crops draw from torch's global RNG,
which training checkpoints save and restore. `unique=True` skips repeated images (by pixel hash, per rank).

A latent cache made for the decoder (`srae latent cache --for decoder`) is read by `latent_cache.CachedImages`, an
`ImageStream` of `((pixels, latents), position)`: the trainer then decodes the cached latents instead of running
the encoder.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.data.images import IMAGE_EXTENSIONS, BadImage, read_image, to_square_tensor
from scale_rae_core.data.order import EpochOrder
from scale_rae_core.data.shards import MANIFEST_NAME
from scale_rae_core.errors import DataError

Position = Any  # whatever the underlying reader needs to resume (JSON-serialisable)


class ImageStream(ABC):
    """Common interface: iterate `(pixels, position)`; `mark_consumed`, `state_dict`, `load_state_dict`."""

    images_per_epoch: int  # on this rank

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, Position]]: ...

    @abstractmethod
    def mark_consumed(self, positions: list[Position]) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PackedImages(ImageStream):
    """The images of a packed dataset, through `WebDatasetReader` (num_workers = 0, in-process)."""

    def __init__(self, path: Path, *, image_size: int, train: bool, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int, unique: bool = False) -> None:
        from scale_rae_core.data.webdataset import WebDatasetReader

        self.reader = WebDatasetReader(
            path, rank=rank, world_size=world_size, num_workers=0, shuffle=train,
            shuffle_buffer=shuffle_buffer if train else 0, seed=seed, drop_last=True,
        )
        self.image_size, self.train, self.unique = image_size, train, unique
        self.images_per_epoch = len(self.reader)  # samples; those without an image are skipped

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Position]]:
        seen: set[bytes] = set()
        for sample in self.reader:
            if sample.image is None:
                continue
            if self.unique:
                digest = hashlib.sha1(sample.image.tobytes()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            yield to_square_tensor(sample.image, self.image_size, train=self.train), sample.position

    def mark_consumed(self, positions: list[Position]) -> None:
        self.reader.mark_consumed([tuple(p) for p in positions])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed", "reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed":
            raise DataError("the checkpoint's data position is not for a packed dataset; resume with the same --data")
        self.reader.load_state_dict(state["reader"])


class FolderImages(ImageStream):
    """Every image file below a folder (sorted), shuffled per epoch, split across ranks (drop-last)."""

    def __init__(self, root: Path, *, image_size: int, train: bool, rank: int, world_size: int,
                 seed: int, unique: bool = False) -> None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass a packed folder or an image folder")
        self.root, self.files = root, files
        self.image_size, self.train, self.unique = image_size, train, unique
        self.order = EpochOrder(len(files), kind="folder", tag="srae-folder", where=str(root), shuffle=train,
                                rank=rank, world_size=world_size, seed=seed)
        self.images_per_epoch = self.order.per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Position]]:
        seen: set[bytes] = set()
        for i, position in self.order.items():
            path = self.files[i]
            try:
                im = read_image(path)
            except BadImage as err:
                raise DataError(f"{path}: {err}; remove or replace the file") from err
            if self.unique:
                digest = hashlib.sha1(im.tobytes()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            yield to_square_tensor(im, self.image_size, train=self.train), position

    def mark_consumed(self, positions: list[Position]) -> None:
        self.order.mark_consumed(positions)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def open_images(path: str | Path, *, image_size: int, train: bool, rank: int = 0, world_size: int = 1,
                seed: int = 0, shuffle_buffer: int = 1000, unique: bool = False) -> ImageStream:
    """A packed dataset (folder with wds_manifest.json, or the manifest) or an image folder, as an ImageStream."""
    path = Path(path).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return PackedImages(path, image_size=image_size, train=train, rank=rank, world_size=world_size,
                            seed=seed, shuffle_buffer=shuffle_buffer, unique=unique)
    if not path.is_dir():
        raise DataError(f"--data {path}: no such folder; pass a packed dataset (srae data pack) or an image folder")
    if (path / MANIFEST_NAME).is_file():
        return PackedImages(path, image_size=image_size, train=train, rank=rank, world_size=world_size,
                            seed=seed, shuffle_buffer=shuffle_buffer, unique=unique)
    return FolderImages(path, image_size=image_size, train=train, rank=rank, world_size=world_size,
                        seed=seed, unique=unique)


def batches(stream: ImageStream, batch_size: int, *, limit: int | None = None,
            drop_last: bool = False) -> Iterator[tuple[Any, list[Position]]]:
    """One pass over `stream` in batches `[B, 3, S, S]` (at most `limit` images); positions per batch. Items that
    are tuples of tensors (`CachedImages`) give a tuple of stacked tensors."""
    items: list[Any] = []
    positions: list[Position] = []
    seen = 0
    for x, pos in stream:
        if limit is not None and seen >= limit:
            break
        items.append(x)
        positions.append(pos)
        seen += 1
        if len(items) == batch_size:
            yield _stack(items), positions
            items, positions = [], []
    if items and not drop_last:
        yield _stack(items), positions


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*items, strict=True))
    return torch.stack(items)
