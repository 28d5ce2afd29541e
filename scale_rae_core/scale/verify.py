"""Self-verification scores: how much the unified model itself believes a generated image fits its prompt.

Pure functions on logits and token ids (no model here); the scaling loop runs the three forward passes
and hands their outputs in. Definitions follow the reference (``scaling_experiment.py``), with V the
vocabulary size and p = softmax(logits):

* self-certainty of one next-token distribution: ``conf = -mean_v log(V * p_v)`` = KL(uniform || p) >= 0;
  0 for a uniform distribution, larger when peaked. Computed with log_softmax, so it stays finite where
  the reference's ``log(V * softmax)`` underflows to -inf.
* **answer** (question ``VERIFY_QUESTION`` about the image, greedy answer): scanning the generated tokens,
  the *last* yes-token sets ``yes_logit`` (the raw logit of the chosen token at that step) and
  ``yes_conf_score`` (conf at that step); likewise for no. ``answer`` = "yes" if any yes-token appeared
  (even if a no-token did too), "no" if only no-tokens, else "uncertain"; absent values are 0;
  ``score`` = 1 for "yes" else 0; ``response_conf_score`` = mean conf over all generated steps.
  Yes-tokens are the ids of yes/Yes/YES with and without a leading space, no-tokens likewise; a variant
  that the tokenizer splits into several pieces is left out (its pieces, e.g. "Y", are not answers).
* **prompt_loss / prompt_conf_score** (caption question ``CAPTION_QUESTION`` + the raw prompt tokens,
  teacher-forced): given the logits at the L prompt positions, ``prompt_loss`` = mean cross-entropy of
  prompt tokens 2..L (the first prompt token is not scored), ``prompt_conf_score`` = mean conf over the
  L positions.
* **image_conf_score**: mean conf over the image positions' next-token distributions when the image
  is fed back after the generation prompt and the generated text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from scale_rae_core.errors import DataError

YES_VARIANTS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_VARIANTS = ("no", "No", "NO", " no", " No", " NO")


def answer_token_ids(tokenizer: Any, variants: Sequence[str]) -> frozenset[int]:
    """Ids of the variants that the tokenizer encodes as exactly one token."""
    ids: set[int] = set()
    for variant in variants:
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    return frozenset(ids)


def yes_no_ids(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """(yes-token ids, no-token ids) of a tokenizer."""
    yes, no = answer_token_ids(tokenizer, YES_VARIANTS), answer_token_ids(tokenizer, NO_VARIANTS)
    if not yes or not no:
        raise DataError("the tokenizer encodes none of yes/Yes/YES or no/No/NO as a single token; self-verification needs them")
    return yes, no


def _rows(logits: torch.Tensor, what: str) -> torch.Tensor:
    """(T, V) float logits from (T, V) or (1, T, V)."""
    if logits.ndim == 3 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.ndim != 2:
        raise ValueError(f"{what}: expected logits of shape (T, V), got {tuple(logits.shape)}")
    return logits.float()


def self_certainty(logits: torch.Tensor) -> torch.Tensor:
    """``-mean_v log(V * softmax(logits)_v)`` over the last axis: (..., V) -> (...)."""
    logits = logits.float()
    return -(F.log_softmax(logits, dim=-1).mean(dim=-1) + math.log(logits.shape[-1]))


@dataclass(frozen=True)
class AnswerScores:
    """Scores of one yes/no answer (field names as in the reference's metadata)."""

    answer: str
    score: int
    yes_logit: float
    no_logit: float
    yes_conf_score: float
    no_conf_score: float
    response_conf_score: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_scores(
    generated_ids: Sequence[int] | torch.Tensor,
    step_logits: torch.Tensor,
    yes_ids: frozenset[int],
    no_ids: frozenset[int],
) -> AnswerScores:
    """Score a greedy answer: ``generated_ids`` (T,) and the logits (T, V) each token was chosen from."""
    ids = [int(t) for t in (generated_ids.reshape(-1).tolist() if isinstance(generated_ids, torch.Tensor) else generated_ids)]
    logits = _rows(step_logits, "answer_scores")
    if logits.shape[0] != len(ids):
        raise ValueError(f"answer_scores: {len(ids)} generated tokens but {logits.shape[0]} logit rows")
    conf = self_certainty(logits)  # (T,)
    yes_logit = no_logit = yes_conf = no_conf = None
    for step, token in enumerate(ids):
        if token in yes_ids:
            yes_logit, yes_conf = float(logits[step, token]), float(conf[step])
        if token in no_ids:
            no_logit, no_conf = float(logits[step, token]), float(conf[step])
    answer = "yes" if yes_logit is not None else "no" if no_logit is not None else "uncertain"
    return AnswerScores(
        answer=answer,
        score=int(answer == "yes"),
        yes_logit=yes_logit or 0.0,
        no_logit=no_logit or 0.0,
        yes_conf_score=yes_conf or 0.0,
        no_conf_score=no_conf or 0.0,
        response_conf_score=float(conf.mean()) if ids else 0.0,
    )


def prompt_scores(prompt_logits: torch.Tensor, prompt_ids: Sequence[int] | torch.Tensor) -> tuple[float, float]:
    """(prompt_loss, prompt_conf_score) from the logits at the L prompt positions and the L prompt ids."""
    logits = _rows(prompt_logits, "prompt_scores")
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(logits.device)
    if logits.shape[0] != ids.shape[0]:
        raise ValueError(f"prompt_scores: {ids.shape[0]} prompt tokens but {logits.shape[0]} logit rows")
    if ids.shape[0] < 2:
        raise DataError("the prompt tokenises to fewer than 2 tokens; prompt_loss scores tokens 2..L")
    loss = F.cross_entropy(logits[:-1], ids[1:])  # position i predicts token i + 1
    return float(loss), float(self_certainty(logits).mean())


def image_conf(image_logits: torch.Tensor) -> float:
    """image_conf_score: mean self-certainty over the image positions' next-token logits (N, V)."""
    logits = _rows(image_logits, "image_conf")
    if logits.shape[0] == 0:
        raise ValueError("image_conf: no image positions")
    return float(self_certainty(logits).mean())


def judge_record(
    answer: AnswerScores,
    *,
    prompt_loss: float,
    prompt_conf_score: float,
    image_conf_score: float,
    question: str,
    response: str,
    gen_output_text: str,
) -> dict[str, Any]:
    """One sample's entry of ``text_responses`` in the reference's metadata layout."""
    return {
        "input_questions": [question],
        "gen_output_text": gen_output_text,
        "responses": [response],
        "prompt_loss": prompt_loss,
        "prompt_conf_score": prompt_conf_score,
        "image_conf_score": image_conf_score,
        **answer.as_dict(),
    }
