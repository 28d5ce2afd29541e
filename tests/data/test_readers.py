"""WebDataset and JSONL readers: order, rank/worker splits, exact resume, errors."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scale_rae_core.data.jsonl import JsonlDataset, JsonlReader
from scale_rae_core.data.pack import pack
from scale_rae_core.data.webdataset import WebDatasetReader, buffer_order
from scale_rae_core.errors import DataError


def png_bytes(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """23 generation samples over 5 shards (5, 5, 5, 5, 3); image i has width 16 + i % 4."""
    root = tmp_path_factory.mktemp("readers")
    src = root / "in"
    src.mkdir()
    for i in range(23):
        (src / f"{i:02d}.png").write_bytes(png_bytes(i, (16 + i % 4, 16)))
        (src / f"{i:02d}.txt").write_text(f"caption {i}")
    pack(src, root / "out", task="generation", samples_per_shard=5)
    return root / "out"


ALL_KEYS = [f"{i:09d}" for i in range(23)]


def keys(samples) -> list[str]:
    return [s.key for s in samples]


# ------------------------------------------------------------------------------------------- webdataset


def test_unshuffled_reader_yields_packed_order_with_images(shards):
    samples = list(WebDatasetReader(shards / "wds_manifest.json", shuffle=False))
    assert keys(samples) == ALL_KEYS
    s = samples[6]
    assert s.image.size == (16 + 6 % 4, 16) and s.image.mode == "RGB"
    assert s.conversations == [{"from": "human", "value": "Generate an image of caption 6"}, {"from": "gpt", "value": "<image>"}]
    assert s.position == (0, 0, 6)
    assert np.array_equal(np.asarray(s.image), np.asarray(Image.open(io.BytesIO(png_bytes(6, (18, 16))))))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_cover_every_sample_exactly_once(shards, drop_last):
    per_rank = [
        keys(WebDatasetReader(shards, rank=r, world_size=3, seed=1, shuffle_buffer=4, drop_last=drop_last, decode_images=False))
        for r in range(3)
    ]
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert [len(ks) for ks in per_rank] == [7, 7, 7] and set(flat) < set(ALL_KEYS)
    else:
        assert [len(ks) for ks in per_rank] == [7, 8, 8] and sorted(flat) == ALL_KEYS
    assert [len(WebDatasetReader(shards, rank=r, world_size=3, drop_last=drop_last)) for r in range(3)] == [len(k) for k in per_rank]


def test_shuffle_changes_per_epoch_and_is_seeded(shards):
    reader = WebDatasetReader(shards, seed=3, shuffle_buffer=6, decode_images=False)
    epoch0 = keys(reader)
    epoch1 = keys(reader)  # a finished epoch rolls over to the next
    assert reader.epoch == 1
    assert sorted(epoch0) == sorted(epoch1) == ALL_KEYS and epoch0 != epoch1 and epoch0 != ALL_KEYS
    assert keys(WebDatasetReader(shards, seed=3, shuffle_buffer=6, decode_images=False)) == epoch0


def test_buffer_order_is_a_permutation_within_reach():
    order = buffer_order(50, 8, random.Random(0))
    assert sorted(order) == list(range(50))
    assert all(p <= j + 8 for j, p in enumerate(order))  # never further ahead than the buffer
    assert buffer_order(5, 1, random.Random(0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("k", [0, 1, 10, 22, 23])
def test_resume_position_is_exact(shards, k):
    def make():
        return WebDatasetReader(shards, seed=5, shuffle_buffer=7, decode_images=False)

    full = keys(make())
    reader = make()
    it = iter(reader)
    head = [next(it).key for _ in range(k)]
    state = json.loads(json.dumps(reader.state_dict()))  # survives a JSON checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    tail = keys(resumed) if k < 23 else []
    assert head + tail == full


def test_resume_rejects_a_different_layout(shards):
    state = WebDatasetReader(shards, world_size=2).state_dict()
    with pytest.raises(DataError, match=r"saved with world_size=2 \(now 1\)"):
        WebDatasetReader(shards).load_state_dict(state)


def test_dataloader_workers_and_mark_consumed_resume(shards):
    def make():
        return WebDatasetReader(shards, num_workers=2, seed=2, shuffle_buffer=4, decode_images=False)

    def loader(reader):
        return torch.utils.data.DataLoader(reader, batch_size=3, num_workers=2, collate_fn=list)

    def per_slot(samples) -> dict[int, list[str]]:
        slots: dict[int, list[str]] = {}
        for s in samples:
            slots.setdefault(s.position[1], []).append(s.key)
        return slots

    full = [s for batch in loader(make()) for s in batch]
    assert sorted(keys(full)) == ALL_KEYS and {s.position[1] for s in full} == {0, 1}

    reader = make()
    head = []
    for batch in loader(reader):
        head += batch
        reader.mark_consumed(s.position for s in batch)  # what the training loop saw
        if len(head) >= 9:
            break
    assert reader.state_dict()["consumed"] == [6, 3]  # batches of 3 alternate between the two workers
    resumed = make()
    resumed.load_state_dict(reader.state_dict())
    tail = [s for batch in loader(resumed) for s in batch]
    assert sorted(keys(head + tail)) == ALL_KEYS
    # Each worker's stream continues exactly where it stopped.
    assert per_slot(head + tail) == per_slot(full)


def test_worker_count_mismatch_is_an_error(shards):
    loader = torch.utils.data.DataLoader(WebDatasetReader(shards), num_workers=1, collate_fn=list)
    with pytest.raises(DataError, match=r"num_workers=0\) is read by 1 DataLoader workers"):
        next(iter(loader))


def test_reference_manifest_without_counts(shards, tmp_path):
    manifest = json.loads((shards / "wds_manifest.json").read_text())
    ref = {"dataset_name": "ref", "tars": manifest["tars"], "samples_per_tar_assumption": 10000}
    (tmp_path / "ref_wds.json").write_text(json.dumps(ref))
    reader = WebDatasetReader(tmp_path / "ref_wds.json", shuffle=False, decode_images=False)
    assert len(reader) == 23 and keys(reader) == ALL_KEYS


# ------------------------------------------------------------------------------------------------ jsonl


def test_jsonl_random_access_and_image_folder(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(png_bytes(0, (20, 12)))
    rows = [
        {"id": "first", "image": "a.png", "conversations": [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "yo"}]},
        {"conversations": [{"from": "human", "value": "text only"}], "metadata": {"src": "x"}},
    ]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    ds = JsonlDataset(path, image_folder=imgs)
    assert len(ds) == 2
    second = ds[1]
    assert (second.key, second.image, second.metadata) == ("train.jsonl:3", None, {"src": "x"})
    first = ds[-2]
    assert first.key == "first" and first.image.size == (20, 12)
    assert first.conversations == [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]
    with pytest.raises(IndexError):
        ds[2]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"conversations": [{"from": "human", "value": "ok"}]})
    path.write_text(good + "\n{broken\n" + json.dumps({"image": "gone.png", "conversations": []}) + "\n")
    ds = JsonlDataset(path)
    assert ds[0].conversations == [{"from": "human", "value": "ok"}]
    with pytest.raises(DataError, match=r"train.jsonl:2: Expecting property name"):
        ds[1]
    with pytest.raises(DataError, match=r"train.jsonl:3: unreadable file"):
        ds[2]
    with pytest.raises(DataError, match="JSONL not found"):
        JsonlDataset(tmp_path / "nope.jsonl")


def test_jsonl_reader_split_and_exact_resume(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": str(i)}]}) + "\n" for i in range(11)))
    per_rank = [keys(JsonlReader(path, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert [len(k) for k in per_rank] == [5, 6] and sorted(per_rank[0] + per_rank[1], key=int) == [str(i) for i in range(11)]

    full = keys(JsonlReader(path, seed=4))
    reader = JsonlReader(path, seed=4)
    it = iter(reader)
    head = [next(it).key for _ in range(4)]
    resumed = JsonlReader(path, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(reader.state_dict())))
    resumed.set_epoch(0)  # a trainer calling set_epoch before iter keeps the position of the current epoch
    assert head + keys(resumed) == full
    assert keys(resumed) != full and sorted(keys(resumed)) == sorted(full)  # next epoch, new order
    with pytest.raises(DataError, match=r"world_size=1 \(now 2\)"):
        JsonlReader(path, rank=0, world_size=2).load_state_dict(reader.state_dict())


def test_webdataset_set_epoch_keeps_position_of_current_epoch(shards):
    reader = WebDatasetReader(shards, seed=5, shuffle_buffer=7, decode_images=False)
    full = keys(WebDatasetReader(shards, seed=5, shuffle_buffer=7, decode_images=False))
    it = iter(reader)
    head = [next(it).key for _ in range(5)]
    resumed = WebDatasetReader(shards, seed=5, shuffle_buffer=7, decode_images=False)
    resumed.load_state_dict(reader.state_dict())
    resumed.set_epoch(0)
    assert head + keys(resumed) == full
    resumed.set_epoch(2)
    assert resumed.state_dict()["consumed"] == [0] and len(keys(resumed)) == 23


@pytest.mark.parametrize("count", [3, 500])
def test_a_manifest_count_that_disagrees_with_its_shard_is_one_line(shards, tmp_path, count):
    """Over-counting used to crash with IndexError after some steps; under-counting trained on a subset."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "wds_manifest.json").read_text())
    manifest["shards"][1]["count"] = count
    (copy / "wds_manifest.json").write_text(json.dumps(manifest))
    reader = WebDatasetReader(copy, shuffle=False, decode_images=False)
    with pytest.raises(DataError) as err:
        list(reader)
    msg = str(err.value)
    assert "\n" not in msg and "shard-000001.tar" in msg and f"says {count}" in msg and "holds 5 samples" in msg


@pytest.mark.parametrize("bad", ["many", -1, 2.5, None, True])
def test_a_manifest_count_that_is_not_a_number_is_one_line(shards, tmp_path, bad):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "wds_manifest.json").read_text())
    manifest["shards"][0]["count"] = bad
    (copy / "wds_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shards\[0\]\.count = .* is not a sample count"):
        WebDatasetReader(copy)
