"""`srae train stage1` end to end on the XLA backend (SPMD over 4 virtual CPU devices): an interrupted and
resumed run repeats the uninterrupted one, and the export carries plain parameter names (loadable anywhere).
"""

from __future__ import annotations

import json

import pytest

from scale_rae_core.config import load_profile
from scale_rae_core.data.pack import pack
from scale_rae_core.data.synth import synthesize
from scale_rae_core.models.scale_rae import load_export
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
    profile = load_profile("tiny-cpu", XLA)

    full = train_unified(profile, "stage1", data, tmp_path / "full")
    train_unified(profile, "stage1", data, tmp_path / "cut", stop_at=2)
    train_unified(profile, "stage1", data, tmp_path / "cut", resume=True)
    assert len(_losses(tmp_path / "full")) == 4
    assert _losses(tmp_path / "cut")[-2:] == pytest.approx(_losses(tmp_path / "full")[-2:], rel=1e-5)

    loaded = load_export(full.export_dir)  # strict: fails on any `_orig_module.` name
    assert all("_orig_module" not in name for name in loaded.model.state_dict())


def test_decoder_training_on_xla_resumes_exactly_and_exports(tmp_path):
    from scale_rae_core.models.decoder import load_decoder
    from scale_rae_core.train.decoder import train_decoder

    synthesize(tmp_path / "shapes", 16, image_size=64, seed=0)
    data = tmp_path / "packed"
    pack(tmp_path / "shapes" / "classes", data)
    profile = load_profile("tiny-cpu", XLA + ["decoder_training.global_batch_size=8", "decoder_training.micro_batch_size=2",
                                              "decoder_training.steps=4", "decoder_training.warmup_epochs=0"])
    full = train_decoder(profile, data, tmp_path / "full")
    train_decoder(profile, data, tmp_path / "cut", stop_at=2)
    rest = train_decoder(profile, data, tmp_path / "cut", resume=True)
    assert [h["loss"] for h in rest.history] == pytest.approx([h["loss"] for h in full.history[2:]], rel=1e-5)
    decoder = load_decoder(full.export_dir)  # strict load of the exported EMA decoder
    assert decoder.cfg.image_size == 64
