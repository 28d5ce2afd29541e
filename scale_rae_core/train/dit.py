"""Class-conditional DiT training on RAE latents (RAE stage 2, rae.md §7): the engine of `srae train dit`.

One optimiser step, on every process (the `[dit_training]` :class:`~scale_rae_core.config.BatchPlan`)::

    for each of accum_steps micro-steps:
        per_process_micro_batch labelled images -> random flip -> frozen encoder (fp32, no grad)   (or a latent cache)
        tokens -> (z − mean) / sqrt(var + eps) with the latent statistics -> latent grid (B, C, g, g)
        loss = flow matching (linear path, velocity target, logit-normal t with the dimension shift) / accum_steps
        backward
    clip the global grad norm -> AdamW step -> lr step -> EMA update

so a step sees exactly `global_batch_size` images over all processes. The flow is `flow/class_flow.py`'s:
t = sigmoid(N(logit_mean, logit_std²)) shifted by s = sqrt(tokens × channels / shift_base_dim). The lr schedule is
RAE's (`train/schedule.py: WarmupConstantLinear`): the peak until `constant_epochs`, a linear decay to `min_lr` at
`decay_end_epoch`, constant after; epochs become steps with steps_per_epoch = images per epoch // global batch.

The latent space (`train/latent_cache.py: latent_source`) is `[dit_training]`'s encoder / decoder / stats, else
`[model]`'s; a statistics file of another encoder or shape is refused in one line. `--data` is a labelled dataset
(class folders, or `srae data pack --format classes`) or a cache written by `srae latent cache` (the encoder is
then not built at all; a cache of another encoder or image size is refused in one line).

The network (a `CLASS_DIT_PRESETS` size with the latents' channels, grid and `num_classes`) is built from the same
seed on every process; its EMA is a separate module (built before parallelism, `train/ema.py`) and both are
handed to the backend (`shard_model`: FSDP2 per DiT block under torchrun, FSDPv2 under torch_xla SPMD), the EMA
sharded like the model so its update stays local. A checkpoint holds both, the optimiser, the schedule, every
process's RNG and data position, so a resumed run repeats the uninterrupted one exactly (same process count).
At the end the EMA weights are exported as the model folder `RUN/model` (`models/adapters/class_dit.py: load_class_dit`):
model.safetensors + config.json (format `srae-class-dit`: preset, config, encoder, decoder, image size) + the
latent statistics, which is what `srae sample --model RUN` reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import BatchPlan, DiTTrainSettings, Profile
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.events import Reporter
from scale_rae_core.models.adapters.class_dit import CLASS_DIT_FORMAT, CLASS_DIT_STATS, CLASS_DIT_VERSION
from scale_rae_core.train.checkpoint import CheckpointManager
from scale_rae_core.train.ema import EMA
from scale_rae_core.train.latent_cache import (
    LatentCache,
    LatentSource,
    check_cache,
    check_purpose,
    check_stats,
    is_cache,
    latent_source,
    read_manifest,
)
from scale_rae_core.train.loop import TRAJECTORY, TrainLoop, TrainResult, TrainState, TrainTask
from scale_rae_core.train.schedule import WarmupConstantLinear

MODEL_DIR = "model"


@dataclass(frozen=True)
class Phases:
    """The run's length and schedule boundaries, in optimiser steps of `global_batch_size` images."""

    steps: int
    steps_per_epoch: int
    warmup: int
    constant_end: int
    decay_end: int

    @classmethod
    def of(cls, cfg: DiTTrainSettings, plan: BatchPlan, images_per_process: int) -> Phases:
        spe = max(1, images_per_process * plan.num_processes // plan.global_batch_size)
        warmup = round(cfg.warmup_epochs * spe)
        constant_end = max(warmup, round(cfg.constant_epochs * spe))
        return cls(steps=cfg.steps or math.ceil(cfg.epochs * spe), steps_per_epoch=spe, warmup=warmup,
                   constant_end=constant_end, decay_end=max(constant_end, round(cfg.decay_end_epoch * spe)))


class _State(nn.Module):
    """What a checkpoint holds: the trained model and its EMA."""

    def __init__(self, model: nn.Module, ema: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.ema = ema


def _class_dit_config(cfg: DiTTrainSettings, channels: int, grid: int) -> Any:
    from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS

    if cfg.preset not in CLASS_DIT_PRESETS:
        raise ConfigError(f"dit_training.preset = '{cfg.preset}' is unknown; choose one of {', '.join(CLASS_DIT_PRESETS)}")
    return replace(CLASS_DIT_PRESETS[cfg.preset], in_channels=channels, grid=grid, num_classes=cfg.num_classes,
                   class_dropout_prob=cfg.class_dropout_prob)


def _decoder_record(spec: str) -> str:
    """A local decoder path made absolute (the model folder is read from elsewhere); a repo id as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec and path.exists() else spec


class DiTTrainer(TrainTask):
    """`[dit_training]` of `profile` on `data` (labelled images or a latent cache) as a TrainTask."""

    progress_keys = ("loss",)
    throughput_key = "images_per_s"

    def __init__(self, profile: Profile, data: str | Path, run_dir: str | Path, backend: Backend) -> None:
        from scale_rae_core.flow.class_flow import class_flow
        from scale_rae_core.models.class_dit import build_class_dit
        from scale_rae_core.models.dit import DiTBlock

        self.profile, self.cfg, self.backend = profile, profile.dit_training, backend
        self.data, self.run_dir = Path(data).expanduser(), Path(run_dir)
        self.source: LatentSource = latent_source(profile)
        self.plan = profile.batch_plan("dit_training")
        if self.cfg.min_lr > self.cfg.lr:
            raise ConfigError(f"{profile.source}: dit_training.min_lr = {self.cfg.min_lr} exceeds lr = {self.cfg.lr}; lower min_lr")
        self.encoder = None
        tokens, channels, grid = self._open_data()
        self.grid = grid
        self.stats = None
        if self.source.stats:
            stats = check_stats(self.source.stats, self.source, tokens, channels, self.source.stats_key)
            self._write_stats(stats)
            stats.mean, stats.var = stats.mean.to(backend.device), stats.var.to(backend.device)
            self.stats = stats
        self.phases = Phases.of(self.cfg, self.plan, self.stream.images_per_epoch)
        self.total_steps = self.phases.steps

        self.model_cfg = _class_dit_config(self.cfg, channels, grid)
        model = build_class_dit(self.model_cfg)  # the caller seeded every process alike
        self.ema = EMA(model)
        frozen = [self.encoder] if self.encoder is not None else []
        self.model = backend.shard_model(model, (DiTBlock,), frozen=frozen)
        self.model.train()
        self.ema.module = backend.shard_model(self.ema.module, (DiTBlock,))
        self.ema.module.requires_grad_(False)
        self.module = _State(self.model, self.ema.module)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = self._optimizer()
        self.flow = class_flow((channels, grid, grid), self.cfg.shift_base_dim, self.cfg.logit_mean, self.cfg.logit_std)
        backend.seed_everything(profile.run.seed)  # per-rank times, noise, label dropout, flips from here on
        self._data: Iterator[tuple[torch.Tensor, torch.Tensor, list[Any]]] | None = None  # started at the first step

    # ------------------------------------------------------------------------------------------ setup
    def _open_data(self) -> tuple[int, int, int]:
        """Open `data` (a latent cache, else labelled images with the frozen encoder); (tokens, channels, grid)."""
        from scale_rae_core.data.labelled import open_labelled
        from scale_rae_core.models.build import build_encoder

        cfg, be, seed = self.cfg, self.backend, self.profile.run.seed
        if is_cache(self.data):
            self.stream = LatentCache(self.data, train=True, hflip=cfg.hflip, rank=be.rank, world_size=be.num_processes,
                                      seed=seed)
            check_cache(self.stream.manifest, self.stream.folder, self.source, cfg.image_size, cfg.num_classes)
            self.classes = self.stream.classes
            tokens, channels = self.stream.manifest["latent_shape"]
            return tokens, channels, self.stream.manifest["grid"]
        self.stream = open_labelled(self.data, image_size=cfg.image_size, train=True, num_classes=cfg.num_classes,
                                    rank=be.rank, world_size=be.num_processes, seed=seed,
                                    shuffle_buffer=self.profile.data.shuffle_buffer)
        self.classes = getattr(self.stream, "classes", None)
        self.encoder = build_encoder(self.source.encoder).eval()
        return self.encoder.num_tokens, self.encoder.hidden_size, self.encoder.grid[0]

    def _write_stats(self, stats: Any) -> None:
        """RUN/latent_stats.safetensors: the statistics in srae's format, exported with the model."""
        if self.backend.is_main:
            enc = self.source.encoder
            stats.save(self.run_dir / CLASS_DIT_STATS, metadata={
                "encoder": enc.path, "encoder_kind": enc.kind, "input_size": str(enc.input_size), "source": self.source.stats})
        self.backend.barrier()

    def _optimizer(self) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW (fused on plain CPU/CUDA tensors) with RAE's warmup-constant-linear schedule."""
        cfg, p = self.cfg, self.phases
        fused = all(type(q.data) is torch.Tensor and q.device.type in ("cpu", "cuda") for q in self.params)
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=1e-8,
                                fused=fused or None)
        shape = WarmupConstantLinear(p.warmup, p.constant_end, p.decay_end, cfg.min_lr / cfg.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, shape)

    # ------------------------------------------------------------------------------------------ data
    def _samples(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Any]]]:
        """One pass of this process's stream in batches of `size` (drop-last): pixels or tokens, labels, positions."""
        if self.encoder is not None:
            from scale_rae_core.data.labelled import labelled_batches

            yield from labelled_batches(self.stream, size, drop_last=True)
            return
        rows, labels, positions = [], [], []
        for tokens, label, pos in self.stream:
            rows.append(tokens)
            labels.append(label)
            positions.append(pos)
            if len(rows) == size:
                yield torch.stack(rows), torch.tensor(labels, dtype=torch.long), positions
                rows, labels, positions = [], [], []

    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) or cached tokens (B, N, C) on the CPU -> normalised latent grids (B, C, g, g)."""
        from scale_rae_core.models.dit import tokens_to_grid

        be = self.backend
        if self.encoder is not None:
            if self.cfg.hflip:
                flip = torch.rand(x.shape[0]) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            tokens = self.encoder(be.shard_batch(x)).float()  # (B, N, C), fp32 outside autocast (as RAE)
        else:
            tokens = be.shard_batch(x)
        if self.stats is not None:
            tokens = self.stats.normalize(tokens)
        return tokens_to_grid(tokens, self.grid).contiguous()  # (B, C, g, g)

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Any]]]:
        """Endless micro-batches (latents, labels) on the device with their data positions."""
        size, empty_passes = self.plan.per_process_micro_batch, 0
        while True:
            got = False
            for x, labels, positions in self._samples(size):
                got = True
                yield self._latents(x), self.backend.shard_batch(labels), positions
            empty_passes = 0 if got else empty_passes + 1
            if empty_passes == 2:  # a resumed pass may hold only the dropped tail: allow one empty pass
                raise ConfigError(
                    f"dit_training.micro_batch_size = {self.cfg.micro_batch_size} ({size} per process) is larger than "
                    f"this process's {self.stream.images_per_epoch} images per epoch; lower it or add data"
                )

    # ------------------------------------------------------------------------------------------ the loop's hooks
    def state(self) -> TrainState:
        return TrainState(self.module, self.opt, self.sched)

    def train_step(self, done: int) -> dict[str, Any]:
        from scale_rae_core.flow.class_flow import class_flow_loss

        be, accum = self.backend, self.plan.accum_steps
        if self._data is None:
            self._data = self._micro_batches()
        total = torch.zeros((), device=be.device)
        positions: list[Any] = []
        for _ in range(accum):
            latents, labels, pos = next(self._data)
            positions += pos
            with be.autocast():
                loss = class_flow_loss(self.model, latents, labels, self.flow).mean()
            (loss / accum).backward()
            total += loss.detach().float()
        self.stream.mark_consumed(positions)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.cfg.ema_decay)
        be.mark_step()
        loss = float(be.all_reduce_mean(total / accum))
        epochs = (done + 1) / self.phases.steps_per_epoch  # in optimiser steps, as the schedule counts them
        return {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "epoch": round(epochs, 4)}

    def start_fields(self) -> dict[str, Any]:
        p = self.phases
        return {"data": str(self.data), "cached_latents": self.encoder is None, "latents": [*self.latent_shape],
                "preset": self.cfg.preset, "parameters": sum(q.numel() for q in self.params),
                "steps_per_epoch": p.steps_per_epoch, "constant_end": p.constant_end, "decay_end": p.decay_end}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.model_cfg.in_channels, self.grid, self.grid)

    def export(self) -> Path:
        """*Collective.* The EMA weights as the model folder RUN/model (config.json + model.safetensors + stats)."""
        config = {
            "format": CLASS_DIT_FORMAT, "version": CLASS_DIT_VERSION, "preset": self.cfg.preset,
            "class_dit": asdict(self.model_cfg),
            "latents": {"encoder": self.source.encoder_record(), "decoder": _decoder_record(self.source.decoder),
                        "image_size": self.cfg.image_size,
                        "shape": [*self.latent_shape], "stats": CLASS_DIT_STATS if self.stats is not None else None,
                        "shift_base_dim": self.cfg.shift_base_dim},
            "classes": self.classes,
            "training": {"steps": self.total_steps, "global_batch_size": self.cfg.global_batch_size,
                         "ema_decay": self.cfg.ema_decay, "data": str(self.data)},
        }
        extra = {CLASS_DIT_STATS: self.run_dir / CLASS_DIT_STATS} if self.stats is not None else {}
        manager = CheckpointManager(self.run_dir, 1, self.backend)
        return manager.export(self.run_dir / MODEL_DIR, self.ema.module, config, extra)


def train_dit(profile: Profile, data: str | Path, run_dir: str | Path, *, resume: bool = False,
              reporter: Reporter | None = None, stop_at: int | None = None,
              accept_changes: bool = False) -> TrainResult:
    """Build everything from the profile, then train (the engine behind `srae train dit`). Collective.

    ``resume``: continue from the newest complete checkpoint in ``run_dir``, or start fresh when there is none
    (see :mod:`scale_rae_core.train.loop`). ``stop_at``: save after that step and stop. ``accept_changes``: resume
    even though the trajectory settings (``dit_training`` and the shared ones) or the data differ.
    """
    from scale_rae_core.backends import backend_for

    profile.check_runtime()
    if not Path(data).expanduser().exists():  # before the run folder is made
        raise DataError(f"--data {data}: no such file or folder; pass class folders (root/<class>/<image>), a packed "
                        "class dataset (srae data pack --format classes) or a latent cache (srae latent cache)")
    if is_cache(data):
        check_purpose(read_manifest(data)[1], Path(data), "dit")  # before the run folder is made, too
    with backend_for(profile.backend) as backend, TrainLoop(
        "train_dit", profile, run_dir, backend, resume=resume, reporter=reporter, inputs={"data": Path(data)},
        trajectory=(*TRAJECTORY, "dit_training"), accept_changes=accept_changes,
    ) as loop:
        backend.seed_everything(profile.run.seed, per_rank=False)  # same initial weights on every rank
        trainer = DiTTrainer(profile, data, loop.run_dir, backend)
        return loop.run(trainer, stop_at=stop_at)
