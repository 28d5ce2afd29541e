"""A deterministic pixel scorer for the shapes world (``scale_rae_core.shapes.synth``).

``read_image`` says which colour, shape, position and size an image shows, using only numpy, and is
meant for generated images: blurry, noisy, JPEG-damaged or slightly off-colour. The steps:

1. background = the median colour of the two-pixel border;
2. foreground core = pixels (after a light blur against noise) whose distance from the background is
   over half the largest such distance; no core, or a faint one, means "no shape";
3. fill = the median RGB of the core's strongest pixels; colour = the reference colour nearest to it;
4. alpha = each pixel's coverage, projecting (pixel - background) onto (fill - background), inside a
   window around the core; area and centroid come from alpha, so blur (which keeps both) hardly moves
   them, and alpha is clipped only loosely so that noise averages out rather than adding area;
5. shape = the template (circle, square, apex-up triangle of the same area, centred on the centroid,
   rasterised with supersampling) closest to alpha after blurring both by the same small kernel;
6. position = the third of the width holding the centroid; size = the template's box side against
   ``SIZE_THRESHOLD`` of the image side.

``parse_prompt`` pulls the attribute words out of a caption or prompt, and ``match`` compares the two.
``read_class`` and ``class_accuracy`` judge images of the class-conditional task (``SHAPE_CLASSES``: colour x
shape, e.g. ``red_circle``) the same way.
:class:`ShapesScorer` is ``match`` as a test-time-scaling scorer (``scale.scorers``); srae registers it as the
``shapes`` entry point of the ``srae.scorers`` group, so ``srae scale --scorer shapes`` finds it by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from scale_rae_core.data.images import as_rgb
from scale_rae_core.errors import DataError
from scale_rae_core.shapes.synth import COLOURS, SHAPE_CLASSES, SHAPES, SIZE_THRESHOLD

if TYPE_CHECKING:  # torch is only needed by callers that pass tensors
    import torch


MIN_CONTRAST = 0.15  # the strongest foreground pixel must differ from the background by this (RGB in [0, 1])
MIN_FOREGROUND = 0.002  # ... and the core must cover this fraction of the image
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / box side**2
_REFERENCE = np.array(list(COLOURS.values()), dtype=np.float64) / 255.0  # (4, 3)


@dataclass(frozen=True)
class ShapeReading:
    """What ``read_image`` saw. Attribute fields are None when the image shows no clear shape."""

    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    foreground: float  # shape area as a fraction of the image
    confidence: float  # 0..1: how much better the chosen shape template fits than the runner-up


NO_SHAPE = ShapeReading(None, None, None, None, 0.0, 0.0)


def _as_rgb_array(img: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image, an (H, W, 3) array or a (3, H, W) tensor."""
    if isinstance(img, Image.Image):
        return np.asarray(as_rgb(img), dtype=np.float64) / 255.0
    if hasattr(img, "detach"):  # a torch tensor: (3, H, W) or (1, 3, H, W), values in [0, 1]
        array = img.detach().cpu().float().numpy()
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3 or array.shape[0] != 3:
            raise DataError(f"read_image got a tensor of shape {tuple(array.shape)}; pass one image as (3, H, W)")
        array = array.transpose(1, 2, 0)
    elif isinstance(img, np.ndarray):
        array = img
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise DataError(f"read_image got an array of shape {array.shape}; pass one image as (H, W, 3)")
        array = array[..., :3]
        if array.dtype == np.uint8:
            return array.astype(np.float64) / 255.0
    else:
        raise DataError(f"read_image got {type(img).__name__}; pass a PIL image, numpy array or torch tensor")
    array = np.asarray(array, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    if low < -0.5 or high > 1.5:
        raise DataError(
            f"read_image got float values in [{low:.2f}, {high:.2f}]; pass values in [0, 1] "
            "(map [-1, 1] with x * 0.5 + 0.5, or 0..255 as uint8)"
        )
    return np.clip(array, 0.0, 1.0)  # decoders overshoot [0, 1] slightly; clamp as any image writer would


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D (or channels-last 3-D) array, edges replicated."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        a = sum(w * np.take(padded, range(k, k + n), axis=axis) for k, w in enumerate(taps))
    return a


def _template(shape: str, side: float, cx: float, cy: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Coverage (0..1) of ``shape`` with box ``side``, centroid (cx, cy), on the pixel grid ys x xs."""
    sub = (np.arange(4) + 0.5) / 4  # 4x4 samples per pixel
    y = (ys[:, None] + sub[None, :]).reshape(-1)[:, None]  # (h * 4, 1)
    x = (xs[:, None] + sub[None, :]).reshape(-1)[None, :]  # (1, w * 4)
    half = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # apex-up triangle; its centroid lies side / 6 below the box centre
        top = cy - half - side / 6
        inside = (y <= top + side) & (np.abs(x - cx) <= (y - top) / 2)
    h, w = len(ys), len(xs)
    return inside.reshape(h, 4, w, 4).mean(axis=(1, 3))


def read_image(img: Image.Image | np.ndarray | torch.Tensor) -> ShapeReading:
    """Read colour, shape, position and size of the one shape in ``img`` (see the module docstring)."""
    rgb = _as_rgb_array(img)  # (H, W, 3)
    height, width = rgb.shape[:2]
    if min(height, width) < 8:
        raise DataError(f"read_image got a {width}x{height} image; the scorer needs at least 8x8 pixels")
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3),
                             rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)

    side_px = float(np.sqrt(height * width))
    distance = np.linalg.norm(_blur(rgb, max(0.7, side_px / 96)) - background, axis=2)  # (H, W)
    peak = float(distance.max())
    core = distance > 0.5 * peak
    if peak < MIN_CONTRAST or core.mean() < MIN_FOREGROUND:
        return NO_SHAPE

    strongest = rgb[distance > 0.8 * peak]  # (N, 3) the shape's interior
    fill = np.median(strongest, axis=0)
    colour_index = int(np.argmin(np.linalg.norm(_REFERENCE - fill, axis=1)))

    # Coverage inside a window around the core, wide enough for every template of the same area.
    rows, cols = np.nonzero(core)
    margin = int(np.ceil(2 + 0.35 * max(np.ptp(rows), np.ptp(cols)) + 0.05 * side_px))
    y0, y1 = max(0, rows.min() - margin), min(height, rows.max() + margin + 1)
    x0, x1 = max(0, cols.min() - margin), min(width, cols.max() + margin + 1)
    direction = fill - background
    # Clipped loosely, not to [0, 1], so background noise averages out instead of adding area.
    alpha = np.clip((rgb[y0:y1, x0:x1] - background) @ direction / float(direction @ direction), -0.5, 1.5)
    area = float(alpha.sum())
    if area <= 1.0:
        return NO_SHAPE
    ys, xs = np.arange(y0, y1, dtype=np.float64), np.arange(x0, x1, dtype=np.float64)
    cy = float((alpha.sum(axis=1) * (ys + 0.5)).sum() / area)
    cx = float((alpha.sum(axis=0) * (xs + 0.5)).sum() / area)
    if not (y0 <= cy <= y1 and x0 <= cx <= x1):  # negative coverage (darker than the background towards the fill's
        positive = np.clip(alpha, 0.0, None)    # opposite) outweighed most of the area: its centroid is outside
        cy = float((positive.sum(axis=1) * (ys + 0.5)).sum() / positive.sum())  # the window; count coverage only
        cx = float((positive.sum(axis=0) * (xs + 0.5)).sum() / positive.sum())

    sigma = max(1.0, side_px / 64)
    smooth = _blur(alpha, sigma)
    errors = {}
    for shape in SHAPES:
        side = np.sqrt(area / FILL[shape])
        errors[shape] = float(((_blur(_template(shape, side, cx, cy, ys, xs), sigma) - smooth) ** 2).sum())
    best, runner_up = sorted(errors, key=errors.get)[:2]
    confidence = 1.0 - errors[best] / errors[runner_up] if errors[runner_up] > 0 else 0.0
    box_side = np.sqrt(area / FILL[best]) / side_px

    return ShapeReading(
        colour=list(COLOURS)[colour_index],
        shape=best,
        position=("left", "center", "right")[min(2, max(0, int(3 * cx / width)))],
        size="large" if box_side > SIZE_THRESHOLD else "small",
        foreground=area / (height * width),
        confidence=float(confidence),
    )


def read_class(img: Image.Image | np.ndarray | torch.Tensor) -> str | None:
    """The colour x shape class ``img`` shows, as a ``SHAPE_CLASSES`` name (``red_circle``); None when no shape."""
    reading = read_image(img)
    return None if reading.colour is None else f"{reading.colour}_{reading.shape}"


def class_accuracy(images: Sequence[Image.Image | np.ndarray | torch.Tensor], labels: Sequence[str]) -> dict[str, Any]:
    """How many ``images`` show their class ``labels[i]`` (``SHAPE_CLASSES`` names), by ``read_class``.

    Returns ``accuracy`` (the share over all images), ``per_class`` (the share among the images of each class
    that has any) and ``read`` (the class read from each image, None where no shape was seen, which counts as
    wrong).
    """
    if len(images) != len(labels) or not labels:
        raise DataError(f"class_accuracy got {len(images)} images and {len(labels)} labels; pass one label per image, "
                        "at least one")
    unknown = sorted(set(labels) - set(SHAPE_CLASSES))
    if unknown:
        raise DataError(f"class label {unknown[0]!r} is not a shapes class; use one of {', '.join(SHAPE_CLASSES)}")
    read = [read_class(img) for img in images]
    right: dict[str, list[bool]] = {}
    for label, seen in zip(labels, read, strict=True):
        right.setdefault(label, []).append(seen == label)
    per_class = {c: sum(right[c]) / len(right[c]) for c in SHAPE_CLASSES if c in right}
    return {"accuracy": sum(r == y for r, y in zip(read, labels, strict=True)) / len(labels), "per_class": per_class,
            "read": read}


_WORDS = {
    "colour": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow"},
    "shape": {
        "circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
        "square": "square", "squares": "square",
        "triangle": "triangle", "triangles": "triangle",
    },
    "position": {
        "left": "left", "right": "right",
        "center": "center", "centre": "center", "centered": "center", "centred": "center", "middle": "center",
    },
    "size": {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"},
}
_TOKEN = re.compile(r"[a-z]+")


def parse_prompt(text: str) -> dict[str, str | None]:
    """The colour, shape, position and size a prompt or caption names (None where it names none).

    Words are matched whole and case-insensitively, with common variants ("centre", "middle", "big",
    "tiny", plurals); where a prompt names two values of one attribute the first wins.
    """
    found: dict[str, str | None] = dict.fromkeys(_WORDS)
    for token in _TOKEN.findall(text.lower()):
        for attribute, words in _WORDS.items():
            if found[attribute] is None and token in words:
                found[attribute] = words[token]
    return found


def match(prompt: str, img: Image.Image | np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Score ``img`` against ``prompt``.

    Returns the ``expected`` attributes (from ``parse_prompt``), the ``reading``, one entry per attribute
    (True/False, or None where the prompt does not name it), ``colour_shape`` (colour and shape both
    right) and ``full`` (every attribute the prompt names right: colour, shape, and position and size
    when named). The prompt must name a colour and a shape.
    """
    expected = parse_prompt(prompt)
    if expected["colour"] is None or expected["shape"] is None:
        raise DataError(
            f"prompt {prompt!r} names no colour or no shape; the shapes scorer needs prompts like "
            "'a red circle on the left'"
        )
    reading = read_image(img)
    result: dict[str, Any] = {"expected": expected, "reading": reading}
    for attribute, value in expected.items():
        result[attribute] = None if value is None else getattr(reading, attribute) == value
    result["colour_shape"] = bool(result["colour"] and result["shape"])
    result["full"] = all(result[attribute] is not False for attribute in _WORDS) and result["colour_shape"]
    return result


class ShapesScorer:
    """The pixel scorer as a scaling scorer: 1.0 when every attribute the prompt names is right, else 0.0.

    That is colour and shape, plus position and size where the prompt names them (``match(...)["full"]``); the
    offline benchmarks use it as ground truth.
    """

    name = "shapes"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        del device  # pure numpy

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        return torch.tensor([float(match(p, im)["full"]) for p, im in zip(prompts, images, strict=True)])
