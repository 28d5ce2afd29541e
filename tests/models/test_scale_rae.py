"""The unified model: loss composition, parameter groups, export round trip, LLM presets."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from scale_rae_core.config import DiTSettings, EncoderSettings, LLMSettings, StageSettings
from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.llm import build_sample, collate
from scale_rae_core.models.presets import count_llm_params, llm_config
from scale_rae_core.models.scale_rae import (
    ScaleRAE,
    build_llm,
    head_parameter_names,
    is_export,
    load_export,
    prompt_words_loss,
    save_export,
    scale_rae_config,
)
from scale_rae_core.train.unified import match_query_scale, param_groups

C, GRID = 16, 4  # encoder channels, token grid (16 tokens per image)
N = GRID * GRID
GEN = [{"from": "human", "value": "Draw a red circle."}, {"from": "gpt", "value": "<image>"}]
UND = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    llm, tok = build_llm(LLMSettings(path="", preset="tiny"), tmp_path_factory.mktemp("tok"))
    cfg = scale_rae_config(llm, DiTSettings(preset="tiny"), EncoderSettings(kind="siglip", path="tiny-random"), C, GRID)
    return ScaleRAE(cfg, llm=llm), tok


def make_batch(tok, convs):
    samples = [build_sample(c, tok, N, 64) for c in convs]
    feats = [torch.randn(len(s.image_starts), N, C) for s in samples]
    return collate(samples, 64, tok.pad_token_id, max_images=1, image_features=feats)


def test_total_is_ce_plus_weighted_flow_over_answer_images_only(built):
    model, tok = built
    model.eval()
    batch = make_batch(tok, [GEN, UND, GEN, [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]])
    g = torch.Generator().manual_seed(3)
    loss = model(batch, flow_weight=2.0, generator=g)
    assert loss.answer_images.item() == 2
    torch.testing.assert_close(loss.total, loss.ce + 2.0 * loss.flow)
    # By hand: the head on the two answer images (rows 0 and 2), same t and noise draws.
    _, cond, _ = model.lm(batch)
    feats = batch["image_features"].flatten(0, 1)
    rows = torch.tensor([0, 2])
    x0 = feats[rows].view(2, GRID, GRID, C).permute(0, 3, 1, 2)
    per = model.flow.loss(model.diff_head, x0, cond[rows], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss.flow, per.mean())
    # Static-shape variant (all slots, masked) gives the same value when the draws match the rows.
    assert torch.isfinite(model(batch, all_slots=True).flow)


def test_flow_repeats_average_independent_draws_per_answer_image(built):
    model, tok = built
    model.eval()
    batch = make_batch(tok, [GEN, UND, GEN])
    loss = model(batch, flow_weight=1.0, generator=torch.Generator().manual_seed(5), flow_repeats=3)
    # By hand: each answer image repeated 3× in place (rows 0,0,0,2,2,2), one draw of t and noise per row.
    _, cond, _ = model.lm(batch)
    rows = torch.tensor([0, 0, 0, 2, 2, 2])
    x0 = batch["image_features"].flatten(0, 1)[rows].view(6, GRID, GRID, C).permute(0, 3, 1, 2)
    per = model.flow.loss(model.diff_head, x0, cond[rows], generator=torch.Generator().manual_seed(5))  # (6,)
    assert per[0] != per[1]  # the repeats really draw anew
    torch.testing.assert_close(loss.flow, per.view(2, 3).mean(1).mean())
    assert loss.answer_images.item() == 2  # repeats do not count as images
    none = model(make_batch(tok, [UND]), flow_repeats=4)  # no answer image: still exactly 0
    assert none.flow.item() == 0.0


def test_prompt_words_loss_is_the_kl_from_the_prompts_word_counts_at_every_query(built):
    model, tok = built
    model.eval()
    batch = make_batch(tok, [GEN, UND, GEN])
    with torch.no_grad():
        _, _, hidden = model.lm(batch)
        per_slot = prompt_words_loss(model.lm, batch, hidden)  # (B·M,) = (3,)
    # By hand, one sample at a time: the text ids (not padding, not image placeholders) before the slot.
    for b in (0, 2):
        ids = batch["input_ids"][b]
        start = int(batch["image_positions"][b, 0, 0])
        words = [int(i) for i, m in zip(ids[:start], batch["attention_mask"][b, :start], strict=True) if m and i >= 0]
        assert words and tok.decode(words).count("red circle") == 1  # the prompt is in it
        target = torch.bincount(torch.tensor(words), minlength=model.lm.llm.lm_head.out_features).float()
        target /= target.sum()
        logp = torch.log_softmax(model.lm.llm.lm_head(hidden[b, start : start + N]).float(), -1)  # (N, V)
        kl = [(target[target > 0] * (target[target > 0].log() - lp[target > 0])).sum() for lp in logp]
        torch.testing.assert_close(per_slot[b], torch.stack(kl).mean())
    # The loss term: total = CE + flow_weight × flow + words_weight × words over the answer images (rows 0, 2).
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        on = model(batch, flow_weight=2.0, generator=g(), words_weight=0.5)
        off = model(batch, flow_weight=2.0, generator=g())
    torch.testing.assert_close(on.words, per_slot[[0, 2]].mean())
    torch.testing.assert_close(on.total, off.total + 0.5 * on.words)
    assert off.words == 0.0 and (on.ce, on.flow) == (off.ce, off.flow)
    with torch.no_grad():  # no answer image: the term is 0, not a mean over nothing
        assert model(make_batch(tok, [UND]), words_weight=1.0).words.item() == 0.0


def test_match_query_scale_keeps_directions_at_the_embeddings_rms(tmp_path):
    torch.manual_seed(0)
    llm, tok = build_llm(LLMSettings(path="", preset="tiny"), tmp_path)
    cfg = scale_rae_config(llm, DiTSettings(preset="tiny"), EncoderSettings(kind="siglip", path="tiny-random"), C, GRID)
    model = ScaleRAE(cfg, llm=llm)
    queries = model.lm.latent_queries.detach().clone()
    before, after = match_query_scale(model)
    rms = model.lm.llm.get_input_embeddings().weight.pow(2).mean().sqrt().item()
    assert before == pytest.approx(queries.pow(2).mean().sqrt().item(), rel=1e-5)
    assert after == pytest.approx(rms, rel=1e-5) and before > 3 * after  # reference init: 1/sqrt(128) vs 0.02
    torch.testing.assert_close(model.lm.latent_queries.detach(), queries * (after / before))


def test_no_answer_image_gives_zero_flow_term(built):
    model, tok = built
    batch = make_batch(tok, [UND, UND])
    loss = model(batch, flow_weight=2.0)
    assert loss.flow.item() == 0.0 and loss.answer_images.item() == 0
    torch.testing.assert_close(loss.total, loss.ce)
    loss.total.backward()  # the head stays in the graph (FSDP collectives stay matched), with zero gradient
    head_grad = model.diff_head.final_layer.linear.weight.grad
    assert head_grad is not None and head_grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)


def test_param_groups_put_head_and_its_projector_at_head_lr(built):
    model, _ = built
    stage = StageSettings(lr=1e-4, head_lr=1e-3, betas=(0.9, 0.999), head_betas=(0.9, 0.95))
    groups = param_groups(model, stage)
    names = {id(p): n for n, p in model.named_parameters()}
    llm_names = {names[id(p)] for p in groups[0]["params"]}
    head_names = {names[id(p)] for p in groups[1]["params"]}
    assert head_names == set(head_parameter_names(model))
    assert {"lm.diff_head_projector.weight", "lm.diff_head_projector.bias", "diff_head.x_embedder.proj.weight"} <= head_names
    assert all(n.startswith("diff_head.") or n.startswith("lm.diff_head_projector.") for n in head_names)
    assert {"lm.latent_queries", "lm.mm_projector.0.weight", "lm.llm.model.embed_tokens.weight"} <= llm_names
    assert not llm_names & head_names and len(llm_names) + len(head_names) == len(names)
    assert (groups[0]["lr"], groups[0]["betas"]) == (1e-4, (0.9, 0.999))
    assert (groups[1]["lr"], groups[1]["betas"]) == (1e-3, (0.9, 0.95))
    assert groups[0]["weight_decay"] == groups[1]["weight_decay"] == 0.0


def test_export_round_trip_gives_identical_outputs(built, tmp_path):
    model, tok = built
    model.eval()
    out = save_export(model, tok, tmp_path / "export")
    assert is_export(out) and not is_export(tmp_path)
    loaded = load_export(out)
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    assert loaded.encoder_settings().path == "tiny-random"
    batch = make_batch(tok, [GEN, UND])
    a = model(batch, generator=torch.Generator().manual_seed(5))
    b = loaded.model(batch, generator=torch.Generator().manual_seed(5))
    assert a.total.item() == b.total.item() and a.flow.item() == b.flow.item()


def test_load_export_refuses_a_non_export(tmp_path):
    with pytest.raises(CheckpointError, match="config"):
        load_export(tmp_path)


def test_llm_presets_count_real_sizes_on_meta():
    assert round(count_llm_params("qwen2.5-1.5b") / 1e9, 3) == 1.544
    assert round(count_llm_params("qwen2.5-7b") / 1e9, 3) == 7.616
    tiny = llm_config("tiny", vocab_size=300)
    assert tiny.vocab_size == 300 and tiny.num_key_value_heads == 2
    assert isinstance(Qwen2ForCausalLM(tiny), Qwen2ForCausalLM)
