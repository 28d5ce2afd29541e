"""Streaming reader of packed shards, split across ranks and DataLoader workers, with an exact resume point.

Order of an epoch (everything below is computed from the manifest's per-tar counts and the seeds, without
reading any data, so every process can compute every other process's order):

1. The tars, permuted by ``Random(seed, epoch)`` when ``shuffle`` (as the reference trainer shuffles tars per
   epoch); inside a tar, samples in sorted-key order. This gives one global sequence of N samples.
2. Rank ``r`` of ``W`` takes the contiguous range ``[r*N//W, (r+1)*N//W)`` (``drop_last``: ``N//W`` each, so
   every rank gets the same count). Each rank reads only its own ~1/W of the bytes.
3. That range is split the same way into one contiguous stream per DataLoader worker ("slot").
4. A slot's stream goes through a shuffle buffer of ``shuffle_buffer`` samples seeded by
   ``(seed, epoch, rank, slot)``. The buffer is simulated on indices first, so the emission order is known
   before reading; reading is still sequential and keeps at most ~``shuffle_buffer`` samples in memory.

Position: the state is ``(epoch, consumed[slot])`` — how many samples of each slot's emission order were
consumed. Resuming at ``k`` re-reads the stream up to the buffer's reach and skips (without decoding) the
samples that were emitted before ``k``, so the continuation is exactly the rest of the uninterrupted order.

Tracking it: every yielded :class:`Sample` carries ``position = (epoch, slot, index)``. Iterating in the
training process (``num_workers=0``) updates the reader's own counters. With DataLoader workers each worker
iterates a copy, so the training loop must report what it consumed: keep the positions through the collate
function and call ``reader.mark_consumed(positions)`` after each batch; ``state_dict()`` is then exact
however far the workers have prefetched. When every slot is finished, the next iteration starts the next
epoch (``set_epoch`` sets it explicitly; for the current epoch it keeps the position).

Remote shards (a manifest listing ``https://``, ``hf://``, ``gs://`` or ``pipe:`` tars, see
:mod:`scale_rae_core.data.shards`) are streamed through ``webdataset.gopen`` instead of opened for random
access. The order and the position are the same as for local tars — they only depend on the per-tar counts,
which the manifest must give for remote tars (``shards[].count`` or ``samples_per_tar``). A slot reads its
range tar by tar, each from the tar's start: resuming at a position inside a remote tar re-streams that tar
from its beginning and reads past (without decoding) the samples before the position, so a resume costs at
most one tar's bytes per slot. Positions are per slot, not per tar; the tar a position falls in follows from
the counts.
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from scale_rae_core.data.images import DEFAULT_MAX_PIXELS
from scale_rae_core.data.sample import Sample
from scale_rae_core.data.shards import TarIndex, TarStream, decode_sample, load_manifest, open_shard
from scale_rae_core.errors import DataError

STATE_VERSION = 1


def _split(start: int, stop: int, parts: int, part: int) -> tuple[int, int]:
    n = stop - start
    return start + part * n // parts, start + (part + 1) * n // parts


def buffer_order(n: int, buffer: int, rng: random.Random) -> list[int]:
    """Emission order of a shuffle buffer of size ``buffer`` over a stream ``0..n-1``.

    While the buffer is full each incoming item replaces a random buffered one, which is emitted; at the end
    the rest is emitted in random order. ``buffer <= 1`` keeps the stream order.
    """
    if buffer <= 1:
        return list(range(n))
    buf: list[int] = []
    order: list[int] = []
    for p in range(n):
        if len(buf) < buffer:
            buf.append(p)
            continue
        j = rng.randrange(buffer)
        order.append(buf[j])
        buf[j] = p
    rng.shuffle(buf)
    order.extend(buf)
    return order


class WebDatasetReader(IterableDataset):
    """Yields :class:`Sample` s from a ``wds_manifest.json`` (or its folder); see the module docstring.

    ``num_workers`` must equal the DataLoader's ``num_workers`` (0 when iterating directly).
    """

    def __init__(
        self,
        manifest: Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        drop_last: bool = False,
        decode_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if num_workers < 0 or shuffle_buffer < 0:
            raise DataError("num_workers and shuffle_buffer must be >= 0")
        m = load_manifest(Path(manifest))
        self.manifest = m.path
        self.tars = m.tars
        if m.counts is not None:
            self.counts = list(m.counts)
        else:  # a reference manifest without counts: count the .json members once
            self.counts = []
            for tar in m.tars:
                if not isinstance(tar, Path):
                    raise DataError(
                        f"{m.path}: remote tar {tar} has no sample count; add 'samples_per_tar' (one count per tar, "
                        "in order) to the manifest, so the order can be computed without reading every tar"
                    )
                index = TarIndex(tar)
                self.counts.append(len(index))
                index.close()
        self.total = sum(self.counts)
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.slots = max(1, num_workers)
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.drop_last = drop_last
        self.decode_images, self.max_pixels = decode_images, max_pixels
        self.epoch = 0
        self.consumed = [0] * self.slots

    # ------------------------------------------------------------------------------------------- layout

    def _rank_range(self) -> tuple[int, int]:
        if self.drop_last:
            per = self.total // self.world_size
            return self.rank * per, (self.rank + 1) * per
        return _split(0, self.total, self.world_size, self.rank)

    def slot_length(self, slot: int) -> int:
        a, b = _split(*self._rank_range(), self.slots, slot)
        return b - a

    def __len__(self) -> int:
        a, b = self._rank_range()
        return b - a

    def _tar_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.tars)))
        if self.shuffle:
            random.Random(f"srae-tars-{self.seed}-{epoch}").shuffle(order)
        return order

    def _slot_order(self, epoch: int, slot: int) -> list[int]:
        n = self.slot_length(slot)
        buffer = self.shuffle_buffer if self.shuffle else 0
        rng = random.Random(f"srae-buffer-{self.seed}-{epoch}-{self.rank}-{slot}")
        return buffer_order(n, buffer, rng)

    # ----------------------------------------------------------------------------------------- position

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next: from its beginning, or — if it is the current epoch — from the current position.

        Keeping the position for the current epoch lets a trainer call ``set_epoch(e)`` before every
        ``iter()`` (the DistributedSampler habit) right after ``load_state_dict`` without losing the resume
        point.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = [0] * self.slots

    def mark_consumed(self, positions: Iterable[tuple[int, int, int] | None]) -> None:
        """Record that the samples at ``positions`` (``Sample.position``) reached the training loop."""
        for pos in positions:
            if pos is None:
                continue
            epoch, slot, index = pos
            if epoch > self.epoch:
                self.set_epoch(epoch)
            if epoch == self.epoch:
                self.consumed[slot] = max(self.consumed[slot], index + 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the data and split must be the same as when it was saved."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"reader state version {state.get('version')!r} is not {STATE_VERSION}")
        saved, now = state.get("layout", {}), self._layout()
        changed = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in now if saved.get(k) != now[k]]
        if changed:
            raise DataError(
                f"reader state was saved with {', '.join(changed)}; resume with the same data, rank, world "
                "size, workers and shuffle settings"
            )
        self.epoch = int(state["epoch"])
        self.consumed = [int(c) for c in state["consumed"]]

    def _layout(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }

    # ---------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 0
        if workers != self.num_workers:
            raise DataError(
                f"WebDatasetReader(num_workers={self.num_workers}) is read by {workers} DataLoader workers; "
                "pass the DataLoader's num_workers"
            )
        if any(self.consumed) and all(self.consumed[s] >= self.slot_length(s) for s in range(self.slots)):
            self.set_epoch(self.epoch + 1)
        slot = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        return self._iter_slot(self.epoch, slot)

    def _open_tar(self, t: int) -> TarIndex | TarStream:
        """Tar ``t``, after checking that it holds the number of samples the manifest says (the epoch's order
        is computed from those counts: a wrong count would crash later or silently skip samples). A remote tar
        is checked as it streams: it fails when it ends before a sample the counts promise."""
        index = open_shard(self.tars[t])
        if isinstance(index, TarIndex) and len(index) != self.counts[t]:
            index.close()
            raise DataError(
                f"{self.tars[t]}: holds {len(index)} samples but {self.manifest} says {self.counts[t]}; the manifest "
                "does not belong to these shards: re-pack, or check them with `srae data verify`"
            )
        return index

    def _iter_slot(self, epoch: int, slot: int) -> Iterator[Sample]:
        order = self._slot_order(epoch, slot)
        n = len(order)
        start = self.consumed[slot]
        rank_of = array("q", bytes(8 * n))
        for j, p in enumerate(order):
            rank_of[p] = j
        a, _ = _split(*self._rank_range(), self.slots, slot)
        tar_order = self._tar_order(epoch)
        ends = []  # cumulative sample counts along the epoch's tar order
        acc = 0
        for t in tar_order:
            acc += self.counts[t]
            ends.append(acc)

        current: tuple[int, TarIndex | TarStream] | None = None
        pending: dict[int, tuple[str, str, bytes, bytes | None]] = {}
        s = 0
        try:
            for j in range(start, n):
                target = order[j]
                while target not in pending:
                    if rank_of[s] >= start:  # not consumed before the resume point
                        g = a + s
                        k = bisect.bisect_right(ends, g)
                        t = tar_order[k]
                        if current is None or current[0] != t:
                            if current is not None:
                                current[1].close()
                            current = (t, self._open_tar(t))
                        local = g - (ends[k] - self.counts[t])
                        name, data, image = current[1].raw(local)
                        pending[s] = (str(self.tars[t]), name, data, image)
                    s += 1
                where, name, data, image = pending.pop(target)
                sample = decode_sample(
                    where, name, data, image, max_pixels=self.max_pixels, decode_image=self.decode_images
                )
                sample.position = (epoch, slot, j)
                self.consumed[slot] = j + 1
                yield sample
        finally:
            if current is not None:
                current[1].close()
