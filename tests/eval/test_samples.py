"""Sample sets: the index -> (label, seed) plan, sharding, resume, batch independence and the ADM npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.eval.adm_npz import open_npz_images
from scale_rae_core.eval.samples import (
    SamplePlan,
    generate_samples,
    pack_samples,
    prepare_folder,
    read_plan,
    shard,
)
from scale_rae_core.flow.guidance import Guidance
from scale_rae_core.flow.sampler import SamplerConfig
from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, build_class_dit

CFG = CLASS_DIT_PRESETS["tiny-ddt"]


@pytest.mark.parametrize(("n", "world"), [(1, 1), (10, 3), (12, 12), (7, 9), (1000, 8)])
def test_shards_cover_every_index_once(n, world):
    seen = [i for rank in range(world) for i in shard(n, rank, world)]
    assert sorted(seen) == list(range(n)) and len(seen) == len(set(seen))


def test_equal_labels_are_exact_and_the_plan_is_deterministic():
    plan = SamplePlan(n=120, num_classes=12, seed=3)
    labels = plan.labels()
    assert np.bincount(labels, minlength=12).tolist() == [10] * 12
    assert np.array_equal(labels, SamplePlan(120, 12, seed=3).labels())
    assert not np.array_equal(labels, SamplePlan(120, 12, seed=4).labels())
    seeds = [plan.seed_of(i) for i in range(120)]
    assert len(set(seeds)) == 120 and seeds == [SamplePlan(120, 12, seed=3).seed_of(i) for i in range(120)]
    random = SamplePlan(50, 12, "random", seed=1).labels()
    assert random.min() >= 0 and random.max() < 12 and len(random) == 50


def test_plan_errors_are_one_line():
    with pytest.raises(ConfigError) as err:
        SamplePlan(n=100, num_classes=12)
    assert str(err.value) == (
        "--label-sampling equal needs --n to be a multiple of the 12 classes, got 100; use --n 96 or --label-sampling random"
    )
    with pytest.raises(ConfigError, match="--label-sampling must be one of equal, random"):
        SamplePlan(12, 12, "balanced")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_class_dit(CFG).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return m


def decode(latents: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder: 3 latent channels -> a 16x16 RGB image in [0, 1]."""
    return F.interpolate(torch.sigmoid(latents[:, :3]), size=(16, 16), mode="nearest")


def _run(model, out, plan, sampler, **kw):
    return generate_samples(model, decode, out, plan, shift=2.0, sampler=sampler, guidance=Guidance("cfg", 2.0), **kw)


@pytest.mark.parametrize("sampler", [SamplerConfig("euler", steps=3), SamplerConfig("sde", steps=3)],
                         ids=["ode", "sde"])
def test_sharded_runs_equal_one_process_and_pack_in_index_order(tmp_path, model, sampler):
    plan = SamplePlan(n=24, num_classes=12, seed=5)
    one = _run(model, tmp_path / "one", plan, sampler, batch_size=24)
    assert one == {"shard": 24, "skipped": 0, "written": 24}
    for rank in range(3):
        _run(model, tmp_path / "three", plan, sampler, batch_size=5, rank=rank, world_size=3)
    for i in range(24):
        assert (tmp_path / "one" / f"{i:06d}.png").read_bytes() == (tmp_path / "three" / f"{i:06d}.png").read_bytes()
    npz = pack_samples(tmp_path / "three", plan)
    with np.load(npz, allow_pickle=False) as f:
        assert f.files == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (24, 16, 16, 3)
    assert np.array_equal(arr[7], np.asarray(Image.open(tmp_path / "one" / "000007.png")))
    assert open_npz_images(npz).count == 24
    record = json.loads((tmp_path / "three" / "plan.json").read_text())
    assert record["plan"] == {"n": 24, "num_classes": 12, "label_sampling": "equal", "seed": 5, "classes": []}
    assert record["settings"]["guidance"] == {"method": "cfg", "scale": 2.0, "interval": [0.0, 1.0]}


def test_resume_skips_written_indices_and_redraws_the_same_images(tmp_path, model):
    plan = SamplePlan(n=12, num_classes=12, seed=0)
    sampler = SamplerConfig("heun", steps=2)
    _run(model, tmp_path, plan, sampler, batch_size=4)
    before = {i: (tmp_path / f"{i:06d}.png").read_bytes() for i in (2, 9)}
    for i in before:
        (tmp_path / f"{i:06d}.png").unlink()
    with pytest.raises(DataError) as err:
        pack_samples(tmp_path, plan)
    assert "2 of 12 samples are missing (first: 000002.png)" in str(err.value) and "\n" not in str(err.value)
    again = _run(model, tmp_path, plan, sampler, batch_size=4)
    assert again == {"shard": 12, "skipped": 10, "written": 2}
    assert {i: (tmp_path / f"{i:06d}.png").read_bytes() for i in before} == before


def test_resume_with_other_settings_is_refused(tmp_path, model):
    plan = SamplePlan(n=12, num_classes=12)
    _run(model, tmp_path, plan, SamplerConfig("euler", steps=1), batch_size=12)
    with pytest.raises(ConfigError, match="holds samples of another plan or other settings"):
        _run(model, tmp_path, plan, SamplerConfig("euler", steps=2))
    with pytest.raises(ConfigError, match="holds samples of another plan"):
        _run(model, tmp_path, SamplePlan(n=24, num_classes=12), SamplerConfig("euler", steps=1))


def test_plan_and_model_must_agree_on_classes(tmp_path, model):
    with pytest.raises(ConfigError, match="the plan has 10 classes but the model 12"):
        _run(model, tmp_path, SamplePlan(n=10, num_classes=10), SamplerConfig())


def test_labels_restrict_the_plan_to_those_classes():
    plan = SamplePlan(n=12, num_classes=12, seed=1, classes=(3, 7))
    assert sorted(plan.labels().tolist()) == [3] * 6 + [7] * 6
    random = SamplePlan(n=40, num_classes=12, label_sampling="random", seed=1, classes=(3, 7)).labels()
    assert set(random.tolist()) == {3, 7}
    with pytest.raises(ConfigError) as err:
        SamplePlan(n=12, num_classes=12, classes=(3, 12))
    assert str(err.value) == "--labels 12 is outside the model's 12 classes (0..11); pass labels in that range"
    with pytest.raises(ConfigError, match="multiple of the 2 labels given, got 13; use --n 12"):
        SamplePlan(n=13, num_classes=12, classes=(3, 7))


def test_read_plan_gives_back_the_plan_a_folder_was_prepared_with(tmp_path):
    plan = SamplePlan(n=6, num_classes=12, label_sampling="random", seed=3, classes=(2, 7))
    prepare_folder(tmp_path / "s", plan, {"sampler": "euler"})
    assert read_plan(tmp_path / "s") == plan
    assert list(read_plan(tmp_path / "s").labels()) == list(plan.labels())
