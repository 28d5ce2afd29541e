"""`srae train dit` end to end on the XLA backend (SPMD over 4 virtual CPU devices): an interrupted and resumed run
repeats the uninterrupted one, the EMA is sharded like the model, the export carries plain parameter names (loadable
anywhere), and one host with 4 chips steps on exactly the global batch.
"""

from __future__ import annotations

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.data.pack import pack
from scale_rae_core.models.adapters.class_dit import load_class_dit
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.dit import train_dit

pytestmark = pytest.mark.xla
XLA = [
    "backend.kind=xla", "backend.devices_per_node=4",
    "stage1.micro_batch_size=1", "stage1.global_batch_size=4", "stage2.micro_batch_size=1",
    "stage2.global_batch_size=4", "decoder_training.micro_batch_size=8",
    "dit_training.preset=tiny-ddt", "dit_training.micro_batch_size=1", "dit_training.global_batch_size=8", "dit_training.steps=4",
    "checkpoint.every_steps=2", "output.log_every=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(root / "s", 24, image_size=64, seed=0)
    pack(root / "s" / "classes", root / "packed")
    return root / "packed"


def test_dit_on_xla_resumes_exactly_shards_the_ema_and_exports_plain_names(data, tmp_path, monkeypatch):
    import torch_xla

    from scale_rae_core.train import dit as dit_mod

    profile = load_profile("tiny-cpu", XLA)
    plan = profile.batch_plan("dit_training")
    assert (plan.num_processes, plan.data_parallel_size, plan.per_process_micro_batch, plan.accum_steps) == (1, 4, 4, 2)

    ema_specs: list[str] = []
    real_update = dit_mod.EMA.update

    def update(self, model, decay):
        real_update(self, model, decay)
        if not ema_specs:  # the averaged weights live sharded over the 4 chips, like the model's
            ema_specs.extend(torch_xla._XLAC._get_xla_sharding_spec(t) for _, t in self.module.named_parameters())

    monkeypatch.setattr(dit_mod.EMA, "update", update)
    full = train_dit(profile, data, tmp_path / "full")
    train_dit(profile, data, tmp_path / "cut", stop_at=2)
    rest = train_dit(profile, data, tmp_path / "cut", resume=True)
    assert [r["loss"] for r in rest.records] == pytest.approx([r["loss"] for r in full.records[2:]], rel=1e-5)
    assert any("devices=[4" in s for s in ema_specs), ema_specs[:3]

    model, info = load_class_dit(full.export_dir)  # strict: fails on any `_orig_module.` name
    assert all("_orig_module" not in name for name in model.state_dict())
    assert info["class_dit"]["grid"] == 8 and info["class_dit"]["in_channels"] == 40  # tiny-cpu: EfficientNet, 8 × 8 × 40
