"""`srae train dit`, `srae latent cache`, `srae sample`: end to end on the shapes world, resume, released RAE
checkpoints, autoguidance, 2 gloo processes, and every bad input as one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scale_rae_cli.main import app

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "dit_training.preset=tiny-ddt", "--set", "dit_training.global_batch_size=8", "--set", "dit_training.micro_batch_size=4",
        "--set", "checkpoint.every_steps=2"]


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [*args])
    return res.exit_code, res.output


def fails(message: str, *args: str) -> None:
    code, out = run(*args)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), out
    assert message in " ".join(lines[0].split()), out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Shapes class folders, a tiny random decoder for tiny-cpu's encoder, and a 4-step DiT run that records it."""
    from scale_rae_core.config import load_profile
    from scale_rae_core.models.build import build_encoder
    from scale_rae_core.models.decoder import Decoder, save_decoder
    from scale_rae_core.models.rae import decoder_config_for
    from scale_rae_core.shapes.synth import synthesize

    root = tmp_path_factory.mktemp("world")
    synthesize(root / "s", 36, image_size=64, seed=0)
    torch.manual_seed(0)
    encoder = build_encoder(load_profile("tiny-cpu").model.encoder)
    save_decoder(Decoder(decoder_config_for(encoder, "tiny", patch_size=8)), root / "dec")
    code, out = run("train", "dit", "--data", str(root / "s" / "classes"), "--out", str(root / "run"), "--steps", "4",
                    "-q", *TINY, "--set", f"dit_training.decoder={root / 'dec'}")
    assert code == 0, out
    assert "trained to step 4" in out and f"EMA model: {root / 'run' / 'model'}" in out
    return root


def test_train_dit_refuses_to_overwrite_and_names_missing_data(world, tmp_path):
    fails("already holds a run (checkpoint step-00000004); pass --resume",
          "train", "dit", "--data", str(world / "s" / "classes"), "--out", str(world / "run"), "-q", *TINY)
    fails("--data /nowhere: no such file or folder; pass class folders",
          "train", "dit", "--data", "/nowhere", "--out", str(tmp_path / "r"), "-q", *TINY)
    assert not (tmp_path / "r").exists()


def test_latent_cache_then_training_from_it(world, tmp_path):
    code, out = run("latent", "cache", "--data", str(world / "s" / "classes"), "--out", str(tmp_path / "c"),
                    "--chunk-size", "10", "--dtype", "float16", "-q")
    assert code == 0, out
    assert "(64 × 40 latents, float16, flips on) of encoder efficientnet-lite0" in out
    manifest = json.loads((tmp_path / "c" / "latent_cache.json").read_text())
    assert manifest["dtype"] == "float16" and len(manifest["chunks"]) >= 3
    stats = tmp_path / "c" / "latent_stats.safetensors"
    code, out = run("train", "dit", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--steps", "2", "-q",
                    *TINY, "--set", f"dit_training.stats={stats}")
    assert code == 0 and "trained to step 2" in out, out
    fails("--dtype float64 is unknown; choose one of float32, float16, bfloat16",
          "latent", "cache", "--data", str(world / "s" / "classes"), "--out", str(tmp_path / "d"), "--dtype", "float64")


def test_latent_cache_for_the_decoder_then_decoder_training_from_it(world, tmp_path):
    code, out = run("latent", "cache", "--for", "decoder", "--data", str(world / "s" / "classes"), "--out",
                    str(tmp_path / "c"), "-q")
    assert code == 0, out
    assert "(64 × 40 latents, float32, with pixels) of encoder efficientnet-lite0" in out
    assert f"next: srae train decoder --data {tmp_path / 'c'}" in out
    small = ["--set", "decoder_training.global_batch_size=8", "--set", "decoder_training.micro_batch_size=8",
             "--set", "checkpoint.every_steps=2"]
    code, out = run("train", "decoder", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--steps", "2",
                    "-q", *small)
    assert code == 0, out
    assert (tmp_path / "r" / "decoder" / "config.json").is_file()
    fails("--for vae is unknown; choose one of dit, decoder",
          "latent", "cache", "--for", "vae", "--data", str(world / "s" / "classes"), "--out", str(tmp_path / "d"))
    fails("is a latent cache for srae train decoder (no labels); cache the class data with srae latent cache --for dit",
          "train", "dit", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "e"), "--steps", "2", "-q", *TINY)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def _images(npz: Path) -> np.ndarray:
    from scale_rae_core.eval.adm_npz import open_npz_images

    return np.concatenate(list(open_npz_images(npz).batches(100)))


def _sample(world: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run("sample", "--model", str(world / "run"), "--n", "24", "--out", str(out), "--steps", "3", "-q", *extra)


def test_sample_writes_pngs_and_the_adm_npz_and_resumes(world, tmp_path):
    code, out = _sample(world, tmp_path / "s", "--guidance", "2", "--sampler", "heun", "--batch-size", "5")
    assert code == 0, out
    assert f"24 samples in {tmp_path / 's'} (this process wrote 24, skipped 0 already there)" in out
    images = _images(tmp_path / "s" / "samples.npz")
    assert images.shape == (24, 64, 64, 3) and images.dtype == np.uint8
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert plan["plan"]["label_sampling"] == "equal" and plan["settings"]["guidance"]["method"] == "cfg"
    for i in (3, 17):
        (tmp_path / "s" / f"{i:06d}.png").unlink()
    code, out = _sample(world, tmp_path / "s", "--guidance", "2", "--sampler", "heun", "--batch-size", "2")
    assert code == 0 and "wrote 2, skipped 22" in out, out
    assert np.array_equal(_images(tmp_path / "s" / "samples.npz"), images)  # batch-independent
    fails(f"{tmp_path / 's'} holds samples of another plan or other settings",
          "sample", "--model", str(world / "run"), "--n", "24", "--out", str(tmp_path / "s"), "--steps", "4", "-q")


def test_labels_and_autoguidance(world, tmp_path):
    code, out = _sample(world, tmp_path / "a", "--labels", "3,7", "--guide-model", str(world / "run" / "model"),
                        "--guidance", "1.5", "--guidance-interval", "0.2,0.9")
    assert code == 0, out
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["plan"]["classes"] == [3, 7] and plan["settings"]["guidance"] == {
        "method": "autoguidance", "scale": 1.5, "interval": [0.2, 0.9]}


def _released(path: Path, **changes: int) -> Path:
    """A class DiT saved as RAE saves stage2_model.pt ({'ema': state}), the tiny LightningDiT at the run's latents."""
    from dataclasses import replace

    from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, build_class_dit

    cfg = replace(CLASS_DIT_PRESETS["tiny"], in_channels=40, **{"grid": 8, "num_classes": 12, **changes})
    torch.save({"ema": build_class_dit(cfg).state_dict(), "step": 3}, path)
    return path


def test_a_released_rae_checkpoint_samples_with_its_preset_and_statistics(world, tmp_path):
    from scale_rae_core.models.stats import LatentStats

    model = _released(tmp_path / "stage2_model.pt")
    torch.save({"var": torch.ones(40, 8, 8)}, tmp_path / "stat.pt")
    args = ["--model", str(model), "--preset", "tiny", "--decoder", str(world / "dec")]
    fails("is a released RAE checkpoint: pass --stats", "sample", *args, "--n", "12", "--out", str(tmp_path / "x"))
    code, out = run("sample", *args, "--stats", str(tmp_path / "stat.pt"), "--n", "12", "--out", str(tmp_path / "r"),
                    "--steps", "2", "-q")
    assert code == 0 and "12 samples in" in out, out
    assert LatentStats  # the stat.pt went through load_stats: (C, H, W) -> tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "3,x"], "--labels '3,x' is not a comma-separated list of class indices (e.g. 3,7)"),
        (["--labels", "3,13"], "--labels 13 is outside the model's 12 classes (0..11); pass labels in that range"),
        (["--sampler", "dpm"], "--sampler 'dpm' is unknown; choose one of euler, heun, sde, sde-heun"),
        (["--guidance-interval", "0.9"], "--guidance-interval '0.9' is not lo,hi"),
        (["--n", "25"], "--label-sampling equal needs --n to be a multiple of the 12 classes, got 25"),
        (["--preset", "DiTDH-XL"], "--preset is for released RAE checkpoints;"),
        (["--stats", "stat.pt"], "--stats is for released RAE checkpoints;"),
    ],
)
def test_bad_sample_options_are_one_line(world, tmp_path, args, message):
    base = ["sample", "--model", str(world / "run"), "--n", "24", "--out", str(tmp_path / "o"), "--steps", "2"]
    if "--n" in args:
        base = base[:3] + base[5:]
    if "--stats" in args:
        torch.save({"var": torch.ones(40, 8, 8)}, tmp_path / "stat.pt")
        args = ["--stats", str(tmp_path / "stat.pt")]
    fails(message, *base, *args)


def test_a_guidance_model_of_other_latents_or_classes_and_bad_models_are_one_line(world, tmp_path):
    base = ["sample", "--model", str(world / "run"), "--n", "24", "--out", str(tmp_path / "o"), "--guidance", "1.4"]
    grid4 = _released(tmp_path / "g4.pt", grid=4)
    fails("the guidance model works on latents 40x4x4, the model on 40x8x8; use a guidance model trained on the same "
          "latents", *base, "--guide-model", str(grid4), "--guide-preset", "tiny")
    classes10 = _released(tmp_path / "k10.pt", num_classes=10)
    fails("the guidance model has 10 classes, the model 12", *base, "--guide-model", str(classes10),
          "--guide-preset", "tiny")
    fails("is a checkpoint file: pass --preset with the size it was trained as",
          "sample", "--model", str(grid4), "--n", "12", "--out", str(tmp_path / "p"))
    fails("neither an srae class-DiT model", "sample", "--model", str(tmp_path / "nothing"), "--n", "12",
          "--out", str(tmp_path / "p"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fails("junk.pt: cannot read as a weights-only torch file", "sample", "--model", str(tmp_path / "junk.pt"),
          "--preset", "tiny", "--n", "12", "--out", str(tmp_path / "p"))


def test_a_decoder_of_other_latents_or_none_recorded_is_one_line(world, tmp_path):
    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.models.build import build_encoder
    from scale_rae_core.models.decoder import Decoder, save_decoder
    from scale_rae_core.models.rae import decoder_config_for

    encoder = build_encoder(EncoderSettings(kind="siglip", path="tiny-random", input_size=32))
    save_decoder(Decoder(decoder_config_for(encoder, "tiny", patch_size=8)), tmp_path / "dec16")
    fails(f"--decoder {tmp_path / 'dec16'} reads 16 × 192 latents but the model makes 64 × 40",
          "sample", "--model", str(world / "run"), "--n", "12", "--out", str(tmp_path / "o"), "--decoder", str(tmp_path / "dec16"))
    model = _released(tmp_path / "m.pt")
    torch.save({"var": torch.ones(40, 8, 8)}, tmp_path / "stat.pt")
    fails("records no pixel decoder: pass --decoder", "sample", "--model", str(model), "--preset", "tiny", "--stats",
          str(tmp_path / "stat.pt"), "--n", "12", "--out", str(tmp_path / "o2"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_processes_share_the_indices_and_write_the_same_samples(world, tmp_path):
    sets = ["--set", "backend.procs_per_node=2"] + [
        x for section in ("stage1", "stage2", "decoder_training", "dit_training")
        for x in ("--set", f"{section}.global_batch_size=64")]
    args = ["sample", "--model", str(world / "run"), "-n", "36", "--steps", "2", "--batch-size", "4", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "scale_rae_cli.main", *args, "--out", str(tmp_path / "two"), *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "36 samples in" in proc.stdout and "this process wrote 18, skipped 0" in proc.stdout
    code, out = run(*args, "--out", str(tmp_path / "one"))
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == [f"{i:06d}.png" for i in range(36)]
    two, one = (_images(tmp_path / d / "samples.npz") for d in ("two", "one"))
    assert np.array_equal(two, one)
