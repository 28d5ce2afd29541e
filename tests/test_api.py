"""The Python API: the README's example runs as written against the bundled model, in a fresh interpreter that
never imports the CLI; ``generate`` returns the images ``srae generate`` writes; ``import scale_rae_core`` stays
cheap."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scale_rae_core.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def readme_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python example"
    return match.group(1)


def test_the_readme_example_runs_against_the_bundled_model_without_the_cli(tmp_path):
    check = "\nimport sys\nassert 'scale_rae_cli' not in sys.modules, 'the API imported the CLI'\nprint('no-cli')\n"
    out = subprocess.run([sys.executable, "-c", readme_example() + check], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[-1] == "no-cli" and lines[-2] == "red"  # the bundled model names the colour it drew
    with Image.open(tmp_path / "red-circle.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_importing_the_package_loads_no_engine():
    code = "import sys, scale_rae_core; assert 'Pipeline' in scale_rae_core.__all__; print(sorted(m for m in ('torch', 'transformers', 'scale_rae_core.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.fixture(scope="module")
def pipe():
    from scale_rae_core import Pipeline

    with Pipeline.from_pretrained() as pipeline:
        yield pipeline


def test_generate_returns_the_images_srae_generate_writes(pipe, tmp_path):
    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    prompts = ["Generate an image of a blue square on the right.", "a green triangle"]
    images = pipe.generate(prompts, n=2, seed=3, steps=4, guidance=2.0)
    res = CliRunner().invoke(app, ["generate", *prompts, "--n", "2", "--seed", "3", "--steps", "4", "--guidance", "2",
                                   "--out", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(images) == len(pngs) == 4
    for image, png in zip(images, pngs, strict=True):  # prompt by prompt, seeds 3 and 4
        with Image.open(png) as written:
            assert np.array_equal(np.asarray(image), np.asarray(written.convert("RGB"))), png.name


def test_understand_takes_a_path_or_an_image_and_bad_inputs_fail_in_one_line(pipe, tmp_path):
    image = pipe.generate("Generate an image of a red circle on the left.", steps=4)[0]
    image.save(tmp_path / "x.png")
    assert pipe.understand(tmp_path / "x.png", "What colour is the shape?") == pipe.understand(image, "What colour is the shape?")
    with pytest.raises(DataError, match=r"image .*missing.png: not found"):
        pipe.understand(tmp_path / "missing.png", "What is it?")
    with pytest.raises(ConfigError, match="one or more non-empty prompt strings"):
        pipe.generate([])
    with pytest.raises(ConfigError, match="--steps 0 is too small"):
        pipe.generate("a red circle", steps=0)
