"""RAE glue: noise only in training, stats applied in token order, decode inverts the normalisations."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from scale_rae_core.errors import ConfigError
from scale_rae_core.models.decoder import Decoder, DecoderConfig
from scale_rae_core.models.encoder import EncoderConfig, FrozenEncoder
from scale_rae_core.models.rae import RAE, decoder_config_for
from scale_rae_core.models.stats import LatentStats, load_stats


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> FrozenEncoder:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "dreg"
    cfg = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_register_tokens=2,
    )
    Dinov2WithRegistersModel(cfg).save_pretrained(path)
    return FrozenEncoder(EncoderConfig("dinov2-reg", str(path)))  # 16 tokens x 32 channels


@pytest.fixture
def decoder(encoder: FrozenEncoder) -> Decoder:
    torch.manual_seed(0)
    return Decoder(decoder_config_for(encoder, "tiny", patch_size=8))


def test_noise_only_in_training_mode(encoder, decoder):
    rae = RAE(encoder, decoder, noise_tau=0.8)
    x = torch.rand(4, 3, 32, 32)
    clean = encoder(x)
    rae.eval()
    torch.testing.assert_close(rae.encode(x), clean, rtol=0, atol=0)
    rae.train()
    noisy = rae.encode(x)
    sigma = (noisy - clean).std(dim=(1, 2))  # one sigma per sample, drawn from 0.8 * U(0, 1)
    assert (sigma > 0).all() and (sigma < 0.8 * 1.2).all()
    assert sigma.max() - sigma.min() > 1e-3  # per-sample, not one shared scale
    no_tau = RAE(encoder, decoder, noise_tau=0.0).train()
    torch.testing.assert_close(no_tau.encode(x), clean, rtol=0, atol=0)


def test_released_stats_are_applied_in_token_order(encoder, decoder, tmp_path):
    Cc, g = 32, 4
    c, i, j = torch.meshgrid(torch.arange(Cc), torch.arange(g), torch.arange(g), indexing="ij")
    mean = (100.0 * i + 10.0 * j + 0.01 * c).float()  # [C, H, W], every element distinct
    var = (1.0 + i + 2.0 * j).float().expand(Cc, g, g).clone()
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    rae = RAE(encoder, decoder, stats=load_stats(tmp_path / "stat.pt")).eval()
    x = torch.rand(2, 3, 32, 32)
    raw, z = encoder(x), rae.encode(x)
    for ii, jj, cc in [(0, 0, 0), (1, 3, 5), (3, 2, 31)]:
        n = ii * g + jj
        expected = (raw[:, n, cc] - mean[cc, ii, jj]) / torch.sqrt(var[cc, ii, jj] + 1e-5)
        torch.testing.assert_close(z[:, n, cc], expected)


def test_decode_inverts_stats_and_pixel_normalisation(encoder, decoder):
    g = torch.Generator().manual_seed(0)
    stats = LatentStats(mean=torch.randn(16, 32, generator=g), var=torch.rand(16, 32, generator=g) + 0.5)
    rae = RAE(encoder, decoder, stats=stats).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = rae(x)
        expected = decoder(encoder(x)) * encoder.std + encoder.mean  # the decoder sees raw tokens
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_mismatches_are_config_errors(encoder):
    wrong_width = Decoder(DecoderConfig.from_preset("tiny", latent_dim=48, num_patches=16, patch_size=8))
    with pytest.raises(ConfigError, match="16 x 32"):
        RAE(encoder, wrong_width)
    half = Decoder(DecoderConfig.from_preset("tiny", latent_dim=32, num_patches=16, patch_size=8))  # 0.5/0.5
    with pytest.raises(ConfigError, match="pixel_mean"):
        RAE(encoder, half)
    ok = Decoder(decoder_config_for(encoder, "tiny", patch_size=8))
    with pytest.raises(ConfigError, match="latent stats"):
        RAE(encoder, ok, stats=LatentStats(mean=torch.zeros(32, 4, 4), var=torch.ones(32, 4, 4)))
