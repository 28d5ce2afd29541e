"""Sequence building, image tokens and the unified LM on a tiny tokenizer and a tiny Qwen2."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.models.adapters.scale_rae import from_reference_key, to_reference_key
from scale_rae_core.models.llm import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER_ID,
    SequenceTooLongError,
    UnifiedLM,
    UnifiedLMConfig,
    add_image_tokens,
    build_sample,
    collate,
    image_token_ids,
)
from scale_rae_core.models.tokenizer import build_tiny_tokenizer

WORDS = ["draw a red cat", "what is in the image?", "a cat on a mat", "hello world"]
N = 4  # tokens per image
C, Z = 8, 12  # encoder channels, condition channels


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(WORDS, path)
    return path


@pytest.fixture
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def tiny_qwen(vocab_size: int, tie: bool = False) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_unified(tok) -> UnifiedLM:
    return UnifiedLM(
        UnifiedLMConfig(encoder_channels=C, num_image_tokens=N, z_channels=Z), tiny_qwen(len(tok))
    ).eval()


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised(sample) -> list[int]:
    return [t for t in sample.labels if t != IGNORE_INDEX]


GEN = [{"from": "human", "value": "draw a red cat"}, {"from": "gpt", "value": "<image>"}]
UND = [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": "a cat"}]


# ---- tokenizer ---------------------------------------------------------------------------------------


def test_tiny_tokenizer_reloads_offline_and_round_trips(tok):
    text = "Draw a cat!\n\n  über 123 😀\tdone"
    assert tok.decode(enc(tok, text)) == text
    assert len(enc(tok, "\n")) == 1
    assert enc(tok, "a\nb") == enc(tok, "a") + enc(tok, "\n") + enc(tok, "b")
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    vocab = tok.get_vocab()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<im_start>", "<im_end>"]
    ids = [vocab[t] for t in specials]
    assert ids == list(range(len(tok) - 5, len(tok)))  # appended after the BPE vocab, Qwen's order
    assert enc(tok, "x<|im_start|>y<im_end>") == [*enc(tok, "x"), ids[1], *enc(tok, "y"), ids[4]]


def test_chat_template_is_the_qwen_format(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "draw a red cat"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\ndraw a red cat<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- special tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_add_image_tokens_resizes_and_inits_new_rows_to_the_mean(tmp_path, tie):
    tok = build_tiny_tokenizer(WORDS, tmp_path, image_tokens=False)
    n_old = len(tok)
    model = tiny_qwen(n_old + 6, tie=tie)  # padded vocabulary, like Qwen2.5's 151936 rows
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    ids = add_image_tokens(tok, model)

    assert tuple(ids) == (n_old, n_old + 1) == tuple(image_token_ids(tok))
    assert len(tok) == n_old + 2
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape == new_out.shape == (n_old + 2, 32)  # shrunk to len(tokenizer)
    for new, old in ((new_in, old_in), (new_out, old_out)):
        torch.testing.assert_close(new[:n_old], old[:n_old])
        mean = old[:n_old].mean(0)
        torch.testing.assert_close(new[n_old], mean)
        torch.testing.assert_close(new[n_old + 1], mean)
    assert tok.convert_ids_to_tokens(list(ids)) == ["<im_start>", "<im_end>"]
    assert enc(tok, "<im_start>") == [ids.im_start]


# ---- sequence building -------------------------------------------------------------------------------


def test_generation_sample_supervises_the_assistant_turn_and_marks_an_answer_image(tok):
    s = build_sample(GEN, tok, N, max_len=128)
    im = image_token_ids(tok)
    prefix = enc(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    prefix += enc(tok, "<|im_start|>user\ndraw a red cat<|im_end|>\n")
    head = enc(tok, "<|im_start|>assistant\n<im_start>")
    tail = enc(tok, "<im_end><|im_end|>\n")
    assert s.input_ids == prefix + head + [IMAGE_PLACEHOLDER_ID] * N + tail
    assert s.labels == [IGNORE_INDEX] * len(prefix) + head + [IGNORE_INDEX] * N + tail
    assert s.image_starts == [len(prefix) + len(head)]
    assert s.answer_image_mask == [True]
    start = s.image_starts[0]
    assert s.input_ids[start - 1] == s.labels[start - 1] == im.im_start  # <im_start> is supervised
    assert s.labels[start + N] == im.im_end
    assert s.image_positions == [list(range(start, start + N))]
    assert s.attention_mask == [1] * len(s.input_ids)


def test_understanding_sample_masks_user_turn_newlines_and_marks_a_context_image(tok):
    s = build_sample(UND, tok, N, max_len=128)
    im = image_token_ids(tok)
    nl = enc(tok, "\n")[0]
    assert supervised(s) == enc(tok, "<|im_start|>assistant\na cat<|im_end|>\n")
    assert s.answer_image_mask == [False]
    start = s.image_starts[0]
    assert s.input_ids[start - 1] == im.im_start and s.labels[start - 1] == IGNORE_INDEX
    assert s.input_ids[start : start + N] == [IMAGE_PLACEHOLDER_ID] * N
    assert s.input_ids[start + N : start + N + 2] == [im.im_end, nl]
    # the first supervised token is the assistant header: every "\n" before it is masked (ref bug §8.9)
    first = next(i for i, t in enumerate(s.labels) if t != IGNORE_INDEX)
    assert s.input_ids.count(nl) > 2 and s.input_ids[:first].count(nl) >= 4
    assert all(label == IGNORE_INDEX for label in s.labels[:first])


def test_text_only_sample_equals_the_chat_template_and_inference_prompt(tok):
    conv = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello world"}]
    s = build_sample(conv, tok, N, max_len=128)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    assert s.input_ids == enc(tok, tok.apply_chat_template(messages, tokenize=False))
    p = build_sample(conv[:1], tok, N, max_len=128, add_generation_prompt=True)
    assert p.input_ids == enc(
        tok, tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    )
    assert supervised(p) == []
    custom = build_sample([{"from": "system", "value": "Be brief."}, *conv], tok, N, max_len=128)
    assert tok.decode(custom.input_ids).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"
    )


def test_two_images_are_classified_by_turn(tok):
    conv = [
        {"from": "human", "value": "<image> make it red"},
        {"from": "gpt", "value": "sure <image>"},
    ]
    s = build_sample(conv, tok, N, max_len=128)
    assert s.answer_image_mask == [False, True]
    assert s.input_ids.count(IMAGE_PLACEHOLDER_ID) == 2 * N
    assert s.image_starts[1] > s.image_starts[0] + N


def test_sequence_building_errors(tok, tmp_path):
    with pytest.raises(SequenceTooLongError, match="max_len is 20") as err:
        build_sample(GEN, tok, N, max_len=20)
    assert isinstance(err.value, DataError)
    with pytest.raises(DataError, match="role 'bot'"):
        build_sample([{"from": "bot", "value": "hi"}], tok, N, max_len=128)
    with pytest.raises(DataError, match="empty"):
        build_sample([], tok, N, max_len=128)
    plain = build_tiny_tokenizer(WORDS, tmp_path, image_tokens=False)
    with pytest.raises(ConfigError, match="add_image_tokens"):
        build_sample(GEN, plain, N, max_len=128)


def test_collate_has_static_shapes_and_pads(tok):
    gen, und = build_sample(GEN, tok, N, 64), build_sample(UND, tok, N, 64)
    text = build_sample([{"from": "human", "value": "hello"}], tok, N, 64)
    a = collate([gen, und], max_len=64, pad_id=tok.pad_token_id, max_images=2)
    b = collate([text, text], max_len=64, pad_id=tok.pad_token_id, max_images=2)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert a["input_ids"].shape == (2, 64) and a["image_positions"].shape == (2, 2, N)
    n = len(gen.input_ids)
    assert a["input_ids"][0, :n].tolist() == gen.input_ids
    assert (a["input_ids"][0, n:] == tok.pad_token_id).all() and (a["labels"][0, n:] == IGNORE_INDEX).all()
    assert a["attention_mask"][0].sum() == n
    assert a["image_positions"][0, 0].tolist() == gen.image_positions[0]
    assert a["image_valid"].tolist() == [[True, False], [True, False]]
    assert a["answer_image_mask"].tolist() == [[True, False], [False, False]]
    assert not b["image_valid"].any() and (b["image_positions"] == 0).all()

    feats = [torch.ones(1, N, C), 2 * torch.ones(1, N, C)]
    f = collate([gen, und], 64, tok.pad_token_id, max_images=2, image_features=feats)["image_features"]
    assert f.shape == (2, 2, N, C) and f[:, 0, 0, 0].tolist() == [1.0, 2.0] and (f[:, 1] == 0).all()
    f = collate([text], 64, 0, max_images=2, image_features=[torch.zeros(0, N, C)])["image_features"]
    assert f.shape == (1, 2, N, C)
    with pytest.raises(DataError, match="expected"):
        collate([gen], 64, 0, image_features=[torch.zeros(2, N, C)])
    with pytest.raises(DataError, match="max_images is 1"):
        collate([build_sample([{"from": "human", "value": "<image><image>"}], tok, N, 64)], 64, 0)
    with pytest.raises(SequenceTooLongError):
        collate([gen], max_len=10, pad_id=0)


# ---- unified model -----------------------------------------------------------------------------------


def unified_batch(tok):
    samples = [build_sample(GEN, tok, N, 48), build_sample(UND, tok, N, 48)]
    feats = [torch.randn(1, N, C), torch.randn(1, N, C)]
    return collate(samples, 48, tok.pad_token_id, max_images=2, image_features=feats)


def test_latent_queries_init_and_parameter_shapes(tok):
    m = tiny_unified(tok)
    assert m.latent_queries.shape == (N, 32)
    assert abs(m.latent_queries.std().item() - 1 / math.sqrt(32)) < 0.05
    assert m.mm_projector[0].weight.shape == (32, C) and m.mm_projector[2].weight.shape == (32, 32)
    assert isinstance(m.mm_projector[1], torch.nn.GELU)
    assert m.diff_head_projector.weight.shape == (Z, 32)


def test_embed_places_queries_at_answer_images_and_projections_at_context_images(tok):
    m = tiny_unified(tok)
    batch = unified_batch(tok)
    emb = m.embed(
        batch["input_ids"],
        batch["image_features"],
        batch["image_positions"],
        batch["answer_image_mask"],
        batch["image_valid"],
    )
    text = m.llm.get_input_embeddings()(batch["input_ids"].clamp(min=0))
    gen_pos, und_pos = batch["image_positions"][0, 0], batch["image_positions"][1, 0]
    torch.testing.assert_close(emb[0, gen_pos], m.latent_queries.detach(), rtol=0, atol=0)
    proj = m.mm_projector(batch["image_features"][1, 0])
    torch.testing.assert_close(emb[1, und_pos], proj, rtol=0, atol=0)
    is_img = batch["input_ids"] == IMAGE_PLACEHOLDER_ID
    torch.testing.assert_close(emb[~is_img], text[~is_img], rtol=0, atol=0)  # empty slots touch nothing


def test_forward_ce_loss_matches_a_manual_computation(tok):
    m = tiny_unified(tok)
    batch = unified_batch(tok)
    ce, cond, hidden = m(batch)
    emb = m.embed(
        batch["input_ids"],
        batch["image_features"],
        batch["image_positions"],
        batch["answer_image_mask"],
        batch["image_valid"],
    )
    logits = m.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits.float()
    total, count = 0.0, 0
    for b in range(2):
        for t in range(47):
            target = int(batch["labels"][b, t + 1])
            if target != IGNORE_INDEX:
                total -= torch.log_softmax(logits[b, t], -1)[target].item()
                count += 1
    assert count == sum(len(supervised(build_sample(c, tok, N, 48))) for c in (GEN, UND))
    assert ce.item() == pytest.approx(total / count, rel=1e-5)


def test_forward_gathers_post_norm_hidden_states_at_image_positions(tok):
    m = tiny_unified(tok)
    batch = unified_batch(tok)
    seen = {}
    hook = m.llm.model.norm.register_forward_hook(lambda mod, inp, out: seen.setdefault("h", out))
    _, cond, hidden = m(batch)
    hook.remove()
    assert cond.shape == (2 * 2, N, Z) and hidden.shape == (2, 48, 32)
    torch.testing.assert_close(hidden, seen["h"])
    pos = batch["image_positions"]
    torch.testing.assert_close(cond[0], m.diff_head_projector(seen["h"][0, pos[0, 0]]))  # answer image
    torch.testing.assert_close(cond[2], m.diff_head_projector(seen["h"][1, pos[1, 0]]))  # context image
    diffusion_mask = batch["answer_image_mask"].flatten()
    assert diffusion_mask.tolist() == [True, False, False, False]


def test_ce_loss_is_differentiable_into_every_image_parameter(tok):
    m = tiny_unified(tok).train()
    ce, cond, _ = m(unified_batch(tok))
    (ce + cond[0].square().mean()).backward()
    assert m.latent_queries.grad.abs().sum() > 0
    assert m.mm_projector[0].weight.grad.abs().sum() > 0
    assert m.diff_head_projector.weight.grad.abs().sum() > 0


def _greedy_without_cache(m: UnifiedLM, emb: torch.Tensor, steps: int) -> list[int]:
    """The reference's way: the whole sequence re-run for every token, no cache, no padding."""
    ids: list[int] = []
    for _ in range(steps):
        hidden = m.llm.model(inputs_embeds=emb[None], use_cache=False).last_hidden_state
        ids.append(int(m.llm.lm_head(hidden[0, -1]).argmax()))
        emb = torch.cat([emb, m.embed_text(torch.tensor(ids[-1:]))])
    return ids


def _conditions_without_cache(m: UnifiedLM, emb: torch.Tensor, ids: list[int]) -> torch.Tensor:
    seq = torch.cat([emb, m.embed_text(torch.tensor(ids)), m.latent_queries])[None]
    return m.diff_head_projector(m.llm.model(inputs_embeds=seq).last_hidden_state[:, -N:])  # (1, N, Z)


def _prompt(m: UnifiedLM, tok, conversation, features: torch.Tensor | None = None) -> torch.Tensor:
    """An embedded prompt (T, d); ``features`` (n, N, C) fill its images as context images."""
    sample = build_sample(conversation, tok, N, 64, add_generation_prompt=True)
    n = len(sample.image_starts)
    batch = collate([sample], len(sample.input_ids), 0, max_images=max(n, 1),
                    image_features=[features if features is not None else torch.zeros(0, N, C)])
    no = torch.zeros_like(batch["answer_image_mask"])
    return m.embed(batch["input_ids"], batch["image_features"], batch["image_positions"], no, batch["image_valid"])[0]


def test_kv_cached_greedy_decode_matches_an_uncached_greedy_loop(tok):
    m = tiny_unified(tok)
    emb = _prompt(m, tok, GEN[:1])
    with torch.no_grad():
        out = m.decode([emb], max_new_tokens=6, stop_ids=[], image_start_id=-1)
        assert out.tokens == [_greedy_without_cache(m, emb, 6)]
    assert out.opened == [False] and out.forced == [False] and out.conditions is None
    assert m.decode([emb], max_new_tokens=0, stop_ids=[], image_start_id=-1).tokens == [[]]


def _bias(token: int, calls: set[int]):
    """An lm_head hook that makes ``token`` win at the given (1-based) calls."""
    seen = []

    def hook(mod, inp, out):
        seen.append(1)
        if len(seen) in calls:
            out = out.clone()
            out[..., token] += 1e4
        return out

    return hook


def test_decode_feeds_latent_queries_after_im_start(tok):
    m = tiny_unified(tok)
    im = image_token_ids(tok)
    emb = _prompt(m, tok, GEN[:1])
    hook = m.llm.lm_head.register_forward_hook(_bias(im.im_start, {1}))
    out = m.decode([emb], max_new_tokens=5, stop_ids=[tok.eos_token_id], image_start_id=im.im_start)
    hook.remove()
    assert out.tokens == [[im.im_start]] and out.opened == [True] and out.forced == [False]
    with torch.no_grad():
        torch.testing.assert_close(out.conditions, _conditions_without_cache(m, emb, [im.im_start]),
                                   rtol=1e-4, atol=1e-5)
        # force_image: the token limit forces <im_start> after max_new_tokens text tokens
        forced = m.decode([emb], max_new_tokens=2, stop_ids=[], image_start_id=im.im_start, force_image=True)
        assert forced.tokens[0][:2] == _greedy_without_cache(m, emb, 2) and forced.tokens[0][2] == im.im_start
        assert forced.forced == [True] and forced.opened == [True]
        torch.testing.assert_close(forced.conditions, _conditions_without_cache(m, emb, forced.tokens[0]),
                                   rtol=1e-4, atol=1e-5)


def test_decode_ends_at_a_stop_id_or_forces_im_start_in_its_place(tok):
    m = tiny_unified(tok)
    im = image_token_ids(tok)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    emb = _prompt(m, tok, GEN[:1])
    hook = m.llm.lm_head.register_forward_hook(_bias(stop, {3}))
    plain = m.decode([emb], max_new_tokens=8, stop_ids=[stop], image_start_id=im.im_start)
    hook.remove()
    assert len(plain.tokens[0]) == 3 and plain.tokens[0][-1] == stop  # the stop id is kept
    assert plain.opened == [False] and plain.conditions is None
    hook = m.llm.lm_head.register_forward_hook(_bias(stop, {3}))
    forced = m.decode([emb], max_new_tokens=8, stop_ids=[stop], image_start_id=im.im_start, force_image=True)
    hook.remove()
    assert forced.tokens[0] == plain.tokens[0][:2] + [im.im_start] and forced.forced == [True]


def test_batched_decode_equals_each_prompt_decoded_alone(tok):
    """Prompts of different lengths (one with a context image) that end differently: on a stop id, by opening
    an image, at the token limit. Decoded together (left padding, finished rows waiting masked) each row must
    give its tokens and conditions alone."""
    m = tiny_unified(tok)
    feats = torch.randn(1, N, C)
    prompts = [
        _prompt(m, tok, GEN[:1]),
        _prompt(m, tok, [{"from": "human", "value": "<image>\nwhat is in the image? a cat on a mat"}], feats),
        _prompt(m, tok, [{"from": "system", "value": "hello world"}, {"from": "human", "value": "cat"}]),
    ]
    assert len({p.shape[0] for p in prompts}) == 3
    with torch.no_grad():
        free = [_greedy_without_cache(m, p, 8) for p in prompts]
    # token ids chosen from the rows' own greedy text: row 0 meets the stop id, row 1 the "image" id
    stop, image = free[0][2], next(t for t in free[1][1:] if t not in free[0][:3] and t not in free[2])
    options = {"max_new_tokens": 8, "stop_ids": [stop], "image_start_id": image}
    alone = [m.decode([p], **options) for p in prompts]
    ends = [("stop" if a.tokens[0][-1] == stop else "image" if a.opened[0] else "limit") for a in alone]
    assert ends == ["stop", "image", "limit"], (free, ends)
    together = m.decode(prompts, **options)
    assert together.tokens == [a.tokens[0] for a in alone]
    assert together.opened == [False, True, False]
    assert together.conditions.shape == (3, N, Z)
    torch.testing.assert_close(together.conditions[1:2], alone[1].conditions, rtol=1e-4, atol=1e-5)
    assert together.conditions[0].abs().sum() == 0 and together.conditions[2].abs().sum() == 0


def test_decode_uses_the_cache_api_without_deprecation_warnings(tok):
    import warnings

    m = tiny_unified(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers warns (FutureWarning) when `past_key_values=` is passed
        out = m.decode([_prompt(m, tok, GEN[:1])], max_new_tokens=3, stop_ids=[], image_start_id=-1)
    assert len(out.tokens[0]) == 3


def test_a_transformers_that_ignores_the_cache_argument_is_named_not_silently_wrong(tok, monkeypatch):
    m = tiny_unified(tok)
    forward = type(m.llm.model).forward

    def without_cache(self, *args, cache=None, **kwargs):  # what a transformers before 5.24 does with `cache=`
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(m.llm.model), "forward", without_cache)
    with pytest.raises(ConfigError, match=r"did not fill the KV cache.*transformers>=5\.24"):
        m.decode([_prompt(m, tok, GEN[:1])], max_new_tokens=3, stop_ids=[], image_start_id=-1)


def test_reference_parameter_names_round_trip(tok):
    m = tiny_unified(tok)
    assert from_reference_key("model.mm_projector.0.weight") == "mm_projector.0.weight"
    assert from_reference_key("model.latent_queries") == "latent_queries"
    assert from_reference_key("diff_head_projector.bias") == "diff_head_projector.bias"
    assert from_reference_key("model.embed_tokens.weight") == "llm.model.embed_tokens.weight"
    assert from_reference_key("lm_head.weight") == "llm.lm_head.weight"
    assert from_reference_key("diff_head.net.x_embedder.proj.weight") is None
    for key in m.state_dict():
        assert from_reference_key(to_reference_key(key)) == key


def test_config_validation():
    with pytest.raises(ConfigError, match="model.z_channels"):
        UnifiedLMConfig(encoder_channels=8, num_image_tokens=4, z_channels=0)
