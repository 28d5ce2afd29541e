"""Representation autoencoder: frozen encoder + pixel decoder + optional latent statistics.

    encode: pixels [B, 3, H, W] in [0, 1] -> encoder tokens [B, N, C]
            -> (training only, noise_tau > 0) z + sigma * eps, sigma ~ noise_tau * U(0, 1) per sample
            -> (stats given) (z - mean) / sqrt(var + 1e-5)
    decode: latents [B, N, C] -> undo the stats -> decoder -> to_pixels: x * pixel_std + pixel_mean  (not clamped)

The decoder always sees raw (un-normalised) encoder tokens; the stats only define the space a generator
works in. `to_pixels` is the one place a decoder's output is de-normalised (training, eval and inference
all call it); it leaves values outside [0, 1] alone (losses want them); clamp for display.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scale_rae_core.errors import ConfigError
from scale_rae_core.models.decoder import Decoder, DecoderConfig
from scale_rae_core.models.encoder import FrozenEncoder
from scale_rae_core.models.stats import LatentStats


class RAE(nn.Module):
    def __init__(
        self,
        encoder: FrozenEncoder,
        decoder: Decoder,
        stats: LatentStats | None = None,
        noise_tau: float = 0.0,
    ) -> None:
        super().__init__()
        dcfg = decoder.cfg
        if (encoder.num_tokens, encoder.hidden_size) != (dcfg.num_patches, dcfg.latent_dim):
            raise ConfigError(
                f"decoder expects {dcfg.num_patches} tokens x {dcfg.latent_dim} channels but the encoder "
                f"gives {encoder.num_tokens} x {encoder.hidden_size}; use a decoder trained for this encoder"
            )
        enc_mean, enc_std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        if not (_close(enc_mean, dcfg.pixel_mean) and _close(enc_std, dcfg.pixel_std)):
            raise ConfigError(
                f"decoder pixel_mean/pixel_std {dcfg.pixel_mean}/{dcfg.pixel_std} differ from the encoder's "
                f"{enc_mean}/{enc_std}; the decoder was trained for another encoder"
            )
        if stats is not None and stats.shape != (dcfg.num_patches, dcfg.latent_dim):
            raise ConfigError(
                f"latent stats have shape {stats.shape}, expected ({dcfg.num_patches}, {dcfg.latent_dim}) tokens"
            )
        if noise_tau < 0:
            raise ConfigError(f"noise_tau must be >= 0, got {noise_tau}")
        self.encoder = encoder
        self.decoder = decoder
        self.stats = stats
        self.noise_tau = noise_tau

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> latents [B, N, C] (normalised by the stats when given)."""
        return self.from_encoder(self.encoder(pixels))  # (B, N, C), no grad: the encoder is frozen

    def from_encoder(self, z: torch.Tensor) -> torch.Tensor:
        """What `encode` does after the encoder's forward: + sigma * eps, sigma ~ noise_tau * U(0, 1) per sample
        (training only, noise_tau > 0), then the stats' normalisation when given. Decoder training on cached
        encoder latents calls it, so that path is `encode`'s by construction."""
        if self.training and self.noise_tau > 0:
            sigma = self.noise_tau * torch.rand(z.shape[0], 1, 1, device=z.device, dtype=z.dtype)
            z = z + sigma * torch.randn_like(z)
        if self.stats is not None:
            z = self.stats.normalize(z)
        return z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, N, C] -> pixels [B, 3, p*sqrt(N), p*sqrt(N)], ~[0, 1] (not clamped)."""
        if self.stats is not None:
            latents = self.stats.denormalize(latents)
        return to_pixels(self.decoder(latents), self.encoder.mean, self.encoder.std)  # buffers already on device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(pixels))


def to_pixels(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """A decoder's output (B, 3, H, W), in its encoder's normalised pixel space -> pixels, ~[0, 1] (not clamped).

    ``mean`` / ``std``: the encoder's pixel normalisation (3 values each), as the encoder's buffers or a
    decoder config's ``pixel_mean`` / ``pixel_std``.
    """
    mean = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * std + mean


def decoder_config_for(
    encoder: FrozenEncoder, preset: str, patch_size: int = 16, **kwargs: object
) -> DecoderConfig:
    """A `DecoderConfig` from a size preset, with the input width, grid and pixel mean/std of `encoder`."""
    return DecoderConfig.from_preset(
        preset,
        latent_dim=encoder.hidden_size,
        num_patches=encoder.num_tokens,
        patch_size=patch_size,
        encoder_kind=encoder.kind,
        encoder_id=encoder.cfg.label,
        pixel_mean=encoder.mean.flatten().tolist(),
        pixel_std=encoder.std.flatten().tolist(),
        **kwargs,
    )


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True))
