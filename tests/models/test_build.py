"""Building components from profile sections: the cached tiny-random encoder, decoders, stats."""

from __future__ import annotations

import hashlib

import pytest
import torch

from scale_rae_core.config import DecoderSettings, EncoderSettings, ModelSettings, load_profile
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models import build, tiny_encoder
from scale_rae_core.models.decoder import save_decoder
from scale_rae_core.models.stats import LatentStats


def _weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SRAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_random_is_generated_once_cached_and_deterministic(cache):
    settings = EncoderSettings(kind="siglip", path="tiny-random", input_size=64)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build.build_encoder(settings)
    assert torch.equal(torch.get_rng_state(), before)  # generating it leaves the caller's RNG alone
    folder = tiny_encoder.tiny_random_encoder_dir()
    assert folder.parent == cache and (folder / "preprocessor_config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    b = build.build_encoder(settings)  # loaded from the cache, not regenerated
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert _weights_hash(a) == _weights_hash(b)
    assert (a.num_tokens, a.hidden_size, a.grid) == (64, tiny_encoder.TINY_RANDOM_CONFIG["hidden_size"], (8, 8))
    # a fresh cache regenerates exactly the same weights
    (folder / "config.json").unlink()
    c = build.build_encoder(settings)
    assert _weights_hash(c) == _weights_hash(a)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(a(x), c(x), rtol=0, atol=0)


def test_tiny_random_needs_a_siglip_kind(cache):
    with pytest.raises(ConfigError, match="model.encoder.kind"):
        build.build_encoder(EncoderSettings(kind="mae", path="tiny-random"))


def test_build_decoder_from_preset_and_from_our_export(cache, tmp_path):
    enc = build.build_encoder(EncoderSettings(kind="siglip", path="tiny-random", input_size=32))  # 4 x 4 tokens
    dec = build.build_decoder(DecoderSettings(preset="tiny", patch_size=8, image_size=32), enc)
    assert (dec.cfg.latent_dim, dec.cfg.num_patches, dec.cfg.image_size) == (enc.hidden_size, 16, 32)
    # the decoder records the encoder as the profile names it, not the machine-local cache folder behind it
    assert enc.cfg.path_or_repo.startswith(str(cache)) and dec.cfg.encoder_id == "tiny-random"
    save_decoder(dec, tmp_path / "dec")
    again = build.build_decoder(DecoderSettings(path=str(tmp_path / "dec"), patch_size=8, image_size=32), enc)
    assert _weights_hash(again) == _weights_hash(dec)
    with pytest.raises(ConfigError, match="model.decoder.image_size"):
        build.build_decoder(DecoderSettings(preset="tiny", patch_size=8, image_size=64), enc)
    with pytest.raises(ConfigError, match="model.decoder.patch_size"):
        build.build_decoder(DecoderSettings(path=str(tmp_path / "dec"), patch_size=4, image_size=16), enc)
    with pytest.raises(CheckpointError, match="model.decoder.path"):
        build.build_decoder(DecoderSettings(path="no/such/dir/here", patch_size=8, image_size=32), enc)


def test_build_rae_with_stats(cache, tmp_path):
    enc = build.build_encoder(load_profile("tiny-cpu", ["model.encoder.input_size=32"]).model.encoder)
    stats = LatentStats(mean=torch.zeros(16, enc.hidden_size), var=torch.full((16, enc.hidden_size), 4.0), count=3)
    stats.save(tmp_path / "s.safetensors")
    prof = load_profile("tiny-cpu", ["model.encoder.input_size=32", "model.decoder.image_size=32",
                                     f"model.stats='{tmp_path / 's.safetensors'}'"])
    rae = build.build_rae(prof).eval()
    assert rae.stats is not None and rae.stats.count == 3
    assert rae(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="model.stats"):
        build.build_stats(ModelSettings(stats=str(tmp_path / "missing.safetensors")))
