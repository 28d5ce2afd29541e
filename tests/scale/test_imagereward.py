"""ImageReward on transformers: public key names, strict reload, and the forward against a plain-torch reading
of the published architecture (timm ViT + BLIP med BERT + MLP), all on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scale_rae_core.errors import CheckpointError
from scale_rae_core.scale.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageReward,
    ImageRewardConfig,
    load_blip_tokenizer,
)

WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "the", "left", "right", "photo", "of", "##s"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = dict(
    image_size=32, patch_size=16, vision_width=128, vision_layers=2, vision_mlp=96,
    text_width=32, text_layers=2, text_heads=2, text_mlp=48, vocab_size=len(SPECIALS) + len(WORDS) + 2,
    max_positions=40, embed_dim=16, head_widths=(24, 12, 8, 4),
)


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    return folder


def tiny_model(tmp_path: Path) -> ImageReward:
    torch.manual_seed(0)
    model = ImageReward(ImageRewardConfig(**TINY), tokenizer=load_blip_tokenizer(write_vocab(tmp_path / "vocab")))
    with torch.no_grad():  # random, not transformers' zero-ish init, so every weight matters
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if name.startswith("mlp.") else 0.2)
    return model


def images(n: int = 3) -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        size = (40 + 8 * i, 36)  # non-square: exercises the short-side resize + center crop
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels))
    return out


def expected_public_keys(cfg: ImageRewardConfig) -> set[str]:
    """The key names of the reference ImageReward module (BLIP vit.py + med.py + ImageReward's MLP)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    keys = {f"{v}cls_token", f"{v}pos_embed", f"{v}patch_embed.proj.weight", f"{v}patch_embed.proj.bias",
            f"{v}norm.weight", f"{v}norm.bias"}
    for i in range(cfg.vision_layers):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{v}blocks.{i}.{m}.weight", f"{v}blocks.{i}.{m}.bias"}
    keys |= {f"{t}embeddings.word_embeddings.weight", f"{t}embeddings.position_embeddings.weight",
             f"{t}embeddings.LayerNorm.weight", f"{t}embeddings.LayerNorm.bias", f"{t}embeddings.position_ids"}
    for i in range(cfg.text_layers):
        layer = f"{t}encoder.layer.{i}."
        for block in ("attention", "crossattention"):
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys |= {f"{layer}{block}.{m}.weight", f"{layer}{block}.{m}.bias"}
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys |= {f"{layer}{m}.weight", f"{layer}{m}.bias"}
    for head in ("blip.vision_proj", "blip.text_proj"):
        keys |= {f"{head}.weight", f"{head}.bias"}
    for i in (0, 2, 4, 6, 7):
        keys |= {f"mlp.layers.{i}.weight", f"mlp.layers.{i}.bias"}
    return keys


def reference_reward(sd: dict[str, torch.Tensor], cfg: ImageRewardConfig, pixels, ids, mask) -> torch.Tensor:
    """Plain-torch forward written from the published architecture, reading the public key names."""
    B = pixels.shape[0]
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    D = cfg.vision_width
    H = D // 64

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def ln(x, name, eps):
        return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    x = F.conv2d(pixels, sd[f"{v}patch_embed.proj.weight"], sd[f"{v}patch_embed.proj.bias"], stride=cfg.patch_size)
    x = torch.cat([sd[f"{v}cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[f"{v}pos_embed"]
    N = x.shape[1]
    for i in range(cfg.vision_layers):
        b = f"{v}blocks.{i}."
        qkv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * (D // H) ** -0.5, -1) @ qkv[2]
        x = x + lin(att.transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, f"{v}norm", 1e-6)

    T, W, heads = ids.shape[1], cfg.text_width, cfg.text_heads
    e = sd[f"{t}embeddings.word_embeddings.weight"][ids] + sd[f"{t}embeddings.position_embeddings.weight"][:T]
    h = ln(e, f"{t}embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * -1e9

    def attention(prefix, q_in, kv_in, bias):
        def split(z):
            return z.view(B, z.shape[1], heads, W // heads).transpose(1, 2)
        q, k, val = split(lin(q_in, prefix + "self.query")), split(lin(kv_in, prefix + "self.key")), split(lin(kv_in, prefix + "self.value"))
        s = q @ k.transpose(-1, -2) / (W // heads) ** 0.5
        ctx = torch.softmax(s + bias, -1) @ val
        return ln(lin(ctx.transpose(1, 2).reshape(B, T, W), prefix + "output.dense") + q_in, prefix + "output.LayerNorm", 1e-12)

    for i in range(cfg.text_layers):
        layer = f"{t}encoder.layer.{i}."
        h = attention(layer + "attention.", h, h, pad)
        h = attention(layer + "crossattention.", h, image, 0.0)
        h = ln(lin(F.gelu(lin(h, layer + "intermediate.dense")), layer + "output.dense") + h, layer + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return (r.squeeze(-1) - REWARD_MEAN) / REWARD_STD


def save_public(model: ImageReward, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.public_state_dict(), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(model.config.med_config()))
    write_vocab(folder)
    return folder


def test_public_key_names_are_the_reference_names(tmp_path):
    model = tiny_model(tmp_path)
    assert set(model.public_state_dict()) == expected_public_keys(model.config)


def test_tokenizer_is_bert_plus_dec_and_enc(tmp_path):
    tok = load_blip_tokenizer(write_vocab(tmp_path))
    n = len(SPECIALS) + len(WORDS)
    assert (tok.bos_token, tok.bos_token_id) == ("[DEC]", n)
    assert tok.convert_tokens_to_ids("[ENC]") == n + 1
    enc = tok(["A Red circle"], padding="max_length", truncation=True, max_length=35)
    assert len(enc["input_ids"][0]) == 35
    assert enc["input_ids"][0][:5] == [2, 5 + WORDS.index("a"), 5 + WORDS.index("red"), 5 + WORDS.index("circle"), 3]


def test_forward_matches_plain_torch_reading_of_the_public_weights(tmp_path):
    model = tiny_model(tmp_path)
    prompts = ["a red circle on the left", "a green square", "blue circles on the right"]
    ims = images()
    got = model.score(prompts, ims)
    ids, mask = model.tokenize(prompts)
    want = reference_reward(model.public_state_dict(), model.config, model.preprocess(ims), ids, mask)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 1e-3  # the three inputs really differ


def test_save_public_and_reload_strictly_gives_identical_scores(tmp_path):
    model = tiny_model(tmp_path)
    folder = save_public(model, tmp_path / "ir")
    prompts, ims = ["a red circle"] * 3, images()
    for source in (folder, folder / "ImageReward.pt"):
        loaded = ImageReward.from_pretrained(source)
        assert loaded.config == model.config  # sizes read back from the weights + med_config
        assert torch.equal(loaded.score(prompts, ims), model.score(prompts, ims))
    assert torch.equal(loaded.score("a red circle", ims), model.score(prompts, ims))  # one prompt for all


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    model = tiny_model(tmp_path)
    state = model.public_state_dict()
    dropped = dict(state)
    del dropped["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    dropped["blip.itm_head.weight"] = torch.zeros(2, 32)
    with pytest.raises(CheckpointError, match=r"unknown keys: blip\.itm_head\.weight; missing keys: .*crossattention\.self\.key\.weight"):
        model.load_public_state_dict(dropped)
    bad = dict(state)
    bad["mlp.layers.7.weight"] = torch.zeros(1, 5)
    with pytest.raises(CheckpointError, match=r"wrong shapes: mlp\.layers\.7\.weight \(1, 5\) vs"):
        model.load_public_state_dict(bad)
    bad = dict(state)
    bad["blip.text_encoder.embeddings.position_ids"] = torch.zeros(1, 40, dtype=torch.long)
    with pytest.raises(CheckpointError, match="position_ids"):
        model.load_public_state_dict(bad)
    del state["blip.text_encoder.embeddings.position_ids"]  # a buffer: optional, checked when present
    model.load_public_state_dict(state)


def test_loading_errors_are_one_line(tmp_path):
    model = tiny_model(tmp_path)
    folder = save_public(model, tmp_path / "ir")
    (folder / "med_config.json").unlink()
    with pytest.raises(CheckpointError, match="med_config.json not found"):
        ImageReward.from_pretrained(folder)
    assert ImageReward.from_pretrained(folder, med_config=model.config.med_config()).config == model.config
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        ImageReward.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no-such-repo: not in the local Hugging Face cache.*`hf download no-such-owner/no-such-repo`"):
        ImageReward.from_pretrained("no-such-owner/no-such-repo")  # HF_HUB_OFFLINE=1 in tests
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights-only"):
        ImageReward.from_pretrained(tmp_path / "junk.pt", med_config=model.config.med_config())


def test_preprocess_resizes_short_side_and_center_crops(tmp_path):
    model = tiny_model(tmp_path)
    strip = Image.new("RGB", (96, 32), (255, 0, 0))  # red | green | blue thirds
    strip.paste((0, 255, 0), (32, 0, 64, 32))
    strip.paste((0, 0, 255), (64, 0, 96, 32))
    x = model.preprocess([strip])
    assert x.shape == (1, 3, 32, 32)
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x[0, :, 16, 16], green)  # the center crop is the green third
    tensor_in = model.preprocess([torch.ones(3, 32, 32)])  # (3, H, W) tensors in [0, 1] are accepted
    assert tensor_in.shape == (1, 3, 32, 32)


def test_preprocess_reads_files_and_modes_with_the_shared_reader(tmp_path):
    import numpy as np

    from scale_rae_core.errors import DataError

    model = tiny_model(tmp_path)
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red: white, as everywhere else
    white = model.preprocess([Image.new("RGB", (32, 32), (255, 255, 255))])
    torch.testing.assert_close(model.preprocess([clear]), white)
    deep = tmp_path / "deep.png"  # a 16-bit mid-grey file: grey, not Pillow's saturated white
    Image.fromarray(np.full((32, 32), 32896, np.uint16)).save(deep)
    grey = model.preprocess([Image.new("RGB", (32, 32), (128, 128, 128))])
    torch.testing.assert_close(model.preprocess([deep]), grey)
    with pytest.raises(DataError, match=r"^image .*missing\.png: not found"):
        model.preprocess([tmp_path / "missing.png"])
