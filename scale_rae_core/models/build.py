"""Profile sections -> built components: the frozen encoder, the pixel decoder, the latent stats, the RAE.

`model.encoder.path = "tiny-random"` names a seeded tiny SigLIP vision tower (64 px, patch 8 -> 8 x 8 = 64
tokens). It is generated once with `save_pretrained` into the srae cache (`$SRAE_CACHE`, else
`~/.cache/srae/`), in a folder keyed by a hash of its config and init scheme, and always loaded from there,
so every process and every machine reads the same bytes. Its weights do not depend on transformers' own
initialisers: every tensor is drawn from one `torch.Generator` in sorted-name order (`_init_tiny`).

`model.decoder.path` is ours (a directory with an srae `config.json`) or a released decoder (`model.pt` +
vit_mae `config.json`), a local path or a hub repo id (`convert.load_any_decoder`); empty means a fresh decoder
from `model.decoder.preset`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from scale_rae_core.config import DecoderSettings, EncoderSettings, ModelSettings, Profile
from scale_rae_core.errors import ConfigError
from scale_rae_core.models.decoder import Decoder
from scale_rae_core.models.encoder import EncoderConfig, FrozenEncoder
from scale_rae_core.models.rae import RAE, decoder_config_for
from scale_rae_core.models.stats import LatentStats, load_stats

TINY_RANDOM = "tiny-random"
# The tiny SigLIP vision tower behind `path = "tiny-random"`. Width 192 = 8 * 8 * 3: the patch embedding is a
# square (hence invertible) map of a patch's pixels, so the tokens keep what the decoder needs to reach
# > 25 dB on the 64-px shapes world (benchmarks/bench_decoder.py).
TINY_RANDOM_CONFIG: dict[str, Any] = dict(
    hidden_size=192,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    num_channels=3,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
TINY_RANDOM_SEED = 0
_INIT_SCHEME = 1  # bump when `_init_tiny` changes, so old cache folders are not reused


def cache_dir() -> Path:
    """`$SRAE_CACHE`, else `~/.cache/srae`."""
    root = os.environ.get("SRAE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "srae"


def _tiny_key() -> str:
    blob = json.dumps({"config": TINY_RANDOM_CONFIG, "seed": TINY_RANDOM_SEED, "init": _INIT_SCHEME}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _init_tiny(model: torch.nn.Module, seed: int) -> None:
    """Every tensor from one generator, in sorted-name order: weights N(0, 1/fan_in), norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # comparable to the patch signal
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def tiny_random_encoder_dir() -> Path:
    """The cached tiny SigLIP directory, generated (atomically: temp folder + rename) on first use."""
    target = cache_dir() / f"tiny-random-siglip-{_tiny_key()}"
    if (target / "config.json").is_file():
        return target
    from transformers import SiglipVisionConfig, SiglipVisionModel

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            model = SiglipVisionModel(SiglipVisionConfig(**TINY_RANDOM_CONFIG, vision_use_head=False))
        _init_tiny(model, TINY_RANDOM_SEED)
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        side = TINY_RANDOM_CONFIG["image_size"]
        processor = {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True,
            "size": {"height": side, "width": side},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a damaged copy: replace it
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first: its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
