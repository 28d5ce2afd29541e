"""Packaging: one `srae` entry point, torch range, no torchvision anywhere in the installed dependency tree."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_one_console_script_and_torch_range_admits_both_lanes():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"] == {"srae": "scale_rae_cli.main:run"}
    torch_req = next(r for r in meta["dependencies"] if _name(r) == "torch")
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(torch_req.split("torch", 1)[1])
    assert "2.9.0" in spec and "2.13.0" in spec and "2.14.0" not in spec
    assert all(_name(r) != "torch-xla" for r in meta["dependencies"])
    assert any("torch_xla" in r for r in meta["optional-dependencies"]["tpu"])
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_no_torchvision_in_the_installed_dependency_tree():
    seen, todo = set(), ["srae"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for req in dist.requires or []:
            if "extra ==" in req and "extra == \"test\"" not in req and "extra == \"fid-offline\"" not in req:
                continue  # optional extras of dependencies are not installed
            todo.append(_name(req))
    assert "torch" in seen and "transformers" in seen
    blocked = {"torchvision", "timm", "open-clip-torch", "lpips", "torch-fidelity", "pytorch-fid", "clean-fid", "image-reward"}
    assert not (seen & blocked), seen & blocked


def test_the_bundled_model_is_package_data():
    """Every shipped asset (the shapes model, the tiny tokenizer) matches a package-data glob (so a wheel install
    has it too)."""
    from fnmatch import fnmatch

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["scale_rae_core"]
    package = ROOT / "scale_rae_core"
    files = [p.relative_to(package).as_posix() for p in (package / "assets").rglob("*") if p.is_file()]
    assert "assets/shapes-demo/model.safetensors" in files and "assets/shapes-demo/decoder/config.json" in files
    assert "assets/tiny-tokenizer/tokenizer.json" in files
    assert [f for f in files if not any(fnmatch(f, g) and "/" not in f[len(g.rsplit("/", 1)[0]) + 1:] for g in globs)] == []


def test_the_shapes_scorer_is_an_installed_entry_point():
    """`--scorer shapes` is found through srae's own `srae.scorers` entry point (the scaling engine does not import
    the shapes world)."""
    from scale_rae_core.scale.scorers import available_scorers, build_scorer
    from scale_rae_core.shapes.scorer import ShapesScorer

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["srae.scorers"] == {"shapes": "scale_rae_core.shapes.scorer:ShapesScorer"}
    assert "shapes" in available_scorers() and isinstance(build_scorer("shapes"), ShapesScorer)
