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


def _number_options():
    """(command path, flag, kind) for every int and float option of every command, hidden ones too."""
    from typer.core import TyperOption

    out = []
    for path in _all_commands():
        command = get_command(app)
        for name in path:
            command = command.commands[name]
        for param in command.params:
            kind = {int: "int", float: "float"}.get(param.type_descriptor.annotation)
            if isinstance(param, TyperOption) and kind:
                out.append((path, param.opts[0], kind))
    return out


NUMBER_OPTIONS = _number_options()


def test_number_options_are_found():
    flags = {(" ".join(p), f) for p, f, _ in NUMBER_OPTIONS}
    assert {("generate", "--seed"), ("generate", "--guidance"), ("demo", "--bench-k"), ("data synth", "--heldout")} <= flags


@pytest.mark.parametrize("path, flag, kind", NUMBER_OPTIONS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_number_option_refuses_what_torch_cannot_take_in_one_line(path, flag, kind):
    bad = {"int": ["99999999999999999999", "-99999999999999999999"], "float": ["nan", "inf", "-inf"]}[kind]
    reason = {"int": "does not fit in 64 bits", "float": "is not a finite number"}[kind]
    for value in bad:
        result = runner.invoke(app, [*path, flag, value])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: Invalid value for '{flag}'"), lines[0]
        if value != "-99999999999999999999":  # an option with its own minimum (verify --keep) names that instead
            assert f"{value} {reason}" in lines[0], lines[0]


def test_every_option_is_declared_one_way():
    """Annotated[T, typer.Option(...)] everywhere: no `x: T = typer.Option(...)` defaults left."""
    import inspect

    from typer.models import ParameterInfo

    root = get_command(app)
    for path in _all_commands():
        command = root
        for name in path:
            command = command.commands[name]
        for parameter in inspect.signature(command.callback).parameters.values():
            assert not isinstance(parameter.default, ParameterInfo), (path, parameter.name)


def test_help_prints_brackets_as_written():
    """Rich markup would eat "[model]" or "[stageN]"; help texts print as written."""
    import re

    assert "[model]" in runner.invoke(app, ["train", "--help"]).output  # the decoder command's summary
    assert "[stageN].steps" in runner.invoke(app, ["train", "stage1", "--help"]).output
    root = get_command(app)
    for path in _all_commands():
        command = root
        for name in path:
            command = command.commands[name]
        texts = [command.help or "", command.epilog or "", *(getattr(p, "help", None) or "" for p in command.params)]
        output = runner.invoke(app, [*path, "--help"]).output
        for token in re.findall(r"\[[^\]\s]+\]", " ".join(texts)):
            assert token.replace("\\", "") in output, (path, token)
