"""`srae data synth|pack|inspect|verify` through the command line (the demo: tests/demo)."""

from __future__ import annotations

import json
import tarfile

import pytest
from typer.testing import CliRunner

from scale_rae_cli.main import app

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_synth_pack_inspect_verify(tmp_path):
    world, packed = tmp_path / "shapes", tmp_path / "packed"
    out = _ok(["data", "synth", str(world), "--n", "20", "--image-size", "32"])
    assert "18 training images (234 conversations), 2 held-out images" in out
    out = _ok(["data", "pack", str(world / "conversations.jsonl"), "--out", str(packed), "--quiet", "--samples-per-shard", "40"])
    assert "packed 234 samples into 6 shards" in out and "skipped 0" in out
    manifest = json.loads((packed / "wds_manifest.json").read_text())
    assert manifest["total"] == 234 and len(manifest["tars"]) == 6
    events = [json.loads(line) for line in (packed / "pack.events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["pack.start", "pack.done"] and events[1]["packed"] == 234
    info = json.loads(_ok(["data", "inspect", str(packed), "--json", "--samples", "2"]))
    assert info["total"] == 234 and len(info["samples"]) == 2 and info["samples"][0]["image_size"] == [32, 32]
    assert "ok: 234 samples in 6 shards checked, 0 problems" in _ok(["data", "verify", str(packed)])


def test_verify_fails_with_exit_1_on_a_damaged_shard(tmp_path):
    world, packed = tmp_path / "shapes", tmp_path / "packed"
    _ok(["data", "synth", str(world), "--n", "10", "--image-size", "16"])
    _ok(["data", "pack", str(world / "captioned"), "--out", str(packed), "--quiet", "--task", "generation"])
    shard = sorted(packed.glob("*.tar"))[0]
    with tarfile.open(shard) as t:
        names = t.getnames()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncate
    result = runner.invoke(app, ["data", "verify", str(packed)])
    assert result.exit_code == 1 and "FAILED" in result.output and "problem:" in result.output
    assert names  # the shard had members before damage


def test_pack_bad_inputs_are_one_line_errors(tmp_path):
    result = runner.invoke(app, ["data", "pack", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1
    (tmp_path / "in").mkdir()
    result = runner.invoke(app, ["data", "pack", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--codec", "gif"])
    assert result.exit_code == 1 and "codec" in result.output
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--n", "0"])
    assert result.exit_code == 1 and result.output.startswith("error: ")


def test_progress_bar_shows_rate_unless_quiet(tmp_path):
    world = tmp_path / "shapes"
    _ok(["data", "synth", str(world), "--n", "10", "--image-size", "16"])
    loud = _ok(["data", "pack", str(world / "captioned"), "--out", str(tmp_path / "a")])
    assert "packing" in loud and "/s" in loud and "eta" in loud
    quiet = _ok(["data", "pack", str(world / "captioned"), "--out", str(tmp_path / "b"), "--quiet"])
    assert "packing" not in quiet and quiet.startswith("packed ")


def test_pack_tars_and_a_parquet_error_then_inspect_and_verify_a_pipe_manifest(tmp_path):
    from tests.data.formats import blip3o_tars

    tars = blip3o_tars(tmp_path / "tars")
    out = _ok(["data", "pack", str(tars / "shard-{000000..000002}.tar"), "--out", str(tmp_path / "p"), "--quiet",
               "--task", "generation", "--caption-column", "txt", "--samples-per-shard", "4"])
    assert "packed 6 samples into 2 shards" in out and "skipped 1" in out

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), tmp_path / "t.parquet")
    result = runner.invoke(app, ["data", "pack", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "q")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: ") and "name it with --caption-column" in result.output

    manifest = json.loads((tmp_path / "p" / "wds_manifest.json").read_text())
    for s in manifest["shards"]:
        s["name"] = f"pipe:cat {tmp_path / 'p' / s['name']}"
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "wds_manifest.json").write_text(json.dumps(manifest))
    info = json.loads(_ok(["data", "inspect", str(tmp_path / "remote"), "--json", "--samples", "2"]))
    assert info["total"] == 6 and info["samples"][1]["conversations"][0]["value"] == "Generate an image of caption 1"
    assert info["shards"][0]["name"].startswith("pipe:cat ")
    assert "ok: 6 samples in 2 shards checked, 0 problems" in _ok(["data", "verify", str(tmp_path / "remote")])
