"""The floors of the code base hold: the import-linter contracts in pyproject.toml, run with the suite."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_contract_is_kept():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    assert layers[0] == "scale_rae_cli" and layers[-1] == "scale_rae_core.errors"
    assert {c["type"] for c in contracts} >= {"layers", "independence", "acyclic_siblings"}
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and f"Contracts: {len(contracts)} kept, 0 broken." in out.stdout, out.stdout + out.stderr
