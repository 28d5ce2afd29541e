"""PSNR, SSIM and FID maths against closed forms and independent numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scale_rae_core.errors import DataError
from scale_rae_core.eval.features import RandomProjectionFeatures
from scale_rae_core.eval.metrics import (
    PSNR_CAP_DB,
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    psnr,
    reconstruction_metrics,
    ssim,
)

# ----------------------------------------------------------------------------------------------- PSNR


def test_psnr_known_values_and_identical_images():
    x = torch.zeros(3, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 -> 20 dB
    y[1] += 0.5  # mse 0.25 -> 10*log10(4) dB
    p = psnr(x, y)
    assert p.shape == (3,)
    assert p[0].item() == pytest.approx(20.0)
    assert p[1].item() == pytest.approx(10 * math.log10(4))
    assert math.isinf(p[2].item())
    # the same images on a 0..255 scale give the same PSNR
    assert torch.allclose(psnr(x * 255, y * 255, data_range=255.0)[:2], p[:2])


def test_psnr_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# ----------------------------------------------------------------------------------------------- SSIM


def _ssim_numpy(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Straight from the definition: every valid 11x11 window, Gaussian-weighted moments, per channel."""
    c = np.arange(11) - 5.0
    g = np.exp(-(c**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for a_img, b_img in zip(x, y, strict=True):
        vals = []
        for a_ch, b_ch in zip(a_img, b_img, strict=True):
            H, W = a_ch.shape
            for i in range(H - 10):
                for j in range(W - 10):
                    a = a_ch[i : i + 11, j : j + 11]
                    b = b_ch[i : i + 11, j : j + 11]
                    ma, mb = (w * a).sum(), (w * b).sum()
                    va = (w * (a - ma) ** 2).sum()
                    vb = (w * (b - mb) ** 2).sum()
                    cab = (w * (a - ma) * (b - mb)).sum()
                    vals.append(
                        ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                    )
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_matches_a_direct_numpy_computation():
    x = torch.rand(2, 3, 14, 13)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    y[1] = torch.rand(3, 14, 13)  # an unrelated image: SSIM near 0
    got = ssim(x, y)
    ref = _ssim_numpy(x.double().numpy(), y.double().numpy())
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert 0.3 < got[0] < 0.95 and abs(got[1]) < 0.2


def test_ssim_identical_is_one_and_constant_images_follow_the_luminance_term():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # flat images: all variances vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(
        torch.full((1, 3, 12, 12), a, dtype=torch.float64), torch.full((1, 3, 12, 12), b, dtype=torch.float64)
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # data_range scales the constants with the signal
    got255 = ssim(
        torch.full((1, 3, 12, 12), a * 255, dtype=torch.float64),
        torch.full((1, 3, 12, 12), b * 255, dtype=torch.float64),
        data_range=255.0,
    )
    assert got255.item() == pytest.approx(expected, rel=1e-9)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(DataError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))


# ------------------------------------------------------------------------------------------ FID maths


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()  # 1+6.25 + 4+1+0
    assert expected.item() == pytest.approx(12.25)
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(12.25, rel=1e-12)


def test_frechet_distance_full_covariance_matches_numpy_eigenvalues():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 3))
    cov1 = a @ a.T + 0.1 * np.eye(5)
    cov2 = b @ b.T  # rank 3: singular, as with fewer samples than dimensions
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # tr sqrt(C1 C2) = sum of square roots of the (real, non-negative) eigenvalues of C1 C2; the two zero
    # eigenvalues come out as +-1e-15 noise whose square roots (~3e-8) bound the agreement
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(cov1 @ cov2).real, 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, abs=1e-6)  # symmetric
    full = cov2 + 0.5 * np.eye(5)  # non-singular: agreement to rounding
    tr_sqrt = np.sqrt(np.linalg.eigvals(cov1 @ full).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(full) - 2 * tr_sqrt
    assert frechet_distance(mu1, cov1, mu2, full) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_a_distribution_with_itself_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 8))  # rank 8 in 64 dims
    cov = a @ a.T
    mu = rng.normal(size=64)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(DataError, match="same network"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_sample_fid_approaches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    d, n = 4, 40_000
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([0.5, 0.0, -0.5, 1.0], dtype=torch.float64)
    l1 = torch.tensor(
        [[1.0, 0, 0, 0], [0.5, 1.0, 0, 0], [0, 0.3, 0.8, 0], [0.2, 0, 0.1, 0.5]], dtype=torch.float64
    )
    l2 = torch.eye(d, dtype=torch.float64) * 1.5
    cov1, cov2 = l1 @ l1.T, l2 @ l2.T
    exact = frechet_distance(mu1, cov1, mu2, cov2)
    x = mu1 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ l1.T
    y = mu2 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ l2.T
    a, b = FeatureStats(d), FeatureStats(d)
    for chunk in x.split(7_000):
        a.update(chunk)
    for chunk in y.split(9_999):
        b.update(chunk)
    assert exact > 2.0
    assert fid_from_stats(a, b) == pytest.approx(exact, abs=0.05)


# ---------------------------------------------------------------------------------------- FeatureStats


def test_feature_stats_merge_equals_all_at_once_and_matches_numpy():
    feats = torch.randn(103, 6) * 3 + 10  # an offset mean, as real features have
    whole = FeatureStats(6).update(feats)
    parts = [FeatureStats(6).update(c) for c in feats.split([1, 40, 2, 60])]
    merged = FeatureStats(6)
    for p in reversed(parts):  # order does not matter
        merged.merge(p)
    assert merged.count == whole.count == 103
    assert torch.allclose(merged.mean(), whole.mean(), rtol=0, atol=1e-12)
    assert torch.allclose(merged.cov(), whole.cov(), rtol=0, atol=1e-10)
    ref = feats.double().numpy()
    np.testing.assert_allclose(whole.mean().numpy(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.cov().numpy(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-10)
    # summing state dicts (what an all-reduce does) is the same merge
    summed = {k: sum(p.state_dict()[k] for p in parts) for k in ("count", "sum", "outer")}
    from_sum = FeatureStats.from_state_dict(summed)
    assert from_sum.count == 103
    assert torch.allclose(from_sum.cov(), whole.cov(), rtol=0, atol=1e-10)


def test_feature_stats_errors():
    s = FeatureStats(4)
    with pytest.raises(DataError, match=r"\(N, 4\)"):
        s.update(torch.zeros(2, 5))
    s.update(torch.zeros(1, 4))
    with pytest.raises(DataError, match="at least 2 needed"):
        s.cov()
    with pytest.raises(DataError, match="same feature network"):
        s.merge(FeatureStats(3))
    with pytest.raises(DataError, match="NaN"):
        s.update(torch.full((1, 4), float("nan")))


# ------------------------------------------------------------------------------ reconstruction_metrics


def test_reconstruction_metrics_identical_pairs():
    net = RandomProjectionFeatures()
    batches = [torch.rand(3, 3, 16, 16), torch.rand(2, 3, 16, 16)]
    out = reconstruction_metrics(((b, b.clone()) for b in batches), net)
    assert out["num_images"] == 5
    assert out["identical_images"] == 5
    assert out["psnr"] == PSNR_CAP_DB == out["psnr_cap_db"]
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert out["rfid"] == pytest.approx(0.0, abs=1e-6)
    assert out["fid_network"] == net.label and "NOT comparable" in out["fid_network"]
    assert out["fid_feature_dim"] == 512


def test_reconstruction_metrics_noisy_pairs_match_per_image_metrics():
    net = RandomProjectionFeatures()
    x = torch.rand(4, 3, 16, 16)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    out = reconstruction_metrics([(x[:2], y[:2]), (x[2:], y[2:])], net)
    assert out["identical_images"] == 0
    assert out["psnr"] == pytest.approx(psnr(x, y).mean().item(), rel=1e-12)
    assert out["ssim"] == pytest.approx(ssim(x, y).mean().item(), rel=1e-12)
    worse = reconstruction_metrics([(x, torch.rand_like(x))], net)
    assert 0 < out["rfid"] < worse["rfid"]


def test_reconstruction_metrics_rejects_bad_inputs():
    net = RandomProjectionFeatures()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(DataError, match=r"clamp\(0, 1\)"):
        reconstruction_metrics([(x, x * 1.5)], net)
    with pytest.raises(DataError, match="at least 2"):
        reconstruction_metrics([(x[:1], x[:1])], net)
