"""Held-out evaluation during unified training: answer CE on understanding samples, flow loss on generation.

Two fixed batches are read once from ``data.eval`` (the same on every process): up to ``micro_batch_size``
understanding samples (an image in the user turn) and as many generation samples (an image in the answer).

* ``eval_answer_ce``: cross-entropy over the answer's own tokens only — the supervised assistant tokens minus
  the ``<|im_start|>assistant\\n`` header and the closing ``<|im_end|>\\n`` (which are trivially predictable).
* ``eval_flow``: the flow loss over the answer images with fixed times and noise (a seeded generator), so
  values at different steps are comparable; ``eval_gen_ce``: CE of the generation samples (prompt → ``<im_start>``).
* ``eval_flow_mismatched``: the same flow loss with every target image conditioned on the *previous* sample's
  prompt (same images, times and noise per row). Its excess over ``eval_flow`` is what the prompt tells the head; about 0 means the
  head ignores the prompt (it then draws the same image for every prompt).

The model runs in eval mode (no condition dropout) without gradients; training RNG streams are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import StageSettings
from scale_rae_core.errors import DataError
from scale_rae_core.models.llm import IGNORE_INDEX
from scale_rae_core.models.tokenizer import TURN_END, TURN_START
from scale_rae_core.train.unified_data import MicroBatcher, Prepared, encode_and_collate, open_source

EVAL_SEED = 1234
MAX_SCAN = 4096  # samples read at most while looking for both kinds


def answer_only_labels(p: Prepared, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Labels with everything but the answer text masked (single-assistant-turn samples)."""
    header = len(tokenizer(f"{TURN_START}assistant\n", add_special_tokens=False)["input_ids"])
    trailer = len(tokenizer(f"{TURN_END}\n", add_special_tokens=False)["input_ids"])
    labels = list(p.tokens.labels)
    supervised = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    keep = set(supervised[header : len(supervised) - trailer])
    return [t if i in keep else IGNORE_INDEX for i, t in enumerate(labels)]


@dataclass
class EvalBatches:
    understanding: dict[str, torch.Tensor] | None
    generation: dict[str, torch.Tensor] | None
    device: torch.device

    @classmethod
    def build(
        cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, num_image_tokens: int, settings: StageSettings,
        encoder: torch.nn.Module, backend: Backend, image_folder: str = "",
    ) -> EvalBatches:
        reader = open_source(path, image_folder=image_folder, rank=0, world_size=1, seed=0, shuffle_buffer=0)
        batcher = MicroBatcher(reader, tokenizer, num_image_tokens, settings.seq_len, encoder.input_size)
        size = settings.micro_batch_size
        und: list[Prepared] = []
        gen: list[Prepared] = []
        for _ in range(MAX_SCAN):
            if len(und) >= size and len(gen) >= size:
                break
            (p,) = batcher.next_batch(1)
            if batcher.epoch > 0:
                break
            if p.task == "understanding" and len(und) < size:
                p.tokens.labels = answer_only_labels(p, tokenizer)
                und.append(p)
            elif p.task == "generation" and len(gen) < size:
                gen.append(p)
        if not und and not gen:
            raise DataError(f"data.eval = {path}: no understanding or generation sample fits in seq_len {settings.seq_len}")
        pad = tokenizer.pad_token_id
        dev = backend.device
        return cls(
            encode_and_collate(und, encoder, settings.seq_len, pad, dev) if und else None,
            encode_and_collate(gen, encoder, settings.seq_len, pad, dev) if gen else None,
            dev,
        )

    @torch.no_grad()
    def run(self, model: torch.nn.Module, flow_weight: float) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            if self.understanding is not None:
                out["eval_answer_ce"] = float(self._loss(model, self.understanding, flow_weight).ce)
            if self.generation is not None:
                loss = self._loss(model, self.generation, flow_weight)
                out["eval_flow"] = float(loss.flow)
                out["eval_gen_ce"] = float(loss.ce)
                if self.generation["image_features"].shape[0] > 1:
                    # every text-side tensor moves one sample on; the images (and the draws per row) stay
                    swapped = {k: v if k == "image_features" else v.roll(1, 0) for k, v in self.generation.items()}
                    out["eval_flow_mismatched"] = float(self._loss(model, swapped, flow_weight).flow)
        finally:
            model.train(was_training)
        return out

    def _loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], flow_weight: float):
        """The model's loss with the flow times and noise from a fresh generator seeded EVAL_SEED: the same draws at
        every evaluation, and none from the global stream (a batch without answer images still runs the head on a
        placeholder row, and a global draw would move the training run)."""
        return model(batch, flow_weight=flow_weight, generator=torch.Generator(device=self.device).manual_seed(EVAL_SEED))
