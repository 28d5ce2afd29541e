"""The quality bars of the embedded default: the numbers a demo run's stages must reach."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bar:
    """A quality bar: ``stages[stage][key] >= minimum`` (``> minimum`` when ``strict``); ``fix`` says what to try
    when it is missed."""

    label: str
    stage: str
    key: str
    minimum: float
    strict: bool = False
    fix: str = "train longer (e.g. --set stage1.steps=..., or --retrain: the bundled model's recipe)"
    headroom_of: str = ""  # a rate in the same stage: the bar asks at most HEADROOM_SHARE of what it leaves (1 − rate)

    def minimum_for(self, info: dict[str, Any]) -> float:
        """The bar for one run: ``minimum``, or less where the run's ``headroom_of`` rate leaves less to gain."""
        rate = info.get(self.headroom_of) if self.headroom_of else None
        return self.minimum if rate is None else min(self.minimum, HEADROOM_SHARE * (1.0 - float(rate)))

    def met(self, value: float, minimum: float | None = None) -> bool:
        minimum = self.minimum if minimum is None else minimum
        return value > minimum if self.strict else value >= minimum


# A selection can only fix the samples that are wrong: at 98.6% per sample, best-of-k gains at most 1.4 points, so a
# fixed 5-point bar would refuse every model good enough for the 95% install bar. The gain bar is therefore 5 points
# or half of what the single samples miss, whichever is smaller.
HEADROOM_SHARE = 0.5


# The bars of the embedded default: what the demo's own model must reach in the demo's budget (BENCHMARKS.md records
# where the tiny recipe stands against them). Generation figures are rates over all k samples per prompt (36 × k
# draws; the first sample alone is 36 draws and swings ±7 points); the gain is best-of-k by the model's own reading
# (the demo's selector) minus a single sample, in points of colour+shape.
_DECODER = Bar("decoder held-out PSNR (dB)", "decoder", "psnr", 25.0, fix="train the decoder longer (--set decoder_training.steps=...)")
_DIT = Bar("class-conditional DiT: class accuracy of its samples (shapes reader)", "dit", "class_accuracy", 0.9,
           fix="train the class DiT longer (--set dit_training.steps=...)")
_POSITION = Bar("generation: position prompt match, mean over the k samples", "eval", "gen_position_mean", 0.97)


def _generation(minimum: float) -> Bar:
    return Bar("generation: colour + shape prompt match, mean over the k samples", "eval", "gen_colour_shape_mean", minimum)


def _understanding(minimum: float) -> Bar:
    return Bar("understanding: exact-match accuracy", "eval", "understanding", minimum)


_GAIN_LABEL = "best-of-k by self-verification minus a single sample (colour + shape)"
_GAIN = Bar(_GAIN_LABEL, "eval", "gain_colour_shape", 0.05, headroom_of="gen_colour_shape_mean")
# One demo run is one training seed: its gain over 36 prompts swings by ±7 points (the 95% interval), so the run
# asks what every seed must show — a selection never worse than a single sample —, and the 5-point mean over three
# training seeds is the benchmark's (BENCHMARKS.md).
_GAIN_PER_RUN = Bar(_GAIN_LABEL, "eval", "gain_colour_shape", 0.0)

QUALITY_BARS: tuple[Bar, ...] = (_DECODER, _DIT, _generation(0.9), _POSITION, _understanding(0.97), _GAIN_PER_RUN)
# What `srae demo --retrain --install` must reach before its model replaces the bundled one (the default --model of
# every command): stricter than the demo's, and only about the model that is installed (not the class DiT).
INSTALL_BARS: tuple[Bar, ...] = (_DECODER, _generation(0.95), _POSITION, _understanding(0.99), _GAIN)


def check_bars(stages: dict[str, dict[str, Any]], bars: tuple[Bar, ...] = QUALITY_BARS) -> list[dict[str, Any]]:
    """Each bar whose stage ran or was reused in ``stages``, with its value and whether it is met."""
    out = []
    for bar in bars:
        info = stages.get(bar.stage, {})
        value = info.get(bar.key)
        if value is not None:
            minimum = bar.minimum_for(info)
            out.append({"label": bar.label, "stage": bar.stage, "key": bar.key, "value": value,
                        "minimum": minimum, "strict": bar.strict, "ok": bar.met(value, minimum), "fix": bar.fix})
    return out
