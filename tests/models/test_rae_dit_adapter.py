"""RAE stage-2 checkpoints: the released key layout loads strictly, the forward matches a from-the-spec forward,
and nothing but weights is ever unpickled.

The reference forward below is written from rae.md §5 (RAE `DDT.py` / `lightningDiT.py` / `model_utils.py`),
on the raw reference-named state dict, without srae's modules.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scale_rae_core.errors import CheckpointError
from scale_rae_core.models.adapters.class_dit import load_rae_stage2, read_rae_state_dict, state_dict_from_rae
from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, ClassDiTConfig, build_class_dit

DDT = CLASS_DIT_PRESETS["tiny-ddt"]  # trunk 64 x 2 (4 heads), head 96 x 1 (4 heads), C=32, g=8, K=12
DIT = CLASS_DIT_PRESETS["tiny"]


# ------------------------------------------------------------------ the reference's fixed tables and layout


def ref_rope_table(dim: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=side): [side², 2·dim] cos/sin tables."""
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    pos = torch.arange(side) / side * side
    f = torch.einsum("i,f->if", pos, freqs).repeat_interleave(2, dim=-1)  # (side, dim)
    grid = torch.cat([f[:, None, :].expand(side, side, dim), f[None, :, :].expand(side, side, dim)], dim=-1)
    grid = grid.reshape(side * side, 2 * dim)
    return grid.cos(), grid.sin()


def ref_pos_embed(dim: int, side: int) -> torch.Tensor:
    """get_2d_sincos_pos_embed: meshgrid(w, h); the first half encodes grid[0] (the column), the second the row."""
    gw, gh = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()[None]


def _block_shapes(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    h = int(2 / 3 * int(d * 4.0))
    return {
        f"{prefix}.norm1.weight": (d,), f"{prefix}.norm2.weight": (d,),
        f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
        f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
        f"{prefix}.mlp.w12.weight": (2 * h, d), f"{prefix}.mlp.w12.bias": (2 * h,),
        f"{prefix}.mlp.w3.weight": (d, h), f"{prefix}.mlp.w3.bias": (d,),
        f"{prefix}.adaLN_modulation.1.weight": (6 * d, d), f"{prefix}.adaLN_modulation.1.bias": (6 * d,),
    }


def reference_state_dict(cfg: ClassDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict named and shaped as RAE saves DiTwDDTHead / LightningDiT, with small random values."""
    C, g, D, K = cfg.in_channels, cfg.grid, cfg.hidden, cfg.num_classes
    Dh = cfg.head_hidden if cfg.has_head else D
    shapes: dict[str, tuple[int, ...]] = {
        "t_embedder.W": (256,),
        "t_embedder.mlp.0.weight": (D, 512), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (K + 1, D),
        "x_embedder.proj.weight": (Dh, C, 1, 1), "x_embedder.proj.bias": (Dh,),
        "final_layer.norm_final.weight": (Dh,),
        "final_layer.linear.weight": (C, Dh), "final_layer.linear.bias": (C,),
        "final_layer.adaLN_modulation.1.weight": (2 * Dh, Dh), "final_layer.adaLN_modulation.1.bias": (2 * Dh,),
    }
    for i in range(cfg.depth):
        shapes |= _block_shapes(f"blocks.{i}", D)
    if cfg.has_head:
        shapes |= {"s_embedder.proj.weight": (D, C, 1, 1), "s_embedder.proj.bias": (D,),
                   "s_projector.weight": (Dh, D), "s_projector.bias": (Dh,)}
        for i in range(cfg.depth, cfg.depth + cfg.head_depth):
            shapes |= _block_shapes(f"blocks.{i}", Dh)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) * (0.5 if k.endswith("W") else 0.08) for k, s in shapes.items()}
    state["pos_embed"] = ref_pos_embed(D, g)
    if cfg.has_head:
        for name, width, heads in (("enc", D, cfg.heads), ("dec", Dh, cfg.head_heads)):
            cos, sin = ref_rope_table(width // heads // 2, g)
            state[f"{name}_feat_rope.freqs_cos"], state[f"{name}_feat_rope.freqs_sin"] = cos, sin
    else:
        state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = ref_rope_table(D // cfg.heads // 2, g)
    return state


# ------------------------------------------------------------------------------ the reference's forward


def _rms(x, w):
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w


def _rope(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _block(sd, p, x, c, rope, heads):
    lin = lambda name, v: F.linear(v, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"])  # noqa: E731
    sh1, sc1, g1, sh2, sc2, g2 = lin("adaLN_modulation.1", F.silu(c)).chunk(6, dim=-1)
    B, N, D = x.shape
    h = _rms(x, sd[f"{p}.norm1.weight"]) * (1 + sc1) + sh1
    q, k, v = lin("attn.qkv", h).view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(_rope(q, *rope), _rope(k, *rope), v).transpose(1, 2).reshape(B, N, D)
    x = x + g1 * lin("attn.proj", a)
    h = _rms(x, sd[f"{p}.norm2.weight"]) * (1 + sc2) + sh2
    u, w = lin("mlp.w12", h).chunk(2, dim=-1)
    return x + g2 * lin("mlp.w3", F.silu(u) * w)


def reference_forward(sd, cfg: ClassDiTConfig, x, t, y):
    B, C, g, _ = x.shape
    tf = t[:, None] * sd["t_embedder.W"][None, :] * 2 * math.pi
    te = torch.cat([tf.sin(), tf.cos()], -1)
    te = F.linear(F.silu(F.linear(te, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                  sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    ye = sd["y_embedder.embedding_table.weight"][y]
    tokens = lambda name: F.conv2d(x, sd[f"{name}.proj.weight"], sd[f"{name}.proj.bias"]).flatten(2).transpose(1, 2)  # noqa: E731
    if cfg.has_head:
        c = F.silu(te + ye)[:, None]
        s = tokens("s_embedder") + sd["pos_embed"]
        enc = (sd["enc_feat_rope.freqs_cos"], sd["enc_feat_rope.freqs_sin"])
        for i in range(cfg.depth):
            s = _block(sd, f"blocks.{i}", s, c, enc, cfg.heads)
        s = F.linear(F.silu(te[:, None] + s), sd["s_projector.weight"], sd["s_projector.bias"])
        h = tokens("x_embedder")
        dec = (sd["dec_feat_rope.freqs_cos"], sd["dec_feat_rope.freqs_sin"])
        for i in range(cfg.depth, cfg.depth + cfg.head_depth):
            h = _block(sd, f"blocks.{i}", h, s, dec, cfg.head_heads)
        cond, out = s, h
    else:
        cond = (te + ye)[:, None]
        out = tokens("x_embedder") + sd["pos_embed"]
        for i in range(cfg.depth):
            out = _block(sd, f"blocks.{i}", out, cond, (sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]), cfg.heads)
    shift, scale = F.linear(F.silu(cond), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=-1)
    out = F.linear(_rms(out, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift,
                   sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    return out.view(B, g, g, C).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cfg", [DDT, DIT], ids=["DiTwDDTHead", "LightningDiT"])
def test_released_layout_loads_strictly_and_forward_matches(tmp_path, cfg):
    sd = reference_state_dict(cfg)
    path = tmp_path / "stage2_model.pt"
    torch.save({"ema": sd, "model": reference_state_dict(cfg, seed=9), "step": 5, "epoch": 1}, path)
    model = load_rae_stage2(path, cfg)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, cfg.in_channels, cfg.grid, cfg.grid, generator=gen)
    t, y = torch.tensor([0.05, 0.5, 0.95]), torch.tensor([0, 7, 12])  # 12 = the null class
    with torch.no_grad():
        ours, ref = model(x, t, y), reference_forward(sd, cfg, x, t, y)
    assert ref.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_our_fixed_tables_equal_the_references():
    model = build_class_dit(DDT)
    ref = reference_state_dict(DDT)
    mapped = state_dict_from_rae(ref, DDT)
    for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin", "head_rope.freqs_cos"):
        torch.testing.assert_close(model.state_dict()[key], mapped[key], rtol=0, atol=1e-6)


def test_key_map_renames_head_blocks_ropes_and_wrappers():
    sd = {"module.blocks.1.norm1.weight": torch.zeros(1), "_orig_mod.blocks.2.norm1.weight": torch.zeros(1),
          "enc_feat_rope.freqs_cos": torch.zeros(1), "dec_feat_rope.freqs_sin": torch.zeros(1)}
    assert sorted(state_dict_from_rae(sd, DDT)) == [
        "blocks.1.norm1.weight", "feat_rope.freqs_cos", "head_blocks.0.norm1.weight", "head_rope.freqs_sin"
    ]


def test_plain_state_dict_and_model_only_checkpoint_load(tmp_path):
    sd = reference_state_dict(DIT)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "plain.pt")
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "train.pt")
    a, b = load_rae_stage2(tmp_path / "plain.pt", DIT), load_rae_stage2(tmp_path / "train.pt", DIT)
    torch.testing.assert_close(a.state_dict(), b.state_dict())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_planted_pickle_payload_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "stage2_model.pt"
    torch.save({"ema": reference_state_dict(DIT), "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        read_rae_state_dict(path)
    assert not marker.exists()
    assert "weights-only" in str(err.value) and "\n" not in str(err.value)
    with open(tmp_path / "raw.pkl", "wb") as f:  # a bare pickle, not a torch zip
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointError):
        read_rae_state_dict(tmp_path / "raw.pkl")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"weights": [torch.zeros(2)]}, "expected a state dict or a checkpoint with an 'ema' or 'model' state dict"),
        ([torch.zeros(2)], "found list"),
    ],
)
def test_other_shapes_are_refused_in_one_line(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as err:
        read_rae_state_dict(tmp_path / "x.pt")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_preset_is_a_one_line_error(tmp_path):
    torch.save(reference_state_dict(DDT), tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as err:
        load_rae_stage2(tmp_path / "m.pt", DIT)
    assert "pass the preset it was trained as" in str(err.value) and "\n" not in str(err.value)
    wider = ClassDiTConfig(**{**vars(DDT), "num_classes": 20})
    with pytest.raises(CheckpointError, match=r"wrong shapes: y_embedder.embedding_table.weight \(13, 64\) vs \(21, 64\)"):
        load_rae_stage2(tmp_path / "m.pt", wider)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_rae_stage2(tmp_path / "missing.pt", DDT)
