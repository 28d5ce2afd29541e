"""Both trainers consume exactly ``global_batch_size`` samples per optimiser step, counted while they train on
CPU: in the plain layout (one process, gradient accumulation) and in a TPU-like layout (one host process feeding
4 chips: each micro-step loads 4 × micro_batch_size), which is where the decoder used 4× its batch (issue #13).

Counting: every micro-batch the trainer draws is recorded, and the backend's ``mark_step`` (called once per
optimiser step by every trainer) closes the step's tally.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import scale_rae_core.train.decoder as decoder_mod
from scale_rae_core.backends.cpu_cuda import CpuCudaBackend
from scale_rae_core.config import BackendSettings, load_profile
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.unified_data import MicroBatcher
from tests.train.test_decoder_train import tiny_profile as tiny_decoder_profile
from tests.train.test_decoder_train import write_images
from tests.train.unified_helpers import TINY_OVERRIDES, use_list_reader

XLA_LAYOUT = ["backend.kind=xla", "backend.nodes=1", "backend.devices_per_node=4"]  # 1 host × 4 chips


class Tally:
    """Sizes of the micro-batches drawn, grouped by optimiser step."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.steps: list[list[int]] = []

    def draw(self, n: int) -> None:
        self.pending.append(n)

    def step(self) -> None:
        self.steps.append(self.pending)
        self.pending = []


@pytest.fixture
def tally(monkeypatch) -> Tally:
    t = Tally()
    monkeypatch.setattr(CpuCudaBackend, "mark_step", lambda self: t.step())
    return t


def _count_decoder_batches(monkeypatch, tally: Tally) -> None:
    real = decoder_mod.batches

    def counted(stream, batch_size, **kw):
        for x, pos in real(stream, batch_size, **kw):
            tally.draw(x.shape[0])
            yield x, pos

    monkeypatch.setattr(decoder_mod, "batches", counted)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("imgs") / "folder")


def test_decoder_step_consumes_the_global_batch_with_accumulation(tmp_path, images, monkeypatch, tally):
    _count_decoder_batches(monkeypatch, tally)
    profile = tiny_decoder_profile(tmp_path, steps=2, global_batch_size=8, micro_batch_size=2, lpips_weight=0.0,
                                   gan_weight=0.0)
    result = decoder_mod.train_decoder(profile, images, tmp_path / "run")
    assert result.step == 2
    assert tally.steps == [[2, 2, 2, 2], [2, 2, 2, 2]]  # 4 micro-steps of 2 = 8 = global_batch_size


def test_decoder_step_under_a_host_with_four_chips_consumes_the_global_batch(tmp_path, images, monkeypatch, tally):
    """micro_batch_size 1 per chip × 4 chips: the host loads 4 per micro-step and accumulates 8 / 4 = 2."""
    from scale_rae_core.models.build import build_rae
    from scale_rae_core.train.loop import TrainLoop

    _count_decoder_batches(monkeypatch, tally)
    profile = load_profile("tiny-cpu", [
        *XLA_LAYOUT, "decoder_training.steps=2", "decoder_training.global_batch_size=8",
        "decoder_training.micro_batch_size=1", "decoder_training.image_size=32", "model.encoder.input_size=32",
        "model.decoder.image_size=32", "stage1.micro_batch_size=8", "stage2.micro_batch_size=8",
    ])
    plan = profile.batch_plan("decoder_training")
    assert (plan.per_process_micro_batch, plan.accum_steps) == (4, 2)
    with CpuCudaBackend(BackendSettings()) as backend:  # the layout comes from the profile; CPU runs the maths
        loop = TrainLoop("train_decoder", profile, tmp_path / "run", backend, resume=False)
        rae = build_rae(profile, noise_tau=0.0, with_stats=False)
        trainer = decoder_mod.DecoderTrainer(profile, rae, images, loop.run_dir, backend)
        result = loop.run(trainer)
    assert result.step == 2 and trainer.phases.steps_per_epoch == 16 // 8
    assert tally.steps == [[4, 4], [4, 4]]


def _count_unified_batches(monkeypatch, tally: Tally) -> None:
    real = MicroBatcher.next_batch

    def counted(self, size):
        out = real(self, size)
        tally.draw(len(out))
        return out

    monkeypatch.setattr(MicroBatcher, "next_batch", counted)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "world"
    synthesize(root, 8, image_size=64, seed=0)
    return root / "conversations.jsonl"


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (["stage1.global_batch_size=4", "stage1.micro_batch_size=2"], [[2, 2], [2, 2]]),  # 1 process, accumulate 2
        ([*XLA_LAYOUT, "stage1.global_batch_size=8", "stage1.micro_batch_size=1", "stage2.global_batch_size=8",
          "stage2.micro_batch_size=1", "decoder_training.micro_batch_size=8"], [[4, 4], [4, 4]]),  # 4 chips
    ],
    ids=["cpu", "host-with-4-chips"],
)
def test_unified_step_consumes_the_global_batch(layout, expected, shapes, tmp_path, monkeypatch, tally):
    import scale_rae_core.train.unified as unified

    use_list_reader(monkeypatch)
    _count_unified_batches(monkeypatch, tally)
    monkeypatch.setattr(unified, "get_backend", lambda settings: CpuCudaBackend(BackendSettings()))
    profile = load_profile("tiny-cpu", [*TINY_OVERRIDES, "stage1.steps=2", *layout])
    result = unified.train_unified(profile, "stage1", shapes, tmp_path / "run")
    assert result.step == 2
    assert tally.steps == expected and all(sum(s) == profile.stage1.global_batch_size for s in tally.steps)
