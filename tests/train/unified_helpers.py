"""Helpers for the unified-training tests: a tiny profile, shapes data, and an in-memory sample reader.

``ListReader`` stands in for the packed/JSONL readers where a test needs a reader whose order is known:
it reads a shapes-world ``conversations.jsonl`` into memory, deals sample ``i`` to rank ``i % world_size``
and keeps its position as the index of the next sample, so ``state_dict`` / ``load_state_dict`` resume it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from scale_rae_core.config import load_profile
from scale_rae_core.data.sample import Sample

TINY_OVERRIDES = [
    "model.llm.preset=tiny", "model.dit.preset=tiny",
    "stage1.steps=6", "stage1.global_batch_size=4", "stage1.micro_batch_size=2", "stage1.seq_len=112",
    "stage1.warmup_ratio=0.2", "stage1.lr=1e-3", "stage1.head_lr=1e-3",
    "stage2.steps=2", "stage2.global_batch_size=4", "stage2.micro_batch_size=2", "stage2.seq_len=112",
    "checkpoint.every_steps=2", "checkpoint.keep=2", "output.log_every=1", "output.eval_every=0", "output.progress=false",
    "decoder_training.micro_batch_size=16",
]


def tiny_profile(*extra: str, procs: int = 1):
    return load_profile("tiny-cpu", [*TINY_OVERRIDES, f"backend.procs_per_node={procs}", *extra])


class ListReader:
    def __init__(self, path: str | Path, *, rank: int = 0, world_size: int = 1, **_: Any) -> None:
        path = Path(path)
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.root = path.parent
        self.rank, self.world = rank, world_size
        self.index = rank  # next global index this rank reads

    def __iter__(self):
        while self.index < len(self.rows):
            row = self.rows[self.index]
            self.index += self.world
            image = Image.open(self.root / row["image"]).convert("RGB") if row.get("image") else None
            yield Sample(row.get("id", str(self.index)), image, row["conversations"], row.get("metadata", {}))
        self.index = self.rank  # next epoch starts over

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def list_source(path, *, image_folder="", rank=0, world_size=1, seed=0, shuffle_buffer=0):
    return ListReader(path, rank=rank, world_size=world_size)


def use_list_reader(monkeypatch) -> None:
    import scale_rae_core.train.unified as unified
    import scale_rae_core.train.unified_eval as unified_eval

    monkeypatch.setattr(unified, "open_source", list_source)
    monkeypatch.setattr(unified_eval, "open_source", list_source)
