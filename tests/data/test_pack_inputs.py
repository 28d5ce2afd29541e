"""`pack` of the layouts training data comes in: WebDataset tars, parquet, Hugging Face datasets, LLaVA JSON
arrays, absolute image paths — packed samples, rejects, determinism for any --workers, resume after a kill."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from scale_rae_core.data.pack import STATE_NAME, pack
from scale_rae_core.errors import DataError
from tests.data.formats import (
    BAD,
    blip3o_tars,
    hf_disk,
    hf_parquet,
    image_bytes,
    llava_json,
    packed,
    pixels,
    rejects,
    shard_bytes,
)


def _wds(samples: dict[str, dict[str, bytes | str]], path: Path) -> Path:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, sample in samples.items():
            sink.write({"__key__": key, **sample})
    return path


# ------------------------------------------------------------------------------------------ WebDataset


def test_blip3o_and_img2dataset_tars(tmp_path):
    tars = blip3o_tars(tmp_path / "tars")
    s = pack(tars, tmp_path / "out", task="generation")
    assert (s.format, s.packed, s.skipped) == ("captions", 6, 1)
    samples = packed(tmp_path / "out")
    assert [x["json"]["source"] for x in samples] == [f"shard-{i // 3:06d}.tar:{i:06d}" for i in range(7) if i != BAD]
    first = samples[0]["json"]
    assert first["conversations"] == [{"from": "human", "value": "Generate an image of caption 0"},
                                      {"from": "gpt", "value": "<image>"}]
    assert first["metadata"] == {}
    # key.txt is the caption; the img2dataset key.json is the metadata
    assert samples[1]["json"]["metadata"] == {"url": "https://example.com/1.jpg", "key": "000001", "status": "success",
                                              "width": 20, "height": 14, "caption": "alt text 1"}
    for x, i in zip(samples, [i for i in range(7) if i != BAD], strict=True):
        assert np.array_equal(pixels(x["image"]), pixels(image_bytes(i, "JPEG")))
    (reject,) = rejects(tmp_path / "out")
    assert reject["source"] == "shard-000001.tar:000003" and reject["image"].endswith("shard-000001.tar:000003.jpg")
    assert reject["reason"].startswith("truncated or corrupt image")


def test_one_tar_and_a_brace_pattern(tmp_path):
    tars = blip3o_tars(tmp_path / "tars")
    whole = pack(tars, tmp_path / "folder", task="understanding")
    pattern = pack(str(tars / "shard-{000000..000002}.tar"), tmp_path / "pattern", task="understanding", workers=2)
    assert (whole.packed, pattern.packed) == (6, 6)
    assert shard_bytes(tmp_path / "folder") == shard_bytes(tmp_path / "pattern")
    pack(tars / "shard-000000.tar", tmp_path / "one", task="understanding")
    assert [x["json"]["conversations"][1]["value"] for x in packed(tmp_path / "one")] == ["caption 0", "caption 1", "caption 2"]
    with pytest.raises(DataError, match=r"1 of the 4 files it names are missing, e.g. .*shard-000003.tar"):
        pack(str(tars / "shard-{000000..000003}.tar"), tmp_path / "missing")


def test_tar_with_json_captions_conversations_and_column_flags(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Noise."}]
    _wds({
        "a": {"png": image_bytes(1), "json": json.dumps({"conversations": conv, "metadata": {"src": "x"}})},
        "b": {"json": json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})},
        "c": {"png": image_bytes(2), "json": json.dumps({"caption": "no turns here"})},
    }, tmp_path / "conv" / "c.tar")
    s = pack(tmp_path / "conv", tmp_path / "out-conv")
    assert (s.format, s.packed, s.skipped) == ("conversations", 2, 1)
    a, b = packed(tmp_path / "out-conv")
    assert (a["json"]["conversations"], a["json"]["metadata"]) == (conv, {"src": "x"})
    assert np.array_equal(pixels(a["image"]), pixels(image_bytes(1))) and b["image"] is None
    assert rejects(tmp_path / "out-conv")[0] == {"source": "c.tar:c", "reason": "no 'conversations' in the json member"}

    caps = {"jpg": image_bytes(3, "JPEG"), "json": json.dumps({"prompt": "a prompt", "caption": "cap"})}
    _wds({"d": caps, "e": {"jpg": image_bytes(5, "JPEG"), "json": json.dumps({"width": 3})}}, tmp_path / "caps" / "t.tar")
    s = pack(tmp_path / "caps", tmp_path / "out-caps", task="understanding")
    assert (s.format, s.packed, s.skipped) == ("captions", 1, 1)
    assert rejects(tmp_path / "out-caps") == [
        {"source": "t.tar:e", "reason": "missing caption (no .txt member and no json caption / text / prompt field)"}]
    d = packed(tmp_path / "out-caps")[0]["json"]
    assert d["conversations"][1]["value"] == "cap" and d["metadata"] == {"prompt": "a prompt"}

    two = {"png": image_bytes(6), **caps}  # two images: the flags pick one, and the caption field
    _wds({"f": two}, tmp_path / "two" / "t.tar")
    with pytest.raises(DataError, match="all 1 inputs were rejected"):
        pack(tmp_path / "two", tmp_path / "out-two")
    assert rejects(tmp_path / "out-two")[0]["reason"] == "2 images (jpg, png); pick one with --image-column"
    pack(tmp_path / "two", tmp_path / "out-flags", image_column="png", caption_column="prompt", task="generation")
    (f,) = packed(tmp_path / "out-flags")
    assert f["json"]["conversations"][0]["value"] == "Generate an image of a prompt"
    assert f["json"]["metadata"] == {"caption": "cap"} and np.array_equal(pixels(f["image"]), pixels(image_bytes(6)))


@pytest.mark.parametrize("inside", ["000001.jpg", "000001.txt"])
def test_a_truncated_tar_keeps_its_first_samples(tmp_path, inside):
    """A download cut short: the samples before the cut are packed, the cut one is a reject naming the cut."""
    import tarfile

    tars = blip3o_tars(tmp_path / "tars")
    path = tars / "shard-000000.tar"
    with tarfile.open(path) as tf:
        cut = tf.getmember(inside).offset_data + 5
    path.write_bytes(path.read_bytes()[:cut])
    s = pack(tars, tmp_path / "out", task="generation")
    assert [x["json"]["source"] for x in packed(tmp_path / "out")][:2] == ["shard-000000.tar:000000", "shard-000001.tar:000004"]
    got = rejects(tmp_path / "out")
    assert got[0] == {"source": "shard-000000.tar:000001", "reason": f"the tar breaks off inside {inside} after 1 "
                      "samples; re-download it"}
    assert s.packed == 4  # 0, 4, 5, 6 (3 is the corrupt one)


def test_compressed_tars_and_unknown_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="compressed tars are not read; decompress it to a plain .tar first"):
        pack(tmp_path / "x.tar.gz", tmp_path / "out")
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"unsupported input; pass a folder, a .csv / .jsonl / .json file, .tar or .parquet"):
        pack(tmp_path / "x.zip", tmp_path / "out")


# --------------------------------------------------------------------------------------------- parquet


def test_parquet_with_the_hugging_face_image_struct(tmp_path):
    pytest.importorskip("pyarrow")
    src = hf_parquet(tmp_path / "hub")
    s = pack(src, tmp_path / "out", task="understanding")
    assert (s.format, s.packed, s.skipped) == ("captions", 6, 1)
    samples = packed(tmp_path / "out")
    good = [i for i in range(7) if i != BAD]
    assert [x["json"]["conversations"][1]["value"] for x in samples] == [f"caption {i}" for i in good]
    assert [x["json"]["metadata"] for x in samples] == [{"id": i, "score": i / 10} for i in good]
    assert [x["json"]["source"] for x in samples][:4] == [
        "data/train-00000-of-00002.parquet[0]", "data/train-00000-of-00002.parquet[1]",
        "data/train-00000-of-00002.parquet[2]", "data/train-00001-of-00002.parquet[0]"]
    for x, i in zip(samples, good, strict=True):
        assert np.array_equal(pixels(x["image"]), pixels(image_bytes(i)))
    assert rejects(tmp_path / "out") == [{"source": "data/train-00000-of-00002.parquet[3]",
                                          "reason": "missing caption (column 'text' is empty)"}]


def test_parquet_raw_bytes_path_cells_and_column_flags(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "file.png").write_bytes(image_bytes(7))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "jpg": pa.array([image_bytes(0, "JPEG"), b"not an image", None], type=pa.binary()),
        "thumb": pa.array([{"bytes": image_bytes(1), "path": None}, {"bytes": image_bytes(2), "path": None},
                           {"bytes": None, "path": str(tmp_path / "pics" / "file.png")}], type=struct),
        "caption": ["long caption 0", "long caption 1", "long caption 2"],
        "alt": ["alt 0", "alt 1", "alt 2"],
        "__key__": ["k0", "k1", "k2"],
    }), tmp_path / "t.parquet")
    s = pack(tmp_path / "t.parquet", tmp_path / "a", task="understanding")  # jpg: a preferred image name
    assert (s.packed, s.skipped) == (1, 2)
    assert [r["reason"] for r in rejects(tmp_path / "a")] == ["not an image (Pillow cannot identify it)",
                                                               "no image (the image cell is empty)"]
    assert packed(tmp_path / "a")[0]["json"]["metadata"] == {"alt": "alt 0"}  # no __key__
    s = pack(tmp_path / "t.parquet", tmp_path / "b", task="understanding", image_column="thumb", caption_column="alt")
    samples = packed(tmp_path / "b")
    assert s.packed == 3 and [x["json"]["conversations"][1]["value"] for x in samples] == ["alt 0", "alt 1", "alt 2"]
    assert np.array_equal(pixels(samples[2]["image"]), pixels(image_bytes(7)))  # a path-only cell: the file
    assert samples[0]["json"]["metadata"] == {"caption": "long caption 0"}


def test_parquet_column_problems_name_the_columns_and_the_flag(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [b"x"], "b": [b"y"], "caption": ["c"]}), tmp_path / "two.parquet")
    with pytest.raises(DataError, match=r"two.parquet: several image columns \(a, b\); pick one with --image-column"):
        pack(tmp_path / "two.parquet", tmp_path / "o1")
    pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), tmp_path / "none.parquet")
    with pytest.raises(DataError) as err:
        pack(tmp_path / "none.parquet", tmp_path / "o2")
    assert str(err.value).endswith("no image column (bytes or an image struct); the columns are: url (string), "
                                   "caption (string); name it with --image-column")
    pq.write_table(pa.table({"image": [b"x"], "label": [3]}), tmp_path / "nocap.parquet")
    with pytest.raises(DataError, match=r"no caption column \(one of caption, text, txt, prompt, sentence\); the columns "
                                        r"are: image \(binary\), label \(int64\); name it with --caption-column"):
        pack(tmp_path / "nocap.parquet", tmp_path / "o3")
    with pytest.raises(DataError, match=r"--caption-column 'label' is not a text column"):
        pack(tmp_path / "nocap.parquet", tmp_path / "o4", caption_column="label")
    with pytest.raises(DataError, match=r"--image-column 'pic': no such column; the columns are: image \(binary\)"):
        pack(tmp_path / "nocap.parquet", tmp_path / "o5", image_column="pic")


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "state.json").write_text("{}")
    (tmp_path / "disk" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"t.parquet: reading parquet needs pyarrow; install it with: pip install 'srae\[parquet\]'"):
        pack(tmp_path / "t.parquet", tmp_path / "o1")
    with pytest.raises(DataError, match=r"reading Hugging Face datasets needs `datasets`; install it with: pip install 'srae\[hf\]'"):
        pack(tmp_path / "disk", tmp_path / "o2")


# --------------------------------------------------------------------------------------- HF datasets


def test_datasets_save_to_disk_folder_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    from tests.data.formats import hf_dataset

    disk = hf_disk(tmp_path / "disk")
    s = pack(disk, tmp_path / "out", task="generation")
    assert (s.format, s.packed, s.skipped) == ("captions", 6, 1)
    samples = packed(tmp_path / "out")
    good = [i for i in range(7) if i != BAD]
    assert [x["json"]["source"] for x in samples] == [f"disk[{i}]" for i in good]
    assert [x["json"]["metadata"] for x in samples] == [{"id": i} for i in good]
    for x, i in zip(samples, good, strict=True):
        assert np.array_equal(pixels(x["image"]), pixels(image_bytes(i)))
    assert rejects(tmp_path / "out")[0]["reason"].startswith("not an image") or "corrupt" in rejects(tmp_path / "out")[0]["reason"]

    (tmp_path / "cache").mkdir()  # bare .arrow files (the datasets cache): streamed through datasets
    for f in disk.glob("*.arrow"):
        (tmp_path / "cache" / f.name).write_bytes(f.read_bytes())
    pack(tmp_path / "cache", tmp_path / "arrow", task="generation")
    assert [x["image"] for x in packed(tmp_path / "arrow")] == [x["image"] for x in samples]
    assert packed(tmp_path / "arrow")[0]["json"]["source"] == f"{tmp_path / 'cache'}:train[0]"

    both = datasets.DatasetDict({"train": hf_dataset(2), "validation": hf_dataset(1).select([0, 1])})
    both.save_to_disk(str(tmp_path / "dd"))
    s = pack(tmp_path / "dd", tmp_path / "val", split="validation", task="understanding")
    assert s.packed == 2 and packed(tmp_path / "val")[1]["json"]["source"] == "dd:validation[1]"
    with pytest.raises(DataError, match=r"no split 'test' \(it has train, validation\); pass --split"):
        pack(tmp_path / "dd", tmp_path / "test", split="test")


def test_streamed_dataset_matches_its_parquet_files(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = hf_parquet(tmp_path / "hub")  # what a Hub dataset repo holds
    a = pack(hub, tmp_path / "parquet", task="understanding")
    b = pack(f"hf:{hub}", tmp_path / "stream", task="understanding", workers=2)
    assert (a.packed, a.skipped) == (b.packed, b.skipped) == (6, 1)
    pa_, st = packed(tmp_path / "parquet"), packed(tmp_path / "stream")
    assert [x["json"]["conversations"] for x in pa_] == [x["json"]["conversations"] for x in st]
    assert [x["image"] for x in pa_] == [x["image"] for x in st]
    assert st[0]["json"]["source"] == f"{hub}:train[0]"
    with pytest.raises(DataError, match=r"hf:no-such-org/no-such-set: cannot open the dataset .*check the repo id"):
        pack("hf:no-such-org/no-such-set", tmp_path / "missing")


def test_conversations_column_is_the_llava_hub_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    turns = [[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": f"answer {i}"}] for i in range(2)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "id": ["x0", "x1", "x2"],
        "image": pa.array([{"bytes": image_bytes(0), "path": None}, {"bytes": None, "path": None},
                           {"bytes": image_bytes(2), "path": None}], type=struct),
        "conversations": [turns[0], [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}], []],
        "data_source": ["coco", "sharegpt", "coco"],
    }), tmp_path / "llava.parquet")
    s = pack(tmp_path / "llava.parquet", tmp_path / "out")
    assert (s.format, s.packed, s.skipped) == ("conversations", 2, 1)
    first, text = packed(tmp_path / "out")
    assert first["json"]["conversations"] == turns[0] and first["json"]["metadata"] == {"id": "x0", "data_source": "coco"}
    assert text["image"] is None and "image_filename" not in text["json"]
    assert rejects(tmp_path / "out")[0]["reason"] == "no conversation turns in column 'conversations'"


# ------------------------------------------------------------------------------- LLaVA JSON, absolute paths


def test_llava_json_array_with_image_root(tmp_path, monkeypatch):
    from scale_rae_core.data import json_array

    monkeypatch.setattr(json_array, "CHUNK", 37)  # elements straddle the read chunks
    src = llava_json(tmp_path)
    items = json.loads(src.read_text())
    items.append({"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    items.append(["not", "an", "object"])
    src.write_text(json.dumps(items, indent=2))
    s = pack(src, tmp_path / "out", image_root=tmp_path / "images")
    assert (s.format, s.packed, s.skipped) == ("conversations", 7, 2)
    samples = packed(tmp_path / "out")
    assert samples[0]["json"]["conversations"] == [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                                                   {"from": "gpt", "value": "answer 0"}]
    assert samples[0]["json"]["metadata"] == {"id": "000000000000"} and samples[0]["json"]["source"] == "llava.json[0]"
    assert np.array_equal(pixels(samples[4]["image"]), pixels(image_bytes(5)))
    assert samples[-1]["image"] is None and samples[-1]["json"]["metadata"] == {"id": "text-only"}
    assert rejects(tmp_path / "out") == [{"source": "llava.json[3]", "reason": "no conversation turns"},
                                         {"source": "llava.json[8]", "reason": "element is a JSON list, not an object"}]
    s = pack(src, tmp_path / "no-root")  # without --image-root the images are not found; the text-only one is
    assert (s.packed, s.skipped) == (1, 8)
    assert rejects(tmp_path / "no-root")[0]["reason"] == "image file not found: coco/000000000000.png"


def test_a_broken_json_array_names_the_character(tmp_path):
    text = '[{"image": "a.png", "conversations": []}, {"id": 2,]'
    (tmp_path / "bad.json").write_text(text)
    at = text.index(",]") + 1
    with pytest.raises(DataError, match=r"bad.json: not a valid JSON array \(Expecting property name enclosed in double "
                                        rf"quotes at character {at}\); fix the file"):
        pack(tmp_path / "bad.json", tmp_path / "out", format="conversations")


def test_text_that_is_not_unicode_is_a_reject_not_a_crash(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    turns = '[{"from": "human", "value": "<image>\\n\\ud800?"}, {"from": "gpt", "value": "x"}]'
    (tmp_path / "l.json").write_text(f'[{{"image": "a.png", "conversations": {turns}}}, {{"image": "a.png", "conversations": '
                                     '[{"from": "human", "value": "fine"}]}]')
    s = pack(tmp_path / "l.json", tmp_path / "out")
    assert (s.packed, s.skipped) == (1, 1)
    assert rejects(tmp_path / "out") == [{"source": "l.json[0]", "reason": "text holds a lone surrogate "
                                          "(a \\ud800-\\udfff escape), not valid Unicode"}]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 1 << 20])
def test_json_array_reader_matches_json_load(tmp_path, monkeypatch, chunk):
    from scale_rae_core.data import json_array

    monkeypatch.setattr(json_array, "CHUNK", chunk)
    values = [{"a": [1, 2.5e-3, None, True]}, -0.5e10, 12345, "s\u00e9", [], {}, False]
    for indent in (None, 1):
        (tmp_path / "v.json").write_text(json.dumps(values, indent=indent))
        assert list(json_array.iter_json_array(tmp_path / "v.json")) == values


def test_stage2_jsonl_with_absolute_paths_and_image_root(tmp_path):
    """The reference training guide's stage-2 JSONL: absolute image paths, no image folder."""
    (tmp_path / "store").mkdir()
    (tmp_path / "data" / "rel").mkdir(parents=True)
    (tmp_path / "store" / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "data" / "rel" / "b.png").write_bytes(image_bytes(1))
    turns = [{"from": "human", "value": "Generate an image of a cat"}, {"from": "gpt", "value": "<image>"}]
    rows = [{"image": str(tmp_path / "store" / "a.png"), "conversations": turns},
            {"image": "rel/b.png", "conversations": turns},
            {"image": "../store/a.png", "conversations": turns}]
    src = tmp_path / "lists" / "stage2.jsonl"
    src.parent.mkdir()
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = pack(src, tmp_path / "out", image_root=tmp_path / "data")
    assert (s.packed, s.skipped) == (2, 1)
    a, b = packed(tmp_path / "out")
    assert np.array_equal(pixels(a["image"]), pixels(image_bytes(0))) and np.array_equal(pixels(b["image"]), pixels(image_bytes(1)))
    reason = rejects(tmp_path / "out")[0]["reason"]
    assert reason.startswith(f"path escapes the input root {tmp_path / 'data'}: ../store/a.png")


# -------------------------------------------------------------------------------- determinism and resume


class _Killed(Exception):
    pass


def _kill_at(n: int):
    def progress(done: int, total: int) -> None:
        if done == n:
            raise _Killed
    return progress


@pytest.mark.parametrize("kind", ["wds", "parquet", "hf", "llava"])
def test_every_input_is_deterministic_and_resumable(tmp_path, kind):
    if kind == "parquet":
        pytest.importorskip("pyarrow")
    if kind == "hf":
        pytest.importorskip("datasets")
    build = {"wds": blip3o_tars, "parquet": hf_parquet, "hf": hf_disk, "llava": llava_json}[kind]
    src = build(tmp_path / "src", n=10)
    kw = {"samples_per_shard": 3, "image_root": tmp_path / "src" / "images" if kind == "llava" else None}
    ref = pack(src, tmp_path / "ref", **kw)
    assert ref.skipped == 1 and ref.packed == (10 if kind == "llava" else 20)
    pack(src, tmp_path / "two", workers=2, **kw)
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "ref")
    assert (tmp_path / "two" / "rejects.jsonl").read_bytes() == (tmp_path / "ref" / "rejects.jsonl").read_bytes()

    out = tmp_path / "cut"
    with pytest.raises(_Killed):  # stopped mid-pack, as by a kill: finished shards, a .tmp, the state file
        pack(src, out, progress=_kill_at(7), **kw)
    assert (out / STATE_NAME).is_file() and not (out / "wds_manifest.json").exists()
    s = pack(src, out, resume=True, workers=2, **kw)
    assert s.resumed_shards >= 1 and (s.packed, s.skipped) == (ref.packed, ref.skipped)
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert (out / "rejects.jsonl").read_bytes() == (tmp_path / "ref" / "rejects.jsonl").read_bytes()
