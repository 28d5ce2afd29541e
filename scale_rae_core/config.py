"""Profiles: one TOML file chooses the backend, precision, process layout, model sizes, data, optimisation,
checkpointing and output of every srae command.

A profile is validated into typed sections; each component later receives only its own section.
Precedence, highest first::

    --set key.sub=value   >   SRAE_KEY__SUB=value (environment)   >   profile file   >   defaults

``--profile NAME`` resolves ``NAME.toml`` among the shipped profiles (inside the installed package, so it works
from a wheel too) or takes a path. Unknown keys, wrong types and impossible combinations fail at load with one
line naming the file, the key and the fix (`ConfigError`). Checks that depend on this machine (is torch_xla
installed, is there a GPU) run only when a command is about to use the profile: `Profile.check_runtime()`.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

from scale_rae_core.errors import BackendError, ConfigError

DEFAULT_PROFILE = "tiny-cpu"
ENV_PREFIX = "SRAE_"
ENV_DELIMITER = "__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- sections


class RunSettings(_Section):
    name: str = "srae"  # run name: default folder name under out_dir and label in logs
    seed: int = 0  # global seed (python, numpy, torch; per-rank offsets are derived from it)
    out_dir: str = "runs"  # where runs, exports and samples go unless a command's --out says otherwise


class MeshSettings(_Section):
    fsdp: int = -1  # devices along the parameter/data-sharding axis; -1 = all devices not used by tp
    tp: int = 1  # tensor-parallel axis (1 = pure FSDP, as in the reference recipes)


class BackendSettings(_Section):
    kind: Literal["cpu", "cuda", "xla"] = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"  # compute dtype under autocast; master weights stay fp32
    # Inference only (generate, understand, latent, scale: --dtype): the dtype weights are loaded and held in.
    # "auto" = precision. Training is unaffected (its master weights stay fp32).
    weights_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    nodes: int = Field(1, ge=1)  # machines (cpu/cuda: torchrun --nnodes) or TPU hosts (xla)
    procs_per_node: int = Field(1, ge=1)  # cpu/cuda: torchrun --nproc-per-node
    devices_per_node: int = Field(1, ge=1)  # xla: chips per host (one PJRT device each)
    mesh: MeshSettings = MeshSettings()  # xla SPMD mesh; its product must equal the device count
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # torch.distributed backend (auto: nccl on cuda)
    compile: bool = False  # torch.compile the trained networks
    gradient_checkpointing: bool = False  # recompute activations per decoder layer / DiT block
    launch: str = ""  # documentation: the command line that starts this profile on its machines

    # Layout. Three counts that differ on a TPU slice and must not be confused:
    #   num_processes       host processes; each loads its own share of the data (torch.distributed's world size)
    #   num_devices         accelerators the run spans (cpu/cuda: one per process; xla: every chip of the slice)
    #   data_parallel_size  ways each micro-step's batch is split (num_devices // mesh.tp)
    @property
    def num_processes(self) -> int:
        """Host processes: torchrun's nodes × procs_per_node on cpu/cuda; one per TPU host on xla."""
        return self.nodes * self.procs_per_node

    @property
    def num_devices(self) -> int:
        """Accelerators in the run: one per process on cpu/cuda, nodes × devices_per_node chips on xla."""
        if self.kind == "xla":
            return self.nodes * self.devices_per_node
        return self.num_processes

    @property
    def data_parallel_size(self) -> int:
        """How many ways each micro-step's batch is split (devices on the data/FSDP axis)."""
        if self.kind == "xla":
            return self.num_devices // self.mesh.tp
        return self.num_devices


class EncoderSettings(_Section):
    kind: Literal["siglip", "siglip2", "dinov2-reg", "webssl-dino", "mae", "efficientnet-lite0"] = "siglip2"
    path: str = "google/siglip2-so400m-patch14-224"  # HF repo id or local dir; "tiny-random" builds a seeded tiny one
    input_size: int | None = None  # square input side in pixels; None = the encoder's own
    select_layer: int = -1  # SigLIP, EfficientNet: hidden state taken (-1 last block, -2 the one before; reference mm_vision_select_layer)


class DecoderSettings(_Section):
    preset: Literal["tiny", "B", "L", "XL"] = "XL"
    path: str = ""  # a trained decoder (ours, or a released one such as nyu-visionx/siglip2_decoder); "" = none
    patch_size: int = Field(14, ge=1)  # output pixels per latent token side
    image_size: int = Field(224, ge=8)  # reconstructed image side = patch_size × latent grid side


class LLMSettings(_Section):
    path: str = "Qwen/Qwen2.5-1.5B-Instruct"  # pretrained LLM (HF id or dir); "" = random from preset
    preset: Literal["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"] = "qwen2.5-1.5b"


class DiTSettings(_Section):
    preset: str = "2.4B"  # size preset of the LightningDiT head (see scale_rae_core.models.dit.DIT_PRESETS)
    class_dropout_prob: float = Field(0.1, ge=0.0, le=1.0)  # condition dropout to the learned null (for CFG)
    shift_base_dim: int = Field(4096, ge=1)  # s = sqrt(tokens × channels / shift_base_dim)


class ModelSettings(_Section):
    encoder: EncoderSettings = EncoderSettings()
    decoder: DecoderSettings = DecoderSettings()
    llm: LLMSettings = LLMSettings()
    dit: DiTSettings = DiTSettings()
    stats: str = ""  # latent statistics file (srae stat); "" = no latent normalisation


class DataSettings(_Section):
    train: str = ""  # a packed dir / wds_manifest.json, or a reference JSONL ("" = give --data)
    eval: str = ""  # held-out data in the same forms
    image_folder: str = ""  # root for relative image paths in a JSONL ("" = the JSONL's folder)
    num_workers: int = Field(0, ge=0)  # DataLoader workers per process
    shuffle_buffer: int = Field(1000, ge=0)  # samples held for shuffling by the streaming reader


class StageSettings(_Section):
    """Optimisation of the unified model (stage 1 pretraining or stage 2 finetuning)."""

    lr: float = Field(5.65e-5, gt=0)  # LLM, projector and latent queries
    head_lr: float = Field(5.65e-4, gt=0)  # diffusion head and its condition projector
    betas: tuple[float, float] = (0.9, 0.999)
    head_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0134, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a fraction of the peak lr
    steps: int = Field(1000, ge=1)  # optimiser steps
    global_batch_size: int = Field(128, ge=1)  # samples per optimiser step, all processes together
    micro_batch_size: int = Field(128, ge=1)  # samples per forward on one data-parallel rank
    seq_len: int = Field(512, ge=8)  # every sample is padded to exactly this many tokens (static shapes)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 = off
    flow_weight: float = Field(2.0, ge=0)  # total loss = CE + flow_weight × flow loss
    flow_repeats: int = Field(1, ge=1)  # flow samples (time, noise) per answer image; the LLM runs once
    words_weight: float = Field(0.0, ge=0)  # + words_weight × prompt-words loss at the latent queries (0 = reference)


class DecoderTrainSettings(_Section):
    """RAE decoder training (L1 + LPIPS + GAN), after the RAE recipe."""

    lr: float = Field(2e-4, gt=0)
    disc_lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: float = Field(16, gt=0)
    steps: int = Field(0, ge=0)  # optimiser steps; 0 = derive from epochs
    warmup_epochs: float = Field(1, ge=0)
    min_lr: float = Field(2e-5, ge=0)
    global_batch_size: int = Field(512, ge=1)  # images per optimiser step, all processes together
    micro_batch_size: int = Field(64, ge=1)  # images per forward on one data-parallel rank
    image_size: int = Field(224, ge=8)
    ema_decay: float = Field(0.9978, ge=0, lt=1)
    noise_tau: float = Field(0.8, ge=0)  # encoder-noise augmentation strength
    l1_weight: float = Field(1.0, ge=0)
    lpips_weight: float = Field(1.0, ge=0)
    gan_weight: float = Field(0.75, ge=0)
    max_d_weight: float = Field(1e4, gt=0)
    disc_update_start_epoch: float = Field(6, ge=0)
    gan_start_epoch: float = Field(8, ge=0)
    grad_clip: float = Field(0.0, ge=0)
    lpips_weights: str = ""  # path to VGG16 + LPIPS lin weights (needed when lpips_weight > 0)
    disc_backbone: str = ""  # DINO ViT-S/8 weights, HF id or path (needed when gan_weight > 0)


class DiTTrainSettings(_Section):
    """Class-conditional DiT training on RAE latents (RAE stage 2, rae.md §7): flow matching, EMA, AdamW."""

    preset: str = "DiTDH-XL"  # a size of scale_rae_core.models.class_dit.CLASS_DIT_PRESETS
    num_classes: int = Field(1000, ge=1)  # labels 0..num_classes-1 (+ the null class for CFG)
    class_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)  # per-sample label drop to the null class
    lr: float = Field(2e-4, gt=0)  # peak AdamW learning rate
    min_lr: float = Field(2e-5, ge=0)  # the rate the linear decay reaches at decay_end_epoch, kept after it
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)  # linear warmup from lr/W (0 = none, RAE: none)
    constant_epochs: float = Field(40, ge=0)  # then the peak lr until here (RAE: 40)
    decay_end_epoch: float = Field(800, ge=0)  # then linear decay to min_lr at this epoch (RAE: 800)
    epochs: float = Field(800, gt=0)  # passes over the data (ignored when steps is set)
    steps: int = Field(0, ge=0)  # optimiser steps; 0 = derive from epochs
    global_batch_size: int = Field(1024, ge=1)  # images per optimiser step, all processes together
    micro_batch_size: int = Field(64, ge=1)  # images per forward on one data-parallel rank
    image_size: int = Field(256, ge=8)  # training crop side (the encoder resizes to its own input size)
    hflip: bool = True  # random horizontal flips (RAE: yes)
    ema_decay: float = Field(0.9995, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 = off
    logit_mean: float = 0.0  # training times t = sigmoid(N(logit_mean, logit_std²)), then the dimension shift
    logit_std: float = Field(1.0, gt=0)
    shift_base_dim: int = Field(4096, ge=1)  # s = sqrt(tokens × channels / shift_base_dim)
    # The latent space (an RAE: encoder + decoder + statistics). Absent: the profile's [model] ones.
    encoder: EncoderSettings | None = None  # the frozen encoder whose tokens the DiT learns
    decoder: str | None = None  # the pixel decoder of those tokens, recorded in the model folder for srae sample
    stats: str | None = None  # latent statistics of that encoder (srae stat, or RAE's stat.pt); "" = none


class CheckpointSettings(_Section):
    every_steps: int = Field(1000, ge=1)
    keep: int = Field(2, ge=1)  # newest checkpoints kept; older ones are deleted after a good save
    export: bool = True  # write a self-contained model directory at the end of training


class OutputSettings(_Section):
    log_every: int = Field(10, ge=1)  # steps between metric records
    # steps between held-out evaluations (the task's evaluate(), e.g. stage 1/2's data.eval metrics), each added
    # to that step's metrics record; 0 = at every record. The run's last step is always evaluated.
    eval_every: int = Field(0, ge=0)
    progress: bool = True  # rich progress bars (--quiet turns them off)
    events_file: str = "events.jsonl"  # machine-readable log inside the run dir
    # Training metrics (every metrics.jsonl record) also go to: none | tensorboard (RUN/tensorboard/, extra
    # srae[tensorboard]) | wandb (extra srae[wandb]; WANDB_MODE=offline logs without a network).
    tracker: Literal["none", "tensorboard", "wandb"] = "none"


# --------------------------------------------------------------------------------------------- batch plan

TRAINING_SECTIONS = ("stage1", "stage2", "decoder_training", "dit_training")  # the profile sections that carry a batch plan


@dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step's ``global_batch_size`` samples are split, computed in one place.

    ``micro_batch_size`` is per data-parallel device and micro-step; ``data_parallel_size`` devices share a
    micro-step (processes on cpu/cuda, chips / tp on xla), and ``num_processes`` host processes load the
    data (on xla one process feeds all of its host's chips). So one process loads
    ``per_process_micro_batch = micro_batch_size × data_parallel_size / num_processes`` samples per
    micro-step, and ``accum_steps = global_batch_size / (micro_batch_size × data_parallel_size)`` micro-steps
    make one optimiser step: ``samples_per_step`` is then exactly ``global_batch_size``.

    v4-256's decoder: 2048 global, 16 per chip, 128 chips, 32 hosts → 64 per host per micro-step, 1 micro-step.
    """

    section: str  # the profile section it came from ('stage1', ...): errors name its keys
    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    num_processes: int

    @classmethod
    def of(cls, section: str, settings: StageSettings | DecoderTrainSettings | DiTTrainSettings,
           layout: BackendSettings) -> BatchPlan:
        return cls(section, settings.global_batch_size, settings.micro_batch_size, layout.data_parallel_size,
                   layout.num_processes)

    def problem(self) -> tuple[str, str] | None:
        """(profile key, message) when the numbers do not split evenly; None when they do."""
        per_micro_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_micro_step:
            return (
                f"{self.section}.global_batch_size",
                f"{self.global_batch_size} does not divide evenly into micro_batch_size {self.micro_batch_size} × "
                f"{self.data_parallel_size} data-parallel ranks; use a multiple of {per_micro_step}",
            )
        if per_micro_step % self.num_processes:
            return (
                f"{self.section}.micro_batch_size",
                f"micro_batch_size {self.micro_batch_size} × {self.data_parallel_size} data-parallel devices does "
                f"not split evenly over {self.num_processes} host processes; use a micro_batch_size that does",
            )
        return None

    @property
    def accum_steps(self) -> int:
        """Micro-steps (forward + backward, gradients accumulated) per optimiser step."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def per_process_micro_batch(self) -> int:
        """Samples one process loads per micro-step (sharded over its devices on xla)."""
        return self.micro_batch_size * self.data_parallel_size // self.num_processes

    @property
    def samples_per_step(self) -> int:
        """Samples all processes together consume per optimiser step (equals ``global_batch_size``)."""
        return self.per_process_micro_batch * self.num_processes * self.accum_steps

    def as_dict(self) -> dict[str, int]:
        """The numbers a run reports in its start event."""
        return {"global_batch_size": self.global_batch_size, "micro_batch_size": self.micro_batch_size,
                "data_parallel_size": self.data_parallel_size, "num_processes": self.num_processes,
                "per_process_micro_batch": self.per_process_micro_batch, "accum_steps": self.accum_steps}


# --------------------------------------------------------------------------------------------- profile

_PROFILE_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("srae_profile_file", default=None)


class Profile(BaseSettings):
    """The resolved settings of one run; trainers, inference and backends take this, components a section."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        nested_model_default_partial_update=True,
        validate_assignment=True,
    )

    _source: str = PrivateAttr("<defaults>")

    run: RunSettings = RunSettings()
    backend: BackendSettings = BackendSettings()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    decoder_training: DecoderTrainSettings = DecoderTrainSettings()
    dit_training: DiTTrainSettings = DiTTrainSettings()
    stage1: StageSettings = StageSettings()
    stage2: StageSettings = StageSettings(
        lr=5.66e-5, head_lr=5.66e-4, warmup_ratio=0.03, seq_len=1024
    )
    checkpoint: CheckpointSettings = CheckpointSettings()
    output: OutputSettings = OutputSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources = [init_settings, env_settings]
        path = _PROFILE_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _check_combinations(self) -> Profile:
        b = self.backend
        if b.kind == "xla":
            devices = b.num_devices
            fsdp = b.mesh.fsdp if b.mesh.fsdp != -1 else devices // b.mesh.tp
            if b.mesh.fsdp < -1 or b.mesh.fsdp == 0 or fsdp * b.mesh.tp != devices:
                raise _Combination(
                    "backend.mesh",
                    f"mesh fsdp={b.mesh.fsdp} × tp={b.mesh.tp} does not divide the {devices} devices "
                    f"(nodes {b.nodes} × devices_per_node {b.devices_per_node}); set mesh.fsdp = -1 or a product equal to {devices}",
                )
            if b.procs_per_node != 1:
                raise _Combination(
                    "backend.procs_per_node",
                    f"xla runs one SPMD process per TPU host (got {b.procs_per_node}); set procs_per_node = 1",
                )
        elif b.kind == "cpu" and b.dist_backend == "nccl":
            raise _Combination("backend.dist_backend", "nccl needs backend.kind = 'cuda'; use 'gloo' or 'auto' on cpu")
        for name in TRAINING_SECTIONS:
            problem = BatchPlan.of(name, getattr(self, name), b).problem()
            if problem is not None:
                raise _Combination(*problem)
        return self

    # ---------------------------------------------------------------------------- derived values
    @property
    def inference_dtype(self) -> str:
        """The dtype inference holds weights in: ``backend.weights_dtype``, or ``backend.precision`` for auto."""
        b = self.backend
        return b.precision if b.weights_dtype == "auto" else b.weights_dtype

    def batch_plan(self, section: str) -> BatchPlan:
        """The :class:`BatchPlan` of a training section (one of ``TRAINING_SECTIONS``) for this
        profile's process layout; ConfigError naming the key when it does not split evenly (a layout changed
        after loading is checked here)."""
        plan = BatchPlan.of(section, getattr(self, section), self.backend)
        problem = plan.problem()
        if problem is not None:
            raise ConfigError(f"{self.source}: {problem[0]}: {problem[1]}")
        return plan

    @property
    def source(self) -> str:
        """The profile file this was loaded from ('<defaults>' if none)."""
        return self._source

    def check_runtime(self) -> None:
        """Checks that need this machine: run them before a command uses the backend."""
        kind = self.backend.kind
        where = f"{self.source}: backend.kind = '{kind}'"
        if kind == "xla" and importlib.util.find_spec("torch_xla") is None:
            raise ConfigError(
                f"{where} needs torch_xla, which is not installed here; install the extra with "
                "pip install 'srae[tpu]' on a TPU VM, or choose a cpu/cuda profile"
            )
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BackendError(f"{where} but no CUDA device is visible; use --profile tiny-cpu or check CUDA_VISIBLE_DEVICES")
        if kind in ("cpu", "cuda"):
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world != self.backend.num_processes:
                raise BackendError(
                    f"{self.source}: the profile expects {self.backend.num_processes} processes "
                    f"(backend.nodes × backend.procs_per_node) but WORLD_SIZE is {world}; launch with "
                    f"torchrun --nproc-per-node {self.backend.procs_per_node} or --set backend.procs_per_node={world}"
                )

    def to_toml_dict(self) -> dict[str, Any]:
        """Resolved values as plain data (what `srae profiles show` prints and checkpoints record)."""
        return self.model_dump(mode="json")


class _Combination(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


# --------------------------------------------------------------------------------------------- loading


def shipped_profiles_dir() -> Path:
    return Path(str(resources.files("scale_rae_core") / "profiles"))


def list_profiles() -> list[str]:
    return sorted(p.stem for p in shipped_profiles_dir().glob("*.toml"))


def resolve_profile_path(name_or_path: str | os.PathLike | None) -> Path:
    """A shipped profile name (``tiny-cpu``) or a path to a TOML file."""
    if name_or_path is None:
        name_or_path = os.environ.get("SRAE_PROFILE", DEFAULT_PROFILE)
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.suffix == ".toml" or os.sep in text or candidate.exists():
        if candidate.is_dir():
            raise ConfigError(f"profile {candidate} is a folder; pass a TOML file or a shipped name ({', '.join(list_profiles())})")
        if not candidate.is_file():
            raise ConfigError(f"profile file {candidate} does not exist; pass a shipped name ({', '.join(list_profiles())}) or a TOML path")
        return candidate
    shipped = shipped_profiles_dir() / f"{text}.toml"
    if not shipped.is_file():
        raise ConfigError(f"unknown profile '{text}'; choose one of: {', '.join(list_profiles())} (or give a path to a .toml file)")
    return shipped


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["stage1.lr=1e-4", "backend.kind=cpu"]`` → nested dict; values are read as TOML literals, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set '{item}' is not key.sub=value; write e.g. --set stage1.lr=1e-4")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}' conflicts with another --set for '{part}'")
        node[parts[-1]] = value
    return out


def _has_key(tree: Mapping[str, Any], loc: Sequence[str]) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _env_keys(environ: Mapping[str, str]) -> dict[str, str]:
    """Nested dotted key → the environment variable that sets it."""
    keys = {}
    for name in environ:
        if name.upper().startswith(ENV_PREFIX):
            rest = name[len(ENV_PREFIX):]
            keys[".".join(p.lower() for p in rest.split(ENV_DELIMITER))] = name
    return keys


def _section_keys(loc: Sequence[str]) -> list[str]:
    """Known keys of the section that contains `loc` (for 'did you mean' lists)."""
    model: Any = Profile
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _origin(loc: Sequence[str], path: Path, file_data: Mapping[str, Any], set_data: Mapping[str, Any], env: Mapping[str, str]) -> str:
    dotted = ".".join(loc)
    if _has_key(set_data, loc):
        return f"--set {dotted}"
    env_names = _env_keys(env)
    for i in range(len(loc), 0, -1):
        name = env_names.get(".".join(loc[:i]))
        if name:
            return f"environment variable {name}"
    return f"{path}: key '{dotted}'" if _has_key(file_data, loc) else f"{path}: '{dotted}'"


def _translate(err: ValidationError, path: Path, file_data, set_data, env) -> ConfigError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    where = _origin(loc, path, file_data, set_data, env)
    kind = first["type"]
    if kind == "extra_forbidden":
        known = _section_keys(loc)
        section = ".".join(loc[:-1]) or "top level"
        hint = f"known keys in [{section}]: {', '.join(known)}" if known else "remove it"
        return ConfigError(f"{where}: unknown key '{loc[-1]}'; {hint}")
    if kind == "value_error" and isinstance(first.get("ctx", {}).get("error"), _Combination):
        combo = first["ctx"]["error"]
        return ConfigError(f"{path}: {combo.key}: {combo.message}")
    got = first.get("input")
    got_txt = f" (got {got!r})" if not isinstance(got, dict) else ""
    return ConfigError(f"{where}: {first['msg'].lower()}{got_txt}; fix the value in the profile or pass --set {'.'.join(loc)}=...")


def load_profile(name_or_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Profile:
    """Resolve, read and validate a profile with `--set` overrides and SRAE_* environment variables."""
    path = resolve_profile_path(name_or_path)
    try:
        file_data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass a TOML profile") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); pass a readable TOML profile") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    set_data = parse_overrides(overrides)
    token = _PROFILE_FILE.set(path)
    try:
        profile = Profile(**set_data)
    except ValidationError as err:
        raise _translate(err, path, file_data, set_data, os.environ) from None
    finally:
        _PROFILE_FILE.reset(token)
    profile._source = str(path)
    return profile
