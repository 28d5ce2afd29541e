"""The tiny unified model (Qwen2 + DiT head) on the XLA backend: parity with CPU, static shapes (no
recompilation after warm-up), and checkpoints that the CPU/GPU engine reads and vice versa, with resume.

Runs in the XLA lane (.venv-xla, PJRT_DEVICE=CPU CPU_NUM_DEVICES=4); skipped where torch_xla is absent.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from scale_rae_core.backends.cpu_cuda import CpuCudaBackend
from scale_rae_core.config import BackendSettings, DiTSettings, EncoderSettings, LLMSettings, StageSettings
from scale_rae_core.models.dit import DiTBlock
from scale_rae_core.models.llm import build_sample, collate
from scale_rae_core.models.scale_rae import ScaleRAE, build_llm, prompt_words_loss, scale_rae_config
from scale_rae_core.train.checkpoint import CheckpointManager
from scale_rae_core.train.unified import build_optimizer

pytestmark = pytest.mark.xla
C, GRID, SEQ = 16, 4, 64
N = GRID * GRID
GEN = [{"from": "human", "value": "Draw a red circle."}, {"from": "gpt", "value": "<image>"}]
UND = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture(scope="module")
def xla():
    from scale_rae_core.backends.xla import XlaBackend

    return XlaBackend(BackendSettings(kind="xla", devices_per_node=4))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    llm, tok = build_llm(LLMSettings(path="", preset="tiny"), tmp_path_factory.mktemp("tok"))
    cfg = scale_rae_config(llm, DiTSettings(preset="tiny"), EncoderSettings(kind="siglip", path="tiny-random"), C, GRID)
    model = ScaleRAE(cfg, llm=llm)
    with torch.no_grad():  # the head starts at exactly 0: perturb so its gradients are informative
        for p in model.diff_head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tok


def _batch(tok):
    convs = [GEN, UND, GEN, UND]
    samples = [build_sample(c, tok, N, SEQ) for c in convs]
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, N, C, generator=g) for _ in samples]
    return collate(samples, SEQ, tok.pad_token_id, max_images=1, image_features=feats)


def _on(backend, batch):
    return {k: backend.shard_batch(v) for k, v in batch.items()}


def test_language_and_head_parity_with_cpu(xla, built):
    model, tok = built
    batch = _batch(tok)
    cpu = copy.deepcopy(model).eval()
    ce_cpu, cond_cpu, hidden_cpu = cpu.lm(batch)
    words_cpu = prompt_words_loss(cpu.lm, batch, hidden_cpu)
    dev = xla.shard_model(copy.deepcopy(model).eval(), (Qwen2DecoderLayer, DiTBlock))
    on = _on(xla, batch)
    ce_x, cond_x, hidden_x = dev.lm(on)
    words_x = prompt_words_loss(dev.lm, on, hidden_x)  # the stage-1 recipe's extra term, static shapes
    xla.mark_step()
    torch.testing.assert_close(ce_x.cpu(), ce_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cond_x.cpu(), cond_cpu, rtol=1e-4, atol=1e-4)
    assert words_cpu.min() > 0
    torch.testing.assert_close(words_x.cpu(), words_cpu, rtol=1e-4, atol=1e-5)


def _steps(xla, dev, opt, batch, n: int) -> tuple[list[float], list[int]]:
    """``n`` training steps -> (losses, compile count after each). Every test trains through here, so the step
    graphs are the same and compile once for the lane."""
    losses, compiles = [], []
    for _ in range(n):
        loss = dev(batch, all_slots=True)
        loss.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        xla.mark_step()
        losses.append(loss.total.item())
        compiles.append(xla.compile_count())
    return losses, compiles


def test_training_steps_do_not_recompile_after_warm_up(xla, built):
    model, tok = built
    dev = xla.shard_model(copy.deepcopy(model), (Qwen2DecoderLayer, DiTBlock))
    opt = build_optimizer(dev, StageSettings(lr=1e-3, head_lr=1e-3))
    losses, compiles = _steps(xla, dev, opt, _on(xla, _batch(tok)), 5)
    assert compiles[-1] == compiles[2], f"recompiled after warm-up: {compiles}"
    assert losses[-1] < losses[0]


def test_checkpoints_cross_between_xla_and_cpu_engines_and_resume(xla, built, tmp_path):
    model, tok = built
    stage = StageSettings(lr=1e-3, head_lr=1e-3)
    dev = xla.shard_model(copy.deepcopy(model), (Qwen2DecoderLayer, DiTBlock))
    opt = build_optimizer(dev, stage)
    batch = _on(xla, _batch(tok))
    _steps(xla, dev, opt, batch, 2)
    saved = CheckpointManager(tmp_path / "xla-run", keep=2, backend=xla).save(2, dev, opt)
    expected = {k: v.cpu() for k, v in xla.train_state(dev)["model"].items()}

    # the CPU engine reads the XLA checkpoint: same weights, same optimizer moments
    cpu_be = CpuCudaBackend(BackendSettings(kind="cpu"))
    cpu_model = copy.deepcopy(model)
    cpu_opt = build_optimizer(cpu_model, stage)
    CheckpointManager(tmp_path / "xla-run", keep=2, backend=cpu_be).load(saved, cpu_model, cpu_opt)
    for name, value in cpu_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    assert int(cpu_opt.state_dict()["state"][0]["step"]) == 2

    # and the XLA engine reads a CPU checkpoint (after one more CPU step), then resumes training from it
    cpu_cpu_batch = _batch(tok)
    cpu_model(cpu_cpu_batch, all_slots=True).total.backward()
    cpu_opt.step()
    cpu_opt.zero_grad(set_to_none=True)
    cpu_saved = CheckpointManager(tmp_path / "cpu-run", keep=2, backend=cpu_be).save(3, cpu_model, cpu_opt)
    dev2 = xla.shard_model(copy.deepcopy(model), (Qwen2DecoderLayer, DiTBlock))
    opt2 = build_optimizer(dev2, stage)
    info = CheckpointManager(tmp_path / "cpu-run", keep=2, backend=xla).load(cpu_saved, dev2, opt2)
    assert info["step"] == 3
    got = xla.train_state(dev2)["model"]
    for name, value in cpu_model.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)
    (loss,), _ = _steps(xla, dev2, opt2, batch, 1)
    assert np.isfinite(loss)
