"""ADM-suite statistics in closed form, precision/recall against a brute-force definition, the Inception outputs,
and the engine's one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scale_rae_core.errors import DataError
from scale_rae_core.eval.adm_npz import AdmNpzWriter
from scale_rae_core.eval.features import InceptionFID
from scale_rae_core.eval.fid import (
    Activations,
    adm_scores,
    evaluate_fid,
    fid,
    inception_score,
    manifold_radii,
    precision_recall,
)


def _feats(n=400, d=6, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)))


def test_fid_of_shifted_and_scaled_gaussian_samples():
    a = _feats()
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert fid(a, a + c) == pytest.approx(float(c @ c), rel=1e-9)  # same covariance: |Δμ|²
    centred = a - a.mean(0)
    # C2 = 4·C1, so tr(C1) + tr(C2) − 2·tr(2·C1) = tr(C1), and the means agree
    assert fid(centred, 2 * centred) == pytest.approx(float(torch.cov(centred.T).trace()), rel=1e-9)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_inception_score_closed_forms_and_adm_chunks():
    k = 10
    one_hot = 100.0 * torch.eye(k).repeat(30, 1)  # 300 confident predictions, 30 per class
    assert inception_score(one_hot) == pytest.approx(k, rel=1e-6)
    assert inception_score(torch.zeros(300, k)) == pytest.approx(1.0)
    # ADM averages exp(KL) over chunks of split_size: two chunks each of one class score 1, the whole set 2
    two = 100.0 * torch.eye(2)[torch.tensor([0] * 4 + [1] * 4)]
    assert inception_score(two, split_size=8) == pytest.approx(2.0, rel=1e-6)
    assert inception_score(two, split_size=4) == pytest.approx(1.0, rel=1e-6)


def _brute_force_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def inside(points, centres, r):
        d = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        return (d <= r[None, :]).any(1)

    return inside(samples, ref, radii(ref)).mean(), inside(ref, samples, radii(samples)).mean()


def test_precision_recall_match_the_definition_across_batches():
    ref, samples = _feats(60, 3, seed=1).float(), (_feats(45, 3, seed=2) * 1.5 + 0.7).float()
    expected = _brute_force_pr(ref.double().numpy(), samples.double().numpy())
    got = precision_recall(ref, samples, batch=7)
    assert got == pytest.approx(expected)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_precision_recall_of_identical_and_disjoint_sets():
    a = _feats(50, 4).float()
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 1000.0) == (0.0, 0.0)
    half = torch.cat([a[:25], a[:25] + 1000.0])
    assert precision_recall(a, half)[0] == 0.5


def test_radii_are_the_third_neighbour_excluding_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert manifold_radii(x).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]  # e.g. 6: neighbours at 3, 4, 5
    with pytest.raises(DataError, match="precision/recall need more than 3 images per set, got 3"):
        manifold_radii(x[:3])


def test_sfid_and_is_come_from_their_own_features():
    ref = Activations(pool=_feats(100, 4), spatial=_feats(100, 5, seed=3), logits=torch.zeros(100, 8))
    shift = torch.full((5,), 2.0, dtype=torch.float64)
    samples = Activations(pool=ref.pool.clone(), spatial=ref.spatial + shift, logits=100 * torch.eye(8).repeat(10, 1))
    scores = adm_scores(ref, samples)
    assert scores["fid"] == pytest.approx(0.0, abs=1e-9)
    assert scores["sfid"] == pytest.approx(20.0, rel=1e-9)
    assert scores["inception_score"] == pytest.approx(8.0, rel=1e-6)
    assert scores["omitted"] == {}
    fallback = adm_scores(Activations(pool=ref.pool), Activations(pool=ref.pool + 1.0))
    assert fallback["sfid"] is None and fallback["inception_score"] is None
    assert set(fallback["omitted"]) == {"sfid", "inception_score"} and "Inception" in fallback["omitted"]["sfid"]
    few = adm_scores(Activations(pool=ref.pool[:3]), Activations(pool=ref.pool + 1.0))  # 3 reference images
    assert few["precision"] is None and few["recall"] is None and few["fid"] > 0
    assert few["omitted"]["precision"] == few["omitted"]["recall"] == "needs more than 3 images per set, got 3"


def test_inception_outputs_follow_adms_graph():
    torch.manual_seed(0)
    net = InceptionFID()
    with torch.no_grad():  # BN at identity-ish statistics so activations stay finite and non-trivial
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1.0)
    captured = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: captured.setdefault("mixed_6", out))
    images = torch.rand(2, 3, 40, 40)
    acts = net.activations(images)
    assert acts["pool"].shape == (2, 2048) and acts["spatial"].shape == (2, 2023) and acts["logits"].shape == (2, 1008)
    torch.testing.assert_close(acts["pool"], net(images))
    torch.testing.assert_close(acts["logits"], acts["pool"] @ net.fc.weight.T)  # no bias, as ADM
    mixed = captured["mixed_6"]  # (2, 192, 17, 17), after BN + ReLU
    torch.testing.assert_close(acts["spatial"], mixed[:, :7].permute(0, 2, 3, 1).reshape(2, -1))


def _npz(path, n, side, seed):
    imgs = np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    w = AdmNpzWriter(path, n, side, side)
    w.write(imgs)
    return w.close()


def test_engine_with_the_fallback_network_labels_its_output(tmp_path):
    ref = _npz(tmp_path / "ref.npz", 12, 16, 0)
    samples = _npz(tmp_path / "samples.npz", 10, 16, 1)
    out = evaluate_fid(samples, ref, fid_net="random", batch_size=4, out=tmp_path / "fid.json")
    assert (out["num_samples"], out["num_reference"], out["image_size"]) == (10, 12, [16, 16])
    assert out["fid"] > 0 and 0 <= out["precision"] <= 1 and out["sfid"] is None
    assert "NOT comparable" in out["network"] and "inception_score" in out["omitted"]
    same = evaluate_fid(ref, ref, fid_net="random")
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and (same["precision"], same["recall"]) == (1.0, 1.0)
    assert (tmp_path / "fid.json").read_text().startswith("{")


def test_engine_refuses_another_resolution_in_one_line(tmp_path):
    ref = _npz(tmp_path / "ref.npz", 5, 16, 0)
    samples = _npz(tmp_path / "samples.npz", 5, 8, 1)
    with pytest.raises(DataError) as err:
        evaluate_fid(samples, ref, fid_net="random")
    assert "the reference batch is 16x16 but the samples" in str(err.value) and "\n" not in str(err.value)
