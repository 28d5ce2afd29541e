"""`srae data npz`, `srae eval fid` and `srae eval probe` from the command line: outputs and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.eval.adm_npz import AdmNpzWriter

runner = CliRunner()


def _run(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SRAE_CACHE", str(tmp_path_factory.getbasetemp() / "srae-cache"))


def _folder(root, n, side, seed, classes=("a",)):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def test_npz_then_fid_with_the_labelled_fallback(tmp_path):
    ref_dir = _folder(tmp_path / "ref", 10, 20, 0)
    text = _run(["data", "npz", str(ref_dir), "--out", str(tmp_path / "ref.npz"), "--image-size", "16"])
    assert text.strip() == f"wrote 10 images of 16x16 to {tmp_path / 'ref.npz'}"
    samples = AdmNpzWriter(tmp_path / "samples.npz", 8, 16, 16)
    samples.write(np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    samples.close()
    out = _run(["eval", "fid", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--fid-net", "random",
                "--out", str(tmp_path / "fid.json"), "--quiet"])
    assert "8 samples vs 10 reference images at 16x16: FID " in out and "sFID n/a" in out and "IS n/a" in out
    assert "NOT comparable to any published FID" in out
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["num_samples"] == 8 and result["fid"] > 0 and set(result["omitted"]) == {"sfid", "inception_score"}


def test_fid_errors_are_one_line(tmp_path):
    ref = AdmNpzWriter(tmp_path / "ref.npz", 5, 16, 16)
    ref.write(np.zeros((5, 16, 16, 3), dtype=np.uint8))
    ref.close()
    small = AdmNpzWriter(tmp_path / "small.npz", 5, 8, 8)
    small.write(np.zeros((5, 8, 8, 3), dtype=np.uint8))
    small.close()
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 16, 16, 3), dtype=np.uint8))
    for samples, reference, message in (
        ("small.npz", "ref.npz", "the reference batch is 16x16 but the samples"),
        ("ref.npz", "other.npz", "has no arr_0 (members: images)"),
    ):
        out = _run(["eval", "fid", str(tmp_path / samples), "--ref", str(tmp_path / reference), "--fid-net", "random"], 1)
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_npz_of_mixed_sizes_without_image_size_is_one_line(tmp_path):
    _folder(tmp_path / "imgs", 1, 16, 0, classes=("a",))
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "zz.png")
    out = _run(["data", "npz", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.npz")], 1)
    assert out.count("\n") == 1 and "pass --image-size" in out


def test_probe_on_a_class_folder(tmp_path):
    root = tmp_path / "colours"
    for name, rgb in {"blue": (30, 60, 220), "red": (220, 40, 40)}.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (32, 32), tuple(min(255, c + 7 * i) for c in rgb)).save(root / name / f"{i}.png")
    out = _run(["eval", "probe", "--data", str(root), "--out", str(tmp_path / "probe.json"), "--heldout", "0.4"])
    assert "efficientnet-lite0: top-1 1.0000 on 4 held-out images (2 classes, trained on 6" in out
    assert json.loads((tmp_path / "probe.json").read_text())["classes"] == ["blue", "red"]
