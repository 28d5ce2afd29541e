"""`srae eval probe`: linear-probe top-1 accuracy of a frozen encoder on a class-folder dataset.

* Features: the encoder's tokens (B, N, C) averaged over tokens -> (B, C), from centre crops at the encoder's
  input size (`data.labelled`, eval mode, no augmentation).
* Split: per class, its images (sorted paths) are shuffled by `Random(f"{seed}/{class}")` and round(heldout · n)
  of them — at least one and at most n − 1 when the class has two or more — are held out; the rest train. The split depends only
  on the file names, the seed and the fraction.
* Classifier: multinomial logistic regression (one linear layer, softmax cross-entropy, L2 weight decay on the
  weights) on features standardised with the training split's mean and std, fitted full-batch with L-BFGS in
  float64. The objective is convex, so the result depends on the data, split and weight decay, not on an
  initialisation or a learning-rate schedule.
* Output: top-1 on the held-out split (and on the training split), counts, classes and settings, as JSON.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scale_rae_core.data.labelled import labelled_batches, open_labelled
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.models.encoder import FrozenEncoder


@torch.no_grad()
def pooled_features(encoder: FrozenEncoder, data: str | Path, batch_size: int = 32
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features (n, C) float64, labels (n,), classes) of every image below the class folders at `data`."""
    stream = open_labelled(data, image_size=encoder.input_size, train=False)
    device = encoder.mean.device
    feats, labels = [], []
    for x, y, _ in labelled_batches(stream, batch_size):
        feats.append(encoder(x.to(device)).float().mean(dim=1).double().cpu())  # (B, N, C) -> (B, C)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels), stream.classes


def split_heldout(labels: torch.Tensor, classes: list[str], heldout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a stratified split per class (see the module docstring)."""
    if not 0.0 < heldout < 1.0:
        raise DataError(f"--heldout must be a fraction in (0, 1), got {heldout}")
    train, test = [], []
    for c, name in enumerate(classes):
        idx = (labels == c).nonzero().flatten().tolist()
        random.Random(f"{seed}/{name}").shuffle(idx)
        k = min(len(idx) - 1, max(1, round(heldout * len(idx)))) if len(idx) >= 2 else 0
        test += idx[:k]
        train += idx[k:]
    if not test or len(train) < 2:
        raise DataError("too few images to hold some out and still train on two; add images to the class folders")
    return torch.tensor(sorted(train)), torch.tensor(sorted(test))


def fit_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
               max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, K), b (K,)) minimising mean cross-entropy + weight_decay · |W|² by full-batch L-BFGS (float64)."""
    x = feats.double()
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, labels) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(encoder: FrozenEncoder, data: str | Path, *, heldout: float = 0.2, seed: int = 0,
                 batch_size: int = 32, weight_decay: float = 1e-4, max_iter: int = 500,
                 out: str | Path | None = None) -> dict[str, Any]:
    """Linear-probe the frozen `encoder` on the class folders at `data`; the result dict is also written to `out`."""
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"--weight-decay {weight_decay} must be a finite number >= 0")
    t0 = time.perf_counter()
    encoder.eval()
    feats, labels, classes = pooled_features(encoder, data, batch_size)
    train, test = split_heldout(labels, classes, heldout, seed)
    z = (feats - feats[train].mean(0)) / feats[train].std(0).clamp_min(1e-6)
    W, b = fit_linear(z[train], labels[train], len(classes), weight_decay, max_iter)
    pred = (z @ W + b).argmax(1)
    top1 = lambda idx: float((pred[idx] == labels[idx]).double().mean()) if len(idx) else None  # noqa: E731
    result = {
        "top1": top1(test), "train_top1": top1(train), "num_train": len(train), "num_heldout": len(test),
        "num_classes": len(classes), "classes": classes, "feature_dim": int(feats.shape[1]),
        "pooling": "mean over tokens", "classifier": "multinomial logistic regression (L-BFGS, float64)",
        "encoder": encoder.cfg.label, "input_size": encoder.input_size, "data": str(data),
        "heldout_fraction": heldout, "seed": seed, "weight_decay": weight_decay,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
