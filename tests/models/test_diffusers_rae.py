"""diffusers' AutoencoderRAE <-> srae: a tiny AutoencoderRAE built and saved by diffusers itself decodes to the same
pixels through srae's decoder (``--decoder``), and srae writes one that diffusers loads with every key and that
decodes (and encodes) like srae, both ways. What AutoencoderRAE cannot represent is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.convert import (
    convert_decoder,
    load_any_decoder,
    load_diffusers_rae,
    save_diffusers_rae,
)
from scale_rae_core.models.decoder import Decoder, DecoderConfig
from scale_rae_core.models.rae import to_pixels
from scale_rae_core.models.stats import LatentStats

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra (pip install 'srae[diffusers]') is not installed")
IMAGENET = dict(pixel_mean=[0.485, 0.456, 0.406], pixel_std=[0.229, 0.224, 0.225])
C = 64  # one 64-wide head: the only encoder width diffusers rebuilds from a 64-wide config
TOLERANCE = 1e-5  # fp32 relative error


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _random(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


def _autoencoder(encoder_type: str, grid: int, **kwargs):
    ae = diffusers.AutoencoderRAE(
        encoder_type=encoder_type, encoder_hidden_size=C, encoder_patch_size=2, encoder_num_hidden_layers=1,
        decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, patch_size=2, encoder_input_size=2 * grid, **kwargs)
    _random(ae, 0)
    return ae.eval()


def _srae_pixels(decoder: Decoder, stats: LatentStats | None, z: torch.Tensor) -> torch.Tensor:
    """srae's decode of diffusers' latents z (B, C, h, w): de-normalise (stats) -> tokens -> decoder -> pixels."""
    tokens = z.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h·w, C)
    if stats is not None:
        tokens = stats.denormalize(tokens)
    with torch.no_grad():
        return to_pixels(decoder.eval()(tokens), decoder.cfg.pixel_mean, decoder.cfg.pixel_std)


# (siglip2: diffusers 0.42 cannot build its encoder against transformers 5, so no such folder can be made here)
@pytest.mark.parametrize("encoder_type,kind,stats", [("dinov2", "dinov2-reg", True), ("mae", "mae", False)])
def test_srae_decodes_an_autoencoder_rae_saved_by_diffusers_to_the_same_pixels(tmp_path, encoder_type, kind, stats):
    grid = 4  # not 16: diffusers' position table is rescaled to its 16-grid base, and srae reads that table
    extra = dict(latents_mean=torch.randn(C, grid, grid), latents_std=torch.rand(C, grid, grid) + 0.5,
                 scaling_factor=0.7) if stats else {}
    ae = _autoencoder(encoder_type, grid, **extra)
    ae.save_pretrained(tmp_path / "ae")
    decoder, source = load_any_decoder(str(tmp_path / "ae"), flag="--decoder", encoder_kind=kind, encoder_id="enc/id")
    assert (decoder.cfg.encoder_kind, decoder.cfg.encoder_id, decoder.cfg.image_size) == (kind, "enc/id", 2 * grid)
    _, latent_stats = load_diffusers_rae(tmp_path / "ae")
    assert (latent_stats is not None) == stats
    z = torch.randn(3, C, grid, grid)
    with torch.no_grad():
        reference = ae.decode(z).sample
    assert _rel(_srae_pixels(decoder, latent_stats, z * (1 + 1e-5) if not stats else z), reference) <= TOLERANCE


@pytest.fixture(scope="module")
def mae_encoder(tmp_path_factory):
    """A tiny ViT-MAE as diffusers rebuilds its mae encoder (one 64-wide head, image_size 224), saved by transformers."""
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "mae"
    ViTMAEModel(ViTMAEConfig(hidden_size=C, patch_size=2, image_size=224, num_attention_heads=1, num_hidden_layers=1,
                             mask_ratio=0.0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dinov2_encoder(tmp_path_factory):
    """A tiny DINOv2 with registers as diffusers rebuilds its dinov2 encoder (image_size 518, 4 registers)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "dinov2"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=C, patch_size=2, image_size=518, num_attention_heads=1,
                                                       num_hidden_layers=1)).save_pretrained(path)
    return path


def _srae_decoder(encoder_id: str, grid: int = 16, kind: str = "mae", **kwargs) -> Decoder:
    cfg = DecoderConfig(latent_dim=C, num_patches=grid * grid, patch_size=2, hidden_size=32, num_layers=2, num_heads=2,
                        mlp_size=64, encoder_kind=kind, encoder_id=encoder_id, **{**IMAGENET, **kwargs})
    decoder = Decoder(cfg)
    _random(decoder, 1)
    with torch.no_grad():
        decoder.pos_embed.copy_(Decoder(cfg).pos_embed)  # the fixed table stays the sin-cos one
    return decoder


@pytest.mark.parametrize("kind", ["mae", "dinov2-reg"])
def test_srae_writes_an_autoencoder_rae_that_diffusers_loads_and_that_decodes_and_encodes_alike(kind, request, tmp_path):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app
    from scale_rae_core.models.decoder import save_decoder
    from scale_rae_core.models.encoder import EncoderConfig, FrozenEncoder

    encoder = request.getfixturevalue("mae_encoder" if kind == "mae" else "dinov2_encoder")
    decoder = _srae_decoder(str(encoder), kind=kind)
    stats = LatentStats(mean=torch.randn(256, C), var=torch.rand(256, C) + 0.5)
    save_decoder(decoder, tmp_path / "ours")
    stats.save(tmp_path / "stats.safetensors")
    res = CliRunner().invoke(app, ["convert", "decoder", str(tmp_path / "ours"), str(tmp_path / "ae"), "--to", "diffusers",
                                   "--stats", str(tmp_path / "stats.safetensors")])
    assert res.exit_code == 0, res.output
    assert "(diffusers): 2 layers x 32 wide" in res.output
    ae, info = diffusers.AutoencoderRAE.from_pretrained(str(tmp_path / "ae"), output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["_class_name"] == "AutoencoderRAE"
    tokens = torch.randn(2, 256, C)
    z = stats.normalize(tokens).transpose(1, 2).reshape(2, C, 16, 16)  # srae's latent space, as diffusers lays it out
    with torch.no_grad():
        reference = ae.eval().decode(z).sample
        assert _rel(_srae_pixels(decoder, None, tokens.transpose(1, 2).reshape(2, C, 16, 16)), reference) <= TOLERANCE
        pixels = torch.rand(2, 3, 32, 32)
        ours = stats.normalize(FrozenEncoder(EncoderConfig(kind, str(encoder), input_size=32))(pixels))
        assert _rel(ours.transpose(1, 2).reshape(2, C, 16, 16), ae.encode(pixels).latent) <= TOLERANCE
    # and back: srae reads what it wrote (and diffusers loads) into the same decoder and statistics
    again, again_stats = load_diffusers_rae(tmp_path / "ae")
    for name, value in decoder.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=1e-7)
    torch.testing.assert_close(again_stats.normalize(tokens), stats.normalize(tokens), rtol=1e-5, atol=1e-5)
    back = convert_decoder(tmp_path / "ae", tmp_path / "srae-again")  # --to srae keeps the statistics beside it
    assert (back / "latent_stats.safetensors").is_file()


def test_what_an_autoencoder_rae_cannot_represent_is_refused_in_one_line(mae_encoder, tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    cases = [
        (_srae_decoder("x", kind="webssl-dino"), "of dinov2-reg and mae encoders only, not 'webssl-dino'"),
        (_srae_decoder("x", kind="siglip2"), "of dinov2-reg and mae encoders only, not 'siglip2'"),
        (_srae_decoder(str(mae_encoder), grid=8), "for a 8 x 8 token grid its table differs"),
        (_srae_decoder(str(mae_encoder), layer_norm_eps=1e-6), "layer_norm_eps is 1e-06"),
        (_srae_decoder(""), "names no encoder; pass --encoder-id"),
    ]
    for decoder, message in cases:
        with pytest.raises(ConfigError, match=message):
            save_diffusers_rae(decoder, tmp_path / "x")
    wide = _srae_decoder(str(tmp_path / "wide"), kind="mae")  # 2 heads of 32: diffusers rebuilds one head of 64
    ViTMAEModel(ViTMAEConfig(hidden_size=C, patch_size=2, num_attention_heads=2, num_hidden_layers=1)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match=r"num_attention_heads = 2 but diffusers' AutoencoderRAE rebuilds its mae encoder with 1"):
        save_diffusers_rae(wide, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"--stats: shape \(4, 4\)"):
        save_diffusers_rae(_srae_decoder(str(mae_encoder)), tmp_path / "x", stats=LatentStats(torch.zeros(4, 4), torch.ones(4, 4)))
    assert not (tmp_path / "x").exists()

    ae = _autoencoder("mae", 4)
    ae.save_pretrained(tmp_path / "ae")
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    (tmp_path / "ae" / "config.json").write_text(json.dumps({**config, "num_channels": 4}))
    with pytest.raises(CheckpointError, match="num_channels = 4; srae's decoder writes 3-channel"):
        load_diffusers_rae(tmp_path / "ae")
    (tmp_path / "ae" / "config.json").write_text(json.dumps({**config, "decoder_num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder.decoder_layers.2.attention.to_k.bias"):
        load_diffusers_rae(tmp_path / "ae")


def test_latent_decode_reads_an_autoencoder_rae_as_its_decoder(tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from scale_rae_cli.main import app
    from scale_rae_core.infer.outputs import save_latent

    ae = _autoencoder("mae", 4)
    ae.save_pretrained(tmp_path / "ae")
    tokens = torch.randn(1, 16, C)
    latent = save_latent(tmp_path / "z.safetensors", tokens, {"encoder_kind": "mae", "prompt": "x", "seed": "0"})
    res = CliRunner().invoke(app, ["latent", "decode", str(latent), "--decoder", str(tmp_path / "ae"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    png = torch.from_numpy(np.array(Image.open(res.output.strip().splitlines()[-1]))).float()  # (H, W, 3)
    with torch.no_grad():  # srae feeds encoder-space tokens; diffusers' z for them has its identity stats undone
        reference = ae.decode(tokens.transpose(1, 2).reshape(1, C, 4, 4) / (1 + 1e-5)).sample.clamp(0, 1)[0]
    assert (png / 255 - reference.permute(1, 2, 0)).abs().max() <= 1 / 255 + 1e-6
