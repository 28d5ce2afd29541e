"""Labelled images for class-conditional training (the DiT trainer) and the linear probe.

`open_labelled(path, ...)` returns a resumable stream of `(pixels [3, S, S] in [0, 1], label, position)` from

* a class-folder tree `root/<class>/<image>`: the classes are the sorted sub-folder names (the ImageFolder
  convention; `srae data synth` writes all 12 shapes classes, `shapes.synth.SHAPE_CLASSES`, even when empty), the
  label is the folder's index. Images are listed in sorted path order, shuffled per epoch by `Random(seed, epoch)`
  when training and split contiguously across ranks (drop-last, as `train.decoder_data` reads image folders; with
  `drop_last=False` the ranges cover every image once, for one pass such as `srae latent cache`);
* a packed dataset (`srae data pack root --format classes`): each sample's metadata carries `label` (the class
  name) and `class_index` (its index among the sorted folder names at packing time). With `classes` given, labels
  come from the names (and a mismatching `class_index` is refused); otherwise `class_index` is the label and
  `num_classes` must be given (a packed dataset does not list its classes without a full read).

Resize and crop: shorter side to `image_size` (bicubic), then a square crop — random when training, centred
otherwise (`data.images.to_square_tensor`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.data.images import IMAGE_EXTENSIONS, BadImage, read_image, to_square_tensor
from scale_rae_core.data.order import EpochOrder
from scale_rae_core.data.shards import MANIFEST_NAME
from scale_rae_core.errors import ConfigError, DataError

Position = Any


def class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(image path, label)] in sorted path order) of a class-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass a class-folder tree root/<class>/<image> or a packed dataset")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; a labelled dataset is root/<class>/<image>")
    index = {name: i for i, name in enumerate(classes)}
    items = sorted(
        (p, index[p.relative_to(root).parts[0]])
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and len(p.relative_to(root).parts) > 1
        and p.relative_to(root).parts[0] in index
    )
    if not items:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes, items


class LabelledFolder:
    """A class-folder tree as a resumable stream of `(pixels, label, (epoch, j))`."""

    def __init__(self, root: Path, *, image_size: int, train: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = True) -> None:
        self.root = Path(root)
        self.classes, self.items = class_folders(self.root)
        self.num_classes = len(self.classes)
        self.image_size, self.train = image_size, train
        self.order = EpochOrder(len(self.items), kind="class-folders", tag="srae-labelled", where=str(root),
                                shuffle=train, rank=rank, world_size=world_size, seed=seed, drop_last=drop_last,
                                identity={"classes": self.classes})
        self.images_per_epoch = self.order.per_epoch

    def skip(self, count: int) -> None:
        """Continue the current epoch after its first `count` images, without reading them."""
        self.order.skip(count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, Position]]:
        for i, position in self.order.items():
            path, label = self.items[i]
            try:
                im = read_image(path)
            except BadImage as err:
                raise DataError(f"{path}: {err}; remove or replace the file") from err
            yield to_square_tensor(im, self.image_size, train=self.train), label, position

    def mark_consumed(self, positions: list[Position]) -> None:
        self.order.mark_consumed(positions)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


class LabelledPacked:
    """A packed class dataset as a resumable stream of `(pixels, label, position)` (`WebDatasetReader`)."""

    def __init__(self, path: Path, *, image_size: int, train: bool, classes: list[str] | None = None,
                 num_classes: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, drop_last: bool = True) -> None:
        from scale_rae_core.data.webdataset import WebDatasetReader

        self.path = Path(path)
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None:
            self.num_classes = len(self.classes)
        elif num_classes is not None:
            self.num_classes = num_classes
        else:
            raise ConfigError(
                f"{path}: a packed dataset does not list its classes; give the class names or the number of classes"
            )
        self._index = {name: i for i, name in enumerate(self.classes or [])}
        self.reader = WebDatasetReader(path, rank=rank, world_size=world_size, num_workers=0, shuffle=train,
                                       shuffle_buffer=shuffle_buffer if train else 0, seed=seed, drop_last=drop_last)
        self.image_size, self.train = image_size, train
        self.images_per_epoch = len(self.reader)

    def skip(self, count: int) -> None:
        """Continue the current epoch after its first `count` samples, without decoding them."""
        self.reader.consumed = [count]  # one slot: the reader runs in this process (num_workers = 0)

    def _label(self, key: str, meta: dict[str, Any]) -> int:
        stored = meta.get("class_index")
        if self.classes is not None:
            name = meta.get("label")
            if name not in self._index:
                raise DataError(f"{self.path}: sample {key} has label {name!r}, not one of the {self.num_classes} classes given")
            if stored is not None and stored != self._index[name]:
                raise DataError(
                    f"{self.path}: sample {key} is class_index {stored} but {name!r} is class {self._index[name]} of the "
                    "classes given; pack from a tree with the same class folders"
                )
            return self._index[name]
        if not isinstance(stored, int) or not 0 <= stored < self.num_classes:
            raise DataError(
                f"{self.path}: sample {key} has class_index {stored!r}, not in 0..{self.num_classes - 1}; "
                "pack class folders with srae data pack --format classes"
            )
        return stored

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, Position]]:
        for sample in self.reader:
            if sample.image is None:
                raise DataError(f"{self.path}: sample {sample.key} has no image; a labelled dataset needs one per sample")
            label = self._label(sample.key, sample.metadata)
            yield to_square_tensor(sample.image, self.image_size, train=self.train), label, sample.position

    def mark_consumed(self, positions: list[Position]) -> None:
        self.reader.mark_consumed([tuple(p) for p in positions])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed-classes", "reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "packed-classes":
            raise DataError("the checkpoint's data position is not for a packed class dataset; resume with the same --data")
        self.reader.load_state_dict(state["reader"])


LabelledStream = LabelledFolder | LabelledPacked


def open_labelled(path: str | Path, *, image_size: int, train: bool, classes: list[str] | None = None,
                  num_classes: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                  shuffle_buffer: int = 1000, drop_last: bool = True) -> LabelledStream:
    """A packed class dataset (folder with wds_manifest.json, or the manifest) or a class-folder tree."""
    path = Path(path).expanduser()
    packed = (path.is_file() and path.name.endswith(".json")) or (path / MANIFEST_NAME).is_file()
    if packed:
        return LabelledPacked(path, image_size=image_size, train=train, classes=classes, num_classes=num_classes,
                              rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                              drop_last=drop_last)
    stream = LabelledFolder(path, image_size=image_size, train=train, rank=rank, world_size=world_size, seed=seed,
                            drop_last=drop_last)
    if classes is not None and list(classes) != stream.classes:
        raise DataError(f"{path}: its class folders {stream.classes} are not the classes given {list(classes)}")
    if num_classes is not None and num_classes != stream.num_classes:
        raise DataError(f"{path}: has {stream.num_classes} class folders, the model {num_classes} classes; they must agree")
    return stream


def labelled_batches(stream: LabelledStream, batch_size: int, *, limit: int | None = None, drop_last: bool = False
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Position]]]:
    """One pass over `stream` in batches: pixels (B, 3, S, S), labels (B,) int64, positions."""
    pixels: list[torch.Tensor] = []
    labels: list[int] = []
    positions: list[Position] = []
    seen = 0
    for x, y, pos in stream:
        if limit is not None and seen >= limit:
            break
        pixels.append(x)
        labels.append(y)
        positions.append(pos)
        seen += 1
        if len(pixels) == batch_size:
            yield torch.stack(pixels), torch.tensor(labels, dtype=torch.long), positions
            pixels, labels, positions = [], [], []
    if pixels and not drop_last:
        yield torch.stack(pixels), torch.tensor(labels, dtype=torch.long), positions
