"""The "shapes" world: srae's embedded default dataset.

Every image holds exactly one coloured shape on a plain background:

- shape: circle, square or triangle (apex up, base and height equal);
- colour: red, green, blue or yellow (a pure-ish RGB value, jittered a little per image);
- position: left, center or right (the shape's centre sits at 0.2, 0.5 or 0.8 of the width, jittered by
  a few percent; its vertical position jitters around the middle);
- size: small or large (the shape's box is about 0.2 or 0.32 of the image side);
- background: white, light gray or cream, all far from the four colours.

``render`` draws a ``ShapeSpec`` with PIL at 4x supersampling and box-downsamples it, so edges are
antialiased at any ``image_size`` from 16 up. ``caption`` writes one of a few caption templates and
``questions`` the understanding Q/A pairs. ``synthesize`` writes a whole dataset in every input format
``srae data pack`` consumes::

    out_dir/
      captioned/000000.png  captioned/000000.txt  ...   images with sidecar captions
      captions.csv          columns image,caption; paths relative to out_dir
      captions.jsonl        {"image": "captioned/000000.png", "caption": "..."}
      conversations.jsonl   reference (LLaVA-style) records, thirteen per image: six generation samples
                            (human asks for the image in six wordings, gpt answers "<image>"), one
                            understanding sample per question (human "<image>\\n<question>", gpt the
                            answer), one caption ("Describe this image." → the caption) and two
                            verification samples (the self-verification question about a caption that
                            matches → "yes", and about one that differs in colour, shape or position → "no")
      classes/red_circle/000000.png ...   ImageNet-style class folders (label = colour_shape): the class-conditional
                            task of 12 classes, ``SHAPE_CLASSES``; all 12 folders always exist (empty when a
                            small split drew no image of a class), so the sorted folder names — the class index
                            of ``srae data pack --format classes`` and ``data.labelled`` — are the same for
                            every split and size
      heldout/              the same layout again, for evaluation only

The held-out split is a separate folder drawn from its own random stream, so no held-out image (or
caption) is ever written into the training files. Both splits cycle through the 72 combinations of
colour x shape x position x size in a shuffled order, so every combination is equally represented.
Everything is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from scale_rae_core.errors import DataError
from scale_rae_core.prompts import (
    CAPTION_QUESTION,
    IMAGE_MARKER,
    SHAPES_CAPTION_TEMPLATES,
    SHAPES_GENERATION_TEMPLATES,
    SHAPES_QUESTIONS,
    SHAPES_WHERE,
    VERIFY_QUESTION,
    with_images,
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, float] = {"left": 0.2, "center": 0.5, "right": 0.8}  # centre x, fraction of width
SIZES: dict[str, float] = {"small": 0.2, "large": 0.32}  # box side, fraction of the image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (222, 222, 222),
    "cream": (246, 240, 226),
}
SIZE_THRESHOLD = 0.26  # a box side above this fraction of the image side reads as "large"
# The class-conditional task: colour x shape, in sorted order (= the class index, as for any class-folder tree).
SHAPE_CLASSES: tuple[str, ...] = tuple(sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES))

COLOUR_JITTER = 15  # max per-channel offset of the shape colour, in 0..255 units
POSITION_JITTER = 0.03  # max horizontal offset of the centre, fraction of width
VERTICAL_JITTER = 0.08  # max vertical offset of the centre, fraction of height
SCALE_JITTER = 0.04  # max relative change of the box side
SUPERSAMPLE = 4

GENERATION_SAMPLES = 6  # generation records per image, each worded anew (half of all records)


@dataclass(frozen=True)
class ShapeSpec:
    """One image of the world: its attributes plus the exact (jittered) geometry and colour."""

    colour: str
    shape: str
    position: str
    size: str
    background: str = "white"
    rgb: tuple[int, int, int] | None = None  # None: the colour's reference RGB
    cx: float | None = None  # centre x as a fraction of width; None: the position's nominal x
    cy: float = 0.5  # centre y as a fraction of height
    side: float | None = None  # box side as a fraction of the image side; None: the size's nominal

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise DataError(f"ShapeSpec {name}={value!r} is not one of {', '.join(allowed)}; pick one of those")

    @property
    def label(self) -> str:
        """Class label for class-folder datasets, e.g. ``red_circle``."""
        return f"{self.colour}_{self.shape}"

    def attributes(self) -> dict[str, str]:
        """The named attributes (what captions, questions and metadata talk about)."""
        return {
            "colour": self.colour,
            "shape": self.shape,
            "position": self.position,
            "size": self.size,
            "background": self.background,
        }


def random_spec(
    rng: random.Random,
    colour: str | None = None,
    shape: str | None = None,
    position: str | None = None,
    size: str | None = None,
) -> ShapeSpec:
    """A spec with jittered colour and geometry; attributes not given are drawn from ``rng``."""
    nominal = ShapeSpec(  # validates any names given
        colour=colour or rng.choice(list(COLOURS)),
        shape=shape or rng.choice(SHAPES),
        position=position or rng.choice(list(POSITIONS)),
        size=size or rng.choice(list(SIZES)),
    )
    jitter = [rng.randint(-COLOUR_JITTER, COLOUR_JITTER) for _ in range(3)]
    rgb = tuple(min(255, max(0, c + j)) for c, j in zip(COLOURS[nominal.colour], jitter, strict=True))
    return ShapeSpec(
        colour=nominal.colour,
        shape=nominal.shape,
        position=nominal.position,
        size=nominal.size,
        background=rng.choice(list(BACKGROUNDS)),
        rgb=rgb,
        cx=POSITIONS[nominal.position] + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
        cy=0.5 + rng.uniform(-VERTICAL_JITTER, VERTICAL_JITTER),
        side=SIZES[nominal.size] * (1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)),
    )


def render(spec: ShapeSpec, image_size: int = 64) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
    if image_size < 16:
        raise DataError(f"image_size={image_size} is too small; use 16 or more (64 is the default)")
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    cx = (spec.cx if spec.cx is not None else POSITIONS[spec.position]) * big
    cy = spec.cy * big
    half = (spec.side if spec.side is not None else SIZES[spec.size]) * big / 2
    fill = spec.rgb if spec.rgb is not None else COLOURS[spec.colour]
    draw = ImageDraw.Draw(canvas)
    box = (cx - half, cy - half, cx + half, cy + half)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle, apex up: base and height both equal the box side
        draw.polygon([(cx - half, cy + half), (cx + half, cy + half), (cx, cy - half)], fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def caption(spec: ShapeSpec, rng: random.Random) -> str:
    """A caption for ``spec`` in one of the templates, chosen by ``rng``."""
    template = rng.choice(SHAPES_CAPTION_TEMPLATES)
    return template.format(where=SHAPES_WHERE[spec.position], **spec.attributes())


def questions(spec: ShapeSpec) -> list[tuple[str, str]]:
    """Understanding (question, answer) pairs: colour, shape, position and size."""
    values = spec.attributes()
    return [(question, values[attribute]) for question, attribute in SHAPES_QUESTIONS]


def hard_negative(spec: ShapeSpec, text: str, rng: random.Random) -> str:
    """``text`` (a short caption of ``spec``) with exactly one of colour, shape or position changed: a claim the
    image contradicts while the rest of it still fits."""
    attribute = rng.choice(("colour", "shape", "position"))
    table = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS}[attribute]
    other = rng.choice([v for v in table if v != getattr(spec, attribute)])
    old = SHAPES_WHERE[spec.position] if attribute == "position" else getattr(spec, attribute)
    new = SHAPES_WHERE[other] if attribute == "position" else other
    return text.replace(old, new, 1)


def verification_claims(spec: ShapeSpec, text: str, rng: random.Random) -> list[tuple[str, str]]:
    """[(claim, "yes"), (claim, "no")] for the verification question about one image: ``text`` itself (a short
    caption, what a prompt usually looks like) and a hard negative of it.

    Both go with the same image. With one claim per image a small model memorises the verdict per training image
    and answers held-out images with its prior (the 2026-11-22 long runs answered "no" to every question); a pair
    makes the answer depend on the claim.
    """
    return [(text, "yes"), (hard_negative(spec, text, rng), "no")]


def _split_specs(n: int, seed: int, split: str) -> list[tuple[ShapeSpec, str, str]]:
    """``n`` (spec, caption, generation prompt) triples, cycling through shuffled attribute combinations."""
    rng = random.Random(f"srae-shapes/{seed}/{split}")
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS, SIZES))
    samples: list[tuple[ShapeSpec, str, str]] = []
    while len(samples) < n:
        order = combos[:]
        rng.shuffle(order)
        for colour, shape, position, size in order[: n - len(samples)]:
            spec = random_spec(rng, colour, shape, position, size)
            text = caption(spec, rng)
            prompt = rng.choice(SHAPES_GENERATION_TEMPLATES).format(caption=text)
            samples.append((spec, text, prompt))
    return samples


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _conversation_records(image: str, spec: ShapeSpec, prompt: str, text: str,
                          split: str, stem: str, rng: random.Random) -> list[dict]:
    """The records of one image; ``rng`` (not the spec stream) picks the extra wordings and the verification."""
    metadata = {**spec.attributes(), "label": spec.label, "caption": text, "split": split}

    def record(suffix: str, human: str, gpt: str, task: str, **extra: str) -> dict:
        return {
            "id": f"{stem}-{suffix}",
            "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
            "metadata": {**metadata, **extra, "task": task},
        }

    records = [record("gen", prompt, IMAGE_MARKER, "generation")]
    for k in range(1, GENERATION_SAMPLES):  # more wordings of the same image: generation is the slow task to learn
        other = caption(spec, rng)
        records.append(record(f"gen{k}", rng.choice(SHAPES_GENERATION_TEMPLATES).format(caption=other), IMAGE_MARKER, "generation",
                              caption=other))
    for k, (question, answer) in enumerate(questions(spec)):
        records.append(record(f"q{k}", with_images(question), answer, "understanding"))
    records.append(record("caption", with_images(CAPTION_QUESTION), text, "understanding"))
    short = rng.choice(SHAPES_CAPTION_TEMPLATES[:2]).format(where=SHAPES_WHERE[spec.position], **spec.attributes())
    for k, (claim, verdict) in enumerate(verification_claims(spec, short, rng)):
        records.append(record(f"verify{k}", with_images(VERIFY_QUESTION.format(prompt=claim)), verdict,
                              "verification", claim=claim))
    return records


def _write_split(root: Path, n: int, image_size: int, seed: int, split: str) -> dict:
    """Write one split's formats under ``root``; return its counts and paths."""
    captioned, classes = root / "captioned", root / "classes"
    captioned.mkdir(parents=True, exist_ok=True)
    for label in SHAPE_CLASSES:
        (classes / label).mkdir(parents=True, exist_ok=True)
    rows, conversations, labels = [], [], {}
    tasks = random.Random(f"srae-shapes/{seed}/{split}/tasks")  # own stream: the images do not depend on it
    for index, (spec, text, prompt) in enumerate(_split_specs(n, seed, split)):
        stem = f"{index:06d}"
        png = _png_bytes(render(spec, image_size))
        (captioned / f"{stem}.png").write_bytes(png)
        (captioned / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        label_dir = classes / spec.label
        label_dir.mkdir(parents=True, exist_ok=True)
        (label_dir / f"{stem}.png").write_bytes(png)
        labels[spec.label] = labels.get(spec.label, 0) + 1
        rows.append({"image": f"captioned/{stem}.png", "caption": text})
        conversations += _conversation_records(f"captioned/{stem}.png", spec, prompt, text, split, stem, tasks)

    with open(root / "captions.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _write_jsonl(root / "captions.jsonl", rows)
    _write_jsonl(root / "conversations.jsonl", conversations)
    return {
        "n": n,
        "root": str(root),
        "captioned": str(captioned),
        "captions_csv": str(root / "captions.csv"),
        "captions_jsonl": str(root / "captions.jsonl"),
        "conversations": str(root / "conversations.jsonl"),
        "n_conversations": len(conversations),
        "classes": str(classes),
        "labels": dict(sorted(labels.items())),
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def synthesize(out_dir: Path, n: int, *, image_size: int = 64, seed: int = 0,
               split_heldout: float = 0.1) -> dict:
    """Write ``n`` images of the shapes world into ``out_dir`` in every input format (see module doc).

    ``round(n * split_heldout)`` of the ``n`` images go to ``out_dir/heldout`` (its own random stream),
    the rest to the training files at the top of ``out_dir``. ``out_dir`` must be new or empty, so no
    stale files from an earlier run can mix in. Returns counts and paths for both splits.
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise DataError(f"synthesize n={n}: the number of images must be at least 1")
    if image_size < 16:
        raise DataError(f"synthesize image_size={image_size} is too small; use 16 or more (64 is the default)")
    if not 0.0 <= split_heldout < 1.0:
        raise DataError(f"synthesize split_heldout={split_heldout} must be in [0, 1); 0.1 keeps a tenth for eval")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"synthesize out_dir {out_dir} is not an empty folder; choose a new folder or delete it")

    n_heldout = round(n * split_heldout)
    if n_heldout >= n:
        raise DataError(f"synthesize n={n} with split_heldout={split_heldout} leaves no training images; raise n")
    summary = {
        "root": str(out_dir),
        "image_size": image_size,
        "seed": seed,
        "world": {
            "colours": list(COLOURS),
            "shapes": list(SHAPES),
            "positions": list(POSITIONS),
            "sizes": list(SIZES),
            "backgrounds": list(BACKGROUNDS),
        },
        "train": _write_split(out_dir, n - n_heldout, image_size, seed, "train"),
    }
    if n_heldout:
        summary["heldout"] = _write_split(out_dir / "heldout", n_heldout, image_size, seed, "heldout")
    manifest = {key: summary[key] for key in ("image_size", "seed", "world")}
    for split in ("train", "heldout"):
        if split in summary:
            manifest[split] = {key: summary[split][key] for key in ("n", "n_conversations", "labels")}
    (out_dir / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return summary


__all__ = [
    "BACKGROUNDS", "COLOURS", "POSITIONS", "SHAPES", "SHAPE_CLASSES", "SIZES", "SIZE_THRESHOLD", "ShapeSpec",
    "caption", "questions", "random_spec", "render", "synthesize", "verification_claims", "hard_negative",
]
