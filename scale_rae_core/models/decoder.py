"""Pixel decoder: encoder tokens [B, N, C] -> pixels [B, 3, h*p, w*p] in the encoder's normalised space.

An MAE-style ViT decoder (the RAE / Scale-RAE `GeneralDecoder` architecture):

    tokens (B, N, C) -> Linear C->D -> prepend a trainable CLS (zero init) -> + fixed 2-D sin-cos table
    -> L x pre-LN block (MHA with qkv bias, exact-GELU MLP) -> LayerNorm -> Linear D->p*p*3
    -> drop CLS -> unpatchify (channel fastest inside a patch)

The output is what the encoder saw after its mean/std normalisation; `RAE.decode` maps it back to [0, 1]
with the encoder's mean/std (kept here too, in the config, so a decoder directory is self-contained).
Released checkpoints (`model.pt` with the reference key names) are read by `convert.py`; our own format is
`model.safetensors` + `config.json`, written by `save_decoder` and read by `load_decoder`.

Precision: the weights may be held in bf16/fp16 (`models.io.cast_weights`); the position table stays float32
(`keep_fp32`) and is cast where it is added, every LayerNorm normalises in float32, and the input tokens are cast
to the weights' dtype on entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.io import load_state, read_safetensors, write_model_folder

FORMAT = "srae-decoder"
FORMAT_VERSION = 1


@dataclass
class DecoderConfig:
    """Sizes of the pixel decoder.

    latent_dim: C, the encoder's hidden size (decoder input width).
    num_patches: N, tokens per image (a square grid).
    patch_size: p, pixels per token side; the output is `p * sqrt(N)` pixels square.
    hidden_size / num_layers / num_heads / mlp_size: D, L, heads and MLP width of the transformer.
    layer_norm_eps: 1e-12 in every released decoder.
    attn_impl: "sdpa" (fused kernel) or "eager" (explicit softmax); same maths.
    encoder_kind / encoder_id: the encoder whose tokens this decoder reads (metadata, checked by `RAE`).
    pixel_mean / pixel_std: that encoder's pixel normalisation, used to map the output back to [0, 1].
    preset: the `DECODER_PRESETS` name the sizes came from, if any.
    """

    latent_dim: int
    num_patches: int = 256
    patch_size: int = 16
    hidden_size: int = 1152
    num_layers: int = 28
    num_heads: int = 16
    mlp_size: int = 4096
    layer_norm_eps: float = 1e-12
    attn_impl: str = "sdpa"
    encoder_kind: str = ""
    encoder_id: str = ""
    pixel_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    pixel_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    preset: str = ""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"decoder hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ConfigError(f"decoder hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos)")
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ConfigError(f"decoder num_patches {self.num_patches} is not a square grid")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ConfigError(f"decoder attn_impl {self.attn_impl!r} is unknown; use 'sdpa' or 'eager'")

    @property
    def grid(self) -> int:
        return math.isqrt(self.num_patches)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    @classmethod
    def from_preset(cls, name: str, latent_dim: int, **kwargs: Any) -> DecoderConfig:
        """Sizes from `DECODER_PRESETS[name]`; everything else from `kwargs`."""
        if name not in DECODER_PRESETS:
            raise ConfigError(f"decoder preset {name!r} is unknown; use one of {sorted(DECODER_PRESETS)}")
        return cls(latent_dim=latent_dim, preset=name, **{**DECODER_PRESETS[name], **kwargs})


# ---------------------------------------------------------------------------------------------------------
# helpers


def sincos_pos_embed_2d(dim: int, grid: int, base_grid: int | None = None) -> torch.Tensor:
    """Fixed MAE position table [1 + grid*grid, dim]; row 0 (CLS) is zero.

    Token n = i*grid + j (row i, column j). The first dim/2 channels encode the column j, the last dim/2
    the row i; each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)) and pos = j (or i),
    or j / (grid / base_grid) in float32 when `base_grid` is given (diffusers' `AutoencoderRAE`: base_grid 16).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    positions = torch.arange(grid, dtype=torch.float32)
    if base_grid is not None:
        positions = positions / (grid / base_grid)
    rows, cols = torch.meshgrid(positions.double(), positions.double(), indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (grid*grid, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid*grid, dim/2)

    table = torch.cat([one_axis(cols), one_axis(rows)], dim=1)  # (grid*grid, dim)
    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, h*w, p*p*3] -> [B, 3, h*p, w*p] (square grid; channel fastest inside a patch vector)."""
    B, N, _ = x.shape
    h = w = math.isqrt(N)
    p = patch_size
    x = x.reshape(B, h, w, p, p, 3)  # (B, h, w, p, p, 3)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, p)
    return x.reshape(B, 3, h * p, w * p)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of `unpatchify`: [B, 3, h*p, w*p] -> [B, h*w, p*p*3]."""
    B, _, H, W = x.shape
    p = patch_size
    x = x.reshape(B, 3, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
    return x.reshape(B, (H // p) * (W // p), p * p * 3)


# ---------------------------------------------------------------------------------------------------------
# blocks


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and names) that normalises in float32 and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_impl: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # rows: [query; key; value]
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            y = scores.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-LN transformer block, no dropout / drop-path / layer-scale."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.attn_impl)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------
# model


class Decoder(nn.Module):
    """Tokens [B, N, C] -> pixels [B, 3, p*sqrt(N), p*sqrt(N)] in the encoder's normalised pixel space."""

    keep_fp32 = ("pos_embed",)  # stays float32 when the weights are cast to half

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed = nn.Linear(cfg.latent_dim, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # Fixed, but saved with the weights: a released checkpoint's table is loaded as-is.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid).unsqueeze(0))  # (1, N+1, D)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = LayerNorm(D, eps=cfg.layer_norm_eps)
        self.pred = nn.Linear(D, cfg.patch_size**2 * 3)

    def forward_patches(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> per-patch pixels [B, N, p*p*3]."""
        B, N, C = latents.shape
        if (N, C) != (self.cfg.num_patches, self.cfg.latent_dim):
            raise ValueError(
                f"decoder expects latents [B, {self.cfg.num_patches}, {self.cfg.latent_dim}], got {tuple(latents.shape)}"
            )
        dtype = self.embed.weight.dtype  # the weights' dtype (float32 unless cast to half)
        x = self.embed(latents.to(dtype))  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, N+1, D)
        x = x + self.pos_embed.to(dtype)
        for block in self.blocks:
            x = block(x)
        x = self.pred(self.norm(x))  # (B, N+1, p*p*3)
        return x[:, 1:]  # drop CLS

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.forward_patches(latents), self.cfg.patch_size)  # (B, 3, H, W)


DECODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, mlp_size=128),
    "B": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_size=3072),
    "L": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096),
    "XL": dict(hidden_size=1152, num_layers=28, num_heads=16, mlp_size=4096),
}


# ---------------------------------------------------------------------------------------------------------
# our checkpoint format: <dir>/config.json + <dir>/model.safetensors


def save_decoder(decoder: Decoder, out_dir: str | os.PathLike[str], extra_files: dict[str, Path] | None = None) -> Path:
    """Write the folder `model.safetensors` + `config.json` (+ `extra_files`, e.g. latent statistics) whole and
    atomically (`models.io.write_model_folder`)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(decoder.cfg)}
    return write_model_folder(out_dir, decoder.state_dict(), meta, extra_files, metadata={"format": FORMAT})


def read_decoder_config(path: str | os.PathLike[str]) -> DecoderConfig:
    """Our `config.json` -> DecoderConfig; unknown keys and foreign formats are errors."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path}: missing; a decoder directory needs config.json + model.safetensors"
        ) from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if raw.pop("format", None) != FORMAT:
        raise CheckpointError(
            f"{path}: not an srae decoder config; for a released decoder (config.json + model.pt) or a diffusers "
            "AutoencoderRAE run `srae convert decoder` first"
        )
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})"
        )
    known = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {unknown}; remove them or upgrade srae")
    try:
        return DecoderConfig(**raw)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_decoder(model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Decoder:
    """Read a directory written by `save_decoder` (strict: every key must match)."""
    root = Path(model_dir)
    cfg = read_decoder_config(root / "config.json")
    weights = root / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"{weights}: missing; the decoder directory is incomplete, re-save or re-convert it"
        )
    decoder = Decoder(cfg)
    fix = "re-save or re-convert the decoder"
    load_state(decoder, read_safetensors([weights], fix=fix), source=str(weights), fix=fix, what="its config.json")
    return decoder.to(device)
