"""`srae train dit` / `srae latent cache` engines: exact resume (images, packed classes, cache), the EMA export,
RAE's schedule, the latent cache's contents and resume, one-line refusals, and 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_rae_core.config import Profile, load_profile
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.models.adapters.class_dit import load_class_dit
from scale_rae_core.models.stats import LatentStats, RunningStats
from scale_rae_core.train.dit import Phases, train_dit
from scale_rae_core.train.latent_cache import read_manifest
from scale_rae_core.train.schedule import WarmupConstantLinear

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TINY = ["dit_training.preset=tiny-ddt", "dit_training.steps=6", "dit_training.global_batch_size=8",
        "dit_training.micro_batch_size=4",
        "checkpoint.every_steps=3", "output.log_every=1"]


EFF = "{'kind': 'efficientnet-lite0', 'path': 'efficientnet-lite0', 'input_size': 64, 'select_layer': 5}"  # tiny-cpu's encoder, as a cache records it


def tiny_profile(*extra: str) -> Profile:
    """tiny-cpu's [dit_training] with the 64/96-wide tiny-ddt (the demo's small-ddt is 10x the compute) on the
    EfficientNet encoder's 8 × 8 × 40 latents at 64 px, 2 micro-steps of 4 per step."""
    return load_profile("tiny-cpu", [*TINY, *extra])


def one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The shapes world's 12 class folders (40 images, 64 px) and the same images packed."""
    from scale_rae_core.data.pack import pack
    from scale_rae_core.shapes.synth import synthesize

    root = tmp_path_factory.mktemp("shapes")
    synthesize(root / "s", 40, image_size=64, seed=0)
    pack(root / "s" / "classes", root / "packed")
    return root


@pytest.fixture(scope="module")
def cache(shapes, tmp_path_factory) -> Path:
    from scale_rae_core.backends import get_backend
    from scale_rae_core.train.latent_cache import cache_latents

    out = tmp_path_factory.mktemp("cache") / "c"
    profile = tiny_profile()
    with get_backend(profile.backend) as backend:
        cache_latents(profile, shapes / "s" / "classes", out, backend, chunk_size=16, batch_size=8)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_class_dit(folder)[0].state_dict()


# ------------------------------------------------------------------------------------------ resume and export


@pytest.mark.parametrize("kind", ["folder", "packed"])
def test_resume_repeats_the_uninterrupted_run_exactly(shapes, tmp_path, kind):
    data = shapes / "s" / "classes" if kind == "folder" else shapes / "packed"
    profile = tiny_profile()
    full = train_dit(profile, data, tmp_path / "full")
    assert [r["step"] for r in full.records] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 and r["lr"] == profile.dit_training.lr for r in full.records)  # constant phase of the schedule
    first = train_dit(profile, data, tmp_path / "cut", stop_at=3)
    assert first.export_dir is None and len(first.records) == 3
    second = train_dit(profile, data, tmp_path / "cut", resume=True)
    assert [r["step"] for r in second.records] == [4, 5, 6]
    for a, b in zip(full.records, first.records + second.records, strict=True):
        assert a == b  # every loss, grad norm and lr, bit for bit
    ours, ref = _weights(second.export_dir), _weights(full.export_dir)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_the_export_is_the_ema_and_records_its_latent_space(shapes, tmp_path):
    """Build the trainer by hand to see both modules: the folder holds the EMA weights, not the live ones."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.train.dit import DiTTrainer
    from scale_rae_core.train.loop import TrainLoop

    profile = tiny_profile("dit_training.ema_decay=0.5", f"dit_training.decoder={tmp_path / 'dec'}")
    (tmp_path / "dec").mkdir()
    with backend_for(profile.backend) as backend:
        loop = TrainLoop("train_dit", profile, tmp_path / "run", backend, resume=False)
        backend.seed_everything(0, per_rank=False)
        trainer = DiTTrainer(profile, shapes / "s" / "classes", loop.run_dir, backend)
        result = loop.run(trainer)
    exported, info = load_class_dit(result.export_dir)
    ema, live = trainer.ema.module.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(exported.state_dict()[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    assert info["format"] == "srae-class-dit" and info["preset"] == "tiny-ddt"
    assert info["class_dit"]["in_channels"] == 40 and info["class_dit"]["grid"] == 8
    assert info["latents"]["encoder"] == {"kind": "efficientnet-lite0", "path": "efficientnet-lite0", "input_size": 64,
                                          "select_layer": 5}
    assert info["latents"]["decoder"] == str((tmp_path / "dec").resolve()) and info["latents"]["stats"] is None
    assert info["classes"][0] == "blue_circle" and len(info["classes"]) == 12
    ckpt = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert ckpt["step"] == 6
    from scale_rae_core.train.checkpoint import read_index

    keys = read_index(tmp_path / "run" / "checkpoints" / "step-00000006").state_dict_metadata
    assert any(k.startswith("model.ema.") for k in keys) and any(k.startswith("model.model.") for k in keys)


def test_raes_schedule_in_steps_for_imagenet_on_gpu8():
    """1,281,167 images at 1024 per step: 1251 steps per epoch; constant for 40 epochs, linear to 2e-5 at 800."""
    p = load_profile("gpu-8")
    cfg, plan = p.dit_training, p.batch_plan("dit_training")
    phases = Phases.of(cfg, plan, 1_281_167 // plan.num_processes)
    assert (phases.steps_per_epoch, phases.constant_end, phases.decay_end, phases.steps) == (1251, 50040, 1000800, 1000800)
    f = WarmupConstantLinear(phases.warmup, phases.constant_end, phases.decay_end, cfg.min_lr / cfg.lr)
    assert [f(0), f(50039), f(50040)] == [1.0, 1.0, 1.0]
    assert f((50040 + 1000800) // 2) == pytest.approx(0.55)  # halfway between 1 and 0.1
    assert f(1000800) == f(2_000_000) == pytest.approx(0.1)  # 2e-5 / 2e-4 from decay_end on
    w = WarmupConstantLinear(4, 6, 10, 0.0)
    assert [w(s) for s in range(12)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.ema_decay, cfg.grad_clip) == (2e-4, (0.9, 0.95), 0.0, 0.9995, 1.0)


# ------------------------------------------------------------------------------------------ statistics


def _stats_file(path: Path, tokens: int, channels: int, **meta: str) -> Path:
    return LatentStats(torch.zeros(tokens, channels), torch.ones(tokens, channels)).save(path, metadata=meta)


def test_statistics_of_another_encoder_or_shape_are_refused_in_one_line(shapes, tmp_path):
    data = shapes / "s" / "classes"
    other = _stats_file(tmp_path / "siglip2.safetensors", 64, 40, encoder="google/siglip2-so400m-patch14-224",
                        encoder_kind="siglip2")
    with pytest.raises(ConfigError) as err:
        train_dit(tiny_profile(f"model.stats={other}"), data, tmp_path / "a")
    one_line(err, f"model.stats = '{other}' holds statistics of the encoder google/siglip2-so400m-patch14-224 (siglip2), "
                  "not of efficientnet-lite0 (efficientnet-lite0); run `srae stat` with this encoder")
    small = _stats_file(tmp_path / "small.safetensors", 16, 40, encoder="efficientnet-lite0",
                        encoder_kind="efficientnet-lite0")
    with pytest.raises(ConfigError) as err:
        train_dit(tiny_profile(f"dit_training.stats={small}"), data, tmp_path / "b")
    one_line(err, f"dit_training.stats = '{small}' holds statistics of 16 × 40 latents but the encoder "
                  "efficientnet-lite0 gives 64 × 40")


def test_raes_stat_pt_normalises_the_latents(shapes, tmp_path):
    """A released-style stat.pt ({'var': [C, H, W]}, no encoder recorded) is checked by shape and used."""
    stat = tmp_path / "stat.pt"
    torch.save({"var": torch.full((40, 8, 8), 4.0)}, stat)
    plain = train_dit(tiny_profile("dit_training.steps=1"), shapes / "s" / "classes", tmp_path / "plain")
    scaled = train_dit(tiny_profile("dit_training.steps=1", f"dit_training.stats={stat}"), shapes / "s" / "classes",
                       tmp_path / "scaled")
    assert scaled.records[0]["loss"] != plain.records[0]["loss"]
    exported = load_class_dit(scaled.export_dir)[1]["latents"]["stats"]
    assert exported == "latent_stats.safetensors" and (scaled.export_dir / exported).is_file()


# ------------------------------------------------------------------------------------------ bad data


def test_labels_outside_the_models_classes_are_refused_in_one_line(shapes, tmp_path):
    with pytest.raises(DataError) as err:
        train_dit(tiny_profile("dit_training.num_classes=10"), shapes / "s" / "classes", tmp_path / "a")
    one_line(err, "has 12 class folders, the model 10 classes")
    with pytest.raises(DataError) as err:
        train_dit(tiny_profile("dit_training.num_classes=5"), shapes / "packed", tmp_path / "b")
    one_line(err, "has class_index", "not in 0..4")


# ------------------------------------------------------------------------------------------ the latent cache


def test_the_cache_holds_the_encoders_latents_flips_labels_and_exact_statistics(shapes, cache):
    from safetensors.torch import load_file

    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.data.labelled import labelled_batches, open_labelled
    from scale_rae_core.models.build import build_encoder

    folder, m = read_manifest(cache)
    stream = open_labelled(shapes / "s" / "classes", image_size=64, train=False, drop_last=False)
    pixels, labels, _ = next(labelled_batches(stream, 1000))
    assert m["total"] == len(labels) and [c["count"] for c in m["chunks"]] == [16, 16, len(labels) - 32]
    assert (m["latent_shape"], m["grid"], m["image_size"], m["hflip"], m["dtype"]) == ([64, 40], 8, 64, True, "float32")
    assert m["encoder"] == {"kind": "efficientnet-lite0", "path": "efficientnet-lite0", "input_size": 64, "select_layer": 5}
    assert len(m["classes"]) == 12
    chunks = [load_file(str(folder / c["file"])) for c in m["chunks"]]
    cached = torch.cat([c["latents"] for c in chunks])
    encoder = build_encoder(EncoderSettings(kind="efficientnet-lite0", path="efficientnet-lite0", input_size=64,
                                            select_layer=5))
    # The cache encodes batches of 8, this all 40 at once: conv kernels round differently with the batch, and the
    # per-token LN over 40 channels scales that rounding by 1 / (the token's spread) -> 1e-4, not 1e-5.
    with torch.no_grad():
        torch.testing.assert_close(cached, encoder(pixels), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat([c["latents_flipped"] for c in chunks]), encoder(pixels.flip(-1)),
                                   rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.cat([c["labels"] for c in chunks]), labels)
    acc = RunningStats()
    acc.update(torch.cat([cached, torch.cat([c["latents_flipped"] for c in chunks])]))
    from scale_rae_core.models.stats import load_stats

    stats = load_stats(folder / "latent_stats.safetensors")
    torch.testing.assert_close(stats.mean, acc.result().mean.float())
    torch.testing.assert_close(stats.var, acc.result().var.float())
    assert stats.count == 2 * len(labels)


def test_an_interrupted_cache_resumes_and_other_settings_are_refused(shapes, cache, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    import scale_rae_core.data.labelled as labelled
    from scale_rae_core.backends import get_backend
    from scale_rae_core.train.latent_cache import cache_latents

    copy = tmp_path / "c"
    shutil.copytree(cache, copy)
    last = sorted(copy.glob("latents-*.safetensors"))[-1]
    last.unlink()
    (copy / "latent_cache.json").unlink()
    profile = tiny_profile()
    calls = []
    real = labelled.read_image
    monkeypatch.setattr(labelled, "read_image", lambda path: (calls.append(path), real(path))[1])
    with get_backend(profile.backend) as backend:
        cache_latents(profile, shapes / "s" / "classes", copy, backend, chunk_size=16, batch_size=8)
        assert len(calls) == read_manifest(cache)[1]["chunks"][-1]["count"]  # only the missing chunk was read
        assert torch.equal(load_file(str(last))["latents"], load_file(str(cache / last.name))["latents"])
        assert json.loads((copy / "latent_cache.json").read_text())["chunks"] == read_manifest(cache)[1]["chunks"]
        with pytest.raises(ConfigError) as err:
            cache_latents(profile, shapes / "s" / "classes", copy, backend, chunk_size=8)
    one_line(err, f"--out {copy} holds a cache written with other settings: chunk_size 16 (now 8)")


def test_training_from_the_cache_skips_the_encoder_and_resumes_exactly(cache, tmp_path, monkeypatch):
    import scale_rae_core.models.build as build

    monkeypatch.setattr(build, "build_encoder", lambda *a, **k: pytest.fail("the encoder was built"))
    stats = f"dit_training.stats={cache / 'latent_stats.safetensors'}"
    full = train_dit(tiny_profile(stats), cache, tmp_path / "full")
    train_dit(tiny_profile(stats), cache, tmp_path / "cut", stop_at=2)
    rest = train_dit(tiny_profile(stats), cache, tmp_path / "cut", resume=True)
    assert rest.records == full.records[2:]
    assert full.records[-1]["loss"] < 2.5  # normalised latents: the velocity target has variance ≈ 2
    info = load_class_dit(full.export_dir)[1]
    assert info["classes"] == read_manifest(cache)[1]["classes"]


@pytest.mark.parametrize(
    ("sets", "error", "message"),
    [
        (["dit_training.image_size=32"], ConfigError, "caches 64 px images but dit_training.image_size = 32"),
        (["dit_training.encoder.kind=efficientnet-lite0", "dit_training.encoder.path=efficientnet-lite0",
          "dit_training.encoder.input_size=64", "dit_training.encoder.select_layer=3"],
         ConfigError, f"caches the latents of encoder {EFF}, but dit_training names "
                      "{'kind': 'efficientnet-lite0', 'path': 'efficientnet-lite0', 'input_size': 64, 'select_layer': 3}"),
        (["dit_training.num_classes=5"], ConfigError, "holds label 11, outside the model's 5 classes"),
        (["dit_training.micro_batch_size=64", "dit_training.global_batch_size=64"], ConfigError,
         "dit_training.micro_batch_size = 64 (64 per process) is larger than this process's"),
    ],
)
def test_a_cache_that_does_not_fit_is_refused_in_one_line(cache, tmp_path, sets, error, message):
    with pytest.raises(error) as err:
        train_dit(tiny_profile(*sets), cache, tmp_path / "r")
    one_line(err, message)


# ------------------------------------------------------------------------------------------ 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs: list[dict], tmp: Path, nproc: int = 2) -> None:
    job_file = tmp / f"jobs-{_free_port()}.json"
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(HERE / "dit_worker.py"), str(job_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.dist
def test_two_processes_resume_to_the_same_losses_and_cache_the_same_latents(shapes, cache, tmp_path):
    from safetensors.torch import load_file

    data = str(shapes / "s" / "classes")
    job = {"data": data, "steps": 4}
    _launch([{**job, "kind": "train", "run": str(tmp_path / "full"), "out": str(tmp_path / "full.json")},
             {**job, "kind": "train", "run": str(tmp_path / "cut"), "stop_at": 2, "out": str(tmp_path / "a.json")},
             {**job, "kind": "train", "run": str(tmp_path / "cut"), "resume": True, "out": str(tmp_path / "b.json")},
             {"kind": "cache", "data": data, "cache": str(tmp_path / "cache")}], tmp_path)
    full, a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("full", "a", "b"))
    assert len(full["records"]) == 4 and a["records"] + b["records"] == full["records"]
    assert full["records"][0]["loss"] != full["records"][1]["loss"]
    assert _weights(tmp_path / "full" / "model").keys() == _weights(tmp_path / "cut" / "model").keys()
    assert all(torch.equal(v, _weights(tmp_path / "cut" / "model")[k]) for k, v in _weights(tmp_path / "full" / "model").items())

    folder, two = read_manifest(tmp_path / "cache")
    _, one = read_manifest(cache)
    assert two["total"] == one["total"]
    both = [torch.cat([load_file(str(f / c["file"]))["latents"] for c in m["chunks"]]) for f, m in ((folder, two), (cache, one))]
    torch.testing.assert_close(both[0], both[1], rtol=1e-5, atol=1e-5)  # rank 0's range, then rank 1's: file order
    assert {c["file"].split("-")[1] for c in two["chunks"]} == {"r00000", "r00001"}
