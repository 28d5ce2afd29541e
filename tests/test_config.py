"""Profiles: every shipped profile loads; precedence; strict keys; impossible combinations fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scale_rae_core.config import (
    TRAINING_SECTIONS,
    BatchPlan,
    Profile,
    list_profiles,
    load_profile,
    parse_overrides,
    resolve_profile_path,
    shipped_profiles_dir,
)
from scale_rae_core.errors import BackendError, ConfigError

SHIPPED = ["gpu-1", "gpu-8", "tiny-cpu", "v4-256", "v5e-8", "v5p-128"]


def test_the_expected_profiles_ship():
    assert set(SHIPPED) <= set(list_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_is_consistent(name):
    p = load_profile(name)
    assert p.run.name == name.replace("tiny-cpu", "tiny")
    if p.backend.kind == "xla":
        assert p.backend.num_devices == p.backend.nodes * p.backend.devices_per_node
        assert p.backend.num_processes == p.backend.nodes and p.backend.procs_per_node == 1


@pytest.mark.parametrize("section", TRAINING_SECTIONS)
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_batch_plan_consumes_exactly_the_global_batch(name, section):
    """For the profile's real layout (TPU: hosts × chips, one loading process per host; cpu/cuda: torchrun
    processes), count what one optimiser step loads: every process, every micro-step."""
    p = load_profile(name)
    b, s = p.backend, getattr(p, section)
    plan = p.batch_plan(section)
    if b.kind == "xla":
        hosts, chips = b.nodes, b.nodes * b.devices_per_node
        assert (plan.num_processes, plan.data_parallel_size) == (hosts, chips // b.mesh.tp)
    else:
        assert plan.num_processes == plan.data_parallel_size == b.nodes * b.procs_per_node
    loaded = [plan.per_process_micro_batch for _process in range(plan.num_processes) for _micro in range(plan.accum_steps)]
    assert sum(loaded) == plan.samples_per_step == s.global_batch_size
    # each data-parallel device gets micro_batch_size samples of every micro-step
    assert plan.per_process_micro_batch * plan.num_processes == s.micro_batch_size * plan.data_parallel_size


def test_v4_256_decoder_plan_is_the_configured_batch_not_four_times_it():
    """Issue #13: 2048 global, 16 per chip, 128 chips on 32 hosts: each host loads 64 per micro-step and one
    micro-step makes the step (the old arithmetic accumulated 2048 / (16 × 32) = 4 of them: 8192 samples)."""
    plan = load_profile("v4-256").batch_plan("decoder_training")
    assert (plan.num_processes, plan.data_parallel_size, plan.per_process_micro_batch, plan.accum_steps) == (32, 128, 64, 1)
    assert plan.samples_per_step == 2048


def test_batch_plan_of_a_layout_changed_after_loading_names_the_key():
    p = load_profile("tiny-cpu", ["stage1.global_batch_size=32", "stage1.micro_batch_size=8"])
    p.backend.procs_per_node = 3
    with pytest.raises(ConfigError, match=r"tiny-cpu.toml: stage1.global_batch_size: 32 does not divide evenly into "
                                          r"micro_batch_size 8 × 3 data-parallel ranks; use a multiple of 24"):
        p.batch_plan("stage1")


def test_batch_plan_that_cannot_split_over_hosts_names_micro_batch_size():
    """tp spanning hosts: 2 hosts × 2 chips with tp = 4 leaves 1 data-parallel device for 2 loading hosts."""
    plan = BatchPlan(section="stage1", global_batch_size=6, micro_batch_size=3, data_parallel_size=1, num_processes=2)
    assert plan.problem() == (
        "stage1.micro_batch_size",
        "micro_batch_size 3 × 1 data-parallel devices does not split evenly over 2 host processes; "
        "use a micro_batch_size that does",
    )
    f_ok = BatchPlan(section="stage1", global_batch_size=8, micro_batch_size=2, data_parallel_size=1, num_processes=2)
    assert f_ok.problem() is None and (f_ok.per_process_micro_batch, f_ok.accum_steps, f_ok.samples_per_step) == (1, 4, 8)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_key_in_shipped_profiles_is_commented(name):
    lines = resolve_profile_path(name).read_text().splitlines()
    assert lines[0].startswith("# "), "each profile opens with a comment saying what it is for"
    keys = [line for line in lines if "=" in line.split("#")[0] and not line.startswith("#")]
    assert keys and all("#" in line for line in keys), [line for line in keys if "#" not in line]


def test_tpu_profiles_record_the_reference_batch_arithmetic():
    v4 = load_profile("v4-256")
    assert (v4.backend.nodes, v4.backend.devices_per_node, v4.backend.num_devices, v4.backend.num_processes) == (32, 4, 128, 32)
    assert v4.stage1.global_batch_size == 128 * v4.backend.nodes  # 128 per host, as the reference
    assert v4.stage1.micro_batch_size == 32 and v4.stage1.seq_len == 512 and v4.stage2.seq_len == 1024
    assert (v4.stage1.lr, v4.stage1.head_lr, v4.stage1.head_betas) == (5.65e-5, 5.65e-4, (0.9, 0.95))
    v5p = load_profile("v5p-128")
    assert v5p.stage1.global_batch_size == 128 * v5p.backend.nodes == 2048
    assert "gcloud compute tpus tpu-vm ssh" in v4.backend.launch and "--worker=all" in v4.backend.launch


def test_precedence_set_beats_env_beats_file_beats_default(tmp_path, monkeypatch):
    f = tmp_path / "p.toml"
    f.write_text("[stage1]\nlr = 1e-3\nhead_lr = 2e-3\nwarmup_ratio = 0.2\n")
    monkeypatch.setenv("SRAE_STAGE1__LR", "3e-3")
    monkeypatch.setenv("SRAE_STAGE1__HEAD_LR", "4e-3")
    p = load_profile(f, ["stage1.lr=5e-3"])
    assert p.stage1.lr == 5e-3  # --set
    assert p.stage1.head_lr == 4e-3  # env
    assert p.stage1.warmup_ratio == 0.2  # file
    assert p.stage1.seq_len == Profile().stage1.seq_len  # default
    assert p.source == str(f)


def test_env_profile_selects_the_default(monkeypatch):
    monkeypatch.setenv("SRAE_PROFILE", "gpu-1")
    assert load_profile().backend.kind == "cuda"


def test_profile_by_path_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown profile 'nope'; choose one of: .*tiny-cpu"):
        load_profile("nope")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[run]\nnme = 'x'\n", r"p.toml: key 'run.nme': unknown key 'nme'; known keys in \[run\]: name, out_dir, seed"),
        ("[bogus]\nx = 1\n", r"unknown key 'bogus'"),
        ("[stage1]\nlr = 'fast'\n", r"key 'stage1.lr': input should be a valid number.*got 'fast'"),
        ("[backend]\nkind = 'tpu'\n", r"key 'backend.kind': input should be 'cpu', 'cuda' or 'xla'"),
        ("[stage1]\nglobal_batch_size = 10\nmicro_batch_size = 4\n", r"stage1.global_batch_size: 10 does not divide evenly.*use a multiple of 4"),
        (
            "[backend]\nkind = 'xla'\nnodes = 2\ndevices_per_node = 4\n[backend.mesh]\nfsdp = 3\n",
            r"backend.mesh: mesh fsdp=3 × tp=1 does not divide the 8 devices",
        ),
        ("[backend]\nkind = 'cpu'\ndist_backend = 'nccl'\n", r"nccl needs backend.kind = 'cuda'"),
        ("[backend]\nkind = 'xla'\nprocs_per_node = 4\n", r"backend.procs_per_node: xla runs one SPMD process per TPU host"),
        ("[stage1\nlr = 1\n", r"not valid TOML"),
        ("[stage1]\nwords_weight = -1\n", r"key 'stage1.words_weight': input should be greater than or equal to 0"),
    ],
)
def test_bad_profiles_fail_in_one_line_naming_file_and_key(tmp_path, toml, message):
    f = tmp_path / "p.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message) as err:
        load_profile(f)
    assert "\n" not in str(err.value) and str(f) in str(err.value)


def test_global_batch_must_divide_across_processes(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[backend]\nprocs_per_node = 3\n[stage1]\nglobal_batch_size = 32\nmicro_batch_size = 8\n")
    with pytest.raises(ConfigError, match=r"8 × 3 data-parallel ranks; use a multiple of 24"):
        load_profile(f)


def test_errors_name_the_override_or_variable_that_caused_them(tmp_path, monkeypatch):
    f = tmp_path / "p.toml"
    f.write_text("")
    with pytest.raises(ConfigError, match=r"^--set stage1.nope: unknown key 'nope'"):
        load_profile(f, ["stage1.nope=1"])
    monkeypatch.setenv("SRAE_STAGE1__LR", "abc")
    with pytest.raises(ConfigError, match=r"^environment variable SRAE_STAGE1__LR: input should be a valid number"):
        load_profile(f)


def test_parse_overrides_reads_toml_literals():
    assert parse_overrides(["a.b=1", "a.c=[0.9, 0.95]", "d=bf16", "e='x y'", "f=true"]) == {
        "a": {"b": 1, "c": [0.9, 0.95]}, "d": "bf16", "e": "x y", "f": True,
    }
    with pytest.raises(ConfigError, match="--set 'nokey' is not key.sub=value"):
        parse_overrides(["nokey"])


def test_xla_needs_torch_xla_at_run_time_not_at_load():
    p = load_profile("v4-256")  # loads and validates without torch_xla
    with pytest.raises(ConfigError, match=r"v4-256.toml: backend.kind = 'xla' needs torch_xla.*pip install 'srae\[tpu\]'"):
        p.check_runtime()


def test_cuda_profile_without_gpu_and_wrong_world_size(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA device is visible"):
            load_profile("gpu-1").check_runtime()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BackendError, match=r"expects 1 processes .* WORLD_SIZE is 2; launch with torchrun --nproc-per-node 1"):
        load_profile("tiny-cpu").check_runtime()


def test_profiles_resolve_from_an_installed_copy(tmp_path):
    """`--profile NAME` must not depend on the checkout: resolve from the package data dir."""
    code = "from scale_rae_core.config import resolve_profile_path as r; print(r('tiny-cpu'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.is_file() and path.parent.name == "profiles" and path.parent.parent.name == "scale_rae_core"


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400"])
def test_non_finite_numbers_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_profile("tiny-cpu", [f"stage1.lr={value}"])
    assert "--set stage1.lr" in str(err.value) and "finite number" in str(err.value)


def test_a_folder_or_a_binary_file_as_profile_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_profile(str(tmp_path))
    binary = tmp_path / "p.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match="not a text file"):
        load_profile(str(binary))


def test_profiles_show_follows_srae_profile(monkeypatch):
    import json

    from typer.testing import CliRunner

    from scale_rae_cli.main import app

    monkeypatch.setenv("SRAE_PROFILE", "gpu-1")
    result = CliRunner().invoke(app, ["profiles", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"].endswith("gpu-1.toml")


@pytest.mark.parametrize("name", ["v4-256", "v5p-128"])
def test_multi_host_launch_lines_pass_master_addr_to_every_worker(name):
    profile = load_profile(name)
    launch = profile.backend.launch
    assert profile.backend.nodes > 1 and "--worker=all" in launch
    assert launch.startswith("MASTER_ADDR=$(gcloud compute tpus tpu-vm describe $TPU_NAME ")
    assert "--command \"MASTER_ADDR=$MASTER_ADDR PJRT_DEVICE=TPU srae train stage1" in launch
    assert "init_method" not in (shipped_profiles_dir() / f"{name}.toml").read_text()
