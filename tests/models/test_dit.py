"""LightningDiT head: init, layouts, fixed tables, reference key names, guidance, preset sizes."""

from __future__ import annotations

import math

import pytest
import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.flow.guidance import Guidance, guided_velocity
from scale_rae_core.models.adapters.scale_rae import REFERENCE_DIT_PREFIX, dit_state_dict_from_reference
from scale_rae_core.models.dit import (
    DIT_PRESETS,
    ConditionEmbedder,
    DiTConfig,
    LightningDiT,
    count_reference_params,
    grid_to_tokens,
    tokens_to_grid,
)

TINY = DiTConfig(in_channels=8, grid=4, hidden=32, depth=2, heads=2, cond_dim=24)


def _inputs(cfg: DiTConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.grid, cfg.grid, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randn(batch, cfg.num_tokens, cfg.cond_dim, generator=gen)
    return x, t, y


def _randomised(cfg: DiTConfig = TINY) -> LightningDiT:
    """A tiny DiT whose zero-initialised layers and null vector are made non-zero, in eval mode."""
    model = LightningDiT(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def test_head_outputs_exactly_zero_at_init() -> None:
    model = LightningDiT(TINY)
    x, t, y = _inputs(TINY)
    out = model(x, t, y)
    assert out.shape == (2, 8, 4, 4)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(model.y_embedder.dropout_embedding) == 0
    for block in model.dit_blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
    # The rest is initialised: xavier-scale linears, t-MLP with std ~0.02, zero biases.
    assert 0.01 < model.t_embedder.mlp[0].weight.std().item() < 0.03
    assert model.dit_blocks[0].attn.qkv.weight.abs().max().item() > 0.05
    assert torch.count_nonzero(model.dit_blocks[0].attn.qkv.bias) == 0


def test_token_layout_helpers_are_raster_order_inverses() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tokens = grid_to_tokens(x)
    assert tokens.shape == (2, 16, 3)
    assert torch.equal(tokens[1, 2 * 4 + 3], x[1, :, 2, 3])  # token n = row·g + col
    assert torch.equal(tokens_to_grid(tokens, 4), x)
    with pytest.raises(ValueError, match="16 tokens"):
        tokens_to_grid(tokens[:, :15], 4)


def test_fourier_frequencies_are_the_fixed_seeded_normal_and_not_saved() -> None:
    model = LightningDiT(TINY)
    gen = torch.Generator().manual_seed(114514)
    expected = torch.normal(0.0, 1.0, size=(256,), generator=gen)
    assert torch.equal(model.t_embedder.W, expected)
    assert "t_embedder.W" not in model.state_dict()
    t = torch.tensor([0.0, 0.25])
    angles = 2 * math.pi * t[:, None] * expected[None, :]
    feats = torch.cat([angles.sin(), angles.cos()], dim=-1)
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(feats))


def test_sincos_positions_first_half_column_second_half_row() -> None:
    model = LightningDiT(TINY)  # hidden 32: 8 frequencies per axis, ω_0 = 1
    pe = model.pos_embed[0]  # (16, 32)
    assert pe.shape == (16, 32) and not pe.requires_grad
    assert "pos_embed" in model.state_dict()
    assert all(p is not model.pos_embed for p in model.parameters())
    row0_col1, row2_col0 = pe[1], pe[2 * 4]
    assert row0_col1[0].item() == pytest.approx(math.sin(1.0))  # column half, sin(col·ω_0)
    assert row0_col1[8].item() == pytest.approx(math.cos(1.0))
    assert row0_col1[16].item() == pytest.approx(0.0)  # row half, row 0
    assert row0_col1[24].item() == pytest.approx(1.0)
    assert row2_col0[16].item() == pytest.approx(math.sin(2.0))
    assert row2_col0[0].item() == pytest.approx(0.0)
    assert row0_col1[1].item() == pytest.approx(math.sin(10000 ** (-1 / 8)))


def test_rope_tables_rotate_pairs_by_row_then_column() -> None:
    model = LightningDiT(TINY)  # head_dim 16: channels 0-7 follow the row, 8-15 the column
    cos, sin = model.feat_rope.freqs_cos, model.feat_rope.freqs_sin  # (16, 16)
    assert cos.shape == (16, 16)
    tok_r1c0, tok_r0c1 = 4, 1
    assert cos[tok_r1c0, 0].item() == pytest.approx(math.cos(1.0))  # pair (0, 1), frequency 1, row 1
    assert cos[tok_r1c0, 1].item() == pytest.approx(math.cos(1.0))
    assert cos[tok_r1c0, 8].item() == pytest.approx(1.0)  # column half untouched at column 0
    assert sin[tok_r0c1, 8].item() == pytest.approx(math.sin(1.0))
    assert cos[tok_r1c0, 2].item() == pytest.approx(math.cos(10000 ** (-2 / 8)))
    # Attention logits depend only on the relative 2-D offset between the two tokens.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(16, generator=gen).expand(1, 1, 16, 16)
    k = torch.randn(16, generator=gen).expand(1, 1, 16, 16)
    logits = (model.feat_rope(q) @ model.feat_rope(k).transpose(-1, -2))[0, 0]  # (16, 16)
    assert logits[0, 5].item() == pytest.approx(logits[10, 15].item(), abs=1e-5)  # offset (+1, +1)
    assert logits[0, 5].item() != pytest.approx(logits[0, 6].item(), abs=1e-3)


def test_condition_dropout_is_per_sample_and_only_in_training() -> None:
    emb = ConditionEmbedder(3, dropout_prob=0.1)
    with torch.no_grad():
        emb.dropout_embedding.fill_(-7.0)
    y = torch.ones(4000, 2, 3)
    emb.train()
    out = emb(y)
    dropped = (out == -7.0).all(dim=-1)  # (B, N)
    assert torch.equal(dropped[:, 0], dropped[:, 1])  # all tokens of a sample together
    assert 0.08 < dropped[:, 0].float().mean().item() < 0.12
    emb.eval()
    assert torch.equal(emb(y), y)
    forced = emb(y[:3], force_drop_ids=torch.tensor([True, False, True]))
    assert (forced[0] == -7).all() and (forced[1] == 1).all() and (forced[2] == -7).all()


@pytest.mark.parametrize("w", [0.0, 2.5, 4.0])
def test_the_samplers_guidance_with_the_dits_null_condition_is_real_cfg_in_one_batched_forward(w: float) -> None:
    model = _randomised()
    x, _, y = _inputs(TINY)
    null = model.null_condition(1)  # (1, N, Z), what inference passes
    rows: list[int] = []
    model.x_embedder.register_forward_hook(lambda _m, inp, _out: rows.append(inp[0].shape[0]))
    guided, masked = {}, {}
    with torch.no_grad():
        for t in (0.2, 0.9):
            tt = torch.full((2,), t)
            v_c = model(x, tt, y)
            v_u = model(x, tt, y, force_drop_ids=torch.ones(2, dtype=torch.bool))
            rows.clear()
            assert torch.equal(guided_velocity(model, x, tt, y, Guidance("cfg", 1.0), null_cond=null), v_c)
            assert rows == [2]  # guidance 1: no unconditional branch
            rows.clear()
            guided[t] = guided_velocity(model, x, tt, y, Guidance("cfg", w), null_cond=null)
            assert rows == [4]  # cond and null halves in one forward
            masked[t] = guided_velocity(model, x, tt, y, Guidance("cfg", w, (0.5, 1.0)), null_cond=null)
            assert (v_c - v_u).abs().max().item() > 1e-2
            # The 4-row forward may round differently from the two 2-row ones (other CPU kernels); guidance scales
            # that difference by up to 1 + 2w, so the tolerance does too (2.4e-5 was seen at w = 4 on an AMD EPYC).
            tol = 1e-5 * (1 + 2 * w)
            torch.testing.assert_close(guided[t], v_u + w * (v_c - v_u), rtol=1e-5, atol=tol)
            if t == 0.2:  # outside the interval: the conditional velocity, from a 2-row forward
                assert torch.equal(masked[t], v_c)
    assert torch.equal(masked[0.9], guided[0.9])  # inside


def test_reference_state_dict_loads_strictly() -> None:
    cfg = TINY
    H, Z, C, N, h = cfg.hidden, cfg.cond_dim, cfg.in_channels, cfg.num_tokens, cfg.mlp_hidden
    expected = {  # names and shapes of the released LightningDiT (models/lightningDiT.py, model_utils.py)
        "x_embedder.proj.weight": (H, C, 1, 1),
        "x_embedder.proj.bias": (H,),
        "t_embedder.mlp.0.weight": (Z, 512),
        "t_embedder.mlp.0.bias": (Z,),
        "t_embedder.mlp.2.weight": (Z, Z),
        "t_embedder.mlp.2.bias": (Z,),
        "y_embedder.dropout_embedding": (Z,),
        "pos_embed": (1, N, H),
        "feat_rope.freqs_cos": (N, cfg.head_dim),
        "feat_rope.freqs_sin": (N, cfg.head_dim),
        "final_layer.norm_final.weight": (H,),
        "final_layer.linear.weight": (C, H),
        "final_layer.linear.bias": (C,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, Z),
        "final_layer.adaLN_modulation.1.bias": (2 * H,),
    }
    for i in range(cfg.depth):
        expected |= {
            f"dit_blocks.{i}.norm1.weight": (H,),
            f"dit_blocks.{i}.norm2.weight": (H,),
            f"dit_blocks.{i}.attn.qkv.weight": (3 * H, H),
            f"dit_blocks.{i}.attn.qkv.bias": (3 * H,),
            f"dit_blocks.{i}.attn.proj.weight": (H, H),
            f"dit_blocks.{i}.attn.proj.bias": (H,),
            f"dit_blocks.{i}.mlp.w12.weight": (2 * h, H),
            f"dit_blocks.{i}.mlp.w12.bias": (2 * h,),
            f"dit_blocks.{i}.mlp.w3.weight": (H, h),
            f"dit_blocks.{i}.mlp.w3.bias": (H,),
            f"dit_blocks.{i}.adaLN_modulation.1.weight": (6 * H, Z),
            f"dit_blocks.{i}.adaLN_modulation.1.bias": (6 * H,),
        }
    gen = torch.Generator().manual_seed(0)
    full = {REFERENCE_DIT_PREFIX + k: torch.randn(shape, generator=gen) for k, shape in expected.items()}
    full["diff_head_projector.weight"] = torch.zeros(Z, 16)  # siblings in a full checkpoint are skipped
    full["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 4)
    assert REFERENCE_DIT_PREFIX == "diff_head.model."

    model = LightningDiT(cfg)
    model.load_state_dict(dit_state_dict_from_reference(full), strict=True)
    key = "dit_blocks.1.attn.qkv.weight"
    assert torch.equal(model.dit_blocks[1].attn.qkv.weight, full[REFERENCE_DIT_PREFIX + key])
    assert torch.equal(model.pos_embed, full[REFERENCE_DIT_PREFIX + "pos_embed"])
    with pytest.raises(CheckpointError, match="diff_head.model."):
        dit_state_dict_from_reference({"model.embed_tokens.weight": torch.zeros(1)})


def test_2p4b_preset_parameter_count_on_meta_device() -> None:
    cfg = DIT_PRESETS["2.4B"]
    with torch.device("meta"):
        model = LightningDiT(cfg)
    assert model.dit_blocks[0].attn.qkv.weight.is_meta  # nothing allocated
    H, Z, C, h = cfg.hidden, cfg.cond_dim, cfg.in_channels, cfg.mlp_hidden
    assert h == 5461
    # The reference's formula (notes §1.5): blocks + final + t-embedder + x-embedder + null vector + the
    # fixed 256·H pos_embed (a frozen nn.Parameter there, a buffer here). RoPE tables and W are not counted.
    per_block = 3 * H * H + 3 * H + H * H + H + 2 * H * h + 2 * h + h * H + H + 2 * H + 6 * H * Z + 6 * H
    formula = (
        cfg.depth * per_block
        + (H + 2 * H * Z + 2 * H + H * C + C)
        + (512 * Z + Z + Z * Z + Z)
        + (C * H + H)
        + Z
        + 256 * H
    )
    counted = count_reference_params(model)
    assert counted == formula
    assert abs(counted - 2.436e9) / 2.436e9 < 0.005
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == counted - 256 * H


def test_3072x48_preset_is_8p19b_not_9p8b() -> None:
    with torch.device("meta"):
        model = LightningDiT(DIT_PRESETS["dit-3072x48"])
    assert abs(count_reference_params(model) - 8.19e9) / 8.19e9 < 0.005


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="dit.heads"):
        DiTConfig(hidden=64, heads=5)
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        DiTConfig(class_dropout_prob=1.0)


def test_tiny_preset_builds_and_runs() -> None:
    cfg = DIT_PRESETS["tiny"]
    model = _randomised(cfg)
    x, t, y = _inputs(cfg, batch=1)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (1, cfg.in_channels, 16, 16) and torch.isfinite(out).all()


def test_meta_built_model_gets_its_fixed_tables_back_after_to_empty() -> None:
    with torch.device("meta"):
        model = LightningDiT(TINY)
    model.to_empty(device="cpu")
    model.reset_fixed_buffers()
    fresh = LightningDiT(TINY)
    assert torch.equal(model.t_embedder.W, fresh.t_embedder.W)
    assert torch.equal(model.pos_embed, fresh.pos_embed)
    assert torch.equal(model.feat_rope.freqs_cos, fresh.feat_rope.freqs_cos)
    assert torch.equal(model.feat_rope.freqs_sin, fresh.feat_rope.freqs_sin)
