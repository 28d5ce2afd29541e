"""Random-access reader of a reference-format JSONL (``{"image", "conversations", "metadata"}`` per line).

The byte offset of every non-blank line is indexed once (a sequential scan, 8 bytes per line kept); an item
is then one seek + one line parse. Images are opened relative to ``image_folder`` (the reference trainer's
``--image_folder``) or, when it is not given, the JSONL's folder; absolute paths are used as they are.
A line that is not valid at access time raises :class:`DataError` naming ``file:line`` — srae does not
silently re-sample another index as the reference trainer does.

:class:`JsonlDataset` is the map-style view (``len``, ``[i]``). :class:`JsonlReader` streams it for training:
per epoch a permutation of all lines seeded by ``(seed, epoch)``, rank ``r`` of ``W`` taking a contiguous
slice of it; its position is ``(epoch, consumed)``, so a state saved after ``k`` samples resumes at sample
``k + 1`` of the same order. It iterates in the calling process (no DataLoader worker split).
"""

from __future__ import annotations

import json
import os
import random
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from torch.utils.data import Dataset

from scale_rae_core.data.images import DEFAULT_MAX_PIXELS, BadImage, read_image
from scale_rae_core.data.sample import Sample, reference_record
from scale_rae_core.errors import DataError


class JsonlDataset(Dataset):
    """``len()`` lines, ``dataset[i]`` → :class:`Sample` (key: the line's ``id`` if any, else ``file:line``)."""

    def __init__(
        self,
        path: Path,
        image_folder: Path | None = None,
        *,
        load_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: JSONL not found; pass the path of a .jsonl file")
        if image_folder is not None and not Path(image_folder).is_dir():
            raise DataError(f"--image-folder {image_folder}: not a folder")
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.load_images, self.max_pixels = load_images, max_pixels
        self.offsets = array("q")
        self.lines = array("q")
        with self.path.open("rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    self.offsets.append(offset)
                    self.lines.append(lineno)
                offset += len(raw)
        self._file: IO[bytes] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the file themselves
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def _handle(self) -> IO[bytes]:
        if self._file is None or self._pid != os.getpid():
            self._file = self.path.open("rb")
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        f = self._handle()
        f.seek(self.offsets[index])
        raw = f.readline()
        where = f"{self.path}:{self.lines[index]}"
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
            turns, meta, image_ref = reference_record(obj)
            image = None
            if image_ref is not None and self.load_images:
                if not isinstance(image_ref, str):
                    raise ValueError("'image' must be a path string")
                p = Path(image_ref)
                image = read_image(p if p.is_absolute() else self.image_folder / p, max_pixels=self.max_pixels)
        except (ValueError, BadImage) as err:
            raise DataError(f"{where}: {err}; fix or remove the line") from err
        key = obj.get("id")
        key = str(key) if isinstance(key, (str, int)) else f"{self.path.name}:{self.lines[index]}"
        return Sample(key=key, image=image, conversations=turns, metadata=meta)


class JsonlReader:
    """This rank's samples of a JSONL, in a seeded per-epoch order, with a resumable position."""

    STATE_VERSION = 1

    def __init__(
        self,
        path: Path,
        image_folder: Path | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.dataset = JsonlDataset(path, image_folder, max_pixels=max_pixels)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.consumed = 0

    def _range(self) -> tuple[int, int]:
        n = len(self.dataset)
        if self.drop_last:
            per = n // self.world_size
            return self.rank * per, (self.rank + 1) * per
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def __len__(self) -> int:
        a, b = self._range()
        return b - a

    def order(self, epoch: int) -> list[int]:
        """The line indices this rank reads in ``epoch``."""
        indices = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(f"srae-jsonl-{self.seed}-{epoch}").shuffle(indices)
        a, b = self._range()
        return indices[a:b]

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next: from its start, or from the current position if it is the current epoch."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[Sample]:
        if self.consumed and self.consumed >= len(self):
            self.set_epoch(self.epoch + 1)
        order = self.order(self.epoch)
        for j in range(self.consumed, len(order)):
            sample = self.dataset[order[j]]
            sample.position = (self.epoch, 0, j)
            self.consumed = j + 1
            yield sample

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed, "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the file and split must be the same as when it was saved."""
        saved, now = state.get("layout", {}), self._layout()
        changed = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in now if saved.get(k) != now[k]]
        if state.get("version") != self.STATE_VERSION or changed:
            raise DataError(
                f"JSONL reader state does not match ({', '.join(changed) or 'version'}); resume with the same "
                "file, rank, world size and shuffle settings"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def _layout(self) -> dict[str, Any]:
        return {
            "lines": len(self.dataset),
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }
