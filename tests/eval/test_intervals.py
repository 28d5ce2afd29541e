"""95% intervals: Wilson against hand-computed values, the prompt-level bootstrap on cases whose answer is known."""

from __future__ import annotations

import pytest

from scale_rae_core.eval.intervals import cluster_bootstrap, wilson


@pytest.mark.parametrize("successes, n, lo, hi", [
    (8, 10, 0.4902, 0.9433),  # p = 0.8: centre (0.8 + z²/20) / (1 + z²/10) = 0.7167, half-width 0.2266
    (0, 10, 0.0, 0.2775),     # 0 successes: lower end exactly 0, upper z² / (n + z²)
    (10, 10, 0.7225, 1.0),    # all successes: the mirror image
    (1, 2, 0.0945, 0.9055),   # p = 0.5: symmetric about 0.5
])
def test_wilson_matches_hand_computed_values(successes, n, lo, hi):
    got = wilson(successes, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)
    assert got[0] <= successes / n <= got[1]


def test_wilson_narrows_with_more_trials_and_knows_nothing_of_no_trials():
    assert wilson(0, 0) == (0.0, 1.0)
    small, large = wilson(8, 10), wilson(80, 100)
    assert small[0] < large[0] < 0.8 < large[1] < small[1]


def test_identical_prompts_give_a_zero_width_interval():
    assert cluster_bootstrap([[1.0, 1.0, 0.0, 1.0]] * 12) == (0.75, 0.75)
    assert cluster_bootstrap([[0.25]] * 9) == (0.25, 0.25)  # a per-prompt difference, the same on every prompt


def test_correlated_samples_give_a_wider_interval_than_independent_ones():
    # 20 prompts x 8 samples at a rate of 0.5: each prompt all right or all wrong (perfectly correlated) ...
    clustered = cluster_bootstrap([[1.0] * 8] * 10 + [[0.0] * 8] * 10)
    # ... against the same 160 verdicts as 160 independent trials
    independent = cluster_bootstrap([[1.0]] * 80 + [[0.0]] * 80)
    assert clustered[0] < independent[0] < 0.5 < independent[1] < clustered[1]
    assert clustered[1] - clustered[0] > 2 * (independent[1] - independent[0])  # about sqrt(8) times wider
    # the clustered case is a rate of 10 / 20 prompts: close to the binomial interval over 20 trials
    assert clustered == pytest.approx((0.5 - 1.96 * 0.112, 0.5 + 1.96 * 0.112), abs=0.04)


def test_the_bootstrap_is_deterministic_under_its_seed_and_pools_unequal_clusters():
    clusters = [[1.0, 0.0, 1.0], [0.0], [1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0]]
    assert cluster_bootstrap(clusters) == cluster_bootstrap(clusters) == cluster_bootstrap(clusters, seed=0)
    many = [[float((i * j + i) % 3 == 0) for j in range(1 + i % 4)] for i in range(30)]  # 30 prompts, 1..4 samples
    assert cluster_bootstrap(many, seed=1) != cluster_bootstrap(many, seed=0)  # another seed, another resampling
    lo, hi = cluster_bootstrap(clusters)
    assert 0.0 <= lo < 7 / 12 < hi <= 1.0  # around the pooled rate, 7 of 12 trials
    assert cluster_bootstrap([]) == (0.0, 1.0)
