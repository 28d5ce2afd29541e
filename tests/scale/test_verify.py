"""Self-verification maths on hand-made logits and a real (tiny, Qwen-style) tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scale_rae_core.errors import DataError
from scale_rae_core.models.tokenizer import build_tiny_tokenizer
from scale_rae_core.scale.verify import (
    answer_scores,
    image_conf,
    judge_record,
    prompt_scores,
    self_certainty,
    yes_no_ids,
)

WORDS = ["yes", "Yes", "YES", " yes", " Yes", " YES", "no", "No", "NO", " no", " No", " NO",
         "the image shows a red circle", "Does this image align with the prompt"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(WORDS * 20, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_yes_no_sets_are_the_single_token_variants(tok):
    yes, no = yes_no_ids(tok)
    for variant in ("yes", "Yes", " yes", " Yes"):
        ids = tok.encode(variant, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in yes
    for variant in ("no", "No", " no", " No"):
        ids = tok.encode(variant, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in no
    assert not yes & no
    assert len(yes) <= 6 and len(no) <= 6


def test_self_certainty_is_zero_for_uniform_and_grows_when_peaked():
    V = 7
    assert float(self_certainty(torch.zeros(V))) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.tensor([5.0, 0, 0, 0, 0, 0, 0])
    p = torch.softmax(peaked, -1)
    assert float(self_certainty(peaked)) == pytest.approx(float(-(torch.log(V * p)).mean()), rel=1e-6)
    assert float(self_certainty(torch.tensor([9.0, 0, 0, 0, 0, 0, 0]))) > float(self_certainty(peaked)) > 0
    # finite where log(V * softmax) underflows
    assert math.isfinite(float(self_certainty(torch.tensor([0.0, -1e4, 0, 0, 0, 0, 0]))))
    assert self_certainty(torch.zeros(2, 3, V)).shape == (2, 3)


def _logits_choosing(tokens: list[int], V: int, peaks: list[float]) -> torch.Tensor:
    rows = torch.zeros(len(tokens), V)
    for i, (t, h) in enumerate(zip(tokens, peaks, strict=True)):
        rows[i, t] = h
    return rows


def test_answer_last_yes_and_no_set_the_scores(tok):
    yes, no = yes_no_ids(tok)
    y, n = min(yes), min(no)
    other = tok.encode("the", add_special_tokens=False)[0]
    V = len(tok)
    gen = [n, other, y, other, y]  # a no, then two yeses: the last yes (step 4) counts
    logits = _logits_choosing(gen, V, [2.0, 1.0, 3.0, 1.0, 6.0])
    conf = self_certainty(logits)
    s = answer_scores(gen, logits, yes, no)
    assert (s.answer, s.score) == ("yes", 1)  # yes wins even though a no appeared
    assert s.yes_logit == 6.0 and s.yes_conf_score == pytest.approx(float(conf[4]))
    assert s.no_logit == 2.0 and s.no_conf_score == pytest.approx(float(conf[0]))
    assert s.response_conf_score == pytest.approx(float(conf.mean()))
    assert answer_scores(torch.tensor([[other, n]]), logits[:2].unsqueeze(0), yes, no).answer == "no"

    unsure = answer_scores([other, other], logits[:2], yes, no)
    assert (unsure.answer, unsure.score, unsure.yes_logit, unsure.no_conf_score) == ("uncertain", 0, 0.0, 0.0)
    assert answer_scores([], torch.zeros(0, V), yes, no).response_conf_score == 0.0
    with pytest.raises(ValueError, match="2 generated tokens but 1 logit rows"):
        answer_scores([y, n], logits[:1], yes, no)


def test_prompt_loss_scores_tokens_two_to_L_and_conf_all_positions():
    torch.manual_seed(0)
    L, V = 5, 11
    logits = torch.randn(L, V)
    ids = torch.tensor([3, 1, 4, 1, 5])
    loss, conf = prompt_scores(logits, ids)
    by_hand = sum(-F.log_softmax(logits[i], -1)[ids[i + 1]] for i in range(L - 1)) / (L - 1)
    assert loss == pytest.approx(float(by_hand), rel=1e-6)
    p = torch.softmax(logits, -1)
    assert conf == pytest.approx(float(-(torch.log(V * p)).mean()), rel=1e-5)
    # the last position's logits are not in the loss (they predict what follows the prompt)
    changed = logits.clone()
    changed[-1] += torch.randn(V)
    assert prompt_scores(changed, ids)[0] == pytest.approx(loss)
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        prompt_scores(logits[:1], ids[:1])


def test_image_conf_and_judge_record():
    logits = torch.zeros(4, 9)
    logits[0, 0] = 4.0
    assert image_conf(logits) == pytest.approx(float(self_certainty(logits).mean()))
    assert image_conf(torch.zeros(3, 9)) == pytest.approx(0.0, abs=1e-6)
    s = answer_scores([], torch.zeros(0, 9), frozenset({1}), frozenset({2}))
    record = judge_record(s, prompt_loss=1.5, prompt_conf_score=0.2, image_conf_score=0.3,
                          question="q", response="r", gen_output_text="g")
    assert set(record) == {
        "input_questions", "score", "gen_output_text", "responses", "prompt_loss", "prompt_conf_score",
        "image_conf_score", "answer", "yes_logit", "no_logit", "yes_conf_score", "no_conf_score",
        "response_conf_score",
    }
