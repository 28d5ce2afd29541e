"""Class-conditional diffusion transformers on RAE latents: LightningDiT and DiT^DH (a DiT with a wide "DDT" head).

Both predict the flow velocity ε − x₀ for a latent grid x ∈ (B, C, g, g) at time t ∈ [0, 1]^B (t=0 data, t=1
noise; see `flow/transport.py`) and class labels y ∈ {0 … K−1}^B. Label K is the learned null class used by
classifier-free guidance (it exists when `class_dropout_prob > 0`, as in every released model).

`ClassDiT` (RAE's LightningDiT, `head_depth = 0`):

    s = PatchEmbed(x) + pos_embed                       (B, N, D)   patch 1, fixed 2-D sin-cos positions
    c = FourierMLP(t) + LabelEmbed(y)                   (B, D)      one vector per sample
    s = depth × [adaLN(c) → RMSNorm → 2-D RoPE attention,  adaLN(c) → RMSNorm → SwiGLU]
    v = Linear(adaLN(c) → RMSNorm(s))                   (B, N, C) → (B, C, g, g)

`DiTwDDTHead` (DiT^DH, `head_depth > 0`): the same trunk of width D with c = SiLU(t_emb + y_emb), then

    s = Linear_{D→Dh}(SiLU(t_emb + s))                  (B, N, Dh)  per-token condition for the head
    h = PatchEmbed'(x)                                  (B, N, Dh)  the noisy input again, RoPE only
    h = head_depth × [the same block, adaLN conditioned per token on s]
    v = Linear(adaLN(s) → RMSNorm(h))                   (B, N, C) → (B, C, g, g)

The blocks are srae's (`models/dit.py`: RMSNorm, SwiGLU, 2-D RoPE attention, adaLN); SiLU sits inside every
adaLN, so DiT^DH's condition passes through SiLU twice, as in the reference. Initialisation follows the reference
per architecture: LightningDiT xavier-uniform on every linear; DiT^DH keeps PyTorch's default init inside its
blocks (the recipe behind the published FIDs); both zero the adaLN outputs and the final layer. Patch size is 1,
the only one RAE's released models use (RAE latents are already one token per position).

Module names follow RAE's LightningDiT exactly; DiT^DH splits RAE's single `blocks` list into `blocks` (trunk)
and `head_blocks`, and names its RoPE tables `feat_rope` / `head_rope` (`models/adapters/class_dit.py` maps the
released key layout onto these names). The Fourier frequencies `t_embedder.W`, the positions and the RoPE tables
are saved in the state dict, as RAE saves them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import ConfigError
from scale_rae_core.models.dit import (
    DiTBlock,
    DiTConfig,
    FinalLayer,
    PatchEmbed,
    Rope2D,
    TimestepEmbedder,
    fourier_frequencies,
    rope_tables_2d,
    sincos_pos_embed_2d,
    tokens_to_grid,
)


@dataclass(frozen=True)
class ClassDiTConfig:
    in_channels: int = 768  # C: channels of one latent token (DINOv2-B: 768)
    grid: int = 16  # g: latent side, N = g² tokens (16 at 256 px, 32 at 512 px)
    hidden: int = 1152  # D: trunk width
    depth: int = 28
    heads: int = 16
    head_hidden: int = 2048  # Dh: DDT head width (ignored when head_depth = 0)
    head_depth: int = 2  # 0: plain LightningDiT, no head
    head_heads: int = 16
    num_classes: int = 1000  # K; label K is the null class when class_dropout_prob > 0
    class_dropout_prob: float = 0.1  # training-time per-sample drop of the label to the null class
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 · int(width · mlp_ratio))
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        widths = [("hidden", "heads")] + ([("head_hidden", "head_heads")] if self.head_depth else [])
        for name in ("in_channels", "grid", "hidden", "depth", "heads", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"class_dit.{name} must be a positive integer, got {getattr(self, name)}")
        if self.head_depth < 0:
            raise ConfigError(f"class_dit.head_depth must be >= 0 (0 = no DDT head), got {self.head_depth}")
        for width, heads in widths:
            w, h = getattr(self, width), getattr(self, heads)
            if w < 1 or h < 1 or w % h or (w // h) % 4:
                raise ConfigError(
                    f"class_dit.{width} ({w}) must split into class_dit.{heads} ({h}) heads whose width is a "
                    "multiple of 4 (2-D RoPE); change one of them"
                )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"class_dit.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def has_head(self) -> bool:
        return self.head_depth > 0

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def trunk(self) -> DiTConfig:
        """The block settings of the trunk (conditioned on its own width)."""
        return self._blocks(self.hidden, self.depth, self.heads)

    def head(self) -> DiTConfig:
        """The block settings of the DDT head (conditioned per token on the projected trunk output)."""
        return self._blocks(self.head_hidden, self.head_depth, self.head_heads)

    def _blocks(self, width: int, depth: int, heads: int) -> DiTConfig:
        return DiTConfig(
            in_channels=self.in_channels, grid=self.grid, hidden=width, depth=depth, heads=heads,
            cond_dim=width, mlp_ratio=self.mlp_ratio, class_dropout_prob=0.0, qkv_bias=True,
            rope_theta=self.rope_theta, norm_eps=self.norm_eps,
        )


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class LabelEmbedder(nn.Module):
    """Class label -> (B, D); row K of the table is the null class (present when dropout_prob > 0)."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    @property
    def has_null(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            drop = force_drop_ids.to(device=labels.device, dtype=torch.bool)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            return self.embedding_table(labels)
        return self.embedding_table(torch.where(drop, self.num_classes, labels))


def _check_inputs(cfg: ClassDiTConfig, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    if tuple(x.shape[1:]) != (cfg.in_channels, cfg.grid, cfg.grid):
        raise ValueError(f"x must be (B, {cfg.in_channels}, {cfg.grid}, {cfg.grid}), got {tuple(x.shape)}")
    if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
        raise ValueError(f"t and y must be ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class _ClassConditioned(nn.Module):
    """What both models share: config, embedders, fixed tables, the null label."""

    def __init__(self, cfg: ClassDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.t_embedder = TimestepEmbedder(D, persistent_w=True)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Fixed, never trained; persistent because RAE's checkpoints carry it.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid)[None])  # (1, N, D)
        self.feat_rope = Rope2D(D // cfg.heads, cfg.grid, cfg.rope_theta)

    @property
    def null_label(self) -> int:
        """The label index of the unconditional (null) class."""
        return self.cfg.num_classes

    @property
    def has_null_label(self) -> bool:
        return self.y_embedder.has_null

    def _init_common(self) -> None:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, PatchEmbed):  # like a Linear C -> width
                w = module.proj.weight
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.zeros_(module.proj.bias)
            if isinstance(module, DiTBlock | FinalLayer):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
            if isinstance(module, FinalLayer):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)

    @torch.no_grad()
    def reset_fixed_buffers(self) -> None:
        """Recompute the fixed tables in place (after `to_empty()` on a meta-built model, say).

        W gets its initial value; a loaded checkpoint brings its own.
        """
        device = self.pos_embed.device
        self.t_embedder.W.copy_(fourier_frequencies(device))
        self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden, self.cfg.grid)[None].to(device))
        for rope in self.modules():
            if isinstance(rope, Rope2D):
                cos, sin = rope_tables_2d(rope.freqs_cos.shape[-1], self.cfg.grid, self.cfg.rope_theta)
                rope.freqs_cos.copy_(cos.to(device))
                rope.freqs_sin.copy_(sin.to(device))


class ClassDiT(_ClassConditioned):
    """RAE's class-conditional LightningDiT: `forward(x, t, y)` -> velocity, all (B, C, g, g)."""

    def __init__(self, cfg: ClassDiTConfig) -> None:
        if cfg.has_head:
            raise ConfigError("ClassDiT has no DDT head; build DiTwDDTHead (or use build_class_dit) for head_depth > 0")
        super().__init__(cfg)
        trunk = cfg.trunk()
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.hidden)
        self.blocks = nn.ModuleList(DiTBlock(trunk) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(trunk)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self._init_common()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, g, g), t (B,) in [0, 1], y (B,) labels -> velocity (B, C, g, g).

        `force_drop_ids` (B,) bool replaces the marked labels by the null class; without it labels are dropped
        at random with `class_dropout_prob` in training mode only.
        """
        _check_inputs(self.cfg, x, t, y)
        s = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        c = (self.t_embedder(t) + self.y_embedder(y, force_drop_ids))[:, None, :]  # (B, 1, D)
        for block in self.blocks:
            s = block(s, c, self.feat_rope)
        return tokens_to_grid(self.final_layer(s, c), self.cfg.grid)  # (B, C, g, g)


class DiTwDDTHead(_ClassConditioned):
    """DiT^DH: a DiT trunk plus a wide, shallow head on the noisy input; `forward(x, t, y)` -> velocity."""

    def __init__(self, cfg: ClassDiTConfig) -> None:
        if not cfg.has_head:
            raise ConfigError("DiTwDDTHead needs class_dit.head_depth > 0; build ClassDiT for a plain LightningDiT")
        super().__init__(cfg)
        trunk, head = cfg.trunk(), cfg.head()
        self.s_embedder = PatchEmbed(cfg.in_channels, cfg.hidden)
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.head_hidden)
        self.blocks = nn.ModuleList(DiTBlock(trunk) for _ in range(cfg.depth))
        self.s_projector = (
            nn.Linear(cfg.hidden, cfg.head_hidden) if cfg.hidden != cfg.head_hidden else nn.Identity()
        )
        self.head_rope = Rope2D(cfg.head_hidden // cfg.head_heads, cfg.grid, cfg.rope_theta)
        self.head_blocks = nn.ModuleList(DiTBlock(head) for _ in range(cfg.head_depth))
        self.final_layer = FinalLayer(head)
        self._init_common()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, g, g), t (B,) in [0, 1], y (B,) labels -> velocity (B, C, g, g); see `ClassDiT.forward`."""
        _check_inputs(self.cfg, x, t, y)
        t_emb = self.t_embedder(t)  # (B, D)
        c = F.silu(t_emb + self.y_embedder(y, force_drop_ids))[:, None, :]  # (B, 1, D)
        s = self.s_embedder(x) + self.pos_embed.to(x.dtype)  # (B, N, D)
        for block in self.blocks:
            s = block(s, c, self.feat_rope)
        s = self.s_projector(F.silu(t_emb[:, None, :] + s))  # (B, N, Dh)
        h = self.x_embedder(x)  # (B, N, Dh), no absolute positions
        for block in self.head_blocks:
            h = block(h, s, self.head_rope)
        return tokens_to_grid(self.final_layer(h, s), self.cfg.grid)  # (B, C, g, g)


ClassDiffusionModel = ClassDiT | DiTwDDTHead


def build_class_dit(cfg: ClassDiTConfig) -> ClassDiffusionModel:
    """DiT^DH when the config has a head, else LightningDiT."""
    return DiTwDDTHead(cfg) if cfg.has_head else ClassDiT(cfg)


def count_reference_params(model: nn.Module) -> int:
    """Parameters as RAE counts them: trainable ones plus the fixed `pos_embed` and the 256 Fourier frequencies
    (both `nn.Parameter(requires_grad=False)` there, buffers here). RoPE tables are not counted."""
    fixed = model.get_buffer("pos_embed").numel() + model.get_buffer("t_embedder.W").numel()
    return sum(p.numel() for p in model.parameters()) + fixed


# ----------------------------------------------------------------------------------------------------------
# Presets (latent 768 × 16 × 16, DINOv2-B at 256 px; set in_channels / grid / num_classes from the data)
# ----------------------------------------------------------------------------------------------------------

_DDT = ClassDiTConfig()  # DiT^DH-XL, RAE's main model
_DIT = replace(_DDT, head_hidden=0, head_depth=0, head_heads=0)

CLASS_DIT_PRESETS: dict[str, ClassDiTConfig] = {
    # LightningDiT sizes (DiT's S/B/L/XL); DiT-XL: 677.2 M parameters.
    "DiT-S": replace(_DIT, hidden=384, depth=12, heads=6),
    "DiT-B": replace(_DIT, hidden=768, depth=12, heads=12),
    "DiT-L": replace(_DIT, hidden=1024, depth=24, heads=16),
    "DiT-XL": _DIT,
    # DiT^DH: the same trunks plus a 2 × 2048 head; S (the autoguidance model) 196.5 M, XL 838.7 M.
    "DiTDH-S": replace(_DDT, hidden=384, depth=12, heads=6),
    "DiTDH-B": replace(_DDT, hidden=768, depth=12, heads=12),
    "DiTDH-L": replace(_DDT, hidden=1024, depth=24, heads=16),
    "DiTDH-XL": _DDT,
    # UniRAE's small DiT^DH: trunk and head both 384 wide, 6 + 2 blocks; 23.3 M trainable parameters.
    "DiTDH-small": replace(_DDT, hidden=384, depth=6, heads=6, head_hidden=384, head_depth=2, head_heads=6),
    # For CPU tests and the shapes world: 12 classes, widths 64/96.
    "tiny": ClassDiTConfig(in_channels=32, grid=8, hidden=64, depth=2, heads=4, head_hidden=0, head_depth=0,
                           head_heads=0, num_classes=12),
    "tiny-ddt": ClassDiTConfig(in_channels=32, grid=8, hidden=64, depth=2, heads=4, head_hidden=96, head_depth=1,
                               head_heads=4, num_classes=12),
    # The shapes world's class DiT (the tiny-cpu profile; 3.0 M parameters on its 192-channel random encoder, for which
    # it was sized: RAE's finding, a DiT narrower than its tokens cannot fit them; "tiny-ddt", 64/96 wide, sampled
    # noise), and as shallow as the demo's 3-minute training allows (on 2 cores, 256 wide trained slower per class
    # learnt). tiny-cpu's EfficientNet tokens have 40 channels; in_channels is set from the latents when built.
    "small-ddt": ClassDiTConfig(in_channels=192, grid=8, hidden=192, depth=3, heads=4, head_hidden=192, head_depth=1,
                                head_heads=4, num_classes=12),
}
