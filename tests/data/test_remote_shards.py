"""Remote shards: a manifest of `pipe:` / `file://` tars reads, resumes, trains, inspects and verifies like the
local one (no network: `pipe:cat FILE` goes through webdataset's opener as an https:// or hf:// shard would)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scale_rae_core.data.pack import pack
from scale_rae_core.data.shards import inspect, load_manifest, verify
from scale_rae_core.data.webdataset import WebDatasetReader
from scale_rae_core.errors import DataError
from tests.data.formats import image_bytes


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """26 samples (13 captioned 32x32 images, both tasks) in 7 shards of at most 4."""
    root = tmp_path_factory.mktemp("remote")
    (root / "in").mkdir()
    for i in range(13):
        (root / "in" / f"{i:02d}.png").write_bytes(image_bytes(i, size=(32, 32)))
        (root / "in" / f"{i:02d}.txt").write_text(f"caption {i}")
    pack(root / "in", root / "packed", samples_per_shard=4, codec="jpg")
    return root / "packed"


def remote_copy(local: Path, out: Path, url=lambda p: f"pipe:cat {p}", counts: bool = True, srae: bool = True) -> Path:
    """A manifest in ``out`` listing ``local``'s tars by URL (srae layout with checksums, or reference layout)."""
    m = json.loads((local / "wds_manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    if srae:
        for s in m["shards"]:
            s["name"] = url(local / s["name"])
    else:
        m = {"dataset_name": "ref", "tars": [url(local / s["name"]) for s in m["shards"]],
             **({"samples_per_tar": m["samples_per_tar"]} if counts else {})}
    (out / "wds_manifest.json").write_text(json.dumps(m))
    return out


def read(reader) -> list[tuple]:
    return [(s.key, s.position, s.conversations, s.metadata, np.asarray(s.image).tobytes()) for s in reader]


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("rank", [0, 1])
def test_pipe_manifest_reads_the_same_samples_as_the_local_one(local, tmp_path, rank):
    remote = remote_copy(local, tmp_path / "remote")
    m = load_manifest(remote)
    assert m.tars[0] == f"pipe:cat {local / 'shard-000000.tar'}" and m.counts == [4, 4, 4, 4, 4, 4, 2]
    for kw in ({"shuffle": False}, {"seed": 3, "shuffle_buffer": 5}):
        a = read(WebDatasetReader(local, rank=rank, world_size=2, **kw))
        b = read(WebDatasetReader(remote, rank=rank, world_size=2, **kw))
        assert a == b and len(a) == 13


def test_file_urls_and_a_reference_manifest_of_pipes(local, tmp_path):
    files = remote_copy(local, tmp_path / "files", url=lambda p: p.as_uri(), srae=False)
    assert load_manifest(files).tars[0] == local / "shard-000000.tar"  # file:// is read with random access
    pipes = remote_copy(local, tmp_path / "pipes", srae=False)
    expected = read(WebDatasetReader(local, seed=1))
    assert read(WebDatasetReader(files, seed=1)) == read(WebDatasetReader(pipes, seed=1)) == expected


@pytest.mark.parametrize("k", [0, 5, 9, 25])
def test_a_position_saved_reading_local_shards_resumes_on_the_remote_ones(local, tmp_path, k):
    remote = remote_copy(local, tmp_path / "remote")
    full = read(WebDatasetReader(local, seed=7, shuffle_buffer=6))
    reader = WebDatasetReader(local, seed=7, shuffle_buffer=6)
    it = iter(reader)
    head = [next(it) for _ in range(k)]
    resumed = WebDatasetReader(remote, seed=7, shuffle_buffer=6)
    resumed.load_state_dict(json.loads(json.dumps(reader.state_dict())))
    tail = read(resumed)
    assert [s.key for s in head] + [t[0] for t in tail] == [f[0] for f in full] and tail == full[k:]


def test_dataloader_workers_stream_remote_shards(local, tmp_path):
    remote = remote_copy(local, tmp_path / "remote")

    def keys(path):
        reader = WebDatasetReader(path, num_workers=2, seed=2, shuffle_buffer=3, decode_images=False)
        loader = torch.utils.data.DataLoader(reader, batch_size=3, num_workers=2, collate_fn=list)
        return [(s.key, s.position) for batch in loader for s in batch]

    assert keys(remote) == keys(local) and len(keys(local)) == 26


def test_decoder_training_on_a_pipe_manifest_matches_the_local_one(local, tmp_path, monkeypatch):
    from scale_rae_core.config import load_profile
    from scale_rae_core.train.decoder import train_decoder

    monkeypatch.setenv("SRAE_CACHE", str(tmp_path / "cache"))
    remote = remote_copy(local, tmp_path / "remote")
    profile = load_profile("tiny-cpu", ["decoder_training.steps=2", "decoder_training.global_batch_size=4",
                                        "decoder_training.micro_batch_size=4", "decoder_training.warmup_epochs=0",
                                        "decoder_training.image_size=32", "model.encoder.input_size=32",
                                        "model.decoder.image_size=32"])
    a = train_decoder(profile, local, tmp_path / "run-local")
    b = train_decoder(profile, remote / "wds_manifest.json", tmp_path / "run-remote")
    assert a.losses == b.losses and len(a.losses) == 2


# ---------------------------------------------------------------------------------------- inspect/verify


def test_inspect_and_verify_remote_shards(local, tmp_path):
    remote = remote_copy(local, tmp_path / "remote")
    here, there = inspect(local, samples=5), inspect(remote, samples=5)
    assert [s["name"] for s in there["shards"]] == [f"pipe:cat {local / s['name']}" for s in here["shards"]]
    assert there["shards"][0]["bytes"] is None and there["total"] == 26
    assert [{k: v for k, v in s.items() if k != "shard"} for s in there["samples"]] == \
        [{k: v for k, v in s.items() if k != "shard"} for s in here["samples"]]
    report = verify(remote)
    assert report.ok and (report.shards, report.samples) == (7, 26)

    broken = tmp_path / "broken"
    shutil.copytree(local, broken)
    (broken / "shard-000001.tar").write_bytes((local / "shard-000001.tar").read_bytes()[:3000])
    m = json.loads((remote / "wds_manifest.json").read_text())
    m["shards"][1]["name"] = f"pipe:cat {broken / 'shard-000001.tar'}"
    m["shards"][2]["name"] = f"pipe:cat {tmp_path / 'gone.tar'}"
    (remote / "wds_manifest.json").write_text(json.dumps(m))
    problems = [(p.file, p.reason) for p in verify(remote).problems]
    cut, gone = f"pipe:cat {broken / 'shard-000001.tar'}", f"pipe:cat {tmp_path / 'gone.tar'}"
    assert (cut, "checksum differs from the manifest (changed after packing)") in problems
    assert any(f == cut and r.startswith("unreadable tar after") for f, r in problems)
    assert any(f == gone and r.startswith("unreadable tar after 0 samples") for f, r in problems)
    assert (gone, "holds 0 samples, the manifest says 4") in problems


# ------------------------------------------------------------------------------------------------- errors


def test_remote_tars_need_counts(local, tmp_path):
    remote = remote_copy(local, tmp_path / "remote", srae=False, counts=False)
    with pytest.raises(DataError, match=r"remote tar pipe:cat .*shard-000000.tar has no sample count; add "
                                        r"'samples_per_tar' \(one count per tar, in order\) to the manifest"):
        WebDatasetReader(remote)


def test_a_remote_tar_shorter_than_its_count_or_unsorted_is_one_line(local, tmp_path):
    remote = remote_copy(local, tmp_path / "remote")
    m = json.loads((remote / "wds_manifest.json").read_text())
    m["shards"][0]["count"], m["total"] = 5, 27
    (remote / "wds_manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard-000000.tar: ends after 4 samples, sample 4 was asked for; the manifest's count"):
        read(WebDatasetReader(remote, shuffle=False))

    unsorted = tmp_path / "unsorted.tar"
    with tarfile.open(local / "shard-000000.tar") as src, tarfile.open(unsorted, "w") as dst:
        members = src.getmembers()
        for info in members[2:4] + members[0:2]:  # the second sample first
            dst.addfile(info, src.extractfile(info))
    m["shards"][0].update(name=f"pipe:cat {unsorted}", count=4)
    m["total"] = 26
    (remote / "wds_manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"unsorted.tar: 000000000_und.json comes after 000000000_gen.json|"
                                        r"unsorted.tar: 000000000_gen.json comes after 000000000_und.json"):
        read(WebDatasetReader(remote, shuffle=False))
