"""CLI conventions: --help with an example everywhere, one-line errors, fast startup, env, profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from scale_rae_cli.main import app

runner = CliRunner()


def _all_commands():
    root = get_command(app)
    out = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out.append(path)

    walk(root, [])
    return out


def test_expected_commands_are_registered():
    names = {" ".join(p) for p in _all_commands()}
    assert {"profiles list", "profiles show", "env", "tpu clear"} <= names


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help_with_an_example(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, scale_rae_cli.main; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scale_rae_cli.main", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 3.0  # generous for a loaded CI box; typically ~0.3 s


def test_user_error_is_one_line_and_exit_1():
    result = runner.invoke(app, ["profiles", "show", "nope"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: unknown profile 'nope'; choose one of: gpu-1, gpu-8, tiny-cpu, v4-256, v5e-8, v5p-128 (or give a path to a .toml file)"]


def test_debug_mode_shows_the_traceback():
    env = {**os.environ, "SRAE_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "scale_rae_cli.main", "profiles", "show", "nope"], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_profiles_list_and_show_resolved_values(monkeypatch):
    result = runner.invoke(app, ["profiles", "list"])
    assert result.exit_code == 0
    for name in ("tiny-cpu", "gpu-1", "gpu-8", "v4-256", "v5p-128", "v5e-8"):
        assert name in result.output
    monkeypatch.setenv("SRAE_STAGE1__HEAD_LR", "7e-4")
    result = runner.invoke(app, ["profiles", "show", "v4-256", "--set", "stage1.lr=1e-4", "--json"])
    data = json.loads(result.output)
    assert data["stage1"]["lr"] == 1e-4 and data["stage1"]["head_lr"] == 7e-4
    assert data["backend"]["kind"] == "xla" and data["source"].endswith("v4-256.toml")
    text = runner.invoke(app, ["profiles", "show", "tiny-cpu"]).output
    assert "[backend.mesh]" in text and 'kind = "cpu"' in text


def test_bad_override_on_the_command_line():
    result = runner.invoke(app, ["profiles", "show", "tiny-cpu", "--set", "stage1.global_batch_size=33"])
    assert result.exit_code == 1
    assert "stage1.global_batch_size: 33 does not divide evenly" in result.output


def test_env_reports_versions_devices_and_profile():
    result = runner.invoke(app, ["env", "--profile", "gpu-8"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    import torch

    assert info["torch"] == torch.__version__
    assert info["torch_xla"] is None or isinstance(info["torch_xla"], str)
    assert info["profile"]["backend"]["procs_per_node"] == 8
    assert "cuda_devices" in info and "transformers" in info
