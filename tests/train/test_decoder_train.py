"""Decoder training: exact resume, loss wiring, missing-weights errors, export, 2-process discriminator sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from scale_rae_core.config import Profile, load_profile
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.decoder import load_decoder
from scale_rae_core.train.decoder import train_decoder

SIDE = 32


def tiny_profile(tmp: Path, **training) -> Profile:
    """tiny-cpu at 32 px (4 x 4 tokens of its EfficientNet encoder), micro-batch 4, cache under tmp."""
    os.environ["SRAE_CACHE"] = str(tmp.parent / "srae-cache")
    dt = {"steps": 6, "global_batch_size": 4, "micro_batch_size": 4, "image_size": SIDE, "warmup_epochs": 0.5,
          "disc_update_start_epoch": 0.25, "gan_start_epoch": 0.5, "noise_tau": 0.8, "lr": 1e-3, **training}
    sets = [f"decoder_training.{k}={json.dumps(v) if not isinstance(v, str) else repr(v)}" for k, v in dt.items()]
    sets += ["model.encoder.input_size=32", "model.decoder.image_size=32", "checkpoint.every_steps=3",
             "checkpoint.keep=2", "output.log_every=1"]
    return load_profile("tiny-cpu", sets)


def write_images(root: Path, n: int = 16) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        cls = root / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(SIDE, SIDE, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(cls / f"{i:03d}.png")
    return root


def random_lpips():
    from scale_rae_core.train.lpips import LPIPS

    return LPIPS.random(seed=0)


def random_disc():
    from transformers import ViTConfig

    from scale_rae_core.train.gan import DinoDiscriminator, DiscriminatorConfig

    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    return DinoDiscriminator.random(vit, DiscriminatorConfig(backbone="", key_depths=(0,)), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("imgs") / "folder")


def run(profile, data, out, **kw):
    return train_decoder(profile, data, out, lpips=random_lpips(), discriminator=random_disc(), **kw)


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, images):
    profile = tiny_profile(tmp_path, lpips_weight=0.5, gan_weight=0.75)
    full = run(profile, images, tmp_path / "full")
    assert [h["step"] for h in full.records] == [1, 2, 3, 4, 5, 6]
    # the GAN term (gan_start = 2 steps) and the discriminator (disc_start = 1) are active late in the run
    assert full.records[-1]["d_weight"] > 0 and full.records[-1]["disc_loss"] > 0
    assert full.records[0]["gan"] == 0.0 and full.records[0]["lpips"] > 0

    first = run(profile, images, tmp_path / "split", stop_at=3)
    assert first.export_dir is None and len(first.records) == 3
    second = run(profile, images, tmp_path / "split", resume=True)
    assert [h["step"] for h in second.records] == [4, 5, 6]
    for a, b in zip(full.records, first.records + second.records, strict=True):
        assert a == b  # every loss, weight and lr, bit for bit
    ours = load_decoder(second.export_dir)
    ref = load_decoder(full.export_dir)
    for (k, v), (_, w) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_missing_weights_name_the_profile_keys(tmp_path, images):
    with pytest.raises(ConfigError, match=r"decoder_training\.lpips_weights: .*vgg16-397923af\.pth"):
        train_decoder(tiny_profile(tmp_path, lpips_weight=1.0), images, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"decoder_training\.disc_backbone: .*dino-vits8"):
        train_decoder(tiny_profile(tmp_path, gan_weight=0.5), images, tmp_path / "b", lpips=random_lpips())


def test_resume_without_checkpoint_starts_fresh_and_overwrite_is_refused(tmp_path, images):
    """--resume on an empty run folder is a fresh start (reported as an event), so a preemptible job's launch
    line can always carry it; a folder with a checkpoint is never overwritten without --resume."""
    from scale_rae_core.events import Reporter

    profile = tiny_profile(tmp_path, steps=1)
    with Reporter(tmp_path / "events.jsonl") as rep:
        result = train_decoder(profile, images, tmp_path / "r", resume=True, reporter=rep)
    assert (result.start_step, result.step, result.resumed_from) == (0, 1, None)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "train_decoder.fresh_start" and "no complete checkpoint" in events[0]["reason"]
    assert result.export_dir is not None and load_decoder(result.export_dir).cfg.image_size == SIDE
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoint step-00000001\); pass --resume"):
        train_decoder(profile, images, tmp_path / "r")


_DIST_SCRIPT = """
import json, os, sys, hashlib
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.train.test_decoder_train import tiny_profile, random_lpips, random_disc
from scale_rae_core.config import load_profile
from scale_rae_core.train.decoder import train_decoder
tmp = Path({tmp!r})
profile = tiny_profile(tmp, lpips_weight=0.5, gan_weight=0.75, global_batch_size=8, steps=4)
profile.backend.procs_per_node = 2
profile.backend.dist_backend = "gloo"
disc = random_disc()
res = train_decoder(profile, {data!r}, tmp / "run", lpips=random_lpips(), discriminator=disc)
def digest(m):
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()
from scale_rae_core.models.decoder import load_decoder
rank = os.environ["RANK"]
(tmp / f"rank{{rank}}.json").write_text(json.dumps({{"disc": digest(disc), "disc_loss": res.records[-1]["disc_loss"],
    "l1": res.records[-1]["l1"]}}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_processes_keep_the_discriminator_in_sync(tmp_path, images):
    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "dist_train.py"
    script.write_text(_DIST_SCRIPT.format(root=root, tmp=str(tmp_path), data=str(images)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a["disc"] == b["disc"]  # gradients averaged: identical discriminators
    assert a["l1"] != b["l1"]  # ... although each rank saw different images
    assert (tmp_path / "run" / "decoder" / "model.safetensors").is_file()


def test_resume_right_after_an_epoch_boundary_continues(tmp_path):
    """14 images, batches of 8 (the tail of 6 is dropped each epoch): a run stopped after step 2 sits mid-epoch
    with only the dropped tail left; resuming must carry on into the next epoch and match the full run."""
    from scale_rae_core.config import load_profile
    from scale_rae_core.data.pack import pack
    from scale_rae_core.shapes.synth import synthesize
    from scale_rae_core.train.decoder import train_decoder

    synthesize(tmp_path / "s", 16, image_size=64, seed=0)
    pack(tmp_path / "s" / "classes", tmp_path / "p")
    p = load_profile("tiny-cpu", ["decoder_training.global_batch_size=8", "decoder_training.micro_batch_size=8",
                                  "decoder_training.steps=4", "decoder_training.warmup_epochs=0"])
    full = train_decoder(p, tmp_path / "p", tmp_path / "full")
    train_decoder(p, tmp_path / "p", tmp_path / "cut", stop_at=2)
    rest = train_decoder(p, tmp_path / "p", tmp_path / "cut", resume=True)
    assert [h["loss"] for h in rest.records] == [h["loss"] for h in full.records[2:]]


# ------------------------------------------------------------------------------------------ a latent cache for the decoder


def cache_for_decoder(profile, data, out, **kw):
    from scale_rae_core.backends import backend_for
    from scale_rae_core.train.latent_cache import cache_latents

    with backend_for(profile.backend) as backend:
        return cache_latents(profile, data, out, backend, for_="decoder", **kw)


def test_the_decoder_cache_holds_the_readers_pixels_and_the_encoders_latents(tmp_path, images):
    from safetensors.torch import load_file

    from scale_rae_core.models.build import build_encoder
    from scale_rae_core.train.decoder_data import batches, open_images
    from scale_rae_core.train.latent_cache import read_manifest

    profile = tiny_profile(tmp_path)
    cache_for_decoder(profile, images, tmp_path / "c", chunk_size=5, batch_size=3)
    folder, m = read_manifest(tmp_path / "c")
    assert (m["for"], m["pixels"], m["hflip"], m["total"], m["image_size"]) == ("decoder", True, False, 16, SIDE)
    assert [c["count"] for c in m["chunks"]] == [5, 5, 5, 1]
    chunks = [load_file(str(folder / c["file"])) for c in m["chunks"]]
    assert all("labels" not in c and "latents_flipped" not in c for c in chunks)
    pixels = torch.cat([c["pixels"] for c in chunks])
    assert pixels.dtype == torch.uint8 and pixels.shape == (16, 3, SIDE, SIDE)
    (want, _), = batches(open_images(images, image_size=SIDE, train=False), 16)  # the decoder trainer's reader
    assert torch.equal(pixels.float() / 255.0, want)  # exact, not approximately
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([c["latents"] for c in chunks]), build_encoder(profile.model.encoder)(want),
                                   rtol=1e-5, atol=1e-5)


def test_training_on_the_decoder_cache_follows_training_on_the_images(tmp_path, images):
    """One batch = all 16 images, no noise and no GAN (those draw random numbers the image reader's crops also
    draw): the same losses and weights as through the encoder, up to float summation order."""
    profile = tiny_profile(tmp_path, steps=3, global_batch_size=16, micro_batch_size=16, noise_tau=0.0)
    cache_for_decoder(profile, images, tmp_path / "c")
    direct = train_decoder(profile, images, tmp_path / "direct")
    cached = train_decoder(profile, tmp_path / "c", tmp_path / "cached")
    for a, b in zip(direct.records, cached.records, strict=True):
        assert a["l1"] == pytest.approx(b["l1"], rel=1e-5)
    ours, ref = load_decoder(cached.export_dir), load_decoder(direct.export_dir)
    for (k, v), (_, w) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5, msg=k)


def test_training_on_the_decoder_cache_resumes_exactly(tmp_path, images):
    profile = tiny_profile(tmp_path, lpips_weight=0.5, gan_weight=0.75)
    cache_for_decoder(profile, images, tmp_path / "c")
    full = run(profile, tmp_path / "c", tmp_path / "full")
    assert full.records[-1]["disc_loss"] > 0 and full.records[-1]["d_weight"] > 0
    first = run(profile, tmp_path / "c", tmp_path / "split", stop_at=3)
    second = run(profile, tmp_path / "c", tmp_path / "split", resume=True)
    assert full.records == first.records + second.records  # bit for bit


def test_an_interrupted_decoder_cache_resumes_without_encoding_again(tmp_path, images, monkeypatch):
    from scale_rae_core.train import latent_cache

    profile = tiny_profile(tmp_path)
    cache_for_decoder(profile, images, tmp_path / "c", chunk_size=5)
    (tmp_path / "c" / "latent_cache.json").unlink()
    last = tmp_path / "c" / "latents-r00000-00003.safetensors"
    kept = last.read_bytes()
    last.unlink()
    encoded = []
    real = latent_cache._encode
    monkeypatch.setattr(latent_cache, "_encode", lambda enc, px, *a: encoded.append(len(px)) or real(enc, px, *a))
    cache_for_decoder(profile, images, tmp_path / "c", chunk_size=5)
    assert encoded == [1]  # only the missing chunk's one image
    assert last.read_bytes() == kept


@pytest.mark.parametrize("case", ["dit cache", "image size", "encoder", "decoder cache for dit"])
def test_a_cache_made_for_something_else_is_refused_in_one_line(tmp_path, images, case):
    from scale_rae_core.backends import backend_for
    from scale_rae_core.train.dit import train_dit
    from scale_rae_core.train.latent_cache import cache_latents

    profile = tiny_profile(tmp_path)
    if case == "dit cache":
        dit = load_profile("tiny-cpu", ["dit_training.image_size=32", "model.encoder.input_size=32",
                                         "dit_training.num_classes=2"])
        with backend_for(dit.backend) as backend:
            cache_latents(dit, images, tmp_path / "c", backend)
        want, call = "is a latent cache without pixels", lambda: train_decoder(profile, tmp_path / "c", tmp_path / "r")
    else:
        cache_for_decoder(profile, images, tmp_path / "c")
        if case == "image size":
            other = load_profile("tiny-cpu", [f"decoder_training.image_size={64}"])
            want, call = "caches 32 px images but decoder_training.image_size = 64", \
                lambda: train_decoder(other, tmp_path / "c", tmp_path / "r")
        elif case == "encoder":
            other = load_profile("tiny-cpu", ["model.encoder.kind='siglip2'", "decoder_training.image_size=32",
                                              "model.encoder.input_size=32", "model.decoder.image_size=32"])
            want, call = "caches the latents of encoder", lambda: train_decoder(other, tmp_path / "c", tmp_path / "r")
        else:
            dit = load_profile("tiny-cpu", ["dit_training.image_size=32", "model.encoder.input_size=32",
                                             "dit_training.num_classes=2"])
            want, call = "is a latent cache for srae train decoder", lambda: train_dit(dit, tmp_path / "c", tmp_path / "r")
    with pytest.raises(ConfigError) as err:
        call()
    assert "\n" not in str(err.value) and want in str(err.value), str(err.value)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.safetensors"))


def test_a_decoder_cache_of_a_conversations_pack_holds_each_image_once(tmp_path):
    """A conversations pack repeats each image once per sample (13 here); the cache keeps the distinct ones."""
    from scale_rae_core.data.pack import pack
    from scale_rae_core.shapes.synth import synthesize
    from scale_rae_core.train.latent_cache import read_manifest

    synthesize(tmp_path / "shapes", 10, image_size=SIDE, seed=0)
    pack(tmp_path / "shapes" / "conversations.jsonl", tmp_path / "packed")
    cache_for_decoder(tiny_profile(tmp_path), tmp_path / "packed", tmp_path / "c")
    distinct = len(list((tmp_path / "shapes" / "classes").rglob("*.png")))
    assert read_manifest(tmp_path / "c")[1]["total"] == distinct == 9
