"""Decoder-loss pieces: LPIPS, DINO discriminator, DiffAug, GAN losses, adaptive weight (tiny, CPU, seed 0)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.train.gan import (
    DiffAug,
    DinoDiscriminator,
    DiscriminatorConfig,
    LocalNorm,
    adaptive_weight,
    disc_accuracy,
    generator_loss,
    hinge_d_loss,
    quantize_8bit,
    vanilla_d_loss,
)
from scale_rae_core.train.lpips import LPIPS, VGG16_CFG

# ---------------------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS.random(seed=0)


def _images(seed: int, n: int = 2, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


def _lpips_by_hand(model: LPIPS, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS recipe re-derived from the state dict alone (torchvision VGG16 layout)."""
    sd = model.state_dict()
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    idx, tap = 0, 0
    for i, v in enumerate(VGG16_CFG):
        if v == "M":
            hx, hy = F.max_pool2d(hx, 2), F.max_pool2d(hy, 2)
            idx += 1
            continue
        w, b = sd[f"net.features.{idx}.weight"], sd[f"net.features.{idx}.bias"]
        hx, hy = F.relu(F.conv2d(hx, w, b, padding=1)), F.relu(F.conv2d(hy, w, b, padding=1))
        idx += 2
        if i + 1 == len(VGG16_CFG) or VGG16_CFG[i + 1] == "M":  # last conv of a stage: relu{k}_{2|3}
            nx = hx / (hx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            lin = sd[f"lin{tap}.model.1.weight"]  # (1, C, 1, 1)
            total += ((nx - ny).square() * lin).sum(1).mean(dim=(1, 2))
            tap += 1
    assert tap == 5
    return total


def test_lpips_zero_for_identical_symmetric_positive(lpips: LPIPS) -> None:
    x, y = _images(1), _images(2)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-7)
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (2,)
    assert torch.allclose(d_xy, d_yx, rtol=1e-5, atol=1e-8)
    assert (d_xy > 1e-4).all()
    assert torch.allclose(d_xy, _lpips_by_hand(lpips, x, y), rtol=1e-4, atol=1e-7)


def test_lpips_is_frozen_but_passes_gradients_to_inputs(lpips: LPIPS) -> None:
    lpips.train()
    assert not lpips.training and not lpips.lin0.model[0].training
    assert not any(p.requires_grad for p in lpips.parameters())
    x = _images(3).requires_grad_(True)
    lpips(x, _images(4)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def _torchvision_vgg16(model: LPIPS) -> dict[str, torch.Tensor]:
    """What torchvision's `vgg16().state_dict()` looks like: `features.N.*` plus a classifier."""
    sd = {k.removeprefix("net."): v.clone() for k, v in model.net.state_dict(prefix="net.").items()}
    sd["classifier.0.weight"] = torch.randn(8, 4)
    sd["classifier.0.bias"] = torch.randn(8)
    return sd


def _lin_file(model: LPIPS) -> dict[str, torch.Tensor]:
    return {f"lin{i}.model.1.weight": lin.model[1].weight.clone() for i, lin in enumerate(model.lins)}


def test_lpips_loads_torchvision_and_lpips_layouts(tmp_path: Path, lpips: LPIPS) -> None:
    src = LPIPS.random(seed=1)
    vgg = _torchvision_vgg16(src)
    assert "features.28.bias" in vgg and "features.0.weight" in vgg
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(_lin_file(src), tmp_path / "vgg.pth")
    loaded = LPIPS.load(tmp_path)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, y = _images(5), _images(6)
    assert torch.equal(loaded(x, y), src(x, y))
    assert not torch.allclose(lpips(x, y), src(x, y))  # seed 0 and seed 1 differ

    # features-only VGG dict (`vgg16().features.state_dict()`: keys `0.weight`) + no-dropout lin keys
    feats = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
    torch.save(feats, tmp_path / "features.pth")
    lin0 = {k.replace("model.1", "model.0"): v for k, v in _lin_file(src).items()}
    torch.save(lin0, tmp_path / "lin_nodrop.pth")
    again = LPIPS.from_files(tmp_path / "features.pth", tmp_path / "lin_nodrop.pth")
    assert torch.equal(again(x, y), src(x, y))


def test_lpips_loads_one_combined_lpips_state_dict(tmp_path: Path) -> None:
    """A whole `lpips`-package LPIPS state dict: `net.slice{k}.{n}.*`, `lin{i}` and `lins.{i}`, scaling."""
    src = LPIPS.random(seed=2)
    starts = (0, 4, 9, 16, 23, 30)  # slice k holds features[starts[k-1]:starts[k]]
    combined: dict[str, torch.Tensor] = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1)}
    for k, v in src.net.features.state_dict().items():
        n = int(k.split(".")[0])
        s = next(j for j in range(5) if starts[j] <= n < starts[j + 1]) + 1
        combined[f"net.slice{s}.{k}"] = v
    for i, lin in enumerate(src.lins):
        combined[f"lin{i}.model.1.weight"] = lin.model[1].weight
        combined[f"lins.{i}.model.1.weight"] = lin.model[1].weight
    torch.save(combined, tmp_path / "lpips_full.pth")
    x, y = _images(7), _images(8)
    assert torch.equal(LPIPS.load(tmp_path / "lpips_full.pth")(x, y), src(x, y))


def test_lpips_missing_or_wrong_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"vgg16-397923af\.pth.*torchvision model zoo") as e:
        LPIPS.load(tmp_path)
    assert "\n" not in str(e.value) and "decoder_training.lpips_weights" in str(e.value)
    src = LPIPS.random(seed=0)
    torch.save(_torchvision_vgg16(src), tmp_path / "vgg16-397923af.pth")
    with pytest.raises(CheckpointError, match=r"no vgg\.pth in .*lpips/weights/v0\.1/vgg\.pth"):
        LPIPS.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"lin file .*nope\.pth is missing"):
        LPIPS.from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "nope.pth")
    broken = _torchvision_vgg16(src)
    del broken["features.26.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    torch.save(_lin_file(src), tmp_path / "vgg.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth lacks features\.26\.weight"):
        LPIPS.from_files(tmp_path / "broken.pth", tmp_path / "vgg.pth")
    bad_lin = _lin_file(src)
    bad_lin["lin2.model.1.weight"] = torch.ones(1, 7, 1, 1)
    torch.save(bad_lin, tmp_path / "bad_lin.pth")
    with pytest.raises(CheckpointError, match=r"lin2\.model\.1\.weight of shape \(1, 7, 1, 1\)"):
        LPIPS.from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "bad_lin.pth")


# ---------------------------------------------------------------------------------------------------------
# discriminator


def _vit_config():  # noqa: ANN202 - transformers type
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )


TINY = DiscriminatorConfig(backbone="", key_depths=(1, 3), kernel_size=9)


@pytest.fixture(scope="module")
def disc() -> DinoDiscriminator:
    return DinoDiscriminator.random(_vit_config(), TINY, seed=0).eval()


def _head_params(c: int, k: int) -> int:
    # conv1x1 (w + b), norm (w + b), conv k (w + b), norm, conv C->1 (w + b)
    return (c * c + c) + 2 * c + (c * c * k + c) + 2 * c + (c + 1)


def test_discriminator_output_shape_and_token_count(disc: DinoDiscriminator) -> None:
    x = _images(9, n=2, side=64)  # resized to the backbone's 32
    out = disc(x)
    assert disc.num_tokens == 16
    assert out.shape == (2, 3 * 16) and out.dtype == torch.float32
    # ViT-S/8 at 224 with the default depths: 5 maps x 784 tokens, ~7.4M head parameters (rae.md §3.3)
    assert 5 * _head_params(384, 9) == 7_386_245


def test_discriminator_trains_heads_only_and_saves_heads_only(disc: DinoDiscriminator) -> None:
    trainable = [(n, p) for n, p in disc.named_parameters() if p.requires_grad]
    assert all(n.startswith("heads.") for n, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == 3 * _head_params(32, 9) == 31_395
    assert sum(p.numel() for p in disc.parameters()) == 31_395  # the backbone is not registered
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert all(k.startswith("heads.") for k in disc.state_dict())
    disc.train()
    assert not disc.backbone.training
    disc.eval()


def test_discriminator_features_are_vit_hidden_states(disc: DinoDiscriminator) -> None:
    x = _images(10, n=2, side=48)
    feats = disc.features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16)] * 3
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pix = (F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False) * 0.5 + 0.5 - mean) / std
    hs = disc.backbone(pixel_values=pix, output_hidden_states=True).hidden_states
    assert len(hs) == 5
    for f, h in zip(feats, (hs[4], hs[2], hs[4]), strict=True):  # final block, blocks 1 and 3
        assert torch.allclose(f, h[:, 1:].transpose(1, 2), atol=1e-5)


def test_discriminator_gradients_and_per_sample_independence(disc: DinoDiscriminator) -> None:
    a, b = _images(11, n=1), _images(12, n=1)
    both = disc(torch.cat([a, b]))
    assert torch.allclose(both[:1], disc(a), atol=1e-5) and torch.allclose(both[1:], disc(b), atol=1e-5)
    x = torch.cat([a, b]).requires_grad_(True)
    disc.zero_grad(set_to_none=True)
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())
    disc.zero_grad(set_to_none=True)


def test_discriminator_state_dict_round_trip_and_to_moves_backbone(disc: DinoDiscriminator) -> None:
    other = DinoDiscriminator.random(_vit_config(), TINY, seed=0).eval()  # same backbone, new heads
    x = _images(13)
    with torch.no_grad():
        for p in other.heads.parameters():
            p.add_(0.1)
    assert not torch.allclose(other(x), disc(x))
    other.load_state_dict(disc.state_dict(), strict=True)
    assert torch.allclose(other(x), disc(x), atol=1e-6)
    other.to(torch.float64)
    assert next(other.backbone.parameters()).dtype == torch.float64
    assert next(other.heads.parameters()).dtype == torch.float64


def test_discriminator_config_and_backbone_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key_depths \(1, 4\): block 4 .* 4-block backbone"):
        DinoDiscriminator.random(_vit_config(), DiscriminatorConfig(backbone="", key_depths=(1, 4)))
    missing = tmp_path / "no_such_dino"
    with pytest.raises(CheckpointError, match=r"disc_backbone .*no_such_dino: no such file.*hf download facebook/dino-vits8") as e:
        DinoDiscriminator.from_pretrained(DiscriminatorConfig(backbone=str(missing)))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="backbone is not set"):
        DinoDiscriminator.from_pretrained(DiscriminatorConfig(backbone=""))


def test_discriminator_from_pretrained_local_dir(tmp_path: Path, disc: DinoDiscriminator) -> None:
    disc.backbone.save_pretrained(tmp_path / "dino")
    cfg = DiscriminatorConfig(backbone=str(tmp_path / "dino"), key_depths=(1, 3))
    loaded = DinoDiscriminator.from_pretrained(cfg).eval()
    loaded.load_state_dict(disc.state_dict())
    x = _images(14)
    assert torch.allclose(loaded(x), disc(x), atol=1e-5)


def test_discriminator_syncs_under_ddp(tmp_path: Path) -> None:
    """DDP takes the heads only (the frozen backbone is outside it) and trains through the wrapper."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d = DinoDiscriminator.random(_vit_config(), TINY, seed=0)
        ddp = nn.parallel.DistributedDataParallel(d)
        assert sum(p.numel() for p in ddp.parameters()) == 31_395
        before = [p.detach().clone() for p in d.parameters()]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        hinge_d_loss(ddp(_images(15)), ddp(_images(16))).backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, d.parameters(), strict=True))
    finally:
        dist.destroy_process_group()


def test_local_norm_normalises_each_sample_over_tokens() -> None:
    x = torch.randn(3, 4, 10) * 5 + 2
    y = LocalNorm(4)(x)
    assert torch.allclose(y.mean(dim=2), torch.zeros(3, 4), atol=1e-5)
    assert torch.allclose(y.var(dim=2, unbiased=False), torch.ones(3, 4), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# DiffAug


def test_diffaug_deterministic_and_shape_preserving() -> None:
    x = _images(20, n=4, side=16)
    aug = DiffAug(cutout=0.25)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert aug(x.bfloat16(), torch.Generator().manual_seed(0)).dtype == torch.bfloat16
    x.requires_grad_(True)
    aug(x, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_diffaug_translation_is_an_integer_shift_with_zero_fill() -> None:
    x = torch.arange(1, 1 + 2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    out = DiffAug(translation=0.125, color=False)(x, torch.Generator().manual_seed(3))
    d = 2  # round(16 * 0.125)
    for s in range(2):
        matches = []
        for th in range(-d, d + 1):
            for tw in range(-d, d + 1):
                ref = torch.zeros(3, 16, 16)
                src = x[s, :, max(th, 0) : 16 + min(th, 0), max(tw, 0) : 16 + min(tw, 0)]
                ref[:, max(-th, 0) : 16 + min(-th, 0), max(-tw, 0) : 16 + min(-tw, 0)] = src
                if torch.equal(out[s], ref):
                    matches.append((th, tw))
        assert len(matches) == 1, matches


def test_diffaug_colour_on_flat_images_is_a_brightness_shift() -> None:
    # saturation and contrast leave a constant grey image unchanged; brightness adds U(-0.5, 0.5)
    x = torch.tensor([0.1, -0.3, 0.7]).view(3, 1, 1, 1).expand(3, 3, 8, 8).contiguous()
    out = DiffAug(translation=0.0)(x, torch.Generator().manual_seed(0))
    shift = out - x
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    assert (shift.abs() <= 0.5).all() and shift[:, 0, 0, 0].unique().numel() == 3


def test_diffaug_cutout_zeroes_one_box_per_sample() -> None:
    x = torch.ones(6, 3, 16, 16)
    out = DiffAug(translation=0.0, color=False, cutout=0.25)(x, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for s in range(6):
        zero = out[s, 0] == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 1 <= rows.numel() <= 4 and 1 <= cols.numel() <= 4
        assert int(zero.sum()) == rows.numel() * cols.numel()  # one solid rectangle
        assert torch.equal(out[s, 0], out[s, 2])


# ---------------------------------------------------------------------------------------------------------
# losses and the adaptive weight


def test_gan_losses_exact() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6;  relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(sp(f) for f in (-2.0, 0.0, 1.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(1 / 3)
    assert disc_accuracy(real, fake).item() == pytest.approx(2 / 3)


def test_quantize_8bit() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 0.004, 0.5, 1.0, 2.0])
    q = quantize_8bit(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert q[0] == -1 and q[-1] == 1 and q[1] == -1 and q[-2] == 1
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6


def test_adaptive_weight_exact_on_a_linear_layer() -> None:
    lin = nn.Linear(3, 2, bias=False)
    x = torch.tensor([[1.0, 2.0, 2.0]])  # |x| = 3
    out = lin(x)  # (1, 2); d out_j / d W_jk = x_k
    rec = out.sum()  # grad = [[x], [x]]       -> norm sqrt(2) * 3
    g = 3.0 * out[0, 0]  # grad = [[3x], [0]]  -> norm 9
    w = adaptive_weight(rec, g, lin.weight, max_weight=1e4)
    assert w.item() == pytest.approx(math.sqrt(2) * 3 / (9 + 1e-6), rel=1e-6)
    assert not w.requires_grad and w.dtype == torch.float32
    assert lin.weight.grad is None  # autograd.grad does not accumulate
    assert adaptive_weight(rec, g, lin.weight, max_weight=0.25).item() == pytest.approx(0.25)
    (rec + g).backward()  # the graph was retained
    assert torch.allclose(lin.weight.grad, torch.stack([4 * x[0], x[0]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
        w16 = adaptive_weight(out.sum(), 3.0 * out[0, 0], lin.weight)
    assert w16.dtype == torch.float32 and w16.item() == pytest.approx(math.sqrt(2) / 3, rel=2e-2)
