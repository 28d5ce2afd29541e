"""Held-out evaluation during unified training: the mismatched-prompt flow loss tells whether the head reads
the prompt."""

from __future__ import annotations

import torch

from scale_rae_core.backends import get_backend
from scale_rae_core.config import DiTSettings, EncoderSettings, LLMSettings
from scale_rae_core.models.build import build_encoder
from scale_rae_core.models.scale_rae import ScaleRAE, build_llm, scale_rae_config
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.unified_eval import EvalBatches
from tests.train.unified_helpers import tiny_profile


def test_mismatched_flow_equals_flow_only_when_the_head_ignores_the_prompt(tmp_path):
    synthesize(tmp_path / "w", 6, image_size=64, seed=0, split_heldout=0.0)
    profile = tiny_profile("stage1.micro_batch_size=4", "stage1.seq_len=120")
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSettings(kind="siglip", path="tiny-random"))
    llm, tok = build_llm(LLMSettings(path="", preset="tiny"), tmp_path / "tok")
    cfg = scale_rae_config(llm, DiTSettings(preset="tiny"), EncoderSettings(kind="siglip", path="tiny-random"),
                           encoder.hidden_size, 8)
    model = ScaleRAE(cfg, llm=llm)
    with get_backend(profile.backend) as backend:
        evals = EvalBatches.build(tmp_path / "w" / "conversations.jsonl", tok, 64, profile.stage1, encoder, backend)
    assert evals.generation["image_features"].shape[0] == 4
    # A fresh head (adaLN-zero) ignores its condition: pairing images with other prompts changes nothing.
    fresh = evals.run(model, 1.0)
    assert fresh["eval_flow_mismatched"] == fresh["eval_flow"]
    # A head whose modulation reads the condition: the mismatched pairing scores differently.
    with torch.no_grad():
        for block in model.diff_head.dit_blocks:
            block.adaLN_modulation[-1].weight.normal_(std=1.0)
        model.diff_head.final_layer.linear.weight.normal_(std=0.05)
    reading = evals.run(model, 1.0)
    assert abs(reading["eval_flow_mismatched"] - reading["eval_flow"]) > 1e-5  # float noise here is ~1e-7
    assert {"eval_answer_ce", "eval_gen_ce"} <= reading.keys()
    # The evaluation draws nothing from the global stream, so a training run is the same whether or how often it
    # is evaluated (the understanding batch has no answer image, and the head still runs on a placeholder row).
    torch.manual_seed(7)
    evals.run(model, 1.0)
    after = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(4), after)
