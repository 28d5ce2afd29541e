"""LightningDiT flow head: denoises a g×g grid of encoder latents, conditioned per token through adaLN.

Data flow for x ∈ (B, C, g, g), t ∈ [0, 1]^B (t=0 data, t=1 noise; see `flow/transport.py`), y ∈ (B, g², Z):

    s = PatchEmbed(x) + pos_embed                       (B, N, H)   patch 1, fixed 2-D sin-cos positions
    c = SiLU(FourierMLP(t)[:, None] + CondDrop(y))       (B, N, Z)   one conditioning vector per token
    s = depth × [adaLN(c) → RMSNorm → 2-D RoPE attention,  adaLN(c) → RMSNorm → SwiGLU]
    v = Linear(adaLN(c) → RMSNorm(s))                     (B, N, C) → (B, C, g, g)

Module and parameter names follow the released Scale-RAE checkpoints (`x_embedder`, `t_embedder.mlp`,
`y_embedder.dropout_embedding`, `pos_embed`, `feat_rope.freqs_cos/_sin`, `dit_blocks.N.{norm1,attn.qkv,
attn.proj,norm2,mlp.w12,mlp.w3,adaLN_modulation.1}`, `final_layer.{norm_final,linear,adaLN_modulation.1}`), so a
reference state dict loads strictly once its prefix is stripped (`models.adapters.scale_rae.dit_state_dict_from_reference`).
The Fourier frequencies `t_embedder.W` are not in those checkpoints: they are regenerated from a fixed seed.

Classifier-free guidance is the sampler's (`flow/guidance.py: guided_velocity`, with `null_condition` as the
unconditional y); unlike the reference it really applies v_u + w·(v_c − v_u) (the released code never does,
see the reference notes §8.1). A head configured without the null vector (`null_condition = False`, what the
released code builds when `class_dropout_prob` is 0) has no unconditional branch.

Precision: the weights may be held in bf16/fp16 (`models.io.cast_weights`); the fixed tables (`pos_embed`, the
RoPE tables) and the timestep embedder (Fourier features and its MLP) stay fp32 (`keep_fp32`), RMSNorm normalises
in fp32, the per-token condition c is formed in fp32 and the input x (the sampler's fp32 state) is cast to the
weights' dtype on entry; the velocity comes back in the weights' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import ConfigError

FOURIER_SEED = 114514  # seed of the reference's fixed Gaussian-Fourier frequencies
FOURIER_FEATURES = 256


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 1152  # C: channels of one latent token (SigLIP-2 so400m: 1152)
    grid: int = 16  # g: the latent is a g×g grid, N = g² tokens
    hidden: int = 2048  # H: transformer width
    depth: int = 32
    heads: int = 32
    cond_dim: int = 2048  # Z: width of the per-token condition y and of the timestep embedding
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 · int(H · mlp_ratio))
    class_dropout_prob: float = 0.1  # training-time per-sample drop of y to the learned null vector
    null_condition: bool = True  # the learned null vector exists (released: only when class_dropout_prob > 0)
    qkv_bias: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("in_channels", "grid", "hidden", "depth", "heads", "cond_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dit.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ConfigError(f"dit.hidden ({self.hidden}) must be divisible by dit.heads ({self.heads})")
        if self.head_dim % 4:
            raise ConfigError(
                f"dit head_dim = hidden/heads = {self.head_dim} must be a multiple of 4 for 2-D RoPE; "
                "change dit.hidden or dit.heads"
            )
        if self.hidden % 4:
            raise ConfigError(f"dit.hidden ({self.hidden}) must be a multiple of 4 for 2-D sin-cos positions")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"dit.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.class_dropout_prob > 0 and not self.null_condition:
            raise ConfigError(
                f"dit.class_dropout_prob = {self.class_dropout_prob} drops conditions to the null vector, but "
                "null_condition is false; set class_dropout_prob = 0 or null_condition = true"
            )

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        # Same float expression as the reference: for H=3072 it gives 8192, for H=2048 5461.
        return int(2 / 3 * int(self.hidden * self.mlp_ratio))


# ----------------------------------------------------------------------------------------------------------
# Helpers: layouts, fixed tables, modulation
# ----------------------------------------------------------------------------------------------------------


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, g, g) -> (B, g², C), raster order (row-major)."""
    B, C, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, h * w, C)  # (B, 256, 1152)


def tokens_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, g², C) -> (B, C, g, g); the inverse of `grid_to_tokens`."""
    B, N, C = x.shape
    if N != grid * grid:
        raise ValueError(f"expected {grid * grid} tokens for a {grid}x{grid} grid, got {N}")
    return x.view(B, grid, grid, C).permute(0, 3, 1, 2)  # (B, 1152, 16, 16)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions, (g², dim) in float32, token n = row·g + col.

    Channels [0, dim/2) encode the column, [dim/2, dim) the row; each half is [sin(p·ω), cos(p·ω)] with
    ω_k = 10000^(−k/(dim/4)). Computed in float64 like the reference, stored in float32.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows = coords.repeat_interleave(grid)  # (g²,)  row of token n
    cols = coords.repeat(grid)  # (g²,)  column of token n

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None, :]  # (g², dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (g², dim/2)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()  # (g², dim)


def rope_tables_2d(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (g², head_dim) for 2-D RoPE on interleaved channel pairs (2k, 2k+1).

    Channels [0, head_dim/2) rotate with the token's row, [head_dim/2, head_dim) with its column; each half
    uses frequencies θ^(−2j/(head_dim/2)), j < head_dim/8, every frequency shared by one channel pair.
    """
    axis_dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2).float() / axis_dim)  # (axis_dim/2,)
    pos = torch.arange(grid).float()
    angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=1)  # (g, axis_dim)
    row = angles[:, None, :].expand(grid, grid, axis_dim)  # (g, g, axis_dim)
    col = angles[None, :, :].expand(grid, grid, axis_dim)  # (g, g, axis_dim)
    table = torch.cat([row, col], dim=-1).reshape(grid * grid, head_dim)  # (g², head_dim)
    return table.cos(), table.sin()


def fourier_frequencies(device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed W ∈ R^256 ~ N(0, 1) of the timestep embedding (CPU generator, seed 114514)."""
    gen = torch.Generator(device="cpu").manual_seed(FOURIER_SEED)
    w = torch.normal(0.0, 1.0, size=(FOURIER_FEATURES,), generator=gen, device="cpu")
    return w.to(device)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (−x1, x0, −x3, x2, ...) on the last dim."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight; normalises in float32 and casts back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight


class PatchEmbed(nn.Module):
    """Patch-1 embedding C -> H (a 1×1 convolution, as in the checkpoints)."""

    def __init__(self, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, H, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, N, H)


class TimestepEmbedder(nn.Module):
    """Gaussian-Fourier features [sin 2πtW, cos 2πtW] (512) -> Linear -> SiLU -> Linear, width Z.

    The features are always computed in float32 (2π·t·W reaches ~20 rad: bf16 would be 0.06 rad off).
    `persistent_w`: keep W in the state dict (RAE's checkpoints carry their own random W; Scale-RAE's do not,
    so there W is regenerated from the fixed seed).
    """

    def __init__(self, cond_dim: int, persistent_w: bool = False) -> None:
        super().__init__()
        self.register_buffer("W", fourier_frequencies(), persistent=persistent_w)
        self.mlp = nn.Sequential(
            nn.Linear(2 * FOURIER_FEATURES, cond_dim),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t.float()[:, None] * self.W.float()[None, :]  # (B, 256)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, 512), float32
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, Z)


class ConditionEmbedder(nn.Module):
    """Identity on y (B, N, Z), except that dropped samples get the learned null vector on every token.

    Without the null vector (`null_condition=False`, dropout 0 as in the released code) it is the identity.
    """

    def __init__(self, cond_dim: int, dropout_prob: float, null_condition: bool = True) -> None:
        super().__init__()
        self.dropout_prob = dropout_prob
        self.dropout_embedding = nn.Parameter(torch.zeros(cond_dim)) if null_condition else None

    def null_condition(self, batch_size: int, num_tokens: int) -> torch.Tensor | None:
        if self.dropout_embedding is None:
            return None
        return self.dropout_embedding[None, None, :].expand(batch_size, num_tokens, -1)  # (B, N, Z)

    def forward(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.dropout_embedding is None:
            if force_drop_ids is not None and bool(force_drop_ids.any()):
                raise ValueError("force_drop_ids asks for the null condition but this head has none")
            return y
        if force_drop_ids is not None:
            drop = force_drop_ids.to(device=y.device, dtype=torch.bool)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            return y
        null = self.dropout_embedding.to(y.dtype)[None, None, :]  # (1, 1, Z)
        return torch.where(drop[:, None, None], null, y)


class Rope2D(nn.Module):
    """Holds the 2-D RoPE tables; applied in float32 to (B, heads, N, head_dim)."""

    def __init__(self, head_dim: int, grid: int, theta: float) -> None:
        super().__init__()
        cos, sin = rope_tables_2d(head_dim, grid, theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * self.freqs_cos + _rotate_pairs(xf) * self.freqs_sin).to(x.dtype)


class Attention(nn.Module):
    """Full bidirectional multi-head attention with qkv bias and RoPE on q, k."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rope: Rope2D) -> torch.Tensor:
        B, N, H = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(rope(q), rope(k), v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, H))  # (B, N, H)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(hidden, 2 * mlp_hidden)
        self.w3 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class DiTBlock(nn.Module):
    """Pre-norm block; shift/scale/gate for attention and MLP come per token from the condition c."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        H = cfg.hidden
        self.norm1 = RMSNorm(H, cfg.norm_eps)
        self.attn = Attention(H, cfg.heads, cfg.qkv_bias)
        self.norm2 = RMSNorm(H, cfg.norm_eps)
        self.mlp = SwiGLU(H, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, 6 * H))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope2D) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 × (B, N, H)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm_final = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.linear = nn.Linear(cfg.hidden, cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, 2 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 × (B, N, H)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, C)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


class LightningDiT(nn.Module):
    """The flow head: `forward(x, t, y)` predicts the velocity ε − x₀ for x (B, C, g, g)."""

    keep_fp32 = ("pos_embed", "t_embedder", "feat_rope")  # stay float32 when the weights are cast to half

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.hidden)
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.y_embedder = ConditionEmbedder(cfg.cond_dim, cfg.class_dropout_prob, cfg.null_condition)
        # Fixed, never trained; a persistent buffer because the checkpoints carry it.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.hidden, cfg.grid)[None])  # (1, N, H)
        self.feat_rope = Rope2D(cfg.head_dim, cfg.grid, cfg.rope_theta)
        self.dit_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias; t-MLP N(0, 0.02); adaLN outputs and final linear zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear C -> H
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.dit_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def fixed_tables(self) -> dict[str, torch.Tensor]:
        """The stored fixed tables as computed here (float32, CPU), by their state-dict names."""
        cos, sin = rope_tables_2d(self.cfg.head_dim, self.cfg.grid, self.cfg.rope_theta)
        return {"pos_embed": sincos_pos_embed_2d(self.cfg.hidden, self.cfg.grid)[None],
                "feat_rope.freqs_cos": cos, "feat_rope.freqs_sin": sin}

    @torch.no_grad()
    def reset_fixed_buffers(self, keep: Collection[str] = ()) -> None:
        """Recompute the fixed tables in place (after `to_empty()` on a meta-built model, say); the names in
        `keep` (loaded from a checkpoint) are left as they are."""
        device = self.pos_embed.device
        self.t_embedder.W = fourier_frequencies(device)
        own = self.state_dict(keep_vars=True)
        for name, table in self.fixed_tables().items():
            if name not in keep:
                own[name].copy_(table)

    def null_condition(self, batch_size: int) -> torch.Tensor | None:
        """The learned unconditional y, (B, N, Z), for classifier-free guidance; None for a head without one."""
        return self.y_embedder.null_condition(batch_size, self.cfg.num_tokens)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, g, g), t (B,) in [0, 1], y (B, N, Z) -> velocity (B, C, g, g).

        `force_drop_ids` (B,) bool replaces y by the null condition for the marked samples; without it, y is
        dropped at random with `class_dropout_prob` in training mode only.
        """
        cfg = self.cfg
        B = x.shape[0]
        if tuple(x.shape[1:]) != (cfg.in_channels, cfg.grid, cfg.grid):
            raise ValueError(
                f"x must be (B, {cfg.in_channels}, {cfg.grid}, {cfg.grid}), got {tuple(x.shape)}"
            )
        if tuple(y.shape) != (B, cfg.num_tokens, cfg.cond_dim):
            raise ValueError(f"y must be ({B}, {cfg.num_tokens}, {cfg.cond_dim}), got {tuple(y.shape)}")
        dtype = self.x_embedder.proj.weight.dtype  # the weights' (compute) dtype
        s = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)  # (B, N, H)
        t_emb = self.t_embedder(t)  # (B, Z)
        y = self.y_embedder(y, force_drop_ids)  # (B, N, Z)
        c = F.silu(t_emb.float()[:, None, :] + y.float()).to(dtype)  # (B, N, Z), formed in float32
        for block in self.dit_blocks:
            s = block(s, c, self.feat_rope)
        out = self.final_layer(s, c)  # (B, N, C)
        return tokens_to_grid(out, cfg.grid)  # (B, C, g, g)


def count_reference_params(model: LightningDiT) -> int:
    """Parameters as the reference counts them: trainable parameters plus the fixed 256·H `pos_embed`
    (an `nn.Parameter(requires_grad=False)` there, a buffer here). RoPE tables and W are not counted."""
    return sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

DIT_PRESETS: dict[str, DiTConfig] = {
    # For CPU tests and the tiny profile: 256 tokens of 32 channels, width 64.
    "tiny": DiTConfig(in_channels=32, grid=16, hidden=64, depth=2, heads=4, cond_dim=64),
    # The tiny-cpu profile's head. Width 256 ≥ the channels of its tokens (40 for EfficientNet-Lite0, 192 for the
    # random tiny SigLIP it was sized on): a head narrower than its tokens cannot fit them (RAE's finding; with the
    # 64-wide "tiny" the flow loss stalled at ≈ 0.8 and the samples did not depend on the prompt). in_channels and
    # grid are set from the encoder when built.
    "small": DiTConfig(in_channels=192, grid=8, hidden=256, depth=2, heads=4, cond_dim=256),
    # Scale-RAE-Qwen1.5B_DiT2.4B (SigLIP-2, C=1152): 2.436e9 parameters counted as the reference does.
    "2.4B": DiTConfig(in_channels=1152, grid=16, hidden=2048, depth=32, heads=32, cond_dim=2048),
    # The WebSSL-DINO variant of the same head (C=1024): 2.435e9.
    "2.4B-webssl": DiTConfig(in_channels=1024, grid=16, hidden=2048, depth=32, heads=32, cond_dim=2048),
    # The sizes the reference docs give for "Scale-RAE-Qwen7B_DiT9.8B". With this architecture they make
    # 8.19e9 parameters, not 9.8e9 (depth ≈ 58 would), so the preset is named by its shape until the
    # released config.json settles it; a mismatch will show as missing `dit_blocks.N` keys on loading.
    "dit-3072x48": DiTConfig(in_channels=1152, grid=16, hidden=3072, depth=48, heads=48, cond_dim=3072),
}
