"""Batches for unified training: samples → sequences + pixels → (after the frozen encoder) a collated batch.

The readers (:mod:`scale_rae_core.data.webdataset` for packed shards, :mod:`scale_rae_core.data.jsonl` for
reference JSONL) yield :class:`~scale_rae_core.data.sample.Sample` objects. :class:`MicroBatcher` pulls them
one at a time in this process, renders each conversation with :func:`build_sample` (a sample that does not
fit in ``seq_len`` is skipped and counted, as the reference does; so is one whose ``<image>`` markers do not
match its image), and hands out micro-batches of ``micro_batch_size`` samples with their pixels.

Position: :meth:`MicroBatcher.state_dict` is the reader's own state after the last sample taken plus the
epoch and the skip counters; a checkpoint stores it per rank, so a resumed run reads exactly the samples the
uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from scale_rae_core.data.images import square_pixels
from scale_rae_core.data.sample import Sample
from scale_rae_core.errors import DataError
from scale_rae_core.models.llm import SequenceTooLongError, TokenizedSample, build_sample, collate
from scale_rae_core.prompts import IMAGE_MARKER, with_images


class SampleSource(Protocol):
    """What the readers provide: iteration over this rank's samples, and a resumable position."""

    def __iter__(self) -> Iterator[Sample]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def open_source(path: str | Path, *, image_folder: str, rank: int, world_size: int, seed: int, shuffle_buffer: int) -> SampleSource:
    """A reader for ``path``: a packed folder / ``wds_manifest.json`` (WebDataset) or a reference ``.jsonl``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder; pass a packed folder (srae data pack), its wds_manifest.json or a JSONL")
    if path.suffix == ".jsonl":
        from scale_rae_core.data.jsonl import JsonlReader

        folder = Path(image_folder).expanduser() if image_folder else None
        return JsonlReader(path, folder, rank=rank, world_size=world_size, seed=seed)
    from scale_rae_core.data.webdataset import WebDatasetReader

    return WebDatasetReader(path, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer)


# A sample's image → (3, S, S) in [0, 1], squashed to a square like SigLIP's processor: the preprocessing
# `understand` uses too. (train/unified.py imports it under this name.)
pil_to_pixels = square_pixels


@dataclass
class Prepared:
    """One usable sample: its token sequence and its pixels (None for text-only)."""

    tokens: TokenizedSample
    pixels: torch.Tensor | None  # (3, S, S)
    task: str  # "generation" (has an answer image), "understanding" (a context image) or "text"


@dataclass
class SkipCounts:
    too_long: int = 0
    image_mismatch: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"too_long": self.too_long, "image_mismatch": self.image_mismatch}


def prepare(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int, seq_len: int, input_size: int
) -> Prepared:
    """Tokenise one sample; raises SequenceTooLongError, or DataError when ``<image>`` count and image disagree.

    As the reference loader does, a sample with an image but no ``<image>`` marker gets ``"<image>\\n"``
    in front of its first turn.
    """
    turns = [dict(t) for t in sample.conversations]
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if sample.image is not None and markers == 0 and turns:
        turns[0]["value"] = with_images(turns[0]["value"])
        markers = 1
    if markers != (sample.image is not None):
        raise DataError(f"sample {sample.key}: {markers} <image> markers but {int(sample.image is not None)} image(s)")
    tokens = build_sample(turns, tokenizer, num_image_tokens, seq_len)
    if tokens.answer_image_mask:
        task = "generation" if tokens.answer_image_mask[0] else "understanding"
    else:
        task = "text"
    pixels = square_pixels(sample.image, input_size) if sample.image is not None else None
    return Prepared(tokens, pixels, task)


@dataclass
class MicroBatcher:
    """Micro-batches of usable samples from one rank's reader, epoch after epoch."""

    source: SampleSource
    tokenizer: PreTrainedTokenizerBase
    num_image_tokens: int
    seq_len: int
    input_size: int
    epoch: int = 0
    skipped: SkipCounts = field(default_factory=SkipCounts)
    _it: Iterator[Sample] | None = None
    _used_this_epoch: int = 0

    def _next_sample(self) -> Sample:
        for _ in range(2):
            if self._it is None:
                if hasattr(self.source, "set_epoch"):
                    self.source.set_epoch(self.epoch)
                self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                if self._used_this_epoch == 0:
                    break
                self._it = None
                self.epoch += 1
                self._used_this_epoch = 0
        raise DataError(
            f"the data has no usable sample for this process (skipped: {self.skipped.too_long} longer than seq_len "
            f"{self.seq_len}, {self.skipped.image_mismatch} with <image> markers not matching their image); "
            "raise stage.seq_len or check the data"
        )

    def next_batch(self, size: int) -> list[Prepared]:
        out: list[Prepared] = []
        while len(out) < size:
            sample = self._next_sample()
            try:
                out.append(prepare(sample, self.tokenizer, self.num_image_tokens, self.seq_len, self.input_size))
            except SequenceTooLongError:
                self.skipped.too_long += 1
                continue
            except DataError:
                self.skipped.image_mismatch += 1
                continue
            self._used_this_epoch += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "used_this_epoch": self._used_this_epoch,
            "skipped": self.skipped.as_dict(),
            "reader": self.source.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._used_this_epoch = int(state.get("used_this_epoch", 0))
        self.skipped = SkipCounts(**state.get("skipped", {}))
        self.source.load_state_dict(state["reader"])
        self._it = None


def encode_and_collate(
    prepared: list[Prepared],
    encoder: torch.nn.Module,
    seq_len: int,
    pad_id: int,
    device: torch.device,
    put: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Encode the batch's images with the frozen encoder (no grad, on ``device``) and collate to ``seq_len``.

    Returns the :func:`collate` tensors, ``image_features`` (B, 1, N, C) included, each placed with ``put``
    (the backend's ``shard_batch``: on xla it also shards the batch axis; default: moved to ``device``).
    """
    put = put or (lambda t: t.to(device))
    batch = {k: put(v) for k, v in collate([p.tokens for p in prepared], seq_len, pad_id, max_images=1).items()}
    n_tok = prepared[0].tokens.num_image_tokens
    features = torch.zeros(len(prepared), 1, n_tok, encoder.hidden_size, device=device)  # (B, M=1, N, C)
    with_image = [i for i, p in enumerate(prepared) if p.pixels is not None]
    if with_image:
        pixels = torch.stack([prepared[i].pixels for i in with_image]).to(device)  # (n_img, 3, S, S)
        with torch.no_grad():
            features[with_image, 0] = encoder(pixels).float()  # (n_img, N, C)
    batch["image_features"] = put(features)
    return batch
