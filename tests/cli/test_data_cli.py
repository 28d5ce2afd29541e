"""`srae data synth|pack|inspect|verify` and `srae demo` through the command line."""

from __future__ import annotations

import json
import tarfile

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
