"""`srae eval fid`: FID, sFID, Inception Score, precision and recall, computed as the ADM evaluation suite
(guided-diffusion `evaluations/evaluator.py`, what RAE reports) computes them, in torch.

Activations (`eval.features.InceptionFID.activations`, the TF-2015 Inception port with pytorch-fid's weights):
pool3 (2048-d), `mixed_6/conv`'s first 7 channels (2023-d) and the 1008 softmax logits.

* FID: Fréchet distance between Gaussians fitted to the pool3 features of samples and reference
  (`eval.metrics.frechet_distance`, float64).
* sFID: the same on the 2023-d spatial features.
* Inception Score: exp(E_x KL(p(y|x) ‖ p(y))) on softmax(logits) in chunks of 5000 samples (10 chunks for 50 000),
  averaged over chunks, as ADM.
* Precision / recall (Kynkäänniemi et al., ADM's `ManifoldEstimator`, k = 3): each set's manifold is the union of
  balls around its points with radius = the squared distance to the point's 3rd nearest neighbour (itself
  excluded). Precision = share of samples inside the reference manifold, recall = share of reference images inside
  the sample manifold. Distances are computed in batches in float32 (ADM tries float16 first). A set of at most
  k images has no such manifold: both are then omitted (``omitted`` says why), FID is still given.

Differences from ADM: Inception runs in torch (pytorch-fid's resize and port; numbers are close to, not identical
with, TensorFlow's); the reference statistics are recomputed from the reference's `arr_0` with the same network
(ADM uses the `mu`/`sigma` stored in its reference batches, computed in TensorFlow; stored statistics are
ignored here so both sides come from one network).

Without Inception weights an offline fallback network (`eval.features`) is used and the JSON says so; FID,
precision and recall are then on its features (not comparable to published numbers) and sFID / IS are omitted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scale_rae_core.errors import DataError
from scale_rae_core.eval.adm_npz import ImageBatches, open_images, open_npz_images
from scale_rae_core.eval.metrics import FeatureStats, fid_from_stats

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BATCH = 1000


@dataclass
class Activations:
    """Features of one image set: pool (N, D) always; spatial (N, 2023) and logits (N, 1008) from Inception only."""

    pool: torch.Tensor
    spatial: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def compute_activations(
    batches: Iterable[np.ndarray], net: Any, progress: Callable[[int], None] | None = None
) -> Activations:
    """Run `net` over uint8 (B, H, W, 3) batches; Inception gives all three outputs, other nets `pool` only."""
    parts: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": [], "logits": []}
    inception = hasattr(net, "activations")
    for batch in batches:
        images = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
        outs = net.activations(images) if inception else {"pool": net(images)}
        for key, value in outs.items():
            parts[key].append(value.float().cpu())
        if progress is not None:
            progress(len(batch))
    if not parts["pool"]:
        raise DataError("no images to evaluate")
    joined = {k: torch.cat(v) for k, v in parts.items() if v}
    return Activations(**joined)


# ------------------------------------------------------------------------------------------- statistics


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return fid_from_stats(FeatureStats(a.shape[1]).update(a), FeatureStats(b.shape[1]).update(b))


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: mean over chunks of `split_size` of exp(mean_x KL(p(y|x) ‖ p_chunk(y)))."""
    p = torch.softmax(logits.double(), dim=1)
    scores = []
    for part in p.split(split_size):
        marginal = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - part * marginal.log()).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, clamped at 0 (ADM's `_batch_pairwise_distances`)."""
    return (a.pow(2).sum(1)[:, None] - 2 * a @ b.T + b.pow(2).sum(1)[None, :]).clamp_min(0)


def manifold_radii(feats: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = PR_BATCH) -> torch.Tensor:
    """(N,) squared distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    if feats.shape[0] <= k:
        raise DataError(f"precision/recall need more than {k} images per set, got {feats.shape[0]}; evaluate more images")
    f = feats.float()
    return torch.cat([_squared_distances(f[i : i + batch], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), batch)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """(n,) bool: the point lies within radius_j of some centre j."""
    p, c = points.float(), centres.float()
    return torch.cat([(_squared_distances(p[i : i + batch], c) <= radii[None, :]).any(1) for i in range(0, len(p), batch)])


def precision_recall(
    ref: torch.Tensor, samples: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = PR_BATCH,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of `samples` against `ref` with k-NN manifolds, as ADM's `compute_prec_recall`.

    The distance blocks are computed on `device` (N x N distances for 50 000 images are ~10 TFLOP per pass).
    """
    ref, samples = ref.to(device), samples.to(device)
    r_ref, r_samples = manifold_radii(ref, k, batch), manifold_radii(samples, k, batch)
    precision = _inside(samples, ref, r_ref, batch).double().mean()
    recall = _inside(ref, samples, r_samples, batch).double().mean()
    return float(precision), float(recall)


def adm_scores(ref: Activations, samples: Activations, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every statistic the activations allow; `omitted` says why one is missing."""
    out: dict[str, Any] = {"fid": fid(samples.pool, ref.pool), "sfid": None, "inception_score": None,
                           "precision": None, "recall": None, "omitted": {}}
    fewest = min(len(ref.pool), len(samples.pool))
    if fewest > PR_NEIGHBOURS:
        out["precision"], out["recall"] = precision_recall(ref.pool, samples.pool, device=device)
    else:  # a k-NN manifold needs k neighbours; FID itself is defined (and strongly biased) for any set of two
        out["omitted"]["precision"] = out["omitted"]["recall"] = (
            f"needs more than {PR_NEIGHBOURS} images per set, got {fewest}")
    why = "needs the Inception network (pt_inception-2015-12-05 weights); the fallback network has no such output"
    if samples.spatial is not None and ref.spatial is not None:
        out["sfid"] = fid(samples.spatial, ref.spatial)
    else:
        out["omitted"]["sfid"] = why
    if samples.logits is not None:
        out["inception_score"] = inception_score(samples.logits)
    else:
        out["omitted"]["inception_score"] = why
    return out


# ------------------------------------------------------------------------------------------------ engine


def _check_pair(samples: ImageBatches, ref: ImageBatches) -> None:
    if (samples.height, samples.width) != (ref.height, ref.width):
        raise DataError(
            f"{ref.path}: the reference batch is {ref.width}x{ref.height} but the samples ({samples.path}) are "
            f"{samples.width}x{samples.height}; use a reference batch at the samples' resolution "
            f"(srae data npz FOLDER --image-size {samples.width})"
        )


def evaluate_fid(
    samples: str | Path,
    ref: str | Path,
    *,
    fid_net: str | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score the images at `samples` (ADM `.npz` or image folder) against the ADM batch `ref`; JSON to `out`."""
    from scale_rae_core.eval.features import get_feature_net

    t0 = time.perf_counter()
    sample_set, ref_set = open_images(samples), open_npz_images(ref)
    _check_pair(sample_set, ref_set)
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    net = get_feature_net(fid_net, device)
    ref_acts = compute_activations(ref_set.batches(batch_size), net, progress)
    sample_acts = compute_activations(sample_set.batches(batch_size), net, progress)
    result = adm_scores(ref_acts, sample_acts, device)
    result.update(
        samples=str(samples), reference=str(ref), num_samples=sample_set.count, num_reference=ref_set.count,
        image_size=[sample_set.height, sample_set.width], network=net.label,
        reference_statistics=f"recomputed from the reference's arr_0 with {net.name}; stored mu/sigma are not used",
        seconds=round(time.perf_counter() - t0, 2),
    )
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
