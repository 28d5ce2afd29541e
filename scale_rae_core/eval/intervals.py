"""95% intervals for benchmark rates (pure numpy, no scipy).

- ``wilson``: the Wilson score interval of a proportion ``successes / n`` of independent trials (one answer per
  image, one chosen sample per prompt). Unlike the normal approximation it stays inside [0, 1] and is not empty
  at 0 or n successes.
- ``cluster_bootstrap``: a percentile bootstrap that resamples whole clusters (the prompts), for a rate over
  clusters of correlated trials (the ``k`` samples of one prompt share it, so they are not ``k`` independent
  trials). Each of ``B`` resamples draws as many clusters as there are, with replacement, and pools their trials;
  the interval is the 2.5th and 97.5th percentiles of the pooled rate. A per-cluster value that is itself a
  difference (best-of-k minus the mean of the k samples of the same prompt) gives the interval of a paired
  difference the same way. A fixed ``seed`` makes the interval reproducible.

A percentile bootstrap cannot see beyond the data: when every cluster has the same rate (say all 100%) the
interval has zero width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (``(0.0, 1.0)`` when ``n`` is 0: nothing is known)."""
    assert 0 <= successes <= n, (successes, n)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def cluster_bootstrap(clusters: Sequence[Sequence[float]], *, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the pooled mean of ``clusters`` (lists of trial values),
    resampling whole clusters with replacement (``(0.0, 1.0)`` when there are none)."""
    if not clusters:
        return 0.0, 1.0
    sums = np.array([float(sum(c)) for c in clusters])  # (P,)
    counts = np.array([len(c) for c in clusters], dtype=np.float64)  # (P,)
    assert counts.min() > 0, "every cluster needs at least one trial"
    picks = np.random.default_rng(seed).integers(0, len(clusters), size=(samples, len(clusters)))  # (B, P)
    rates = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)  # (B,)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return float(lo), float(hi)
