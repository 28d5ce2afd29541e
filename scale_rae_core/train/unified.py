"""Unified training (stage 1 pretraining, stage 2 finetuning) of the LLM + DiT head, on any backend.

One optimiser step, on every process (the profile section's :class:`~scale_rae_core.config.BatchPlan`)::

    for each of accum_steps micro-steps:
        per_process_micro_batch samples → sequences (skip too long) → frozen encoder (no grad) → batch
        loss = (CE + flow_weight · flow over answer images) / accum_steps ; backward
    clip the global grad norm → AdamW step (two groups) → warmup-cosine lr step

so a step sees exactly ``global_batch_size`` samples over all processes (``micro_batch_size`` per
data-parallel device; under xla SPMD one process per host loads the batch of all its chips).

A fresh stage 1 first folds a per-channel standardisation of the encoder tokens (measured on the first 64
images of the data, the same on every process) into the new projector's first Linear (:func:`standardize_projector`).
The model is built once in fp32 on every process from the same seed, then handed to the backend
(``shard_model``: activation checkpointing and FSDP2 per Qwen2 decoder layer and per DiT block; the encoder
is frozen and replicated). :class:`~scale_rae_core.train.loop.TrainLoop` resumes, logs, checkpoints (model,
optimiser, scheduler, RNG, data position) and exports, so ``resume`` continues exactly where a run stopped,
with the same or a different process count.

Run directory::

    RUN/model/config.json, tokenizer/, latent_stats.safetensors   the architecture (no weights)
    RUN/checkpoints/step-XXXXXXXX/                               resumable checkpoints (newest `keep`)
    RUN/metrics.jsonl                                            one JSON record per logged step
    RUN/profile.json                                             the resolved profile of the last invocation
    RUN/export/                                                  the final model (load_export)

Stage 2 starts from a stage-1 run (its latest checkpoint, else its export) or an export directory; the
architecture, tokenizer, encoder and latent statistics come from there, the optimisation from ``[stage2]``.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale_rae_core.backends import get_backend
from scale_rae_core.backends.base import Backend
from scale_rae_core.config import Profile, StageSettings
from scale_rae_core.errors import CheckpointError, ConfigError, DataError
from scale_rae_core.events import Reporter
from scale_rae_core.models.scale_rae import (
    STATS_FILE,
    WEIGHTS_FILE,
    ScaleRAE,
    ScaleRAEConfig,
    export_tokenizer_dir,
    is_export,
    read_export_config,
    read_export_tensors,
    tokenizer_files,
    write_export,
)
from scale_rae_core.train.checkpoint import CheckpointManager
from scale_rae_core.train.loop import TrainLoop, TrainResult, TrainState, TrainTask
from scale_rae_core.train.schedule import stage_scheduler
from scale_rae_core.train.unified_data import (
    MicroBatcher,
    SampleSource,
    encode_and_collate,
    open_source,
    pil_to_pixels,
)
from scale_rae_core.train.unified_eval import EvalBatches

STAGES = ("stage1", "stage2")
# Profile keys that change a stage's trajectory (compared on --resume, with the stage's own section); stage 2 takes
# its architecture from --from, so only the seed, the precision and the data order settings of the rest matter.
TRAJECTORY = ("run.seed", "backend.precision", "model.encoder", "model.llm", "model.dit", "model.stats",
              "data.image_folder", "data.shuffle_buffer")
STAGE2_TRAJECTORY = ("run.seed", "backend.precision", "data.image_folder", "data.shuffle_buffer")
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
EXPORT_DIR = "export"
__all__ = ["TrainResult", "UnifiedTrainer", "train_unified"]  # TrainResult: the loop's, returned here


# ----------------------------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, stage: StageSettings) -> list[dict[str, Any]]:
    """The reference's two AdamW groups: every parameter whose name contains ``diff_head`` (the DiT and its
    condition projector ``diff_head_projector``) at ``head_lr`` / ``head_betas``, all others at ``lr`` / ``betas``."""
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if "diff_head" in name else rest).append(p)
    common = {"weight_decay": stage.weight_decay}
    return [
        {"params": rest, "lr": stage.lr, "betas": tuple(stage.betas), "name": "llm", **common},
        {"params": head, "lr": stage.head_lr, "betas": tuple(stage.head_betas), "name": "head", **common},
    ]


def build_optimizer(model: nn.Module, stage: StageSettings) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel when every trainable parameter is a plain CPU/CUDA
    tensor (one kernel for all parameters instead of ~10 per tensor: 13 → 3 ms per step for the tiny model on
    2 CPU cores). Sharded (DTensor) and XLA parameters take the default implementation."""
    groups = param_groups(model, stage)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, fused=fused or None)


# ----------------------------------------------------------------------------------------------------
# Model sources
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """Where a run's network comes from: architecture + tokenizer (+ stats), and initial weights."""

    config: ScaleRAEConfig
    model_dir: Path  # holds config.json, tokenizer/, maybe latent_stats.safetensors
    llm: nn.Module | None = None  # pretrained LLM weights for a fresh stage 1
    export: Path | None = None  # an export (either version) whose weights to start from (stage 2)
    checkpoint: Path | None = None  # a stage-1 checkpoint step dir to start from (stage 2)


def _write_model_dir(run_dir: Path, cfg: ScaleRAEConfig, tokenizer_dir: Path, stats: Path | None) -> Path:
    """RUN/model: config.json + tokenizer/ (+ stats), written atomically by the caller's rank 0."""
    from scale_rae_core.models.io import write_model_folder

    files = {f"{TOKENIZER_DIR}/{name}": p for name, p in tokenizer_files(tokenizer_dir).items()}
    if stats is not None:
        files[STATS_FILE] = stats
    return write_model_folder(run_dir / MODEL_DIR, None, cfg.to_json(), files)


def _fresh_stage1(profile: Profile, run_dir: Path, backend: Backend) -> ModelSource:
    from scale_rae_core.models.build import build_encoder
    from scale_rae_core.models.scale_rae import build_llm, scale_rae_config

    encoder = build_encoder(profile.model.encoder)
    with tempfile.TemporaryDirectory() as tok_dir:
        llm, _ = build_llm(profile.model.llm, tok_dir)
        cfg = scale_rae_config(llm, profile.model.dit, profile.model.encoder, encoder.hidden_size, encoder.grid[0])
        stats = Path(profile.model.stats).expanduser() if profile.model.stats else None
        if stats is not None and not stats.is_file():
            raise ConfigError(f"model.stats = '{profile.model.stats}': file not found; compute it with `srae stat` or set stats = ''")
        if backend.is_main:
            _write_model_dir(run_dir, cfg, Path(tok_dir), stats)
    backend.barrier()
    return ModelSource(cfg, run_dir / MODEL_DIR, llm=llm)


def _from_source(path: Path, run_dir: Path, backend: Backend) -> ModelSource:
    """Stage 2's starting point: an export dir, or a run (latest complete checkpoint, else its export). Its
    weights are checked readable before RUN/model is written."""
    path = Path(path).expanduser()
    if is_export(path):
        cfg, tok, stats, export, ckpt = read_export_config(path), export_tokenizer_dir(path), path / STATS_FILE, path, None
    elif (path / MODEL_DIR / "config.json").is_file():
        cfg = read_export_config(path / MODEL_DIR)
        tok, stats = path / MODEL_DIR / TOKENIZER_DIR, path / MODEL_DIR / STATS_FILE
        found = CheckpointManager(path, 1, backend).complete()
        export, ckpt = None, found[-1][1] if found else None
        if ckpt is None:
            if not is_export(path / EXPORT_DIR):
                raise CheckpointError(f"--from {path}: the run has no complete checkpoint and no export; train it first or pass an export directory")
            export = path / EXPORT_DIR
    else:
        raise CheckpointError(
            f"--from {path} is neither an srae run (RUN/model/config.json) nor an export (config.json + {WEIGHTS_FILE}); "
            "pass the --out folder of `srae train stage1` or its export/ folder"
        )
    if export is not None:
        from scale_rae_core.models.io import read_safetensors
        from scale_rae_core.models.scale_rae import LLM_DIR, has_llm_folder

        files = [export / WEIGHTS_FILE] + ([export / LLM_DIR / WEIGHTS_FILE] if has_llm_folder(export) else [])
        for file in files:  # header + first tensor of each weights file
            next(iter(read_safetensors([file], fix="re-export the model")), None)
    else:
        CheckpointManager.read_meta(ckpt)
    if backend.is_main:
        _write_model_dir(run_dir, cfg, tok, stats if stats.is_file() else None)
    backend.barrier()
    return ModelSource(cfg, run_dir / MODEL_DIR, export=export, checkpoint=ckpt)


def _existing(run_dir: Path) -> ModelSource:
    return ModelSource(read_export_config(run_dir / MODEL_DIR), run_dir / MODEL_DIR)


def _build_model(src: ModelSource) -> ScaleRAE:
    from scale_rae_core.models.stats import load_stats

    stats_file = src.model_dir / STATS_FILE
    stats = load_stats(stats_file) if stats_file.is_file() else None
    if src.export is not None:
        from scale_rae_core.models.scale_rae import load_scale_rae

        fix = "re-export the model"
        return load_scale_rae(src.config, read_export_tensors(src.export, fix=fix), source=str(src.export), fix=fix,
                              stats=stats)
    return ScaleRAE(src.config, llm=src.llm, stats=stats)


# ----------------------------------------------------------------------------------------------------
# Projector initialisation
# ----------------------------------------------------------------------------------------------------

PROJECTOR_INIT_IMAGES = 64  # images whose encoder tokens set the projector's input standardisation


def _first_images(data: Path, profile: Profile, encoder: nn.Module) -> torch.Tensor:
    """Encoder tokens (n, N, C) of the first ``PROJECTOR_INIT_IMAGES`` images of ``data`` in file order (the
    whole set's view, unshuffled: the same on every rank); (0, N, C) when the data has no image."""
    reader = open_source(data, image_folder=profile.data.image_folder, rank=0, world_size=1, seed=profile.run.seed,
                         shuffle_buffer=0)
    pixels = []
    for sample in reader:
        if sample.image is not None:
            pixels.append(pil_to_pixels(sample.image, encoder.input_size))
            if len(pixels) == PROJECTOR_INIT_IMAGES:
                break
    if not pixels:
        return torch.zeros(0, 1, encoder.hidden_size)
    with torch.no_grad():
        return encoder(torch.stack(pixels)).float()  # (n, N, C)


def standardize_projector(model: ScaleRAE, features: torch.Tensor) -> int:
    """Fold a per-channel standardisation of the encoder tokens into ``mm_projector``'s first Linear.

    ``W·(x − μ)/σ + b = (W/σ)·x + (b − (W/σ)·μ)``: the projector starts as if its input had zero mean and unit
    variance per channel, with the same parameters (names, shapes, export) as before. Encoder tokens can be
    dominated by a constant per-channel offset: the tiny random SigLIP's vary across images by 4 % of their
    variance, and a fresh tiny LLM trained on understanding samples alone stayed at chance without this
    (held-out answer CE 1.10 at step 150, the uniform guess is ≈ 1.07) where with it the CE was 0.55.
    ``features`` (n, N, C) from :func:`_first_images`; returns n (0: nothing changed).
    """
    if features.shape[0] == 0:
        return 0
    flat = features.reshape(-1, features.shape[-1]).double()  # (n·N, C)
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6)
    linear = model.lm.mm_projector[0]
    with torch.no_grad():
        linear.weight.div_(std.to(linear.weight.dtype))  # (d, C) / (C,)
        linear.bias.sub_(linear.weight @ mean.to(linear.weight.dtype))
    return int(features.shape[0])


def match_query_scale(model: ScaleRAE) -> tuple[float, float]:
    """Rescale fresh ``latent_queries`` to the per-element RMS of the LLM's input embeddings (random LLMs only).

    The queries (reference init N(0, 1)/√d) sit among token embeddings and read the prompt only through
    attention. With a random tiny LLM (d = 128, embeddings N(0, 0.02²)) they start 4.4× larger than the
    embeddings, and at init the conditions vary across prompts by 7 % of their variation across image
    positions; at the embeddings' scale, by 33 %. (Measured on the shapes world; the head still needs several
    thousand generation samples before it follows the prompt, see BENCHMARKS.md.) A pretrained LLM keeps the
    reference init: stage 1 calls this only when ``model.llm.path`` is empty. Returns (RMS before, after).
    """
    queries = model.lm.latent_queries
    target = model.lm.llm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt()
    with torch.no_grad():
        before = queries.float().pow(2).mean().sqrt()
        queries.mul_((target / before).to(queries.dtype))
    return float(before), float(target)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def train_unified(
    profile: Profile,
    stage: str,
    data: str | Path | None,
    out: str | Path,
    *,
    init_from: str | Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    reporter: Reporter | None = None,
    accept_changes: bool = False,
) -> TrainResult:
    """Run ``stage`` ('stage1' | 'stage2') of ``profile`` on ``data`` into the run directory ``out``.

    ``init_from``: stage 2's starting run or export (required for stage 2, refused for stage 1).
    ``resume``: continue from the newest complete checkpoint in ``out``, or start fresh when there is none
    (see :mod:`scale_rae_core.train.loop`); ``accept_changes``: resume even though the trajectory settings or
    the data differ from the checkpoint's. ``stop_at``: end after that optimiser step as if the job were
    preempted (a checkpoint is saved first); the schedule still spans ``[stage].steps``. Collective: call on
    every process. The data is opened (and so checked) before RUN is locked and anything is written into it.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; use one of {', '.join(STAGES)}")
    data = data or profile.data.train
    if not data:
        raise DataError(f"no training data: pass --data or set data.train in {profile.source}")
    if stage == "stage2" and init_from is None:
        raise ConfigError("stage 2 needs --from: the stage-1 run folder or an export to finetune")
    if stage == "stage1" and init_from is not None:
        raise ConfigError("--from is only for stage 2; stage 1 starts from model.llm.path")
    data, run_dir = Path(data), Path(out).expanduser()

    with get_backend(profile.backend) as backend:
        if not data.exists():  # fail before any model work
            raise DataError(f"--data {data}: no such file or folder; pass a packed folder (srae data pack), its wds_manifest.json or a JSONL")
        reader = open_source(  # fails on missing or malformed data before any model work and before RUN
            data, image_folder=profile.data.image_folder, rank=backend.rank, world_size=backend.num_processes,
            seed=profile.run.seed, shuffle_buffer=profile.data.shuffle_buffer,
        )
        inputs: dict[str, Any] = {"data": data} | ({"from": Path(init_from)} if init_from is not None else {})
        trajectory = (*TRAJECTORY, stage) if stage == "stage1" else (*STAGE2_TRAJECTORY, stage)
        with TrainLoop(stage, profile, run_dir, backend, resume=resume, reporter=reporter, inputs=inputs,
                       trajectory=trajectory, accept_changes=accept_changes) as loop:
            backend.seed_everything(profile.run.seed, per_rank=False)  # same weights on every rank: seed before building
            if loop.resuming:
                src = _existing(run_dir)
            elif stage == "stage1":
                src = _fresh_stage1(profile, run_dir, backend)
            else:
                src = _from_source(Path(init_from), run_dir, backend)
            trainer = UnifiedTrainer(profile, stage, data, run_dir, src, backend, reporter=loop.reporter,
                                     fresh=not loop.resuming, reader=reader)
            return loop.run(trainer, stop_at=stop_at)


class UnifiedTrainer(TrainTask):
    """One stage of unified training as a :class:`~scale_rae_core.train.loop.TrainTask`: the sharded model,
    its optimiser and schedule, the frozen encoder, this process's micro-batcher and the held-out batches.

    ``fresh``: a new run (stage 1 then initialises the projector from the data); False when resuming.
    ``reader``: this process's sample reader, when the caller opened it already (``train_unified`` does, to check
    the data first); else opened here.
    """

    progress_keys = ("loss", "ce", "flow")

    def __init__(self, profile: Profile, stage: str, data: Path, run_dir: Path, src: ModelSource, backend: Backend,
                 *, reporter: Reporter, fresh: bool, reader: SampleSource | None = None) -> None:
        from transformers import AutoTokenizer

        from scale_rae_core.models.build import build_encoder
        from scale_rae_core.models.scale_rae import encoder_settings_of

        self.profile, self.stage, self.data, self.run_dir = profile, stage, data, run_dir
        self.settings: StageSettings = getattr(profile, stage)
        self.src, self.backend = src, backend
        self.plan = profile.batch_plan(stage)
        self.total_steps = self.settings.steps
        model = _build_model(src)
        self.tokenizer = AutoTokenizer.from_pretrained(str(src.model_dir / TOKENIZER_DIR))
        self.encoder = build_encoder(encoder_settings_of(src.config.encoder))  # select_layer included
        self.model = self._prepare(model, reporter, fresh)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.settings)
        self.scheduler = stage_scheduler(self.optimizer, self.settings)
        backend.seed_everything(profile.run.seed)  # per-rank noise from here on

        if reader is None:
            reader = open_source(
                data, image_folder=profile.data.image_folder, rank=backend.rank, world_size=backend.num_processes,
                seed=profile.run.seed, shuffle_buffer=profile.data.shuffle_buffer,
            )
        n_tokens = src.config.lm.num_image_tokens
        self.batcher = MicroBatcher(reader, self.tokenizer, n_tokens, self.settings.seq_len, self.encoder.input_size)
        self.evals = None
        if profile.data.eval:
            self.evals = EvalBatches.build(profile.data.eval, self.tokenizer, n_tokens, self.settings, self.encoder,
                                           backend, image_folder=profile.data.image_folder)

    def _prepare(self, model: ScaleRAE, reporter: Reporter, fresh: bool) -> nn.Module:
        """Initialise a fresh stage-1 projector, shard the model, and for stage 2 from a stage-1 checkpoint load
        that checkpoint's weights."""
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        from scale_rae_core.models.dit import DiTBlock

        if self.stage == "stage1" and fresh:  # a fresh projector: same data, same init on every rank
            n_images = standardize_projector(model, _first_images(self.data, self.profile, self.encoder))
            queries = match_query_scale(model) if not self.profile.model.llm.path else None
            reporter.event(f"{self.stage}.projector_init", images=n_images, query_rms=queries)
        model = self.backend.shard_model(model, (Qwen2DecoderLayer, DiTBlock), frozen=[self.encoder])
        model.train()
        if self.src.checkpoint is not None:  # stage 2 from a stage-1 checkpoint: weights only
            CheckpointManager(self.src.checkpoint.parent.parent, 1, self.backend).load(self.src.checkpoint, model)
        return model

    # ------------------------------------------------------------------------------------------ one step
    def _accumulate(self) -> torch.Tensor:
        """Forward + backward of ``accum_steps`` micro-batches; the step's sums (total, ce, flow averaged over
        micro-steps; answer images, tokens, images summed) on the device."""
        settings, be, accum = self.settings, self.backend, self.plan.accum_steps
        sums = torch.zeros(7, dtype=torch.float32, device=be.device)
        for _ in range(accum):
            batch = encode_and_collate(self.batcher.next_batch(self.plan.per_process_micro_batch), self.encoder,
                                       settings.seq_len, self.tokenizer.pad_token_id, be.device, put=be.shard_batch)
            with be.autocast():
                loss = self.model(batch, flow_weight=settings.flow_weight, all_slots=self.profile.backend.kind == "xla",
                                  flow_repeats=settings.flow_repeats, words_weight=settings.words_weight)
            (loss.total / accum).backward()
            parts = (loss.total, loss.ce, loss.flow, loss.answer_images, batch["attention_mask"].sum(),
                     batch["image_valid"].sum(), loss.words)
            sums += torch.stack([t.detach().float() for t in parts])
        sums[:3] /= accum
        sums[6] /= accum
        return sums

    def train_step(self, done: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        sums = self._accumulate()
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backend.mark_step()

        mean = self.backend.all_reduce_mean(sums).double().cpu()  # the step's one host read of its metrics
        seconds = time.perf_counter() - t0
        w = self.backend.num_processes
        return {
            "loss": float(mean[0]), "ce": float(mean[1]), "flow": float(mean[2]),
            **({"words": float(mean[6])} if self.settings.words_weight > 0 else {}),
            "lr": lrs[0], "head_lr": lrs[1], "grad_norm": float(grad_norm),
            "answer_images": int(round(float(mean[3]) * w)),
            "tokens_per_s": float(mean[4]) * w / seconds, "images_per_s": float(mean[5]) * w / seconds,
            "epoch": self.batcher.epoch, "skipped_too_long": self.batcher.skipped.too_long,
        }

    # ------------------------------------------------------------------------------------------ the loop's hooks
    def state(self) -> TrainState:
        return TrainState(self.model, self.optimizer, self.scheduler)

    def data_position(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def restore(self, info: dict[str, Any]) -> dict[str, Any]:
        position = info["data_position"]
        if position is not None:
            self.batcher.load_state_dict(position)
        elif info["data_positions"] and info["data_positions"][0]:
            # Saved by another process count: the readers' splits differ, so this epoch is read again from its
            # start (the model, optimiser and schedule are restored exactly).
            self.batcher.epoch = int(info["data_positions"][0]["epoch"])
        return {"data_restored": position is not None}

    def evaluate(self) -> dict[str, float]:
        return self.evals.run(self.model, self.settings.flow_weight) if self.evals is not None else {}

    def start_fields(self) -> dict[str, Any]:
        return {"data": str(self.data)}

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.batcher.skipped.as_dict()}

    def export(self) -> Path:
        stats = self.src.model_dir / STATS_FILE
        state = self.backend.full_model_state(self.model)  # collective: the full tensors on the main rank
        return write_export(self.run_dir / EXPORT_DIR, state, self.src.config, self.src.model_dir / TOKENIZER_DIR,
                            stats if stats.is_file() else None, backend=self.backend)
