"""benchmarks/bench_verify.py: its AUC helper, and a tiny run on the bundled model prints the table and writes
probabilities (the script cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_verify", ROOT / "benchmarks" / "bench_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auc_counts_pairs_and_half_ties():
    auc = bench().auc
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5, 0.9], [0.5]) == pytest.approx(0.75)  # one tie (1/2) and one win, over 2 pairs
    assert auc([], [0.3]) is None and auc([0.3], []) is None


def test_a_tiny_run_prints_every_row_and_writes_probabilities(tmp_path):
    from scale_rae_core.infer.loading import bundled_model

    if bundled_model() is None:
        pytest.skip("no bundled model in this checkout")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "v.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_verify.py"), "--prompts", "1", "--k", "2",
                           "--images", "2", "--steps", "2", "--threads", "1", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("real renders, colour question", "real renders, true claim", "real renders, other shape claim", "samples on the latent, own prompt: right",
                "samples on the image, own prompt: wrong", "wrong samples (latent): the drawn claim",
                "samples on the image, P(asked colour) x P(asked shape): right", "# colour+shape: first sample"):
        assert row in done.stdout, done.stdout
    record = json.loads(out.read_text())
    values = [v for vs in record["real"].values() for v in vs]
    values += [s[k] for s in record["samples"] for k in ("latent", "image", "latent_drawn", "qa", "qa_image") if k in s]
    assert len(record["samples"]) == 2 and len(record["real"]["true"]) == 2
    assert values and all(0.0 <= v <= 1.0 for v in values)
