"""The read order of an indexed dataset (an image folder, class folders, a latent cache): per epoch, a seeded
permutation of all items, split contiguously across ranks, with an exact resume position.

* Epoch ``e``'s order is ``range(count)`` shuffled by ``Random(f"{tag}-{seed}-{e}")`` (unshuffled when
  ``shuffle`` is off); every process computes the same order.
* Rank ``r`` of ``W`` takes the contiguous part ``[r·n//W, (r+1)·n//W)`` of it, or with ``drop_last`` the r-th
  of ``W`` equal parts of ``n//W`` items (every rank then sees the same count; the tail is dropped).
* The position is ``(epoch, consumed)``: how many of this rank's items of the epoch reached the training loop.
  Items are handed out with their position ``(epoch, j)`` so a loop that reads ahead reports what it consumed
  (:meth:`EpochOrder.mark_consumed`); a state saved after ``k`` items resumes at item ``k + 1`` of the same order,
  and the next iteration after the last item starts the next epoch.

The state dict is ``{"kind", "epoch", "consumed", "count", **identity, "world_size", "seed"}``; loading one made
for another dataset (kind, count, identity), process count or seed is refused in one line.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

from scale_rae_core.errors import DataError

Position = tuple[int, int]  # (epoch, index in this rank's part of the epoch)


class EpochOrder:
    """This rank's resumable order over ``count`` items; see the module docstring."""

    def __init__(self, count: int, *, kind: str, tag: str, where: str, shuffle: bool, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = True,
                 identity: dict[str, Any] | None = None) -> None:
        if count < world_size:
            raise DataError(f"{where}: {count} items cannot be split across {world_size} processes; add data")
        self.count, self.kind, self.tag, self.where = count, kind, tag, where
        self.shuffle, self.rank, self.world_size, self.seed = shuffle, rank, world_size, seed
        self.identity = dict(identity or {})
        if drop_last:
            per = count // world_size
            self.range = (rank * per, (rank + 1) * per)
        else:
            self.range = (rank * count // world_size, (rank + 1) * count // world_size)
        self.per_epoch = self.range[1] - self.range[0]  # items of this rank per epoch
        self.epoch, self.consumed = 0, 0

    def order(self, epoch: int) -> list[int]:
        """This rank's item indices of ``epoch``, in reading order."""
        order = list(range(self.count))
        if self.shuffle:
            random.Random(f"{self.tag}-{self.seed}-{epoch}").shuffle(order)
        return order[self.range[0] : self.range[1]]

    def items(self) -> Iterator[tuple[int, Position]]:
        """``(item index, (epoch, j))`` from the current position to the end of its epoch (the next epoch when the
        current one is finished). The position advances as items are taken."""
        if self.consumed >= self.per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0
        epoch, order = self.epoch, self.order(self.epoch)
        for j in range(self.consumed, len(order)):
            self.consumed = j + 1
            yield order[j], (epoch, j)

    def skip(self, count: int) -> None:
        """Continue the current epoch after its first ``count`` items, without reading them."""
        self.consumed = count

    def mark_consumed(self, positions: Iterable[Position]) -> None:
        for epoch, j in positions:
            if epoch > self.epoch:
                self.epoch, self.consumed = epoch, 0
            if epoch == self.epoch:
                self.consumed = max(self.consumed, j + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "consumed": self.consumed, "count": self.count,
                **self.identity, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if any(state.get(k) != v for k, v in self.state_dict().items() if k not in ("epoch", "consumed")):
            raise DataError(
                f"{self.where}: the checkpoint's data position was saved for other data, process count or seed; "
                "resume with the same --data, process count and run.seed"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
