"""`srae train stage1` end to end on the XLA backend (SPMD over 4 virtual CPU devices): an interrupted and
resumed run repeats the uninterrupted one, and the export carries plain parameter names (loadable anywhere).
"""

from __future__ import annotations

import json

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.data.pack import pack
from scale_rae_core.models.scale_rae import load_export
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.unified import train_unified

pytestmark = pytest.mark.xla
XLA = [
    "backend.kind=xla", "backend.devices_per_node=4",
    "stage1.micro_batch_size=1", "stage1.global_batch_size=4", "stage1.seq_len=128", "stage1.steps=4",
    "stage2.micro_batch_size=1", "stage2.global_batch_size=4", "decoder_training.micro_batch_size=8",
    "checkpoint.every_steps=2", "output.log_every=1",
]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def test_stage1_on_xla_resumes_exactly_and_exports_plain_names(tmp_path):
    synthesize(tmp_path / "shapes", 12, image_size=64, seed=0)
    data = tmp_path / "packed"
    pack(tmp_path / "shapes" / "conversations.jsonl", data)
    # the one-host layout of the test below (micro-batch 1 per chip, 2 accumulated micro-steps): its step graphs
    # are then compiled once for both tests
    profile = load_profile("tiny-cpu", XLA + ["stage1.global_batch_size=8"])
    assert profile.batch_plan("stage1").accum_steps == 2

    full = train_unified(profile, "stage1", data, tmp_path / "full")
    train_unified(profile, "stage1", data, tmp_path / "cut", stop_at=2)
    train_unified(profile, "stage1", data, tmp_path / "cut", resume=True)
    assert len(_losses(tmp_path / "full")) == 4
    assert _losses(tmp_path / "cut")[-2:] == pytest.approx(_losses(tmp_path / "full")[-2:], rel=1e-5)

    loaded = load_export(full.export_dir)  # strict: fails on any `_orig_module.` name
    assert all("_orig_module" not in name for name in loaded.model.state_dict())


@pytest.mark.parametrize("source", ["packed", "latent cache"])
def test_decoder_training_on_xla_resumes_exactly_and_exports(tmp_path, source):
    from scale_rae_core.backends import backend_for
    from scale_rae_core.models.decoder import load_decoder
    from scale_rae_core.train.decoder import train_decoder
    from scale_rae_core.train.latent_cache import cache_latents

    synthesize(tmp_path / "shapes", 16, image_size=64, seed=0)
    data = tmp_path / "packed"
    pack(tmp_path / "shapes" / "classes", data)
    profile = load_profile("tiny-cpu", XLA + ["decoder_training.global_batch_size=8", "decoder_training.micro_batch_size=1",
                                              "decoder_training.steps=4", "decoder_training.warmup_epochs=0"])
    if source == "latent cache":  # (latents, pixels) pairs: both sharded over the 4 chips by shard_batch
        with backend_for(load_profile("tiny-cpu").backend) as cpu:
            cache_latents(profile, data, tmp_path / "cache", cpu, for_="decoder")
        data = tmp_path / "cache"
    full = train_decoder(profile, data, tmp_path / "full")
    train_decoder(profile, data, tmp_path / "cut", stop_at=2)
    rest = train_decoder(profile, data, tmp_path / "cut", resume=True)
    assert [h["loss"] for h in rest.records] == pytest.approx([h["loss"] for h in full.records[2:]], rel=1e-5)
    decoder = load_decoder(full.export_dir)  # strict load of the exported EMA decoder
    assert decoder.cfg.image_size == 64


def _tally_steps(monkeypatch) -> tuple[list[list[int]], list[str]]:
    """Sizes of the micro-batches drawn (decoder: image batches; unified: MicroBatcher batches), grouped by
    optimiser step (mark_step), and the sharding spec of every tensor put on the device."""
    import torch_xla

    import scale_rae_core.train.decoder as decoder_mod
    from scale_rae_core.backends.xla import XlaBackend
    from scale_rae_core.train.unified_data import MicroBatcher

    steps: list[list[int]] = []
    pending: list[int] = []
    specs: list[str] = []
    real_shard, real_mark = XlaBackend.shard_batch, XlaBackend.mark_step
    real_images, real_samples = decoder_mod.batches, MicroBatcher.next_batch

    def shard_batch(self, tensor):
        out = real_shard(self, tensor)
        specs.append(torch_xla._XLAC._get_xla_sharding_spec(out))
        return out

    def mark_step(self):
        real_mark(self)
        if pending:  # checkpoint saves and loads mark steps too, without drawing data
            steps.append(list(pending))
            pending.clear()

    def images(stream, batch_size, **kw):
        for x, pos in real_images(stream, batch_size, **kw):
            pending.append(x.shape[0])
            yield x, pos

    def samples(self, size):
        out = real_samples(self, size)
        pending.append(len(out))
        return out

    monkeypatch.setattr(XlaBackend, "shard_batch", shard_batch)
    monkeypatch.setattr(XlaBackend, "mark_step", mark_step)
    monkeypatch.setattr(decoder_mod, "batches", images)
    monkeypatch.setattr(MicroBatcher, "next_batch", samples)
    return steps, specs


@pytest.mark.parametrize("trainer", ["decoder", "stage1"])
def test_one_host_with_four_chips_steps_on_exactly_the_global_batch(trainer, tmp_path, monkeypatch):
    """The layout of one host of a TPU slice (1 loading process × 4 chips), micro_batch_size 1 per chip and a
    global batch of 8: the host loads 4 samples per micro-step, sharded over the 4 chips, and accumulates
    8 / (1 × 4) = 2 micro-steps per optimiser step (issue #13: the decoder used to take 8 micro-steps)."""
    from scale_rae_core.train.decoder import train_decoder

    synthesize(tmp_path / "shapes", 16, image_size=64, seed=0)
    data = tmp_path / "packed"
    section = "decoder_training" if trainer == "decoder" else "stage1"
    pack(tmp_path / "shapes" / ("classes" if trainer == "decoder" else "conversations.jsonl"), data)
    profile = load_profile("tiny-cpu", XLA + [f"{section}.global_batch_size=8", f"{section}.micro_batch_size=1",
                                              f"{section}.steps=2", "decoder_training.warmup_epochs=0",
                                              "checkpoint.export=false"])
    plan = profile.batch_plan(section)
    assert (plan.num_processes, plan.data_parallel_size, plan.per_process_micro_batch, plan.accum_steps) == (1, 4, 4, 2)
    steps, specs = _tally_steps(monkeypatch)
    if trainer == "decoder":
        result = train_decoder(profile, data, tmp_path / "run")
    else:
        result = train_unified(profile, "stage1", data, tmp_path / "run")
    assert result.step == 2
    assert steps == [[4, 4], [4, 4]]  # 2 micro-steps of 4 = the global batch of 8, each step
    assert specs and all("devices=[4," in s for s in specs), specs[:2]  # batch axis split over the 4 chips
