"""Small inputs in the exact layouts training data comes in, made in the test (no downloads).

* :func:`blip3o_tars` — WebDataset tars as BLIP3o / img2dataset / LAION publish them (``key.jpg`` + ``key.txt``
  and/or ``key.json``), written with ``webdataset.TarWriter``;
* :func:`hf_parquet` — parquet files with the Hugging Face image struct ``{"bytes", "path"}``, as the Hub's
  parquet conversion stores them (``data/train-0000N-of-0000M.parquet``);
* :func:`hf_disk` — a ``datasets`` ``save_to_disk`` folder;
* :func:`llava_json` — one JSON array of ``{"id", "image", "conversations"}`` (LLaVA-665k / Cambrian).

Each holds ``n`` good records and one bad one at ``BAD`` (a corrupt image or a missing caption), so a test
can check both what is packed and what is rejected.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

BAD = 3  # the index of the bad record in every builder


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


CORRUPT = image_bytes(99)[:60]  # a PNG header with nothing after it


def packed(out: Path) -> list[dict]:
    """Every packed sample in order: ``{"key", "json", "image"}`` (image: encoded bytes or None)."""
    samples = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            obj = json.loads(members[name])
            image = members.get(obj.get("image_filename", ""))
            samples.append({"key": name[:-5], "json": obj, "image": image})
    return samples


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def blip3o_tars(root: Path, n: int = 6, per_tar: int = 3) -> Path:
    """``root/shard-00000{t}.tar``: sample i is ``{i:06d}.jpg`` + ``.txt`` "caption i"; every third also has an
    img2dataset ``.json`` (url, key, status, width, height, caption). Sample BAD has a corrupt jpg."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for t in range((n + 1 + per_tar - 1) // per_tar):
        with wds.TarWriter(str(root / f"shard-{t:06d}.tar")) as sink:
            for i in range(t * per_tar, min(n + 1, (t + 1) * per_tar)):
                sample = {"__key__": f"{i:06d}", "jpg": CORRUPT if i == BAD else image_bytes(i, "JPEG"),
                          "txt": f"caption {i}"}
                if i % 3 == 1:
                    sample["json"] = json.dumps({"url": f"https://example.com/{i}.jpg", "key": f"{i:06d}",
                                                 "status": "success", "width": 20, "height": 14,
                                                 "caption": f"alt text {i}"})
                sink.write(sample)
    return root


def hf_parquet(root: Path, n: int = 6) -> Path:
    """``root/data/train-0000{f}-of-00002.parquet`` with columns image (HF struct), text, id, score; row BAD has
    no caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"image": {"bytes": image_bytes(i), "path": f"{i}.png"}, "text": None if i == BAD else f"caption {i}",
             "id": i, "score": i / 10} for i in range(n + 1)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    half = (n + 2) // 2
    for f, part in enumerate((rows[:half], rows[half:])):
        table = pa.table({
            "image": pa.array([r["image"] for r in part], type=image_type),
            "text": pa.array([r["text"] for r in part], type=pa.string()),
            "id": pa.array([r["id"] for r in part], type=pa.int64()),
            "score": pa.array([r["score"] for r in part], type=pa.float64()),
        })
        pq.write_table(table, root / "data" / f"train-{f:05d}-of-00002.parquet", row_group_size=2)
    return root


def hf_dataset(n: int = 6):
    """A ``datasets.Dataset`` with an Image column, text and id; row BAD has a corrupt image."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": CORRUPT if i == BAD else image_bytes(i), "path": None} for i in range(n + 1)],
        "text": [f"caption {i}" for i in range(n + 1)],
        "id": list(range(n + 1)),
    }, features=features)


def hf_disk(root: Path, n: int = 6) -> Path:
    hf_dataset(n).save_to_disk(str(root))
    return root


def llava_json(root: Path, n: int = 6) -> Path:
    """``root/llava.json`` (one JSON array, indented as LLaVA ships it) over images in ``root/images/coco``;
    element BAD has no conversations."""
    (root / "images" / "coco").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n + 1):
        (root / "images" / "coco" / f"{i:012d}.png").write_bytes(image_bytes(i))
        item = {"id": f"{i:012d}", "image": f"coco/{i:012d}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": f"answer {i}"}]}
        if i == BAD:
            del item["conversations"]
        items.append(item)
    (root / "llava.json").write_text(json.dumps(items, indent=2))
    return root / "llava.json"
