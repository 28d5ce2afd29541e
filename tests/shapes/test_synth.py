"""The shapes world: rendering, captions, and the files ``synthesize`` writes."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scale_rae_core.errors import DataError
from scale_rae_core.prompts import CAPTION_QUESTION, SHAPES_WHERE, VERIFY_QUESTION
from scale_rae_core.shapes.synth import (
    BACKGROUNDS,
    COLOURS,
    GENERATION_SAMPLES,
    POSITIONS,
    SHAPES,
    ShapeSpec,
    caption,
    questions,
    random_spec,
    render,
    synthesize,
    verification_claims,
)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _named(claim: str) -> tuple[list[str], list[str], list[str]]:
    """The colours, shapes and positions a caption names."""
    words = f" {claim} "
    return (
        [c for c in COLOURS if f" {c} " in words],
        [s for s in SHAPES if f" {s} " in words],
        [p for p in POSITIONS if SHAPES_WHERE[p] in claim],
    )


def _claim_fits(claim: str, spec: ShapeSpec) -> bool:
    return _named(claim) == ([spec.colour], [spec.shape], [spec.position])


def test_verification_claims_are_a_positive_and_a_hard_negative_of_the_same_image():
    rng = random.Random(3)
    spec = random_spec(rng, "red", "circle", "left", "small")
    text = "a red circle on the left"
    changed = Counter()
    for _ in range(300):
        (positive, yes), (negative, no) = verification_claims(spec, text, rng)
        assert (positive, yes, no) == (text, "yes", "no") and _claim_fits(positive, spec) and not _claim_fits(negative, spec)
        diff = [a != b for a, b in zip(_named(negative), _named(text), strict=True)]
        assert sum(diff) == 1, negative  # exactly one of colour, shape, position differs
        changed[diff.index(True)] += 1
    assert all(70 < changed[i] < 130 for i in range(3)), changed


@pytest.mark.parametrize("image_size", [16, 32, 64, 256])
def test_render_puts_the_shape_where_the_spec_says(image_size):
    spec = ShapeSpec("blue", "square", "right", "large", background="light gray")
    image = np.asarray(render(spec, image_size)).astype(int)
    assert image.shape == (image_size, image_size, 3)
    assert tuple(image[0, 0]) == BACKGROUNDS["light gray"]
    middle = image_size // 2
    assert tuple(image[middle, int(0.8 * image_size)]) == COLOURS["blue"]  # the square's centre
    assert tuple(image[middle, int(0.2 * image_size)]) == BACKGROUNDS["light gray"]  # left third empty


def test_render_shapes_cover_their_expected_area():
    areas = {}
    for shape in ("circle", "square", "triangle"):
        image = np.asarray(render(ShapeSpec("red", shape, "center", "large"), 128)).astype(float)
        coverage = (255 - image[..., 1]) / (255 - COLOURS["red"][1])  # green channel: 255 bg, 35 shape
        areas[shape] = coverage.sum() / (0.32 * 128) ** 2
    assert areas["square"] == pytest.approx(1.0, abs=0.03)
    assert areas["circle"] == pytest.approx(np.pi / 4, abs=0.03)
    assert areas["triangle"] == pytest.approx(0.5, abs=0.03)


def test_spec_rejects_unknown_attribute_names():
    with pytest.raises(DataError, match="colour='purple'.*red, green, blue, yellow"):
        ShapeSpec("purple", "circle", "left", "small")
    with pytest.raises(DataError, match="shape='hexagon'"):
        ShapeSpec("red", "hexagon", "left", "small")
    with pytest.raises(DataError, match="position='top'"):
        random_spec(random.Random(0), position="top")
    with pytest.raises(DataError, match="image_size=8"):
        render(ShapeSpec("red", "circle", "left", "small"), 8)


def test_random_spec_keeps_given_attributes_and_jitters_within_bounds():
    rng = random.Random(3)
    for _ in range(50):
        spec = random_spec(rng, colour="green", position="left")
        assert (spec.colour, spec.position) == ("green", "left")
        assert all(abs(a - b) <= 15 for a, b in zip(spec.rgb, COLOURS["green"], strict=True))
        assert abs(spec.cx - 0.2) <= 0.03 and abs(spec.cy - 0.5) <= 0.08


def test_caption_and_questions_name_the_attributes():
    spec = ShapeSpec("yellow", "triangle", "center", "small", background="cream")
    texts = {caption(spec, random.Random(seed)) for seed in range(40)}
    assert "a yellow triangle in the center" in texts
    assert "a small yellow triangle in the center" in texts
    assert len(texts) == 4  # every template is used
    assert all(text.startswith("a ") and "yellow triangle" in text for text in texts)
    assert caption(spec, random.Random(7)) == caption(spec, random.Random(7))
    assert questions(spec) == [
        ("What colour is the shape?", "yellow"),
        ("What shape is in the image?", "triangle"),
        ("Where is the shape?", "center"),
        ("Is the shape large or small?", "small"),
    ]


def test_synthesize_is_byte_identical_for_the_same_arguments(tmp_path):
    first = synthesize(tmp_path / "a", 24, image_size=32, seed=5)
    synthesize(tmp_path / "b", 24, image_size=32, seed=5)
    synthesize(tmp_path / "c", 24, image_size=32, seed=6)
    digest_a = _digest(tmp_path / "a")
    assert digest_a == _digest(tmp_path / "b")
    assert digest_a != _digest(tmp_path / "c")
    assert first["train"]["n"] == 22 and first["heldout"]["n"] == 2


def test_synthesize_writes_consistent_formats(tmp_path):
    root = tmp_path / "shapes"
    summary = synthesize(root, 40, image_size=32, seed=0, split_heldout=0.25)
    assert json.loads((root / "synth.json").read_text())["train"]["n"] == 30
    for split, folder, n in (("train", root, 30), ("heldout", root / "heldout", 10)):
        assert summary[split]["n"] == n
        pngs = sorted((folder / "captioned").glob("*.png"))
        assert [p.stem for p in pngs] == [f"{i:06d}" for i in range(n)]
        sidecars = {p.name: (folder / "captioned" / f"{p.stem}.txt").read_text().strip() for p in pngs}

        with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
            csv_rows = list(csv.DictReader(f))
        jsonl_rows = _jsonl(folder / "captions.jsonl")
        assert csv_rows == jsonl_rows
        assert {Path(row["image"]).name: row["caption"] for row in csv_rows} == sidecars
        assert all((folder / row["image"]).is_file() for row in csv_rows)

        records = _jsonl(folder / "conversations.jsonl")
        assert summary[split]["n_conversations"] == len(records) == (GENERATION_SAMPLES + 7) * n
        generation = [r for r in records if r["metadata"]["task"] == "generation"]
        understanding = [r for r in records if r["metadata"]["task"] == "understanding"]
        verification = [r for r in records if r["metadata"]["task"] == "verification"]
        assert len(generation) == GENERATION_SAMPLES * n and len(understanding) == 5 * n and len(verification) == 2 * n
        by_image = {row["image"]: row["caption"] for row in csv_rows}
        for record in generation:
            human, gpt = record["conversations"]
            assert (human["from"], gpt["from"], gpt["value"]) == ("human", "gpt", "<image>")
            assert record["metadata"]["caption"] in human["value"]
            assert record["metadata"]["split"] == split
        assert {r["image"]: r["metadata"]["caption"] for r in generation if r["id"].endswith("-gen")} == by_image
        for record in understanding:
            human, gpt = record["conversations"]
            assert human["value"].startswith("<image>\n")
            meta = record["metadata"]
            if human["value"] == f"<image>\n{CAPTION_QUESTION}":
                assert gpt["value"] == meta["caption"] == by_image[record["image"]]
            else:
                assert gpt["value"] in {meta["colour"], meta["shape"], meta["position"], meta["size"]}
            assert (folder / record["image"]).is_file()
        for record in verification:
            human, gpt = record["conversations"]
            claim = record["metadata"]["claim"]
            assert human["value"] == "<image>\n" + VERIFY_QUESTION.format(prompt=claim)
            spec = ShapeSpec(**{k: record["metadata"][k] for k in ("colour", "shape", "position", "size", "background")})
            assert gpt["value"] == ("yes" if _claim_fits(claim, spec) else "no")
        assert Counter(r["conversations"][1]["value"] for r in verification) == {"yes": n, "no": n}

        # Class folders hold the same image bytes under colour_shape labels.
        labels = {r["image"]: r["metadata"]["label"] for r in generation}
        for image, label in labels.items():
            copy = folder / "classes" / label / Path(image).name
            assert copy.read_bytes() == (folder / image).read_bytes()
        assert sum(1 for _ in (folder / "classes").rglob("*.png")) == n
        assert summary[split]["labels"] == dict(sorted(Counter(labels.values()).items()))

    train = {p.read_bytes() for p in (root / "captioned").glob("*.png")}
    heldout = {p.read_bytes() for p in (root / "heldout" / "captioned").glob("*.png")}
    assert not train & heldout


def test_synthesize_covers_every_combination_evenly(tmp_path):
    synthesize(tmp_path / "s", 144, image_size=16, split_heldout=0.0)
    records = [r for r in _jsonl(tmp_path / "s" / "conversations.jsonl") if r["id"].endswith("-gen")]
    combos = Counter(tuple(r["metadata"][k] for k in ("colour", "shape", "position", "size")) for r in records)
    assert len(combos) == 72 and set(combos.values()) == {2}
    assert not (tmp_path / "s" / "heldout").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n=0"),
        ({"n": 10, "image_size": 8}, "image_size=8"),
        ({"n": 10, "split_heldout": 1.0}, "split_heldout=1.0"),
        ({"n": 1, "split_heldout": 0.9}, "leaves no training images"),
    ],
)
def test_synthesize_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        synthesize(tmp_path / "s", **kwargs)


def test_synthesize_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "old.txt").write_text("stale")
    with pytest.raises(DataError, match="not an empty folder"):
        synthesize(tmp_path, 4)
