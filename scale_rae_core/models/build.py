"""Profile sections -> built components: the frozen encoder, the pixel decoder, the latent stats, the RAE.

`model.encoder.path = "tiny-random"` names a seeded tiny SigLIP vision tower (`models.tiny_encoder`).

`model.decoder.path` is ours (a directory with an srae `config.json`) or a released decoder (`model.pt` +
vit_mae `config.json`), a local path or a hub repo id (`convert.load_any_decoder`); empty means a fresh decoder
from `model.decoder.preset`.
"""

from __future__ import annotations

from pathlib import Path

from scale_rae_core.config import DecoderSettings, EncoderSettings, ModelSettings, Profile
from scale_rae_core.errors import ConfigError
from scale_rae_core.models.decoder import Decoder
from scale_rae_core.models.encoder import EncoderConfig, FrozenEncoder
from scale_rae_core.models.rae import RAE, decoder_config_for
from scale_rae_core.models.stats import LatentStats, load_stats
from scale_rae_core.models.tiny_encoder import TINY_RANDOM, tiny_random_encoder_dir

# ---------------------------------------------------------------------------------------------------------
# components


def build_encoder(settings: EncoderSettings) -> FrozenEncoder:
    """The frozen encoder `model.encoder` names (a hub id, a local directory, or "tiny-random")."""
    path = settings.path
    if path == TINY_RANDOM:
        if settings.kind not in ("siglip", "siglip2"):
            raise ConfigError(
                f"model.encoder.path = 'tiny-random' is a SigLIP tower but model.encoder.kind = '{settings.kind}'; "
                "set kind = 'siglip'"
            )
        path = str(tiny_random_encoder_dir())
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar inside srae's own progress display
    try:
        return FrozenEncoder(EncoderConfig(settings.kind, path, input_size=settings.input_size, name=settings.path,
                                          select_layer=settings.select_layer))
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def load_trained_decoder(path: str, encoder: FrozenEncoder, *, what: str = "model.decoder.path") -> Decoder:
    """Ours (srae config.json + model.safetensors) or a released one (model.pt), a local path or a hub repo id."""
    from scale_rae_core.models.convert import load_any_decoder

    decoder, _ = load_any_decoder(path, flag=what, encoder_kind=encoder.kind, encoder_id=encoder.cfg.label)
    return decoder


def build_decoder(settings: DecoderSettings, encoder: FrozenEncoder) -> Decoder:
    """A trained decoder from `model.decoder.path`, else a fresh one (seed it first) from the preset."""
    grid = encoder.grid[0]
    if settings.image_size != settings.patch_size * grid:
        raise ConfigError(
            f"model.decoder.image_size = {settings.image_size} but patch_size {settings.patch_size} x the encoder's "
            f"{grid} x {grid} token grid gives {settings.patch_size * grid}; set image_size = {settings.patch_size * grid}"
        )
    if not settings.path:
        return Decoder(decoder_config_for(encoder, settings.preset, patch_size=settings.patch_size))
    decoder = load_trained_decoder(settings.path, encoder)
    if decoder.cfg.patch_size != settings.patch_size:
        raise ConfigError(
            f"model.decoder.patch_size = {settings.patch_size} but the decoder at {settings.path} has patch size "
            f"{decoder.cfg.patch_size}; set patch_size = {decoder.cfg.patch_size} "
            f"(and image_size = {decoder.cfg.image_size})"
        )
    return decoder


def build_stats(model: ModelSettings) -> LatentStats | None:
    """The latent statistics `model.stats` names, or None."""
    if not model.stats:
        return None
    path = Path(model.stats).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.stats = '{model.stats}': file not found; compute it with `srae stat` or set stats = ''")
    return load_stats(path)


def build_rae(profile: Profile, *, noise_tau: float = 0.0, with_stats: bool = True) -> RAE:
    """Encoder + decoder (+ stats) of the profile's `[model]` section, on CPU in fp32."""
    encoder = build_encoder(profile.model.encoder)
    decoder = build_decoder(profile.model.decoder, encoder)
    stats = build_stats(profile.model) if with_stats else None
    return RAE(encoder, decoder, stats=stats, noise_tau=noise_tau)
