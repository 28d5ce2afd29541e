"""Synthetic `srae eval shapes` records from chosen readings, for tests that need a record but not a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scale_rae_core.shapes.bench import ATTRIBUTES, generation_figures
from scale_rae_core.shapes.scorer import parse_prompt

Seen = tuple[str | None, str | None, str | None]  # (colour, shape, position) the reader saw


def judged(prompt: str, index: int, seen: Seen, png: Path | None = None) -> dict[str, Any]:
    """One sample as ``evaluate_generation`` records it, had the reader seen ``seen`` for ``prompt``."""
    asked, read = parse_prompt(prompt), dict(zip(ATTRIBUTES, seen, strict=True))
    verdict = {a: read[a] == asked[a] for a in ATTRIBUTES}
    verdict["colour_shape"] = verdict["colour"] and verdict["shape"]
    verdict["full"] = verdict["colour_shape"] and verdict["position"]
    return {"index": index, "png": str(png or Path(f"/missing/{index:05d}.png")), **verdict, "read": read}


def prompt_row(prompt: str, seen: list[Seen], selected: int = 0) -> dict[str, Any]:
    return {"prompt": prompt, "folder": "/missing", "samples": [judged(prompt, i, s) for i, s in enumerate(seen)],
            "selected": selected, "answers": [None] * len(seen)}


def record(rows: list[dict[str, Any]], *, with_intervals: bool = True) -> dict[str, Any]:
    """A whole benchmark record around ``rows`` (``prompt_row``s) with a fixed understanding part: 22 of 24 right.

    ``with_intervals=False`` gives a record as written before the intervals and the confusion existed."""
    generation = {"n_prompts": len(rows), "k": len(rows[0]["samples"]), "seed": 0, "selector": "answer_conf",
                  "verify_on": "latent", **generation_figures(rows), "prompts": rows}
    understanding = {"n_images": 6, "n_questions": 24, "accuracy": 22 / 24, "accuracy_ci95": [0.7415, 0.9768],
                     "by_attribute": {"colour": 1.0, "shape": 5 / 6, "position": 5 / 6, "size": 1.0},
                     "by_attribute_ci95": {"colour": [0.6097, 1.0], "shape": [0.4365, 0.9699],
                                           "position": [0.4365, 0.9699], "size": [0.6097, 1.0]},
                     "images": []}
    if not with_intervals:
        generation = {k: v for k, v in generation.items() if not k.endswith("_ci95") and k != "confusion"}
        understanding = {k: v for k, v in understanding.items() if not k.endswith("_ci95")}
    return {"benchmark": "shapes", "seed": 0, "generation": generation, "understanding": understanding}
