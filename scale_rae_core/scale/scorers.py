"""Pluggable image scorers for test-time scaling: a tiny protocol and a registry.

A scorer has a ``name`` and ``score(prompts, images) -> Tensor`` of shape (N,), higher is better, one
prompt per image. The scaling loop and ``srae verify`` only see this protocol, so adding PickScore or HPS
is one registered factory, without touching the loop::

    from scale_rae_core.scale.scorers import register_scorer

    @register_scorer("pickscore")
    def _pickscore(device="cpu", **options):
        return MyPickScore(device)        # any object with .name and .score(prompts, images)

A scorer is found by name among (1) the registered ones (built in: ``image_reward``), (2) entry points in the
``srae.scorers`` group of any installed package (srae's own: ``shapes``, the shapes world's pixel scorer,
``scale_rae_core.shapes.scorer.ShapesScorer``), (3) ``package.module:factory``. Factories take ``device`` and
keyword options and return a scorer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from scale_rae_core.errors import ConfigError, DataError, SraeError

ENTRY_POINT_GROUP = "srae.scorers"


@runtime_checkable
class Scorer(Protocol):
    """Scores images against prompts; higher is better."""

    name: str

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        """(N,) float scores for N (prompt, image) pairs."""
        ...


ScorerFactory = Callable[..., Scorer]
_REGISTRY: dict[str, ScorerFactory] = {}


def register_scorer(name: str, factory: ScorerFactory | None = None) -> Any:
    """Register ``factory`` under ``name`` (usable as a decorator); a second registration replaces the first."""

    def add(f: ScorerFactory) -> ScorerFactory:
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def available_scorers() -> list[str]:
    """Registered names plus installed ``srae.scorers`` entry points."""
    from importlib.metadata import entry_points

    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _factory(name: str) -> ScorerFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"scorer {name!r}: cannot import {attr} from {module} ({e})") from e
    raise ConfigError(
        f"unknown scorer {name!r}; choose one of {', '.join(available_scorers())} or give package.module:factory"
    )


def build_scorer(name: str, device: str | torch.device = "cpu", **options: Any) -> Scorer:
    """Build the scorer called ``name`` (see the module docstring for where names are looked up)."""
    factory = _factory(name)
    try:
        scorer = factory(device=device, **options)
    except SraeError:
        raise
    except Exception as exc:  # a user's factory that does not take (device=, **options) or fails inside
        first = " ".join(str(exc).split())[:160]
        raise ConfigError(
            f"scorer {name!r}: its factory failed ({type(exc).__name__}: {first}); a factory takes device= and keyword "
            "options and returns an object with .name and .score(prompts, images)"
        ) from None
    if not isinstance(scorer, Scorer):
        raise ConfigError(f"scorer {name!r} built a {type(scorer).__name__}, which has no .name and .score(prompts, images)")
    return scorer


def score_batch(scorer: Scorer, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[float]:
    """Run ``scorer`` and check its output: one finite float per image."""
    if len(prompts) != len(images):
        raise DataError(f"scorer {scorer.name}: {len(prompts)} prompts for {len(images)} images")
    out = torch.as_tensor(scorer.score(list(prompts), list(images))).float().reshape(-1).cpu()
    if out.numel() != len(images):
        raise DataError(f"scorer {scorer.name} returned {out.numel()} scores for {len(images)} images")
    return [float(x) for x in out]


# ----------------------------------------------------------------------------------------------- built-ins
class ImageRewardScorer:
    """ImageReward-v1.0 (normalised reward, roughly N(0, 1) over the authors' test set)."""

    name = "image_reward"

    def __init__(self, weights: str = "THUDM/ImageReward", device: str | torch.device = "cpu",
                 med_config: str | None = None, tokenizer: str | None = None, batch_size: int = 16) -> None:
        from scale_rae_core.scale.imagereward import ImageReward

        self.model = ImageReward.from_pretrained(weights, med_config, tokenizer=tokenizer, device=device)
        self.batch_size = batch_size

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.score(list(prompts), list(images), batch_size=self.batch_size)


register_scorer("image_reward", ImageRewardScorer)
