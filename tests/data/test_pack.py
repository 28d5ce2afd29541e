"""`pack`, `inspect` and `verify`: formats, rejects, determinism, resume, damaged shards."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scale_rae_core.data.pack import STATE_NAME, pack
from scale_rae_core.data.shards import inspect, verify
from scale_rae_core.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def png_bytes(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def caption_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:02d}.png").write_bytes(png_bytes(i))
        (root / f"img{i:02d}.txt").write_text(f"a red square number {i}\n")
    return root


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


# ---------------------------------------------------------------------------------------------- formats


def test_captions_folder_layout_manifest_and_conversations(tmp_path):
    src = caption_folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    s = pack(src, out, samples_per_shard=4, dataset_name="toy")
    assert (s.format, s.packed, s.skipped, s.shards) == ("captions", 10, 0, 3)

    manifest = json.loads((out / "wds_manifest.json").read_text())
    assert manifest["dataset_name"] == "toy"
    assert manifest["samples_per_tar"] == [4, 4, 2] and manifest["total"] == 10
    assert manifest["estimated_total_samples"] == 10 and manifest["samples_per_tar_assumption"] == 4
    assert [Path(t).name for t in manifest["tars"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all(Path(t).is_absolute() for t in manifest["tars"])
    assert not (out / STATE_NAME).exists()

    members = tar_members(out / "shard-000000.tar")
    assert list(members) == [
        "000000000_gen.json", "000000000_gen.png", "000000000_und.json", "000000000_und.png",
        "000000001_gen.json", "000000001_gen.png", "000000001_und.json", "000000001_und.png",
    ]
    gen = json.loads(members["000000000_gen.json"])
    und = json.loads(members["000000000_und.json"])
    assert gen == {
        "conversations": [
            {"from": "human", "value": "Generate an image of a red square number 0"},
            {"from": "gpt", "value": "<image>"},
        ],
        "metadata": {},
        "image_filename": "000000000_gen.png",
        "source": "img00.png",
    }
    assert und["conversations"] == [
        {"from": "human", "value": "<image>\nDescribe this image."},
        {"from": "gpt", "value": "a red square number 0"},
    ]
    # Lossless: the packed pixels are the input pixels.
    packed = np.asarray(Image.open(io.BytesIO(members["000000000_gen.png"])))
    original = np.asarray(Image.open(io.BytesIO(png_bytes(0))))
    assert np.array_equal(packed, original)
    with tarfile.open(out / "shard-000000.tar") as tf:
        info = tf.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == (0, 0, 0, "", 0o644)


@pytest.mark.parametrize("task,first", [("generation", "Generate an image of cap 0"), ("understanding", "<image>\nDescribe this image.")])
def test_caption_csv_and_jsonl_inputs(tmp_path, task, first):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png_bytes(i))
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text("image,caption\n" + "".join(f"imgs/{i}.png,cap {i}\n" for i in range(3)))
    jsonl_path = tmp_path / "caps.jsonl"
    jsonl_path.write_text("".join(json.dumps({"image": f"imgs/{i}.png", "caption": f"cap {i}"}) + "\n" for i in range(3)))
    for src, name in ((csv_path, "csv"), (jsonl_path, "jsonl")):
        out = tmp_path / f"out-{name}"
        s = pack(src, out, task=task)
        assert (s.format, s.packed, s.skipped) == ("captions", 3, 0)
        members = tar_members(out / "shard-000000.tar")
        assert sorted(members) == [f"00000000{i}.{ext}" for i in range(3) for ext in ("json", "png")]
        obj = json.loads(members["000000000.json"])
        assert obj["conversations"][0]["value"] == first
        assert obj["source"] == ("caps.csv:2" if name == "csv" else "caps.jsonl:1")


def test_conversations_jsonl_normalises_roles_and_keeps_text_only(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    lines = [
        {"image": "a.png", "conversations": [{"role": "user", "content": "<image>\nWhat?"},
                                             {"role": "assistant", "content": "Noise."}], "metadata": {"k": 1}},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"image": [str(tmp_path / "a.png")], "conversations": [{"from": "human", "value": "x"}]},
    ]
    src = tmp_path / "conv.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    s = pack(src, out)
    assert (s.format, s.packed, s.skipped) == ("conversations", 3, 0)
    m = tar_members(out / "shard-000000.tar")
    assert sorted(m) == ["000000000.json", "000000000.png", "000000001.json", "000000002.json", "000000002.png"]
    first = json.loads(m["000000000.json"])
    assert first["conversations"] == [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]
    assert first["metadata"] == {"k": 1}
    assert "image_filename" not in json.loads(m["000000001.json"])


def test_classes_tree_labels(tmp_path):
    for label in ("dog", "cat"):
        (tmp_path / "in" / label).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "in" / label / f"{i}.png").write_bytes(png_bytes(i))
    s = pack(tmp_path / "in", tmp_path / "out", codec="jpg", quality=90)
    assert (s.format, s.packed) == ("classes", 4)
    m = tar_members(tmp_path / "out" / "shard-000000.tar")
    metas = [json.loads(m[f"00000000{i}.json"]) for i in range(4)]
    assert [x["metadata"] for x in metas] == [{"label": "cat", "class_index": 0}] * 2 + [{"label": "dog", "class_index": 1}] * 2
    assert all(x["conversations"] == [] for x in metas)
    assert Image.open(io.BytesIO(m["000000000.jpg"])).format == "JPEG"


def test_image_size_shrinks_keeping_aspect_and_webp(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "wide.png").write_bytes(png_bytes(0, (32, 20)))
    (src / "small.png").write_bytes(png_bytes(1, (8, 6)))
    for stem in ("wide", "small"):
        (src / f"{stem}.txt").write_text("x")
    pack(src, tmp_path / "out", image_size=16, codec="webp", task="generation")
    m = tar_members(tmp_path / "out" / "shard-000000.tar")
    sizes = {json.loads(m[k])["source"]: Image.open(io.BytesIO(m[k[:-5] + ".webp"])).size for k in m if k.endswith(".json")}
    assert sizes == {"wide.png": (16, 10), "small.png": (8, 6)}  # never enlarged


def test_shard_byte_limit(tmp_path):
    src = caption_folder(tmp_path / "in", 8)
    s = pack(src, tmp_path / "out", task="generation", max_shard_bytes=20480)
    counts = json.loads((tmp_path / "out" / "wds_manifest.json").read_text())["samples_per_tar"]
    assert sum(counts) == 8 and len(counts) == s.shards > 1 and counts[0] > 1
    assert all(p.stat().st_size <= 20480 for p in (tmp_path / "out").glob("*.tar"))


# ---------------------------------------------------------------------------------------------- rejects


def _bomb_png() -> bytes:
    """A valid 16x16 PNG whose header claims 100000x100000 pixels."""
    data = bytearray(png_bytes(0, (16, 16)))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_bad_inputs_are_rejected_with_reasons(tmp_path):
    src = caption_folder(tmp_path / "in", 2)
    good = png_bytes(5, (32, 32))
    corrupt = bytearray(good)
    corrupt[60:120] = bytes(60)
    bad = {
        "corrupt.png": bytes(corrupt),
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "text.jpg": b"this is not an image at all",
        "bomb.png": _bomb_png(),
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
        (src / name).with_suffix(".txt").write_text("caption")
    (src / "nocap.png").write_bytes(good)
    outside = tmp_path / "outside.png"
    outside.write_bytes(good)
    (src / "link.png").symlink_to(outside)
    (src / "link.txt").write_text("caption")

    s = pack(src, tmp_path / "out", task="generation")
    assert (s.packed, s.skipped) == (2, 7)
    reasons = {r["source"]: r["reason"] for r in read_rejects(tmp_path / "out")}
    assert "corrupt" in reasons["corrupt.png"]
    assert reasons["truncated.png"].startswith("truncated or corrupt image")
    assert reasons["empty.png"] == "empty file"
    assert reasons["text.jpg"] == "not an image (Pillow cannot identify it)"
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["nocap.png"] == "missing caption (nocap.txt not found)"
    assert reasons["link.png"].startswith("path escapes the input root")


def test_pixel_limit_rejects_as_bomb(tmp_path):
    src = caption_folder(tmp_path / "in", 2)
    with pytest.raises(DataError, match="all 2 inputs were rejected"):
        pack(src, tmp_path / "out", max_pixels=100)
    reasons = [r["reason"] for r in read_rejects(tmp_path / "out")]
    assert reasons == ["decompression bomb: 24x16 = 384 pixels exceeds the limit of 100"] * 2


def test_jsonl_line_problems_and_path_escapes_are_rejected(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes(0))
    (tmp_path / "secret.png").write_bytes(png_bytes(1))
    rows = [
        json.dumps({"image": "ok.png", "caption": "fine"}),
        "{not json",
        json.dumps({"image": "../secret.png", "caption": "escape"}),
        json.dumps({"image": str(tmp_path / "secret.png"), "caption": "absolute outside"}),
        json.dumps({"image": "ok.png"}),
        json.dumps({"image": "missing.png", "caption": "gone"}),
        json.dumps(["a", "list"]),
    ]
    (root / "caps.jsonl").write_text("\n".join(rows) + "\n")
    s = pack(root / "caps.jsonl", tmp_path / "out", task="understanding")
    assert (s.packed, s.skipped) == (2, 5)
    rejects = read_rejects(tmp_path / "out")
    assert [r["source"] for r in rejects] == [f"caps.jsonl:{i}" for i in (2, 3, 5, 6, 7)]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith("line is not valid JSON")
    assert reasons[1].startswith("path escapes the input root") and "../secret.png" in reasons[1]
    assert reasons[2] == "missing caption"
    assert reasons[3] == "image file not found: missing.png"
    assert reasons[4] == "line is a JSON list, not an object"
    # An absolute path is used as it is (the reference's stage-2 JSONL layout), wherever it points.
    m = tar_members(tmp_path / "out" / "shard-000000.tar")
    assert json.loads(m["000000003.json"])["conversations"][1]["value"] == "absolute outside"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(m["000000003.png"]))), np.asarray(Image.open(io.BytesIO(png_bytes(1)))))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"format": "tsv"}, "--format 'tsv': unknown"),
        ({"codec": "gif"}, "--codec 'gif': unknown"),
        ({"samples_per_shard": 0}, "--samples-per-shard 0: must be at least 1"),
        ({"task": "edit"}, "--task 'edit': unknown"),
        ({"workers": 0}, "--workers 0"),
    ],
)
def test_bad_options_raise(tmp_path, kwargs, match):
    src = caption_folder(tmp_path / "in", 1)
    with pytest.raises(DataError, match=match):
        pack(src, tmp_path / "out", **kwargs)


def test_missing_input_and_non_empty_out(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        pack(tmp_path / "nope", tmp_path / "out")
    src = caption_folder(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty; pass --resume .* or choose an empty directory"):
        pack(src, tmp_path / "out")
    with pytest.raises(DataError, match=r"holds files srae did not write \(notes.txt\)"):
        pack(src, tmp_path / "out", resume=True)


# ------------------------------------------------------------------------------ determinism and resume


def test_byte_identical_for_one_and_two_workers(tmp_path):
    src = caption_folder(tmp_path / "in", 12)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (src / "broken.txt").write_text("x")
    a = pack(src, tmp_path / "w1", samples_per_shard=5, workers=1)
    b = pack(src, tmp_path / "w2", samples_per_shard=5, workers=2)
    assert a.shards == b.shards == 5
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert (tmp_path / "w1" / "rejects.jsonl").read_bytes() == (tmp_path / "w2" / "rejects.jsonl").read_bytes()


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from scale_rae_core.data.pack import pack

def progress(done, total):
    if done == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

pack(Path(sys.argv[1]), Path(sys.argv[2]), task="generation", samples_per_shard=3, progress=progress)
"""


def test_resume_after_kill_matches_uninterrupted_pack(tmp_path):
    src = caption_folder(tmp_path / "in", 10)
    (src / "img04.txt").unlink()  # a reject in the middle, before the kill point
    ref = tmp_path / "ref"
    pack(src, ref, task="generation", samples_per_shard=3)

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(src), str(out), "8"], env=env, timeout=120)
    assert proc.returncode == -9
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar.tmp"]
    assert not (out / "wds_manifest.json").exists()

    with pytest.raises(DataError, match="pass --resume"):
        pack(src, out, task="generation", samples_per_shard=3)
    s = pack(src, out, task="generation", samples_per_shard=3, resume=True)
    assert (s.resumed_shards, s.shards, s.packed, s.skipped) == (2, 3, 9, 1)
    assert shard_bytes(out) == shard_bytes(ref)
    assert (out / "rejects.jsonl").read_bytes() == (ref / "rejects.jsonl").read_bytes()
    assert not list(out.glob("*.tmp")) and not (out / STATE_NAME).exists()
    keys = [k for p in sorted(out.glob("*.tar")) for k in tar_members(p) if k.endswith(".json")]
    assert keys == [f"{i:09d}.json" for i in range(10) if i != 4]  # none lost, none twice


def test_resume_rewrites_a_damaged_or_missing_last_shard(tmp_path):
    src = caption_folder(tmp_path / "in", 7)
    out = tmp_path / "out"
    pack(src, out, task="generation", samples_per_shard=3)
    expected = shard_bytes(out)
    # Complete pack + resume: nothing to do.
    assert pack(src, out, task="generation", samples_per_shard=3, resume=True).resumed_shards == 3
    last = out / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[:700])
    s = pack(src, out, task="generation", samples_per_shard=3, resume=True)
    assert s.resumed_shards == 2 and shard_bytes(out) == expected
    (out / "shard-000001.tar").unlink()
    s = pack(src, out, task="generation", samples_per_shard=3, resume=True)
    assert s.resumed_shards == 1 and shard_bytes(out) == expected
    with pytest.raises(DataError, match=r"different inputs/options \(codec\)"):
        pack(src, out, task="generation", samples_per_shard=3, codec="jpg", resume=True)


# ---------------------------------------------------------------------------------------- inspect/verify


def test_inspect_reports_counts_and_decoded_samples(tmp_path):
    src = caption_folder(tmp_path / "in", 3)
    pack(src, tmp_path / "out", samples_per_shard=4, task="generation", dataset_name="toy")
    info = inspect(tmp_path / "out", samples=2)
    assert info["dataset_name"] == "toy" and info["total"] == 3 and info["skipped"] == 0
    assert [(s["name"], s["count"]) for s in info["shards"]] == [("shard-000000.tar", 3)]
    assert info["samples"][1] == {
        "key": "000000001",
        "shard": "shard-000000.tar",
        "image_size": [24, 16],
        "conversations": [
            {"from": "human", "value": "Generate an image of a red square number 1"},
            {"from": "gpt", "value": "<image>"},
        ],
        "metadata": {},
    }


def test_verify_detects_tampered_truncated_and_missing_shards(tmp_path):
    src = caption_folder(tmp_path / "in", 6)
    out = tmp_path / "out"
    pack(src, out, task="generation", samples_per_shard=2)
    clean = verify(out)
    assert clean.ok and (clean.shards, clean.samples) == (3, 6)

    # Tamper with image bytes inside shard 0 (same size, so the tar still parses).
    data = bytearray((out / "shard-000000.tar").read_bytes())
    start = 512 * 3  # header(json) + json data block + header(png) -> png data
    data[start + 40 : start + 200] = bytes(160)
    (out / "shard-000000.tar").write_bytes(bytes(data))
    # Truncate shard 1 in the middle of its second sample; delete shard 2.
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[: 512 * 5 + 100])
    (out / "shard-000002.tar").unlink()

    report = verify(out)
    assert not report.ok
    problems = [(p.file, p.reason) for p in report.problems]
    assert ("shard-000000.tar", "checksum differs from the manifest (changed after packing)") in problems
    assert any(f == "shard-000000.tar" and "000000000.png: image does not decode" in r for f, r in problems)
    assert any(f == "shard-000001.tar" and r.startswith("unreadable tar") for f, r in problems)
    assert ("shard-000002.tar", "missing") in problems
    assert any(f == "wds_manifest.json" and "the manifest says 6" in r for f, r in problems)


# ------------------------------------------------------------------------------------ one bad record, one reject


def test_records_that_used_to_abort_a_pack_are_rejected_one_by_one(tmp_path):
    """An unhashable role, a path longer than the file-name limit, nested-too-deep JSON: each costs its line."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes(0))
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    rows = [
        json.dumps(good),
        json.dumps({**good, "conversations": [{"from": ["human"], "value": "x"}]}),
        json.dumps({**good, "image": "x" * 5000 + ".png"}),
        "[" * 100000 + "]" * 100000,
        json.dumps({**good, "image": "ok\u0000.png"}),
        json.dumps(good),
    ]
    (root / "conv.jsonl").write_text("\n".join(rows) + "\n")
    s = pack(root / "conv.jsonl", tmp_path / "out")
    assert (s.packed, s.skipped) == (2, 4)
    reasons = {r["source"]: r["reason"] for r in read_rejects(tmp_path / "out")}
    assert "role ['human']" in reasons["conv.jsonl:2"]
    assert reasons["conv.jsonl:3"].startswith("image path unusable (File name too long)")
    assert reasons["conv.jsonl:4"].startswith("line is not valid JSON: RecursionError")
    assert reasons["conv.jsonl:5"] == "image path contains a NUL character"


def test_csv_rows_that_are_not_utf8_or_too_long_are_rejected_alone(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(png_bytes(i))
    huge = "y" * 200_000  # over Python's default 131072-character field limit: still fine here
    lines = [b"image,caption", b"0.png,first", b"1.png,caf\xe9 latin-1", f"2.png,{huge}".encode(), b"0.png,last"]
    (root / "caps.csv").write_bytes(b"\n".join(lines) + b"\n")
    s = pack(root / "caps.csv", tmp_path / "out", task="understanding")
    assert (s.packed, s.skipped) == (3, 1)
    assert read_rejects(tmp_path / "out") == [{"source": "caps.csv:3", "reason": "row is not UTF-8 text"}]
    captions = [json.loads(v)["conversations"][1]["value"] for k, v in sorted(tar_members(s.out / "shard-000000.tar").items())
                if k.endswith(".json")]
    assert captions == ["first", huge, "last"]


def test_a_field_over_the_csv_limit_rejects_only_its_row(tmp_path, monkeypatch):
    from scale_rae_core.data import sources

    monkeypatch.setattr(sources, "CSV_FIELD_LIMIT", 1000)
    root = tmp_path / "data"
    root.mkdir()
    (root / "0.png").write_bytes(png_bytes(0))
    (root / "caps.csv").write_text("image,caption\n0.png,short\n0.png," + "z" * 2000 + "\n0.png,after\n")
    s = pack(root / "caps.csv", tmp_path / "out", task="understanding")
    assert (s.packed, s.skipped) == (2, 1)
    (reject,) = read_rejects(tmp_path / "out")
    assert reject["reason"].startswith("row does not parse as CSV: field larger than field limit (1000)")
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is restored


def test_an_image_that_fails_in_an_unexpected_way_is_a_reject(tmp_path, monkeypatch):
    from scale_rae_core.data import pack as pack_module

    def boom(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(pack_module, "encode_image", boom)
    src = caption_folder(tmp_path / "in", 2)
    with pytest.raises(DataError, match="all 2 inputs were rejected"):
        pack(src, tmp_path / "out")
    assert {r["reason"] for r in read_rejects(tmp_path / "out")} == {"cannot use the image (MemoryError: simulated)"}


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out.update(int(c) for c in children)
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker processes")
def test_pack_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of `srae data pack --workers 2` must not leave its workers running."""
    import signal
    import time

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(big, format="PNG")
    for i in range(60):  # slow enough to kill mid-pack: ~0.3 s per image
        (src / f"{i:02d}.png").write_bytes(big.getvalue())
        (src / f"{i:02d}.txt").write_text("noise")
    code = (
        "import sys; from pathlib import Path; from scale_rae_core.data.pack import pack; "
        "pack(Path(sys.argv[1]), Path(sys.argv[2]), workers=2)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(tmp_path / "out")], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            workers = _children(proc.pid)
        assert len(workers) >= 2, "the workers never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {w for w in alive if Path(f"/proc/{w}").exists() and "Z" not in _state(w)}
        assert not alive, f"workers {alive} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
