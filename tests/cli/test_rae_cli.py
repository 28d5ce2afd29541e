"""`srae stat`, `srae train decoder`, `srae eval recon`, `srae convert decoder` through the `srae` app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scale_rae_cli.main import app
from scale_rae_core.config import load_profile
from scale_rae_core.data.pack import pack
from scale_rae_core.models import build
from scale_rae_core.models.decoder import load_decoder
from scale_rae_core.models.stats import load_stats
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.decoder_data import batches, open_images

runner = CliRunner()
SMALL = ["--set", "model.encoder.input_size=32", "--set", "model.decoder.image_size=32"]


def _run(args: list[str], code: int = 0) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    synthesize(root / "shapes", 24, image_size=32, seed=0, split_heldout=0.25)
    pack(root / "shapes" / "conversations.jsonl", root / "packed", samples_per_shard=40)
    return {"shapes": root / "shapes", "packed": root / "packed", "heldout": root / "shapes" / "heldout" / "captioned"}


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SRAE_CACHE", str(tmp_path_factory.getbasetemp() / "srae-cache"))


def test_help_has_an_example():
    for args in (["stat"], ["train", "decoder"], ["eval", "recon"], ["convert", "decoder"]):
        assert "Example: srae" in _run([*args, "--help"])


def test_stat_equals_a_direct_computation(world, tmp_path):
    out = tmp_path / "stats.safetensors"
    text = _run(["stat", "--data", str(world["packed"]), "--out", str(out), "--quiet", *SMALL])
    assert "latent stats of 18 images" in text  # 18 training images, each once (repeats in the pack skipped)
    stats = load_stats(out)
    enc = build.build_encoder(load_profile("tiny-cpu", ["model.encoder.input_size=32"]).model.encoder)
    images = torch.cat([x for x, _ in batches(open_images(world["shapes"] / "captioned", image_size=32, train=False), 64)])
    with torch.no_grad():
        z = enc(images).double()  # (18, 16, C)
    assert stats.count == 18
    # `srae stat` encodes in batches of its own: conv rounding differs with the batch (see test_dit's cache test)
    torch.testing.assert_close(stats.mean.double(), z.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.var.double(), z.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
    _run(["stat", "--data", str(world["packed"]), "--out", str(tmp_path / "s.pt"), *SMALL], code=1)


def test_train_export_eval_and_errors(world, tmp_path):
    run = tmp_path / "run"
    text = _run(["train", "decoder", "--data", str(world["shapes"] / "classes"), "--out", str(run), "--steps", "2",
                 "--quiet", *SMALL, "--set", "decoder_training.global_batch_size=4",
                 "--set", "decoder_training.micro_batch_size=4", "--set", "decoder_training.image_size=32"])
    assert "trained to step 2" in text and "EMA decoder" in text
    dec = load_decoder(run / "decoder")
    assert dec.cfg.image_size == 32
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train_decoder.step"]
    assert {"loss", "l1", "lpips", "gan", "d_weight", "lr", "images_per_s"} <= set(steps[-1])
    # a second run into the same folder must say --resume
    again = _run(["train", "decoder", "--data", str(world["shapes"] / "classes"), "--out", str(run), *SMALL], code=1)
    assert "--resume" in again

    out = tmp_path / "recon.json"
    _run(["eval", "recon", "--decoder", str(run / "decoder"), "--data", str(world["heldout"]), "--out", str(out),
          "--fid-net", "random", "--quiet", *SMALL])
    r = json.loads(out.read_text())
    assert {"psnr", "ssim", "rfid", "fid_network", "num_images"} <= set(r) and r["num_images"] == 6
    assert "random-projection" in r["fid_network"]


@pytest.mark.parametrize(("key", "hint"), [("lpips_weight", "decoder_training.lpips_weights"),
                                           ("gan_weight", "decoder_training.disc_backbone")])
def test_missing_loss_weights_are_one_line_errors(world, tmp_path, key, hint):
    text = _run(["train", "decoder", "--data", str(world["shapes"] / "classes"), "--out", str(tmp_path / "r"),
                 *SMALL, "--set", f"decoder_training.{key}=1.0"], code=1)
    line = text.strip()
    assert line.startswith("error:") and hint in line and "\n" not in line
    assert ("vgg16-397923af.pth" in line) if key == "lpips_weight" else ("dino-vits8" in line)


def test_eval_recon_perfect_reconstruction_is_capped(world):
    from scale_rae_core.eval.features import get_feature_net
    from scale_rae_core.eval.metrics import PSNR_CAP_DB, reconstruction_metrics

    images = torch.cat([x for x, _ in batches(open_images(world["heldout"], image_size=32, train=False), 64)])
    r = reconstruction_metrics([(images, images.clone())], get_feature_net("random"))
    assert r["psnr"] == PSNR_CAP_DB and r["identical_images"] == len(images)
    assert r["ssim"] == pytest.approx(1.0) and r["rfid"] == pytest.approx(0.0, abs=1e-6)


def test_convert_round_trip(tmp_path):
    from scale_rae_core.models.convert import load_released_decoder
    from tests.models.test_convert import hf_config, released_state, write_released

    src = write_released(tmp_path / "released", released_state(), hf_config())
    text = _run(["convert", "decoder", str(src), str(tmp_path / "ours"), "--encoder-kind", "siglip2"])
    assert "converted" in text and "encoder siglip2" in text
    ours = load_decoder(tmp_path / "ours")
    ref = load_released_decoder(src, encoder_kind="siglip2")
    z = torch.randn(2, ours.cfg.num_patches, ours.cfg.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(z), ref(z), rtol=0, atol=0)
    assert "encoder_kind" in _run(["convert", "decoder", str(src), str(tmp_path / "x")], code=1)
