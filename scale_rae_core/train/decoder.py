"""RAE decoder training (stage 1): a frozen encoder, a ViT decoder, L1 + LPIPS + GAN (rae.md §3).

Every optimiser step (global batch = micro batch x accumulation x processes):

1. generator: `recon = RAE(x)` in train mode (encoder-noise augmentation tau), loss
   `l1_weight * |recon - x| + lpips_weight * LPIPS(2x-1, 2recon-1)`; from `gan_start` on, plus
   `gan_weight * lambda * (-mean D(DiffAug(2recon-1)))` with VQGAN's adaptive weight
   `lambda = ||dL_rec/dW|| / (||dL_G/dW|| + 1e-6)` on the decoder's last layer W (`pred.weight`), computed in
   fp32 outside autocast, clamped to `max_d_weight`, and averaged over processes so every rank uses one value;
   backward, gradient clipping, AdamW step, LR step, EMA update;
2. discriminator (from `disc_update_start` on): fakes from CLEAN latents (`RAE.eval()`, as RAE), clamped and
   quantised to 8 bits, independent DiffAug for fakes and reals, hinge loss, AdamW step.

Epoch-based settings (`warmup_epochs`, `disc_update_start_epoch`, `gan_start_epoch`, `epochs`) become steps
with `steps_per_epoch = images per epoch // global_batch_size`; `decoder_training.steps` (or `--steps`)
overrides the length. Schedules: warmup from zero + cosine to `min_lr` at the last step (decoder); the
discriminator's schedule has the same shape but counts only its own updates (it starts at
`disc_update_start`), as the reference steps its scheduler only while the discriminator trains.

Parallelism: the decoder and discriminator heads are small next to the encoder activations, so they are
replicated (data parallel) and their gradients averaged with one flattened all-reduce per step each; the
discriminator's gradients are therefore synchronised (rae.md §12.4: the reference trained one discriminator
per rank). Weights stay identical on all ranks, which keeps the EMA, the adaptive weight and the export plain.

State: the decoder, its EMA and the discriminator heads live in one container module, and one AdamW holds
two parameter groups (decoder, discriminator) so a single `CheckpointManager` checkpoint (DCP, atomic,
retention) holds everything; a step of one group leaves the other untouched because its gradients are
None. With the RNG states and the data position also saved, a resumed run repeats the uninterrupted run's
losses exactly (same process count). At the end the EMA decoder is exported in our format
(`<run>/decoder`, read by `load_decoder`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import Profile
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.events import Reporter
from scale_rae_core.models.decoder import Decoder, save_decoder
from scale_rae_core.models.rae import RAE
from scale_rae_core.train.decoder_data import ImageStream, batches, open_images
from scale_rae_core.train.ema import EMA
from scale_rae_core.train.schedule import WarmupCosine

LPIPS_HINT = (
    "a folder with torchvision's vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth) "
    "and the LPIPS v0.1 vgg.pth (`pip download lpips==0.1.4 --no-deps`, unzip, lpips/weights/v0.1/vgg.pth)"
)
DISC_HINT = "a DINO ViT-S/8 transformers ViTModel: `hf download facebook/dino-vits8` and give its repo id or folder"


@dataclass
class Plan:
    """The run's length and phase boundaries, in optimiser steps."""

    steps: int
    steps_per_epoch: int
    accum: int
    warmup: int
    disc_start: int
    gan_start: int


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    export_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step run in this call


def _disc_factor(schedule: WarmupCosine, start: int):
    def factor(step: int) -> float:
        return schedule(step - start) if step >= start else 0.0

    return factor


class _State(nn.Module):
    """What a checkpoint holds: the decoder, its EMA and the discriminator heads."""

    def __init__(self, decoder: Decoder, ema: nn.Module, disc: nn.Module | None) -> None:
        super().__init__()
        self.decoder = decoder
        self.ema = ema
        if disc is not None:
            self.disc = disc


class DecoderTrainer:
    """Train `rae.decoder` on the images at `data`, under `run_dir`.

    `lpips` / `discriminator` may be passed in (tests use random-weight ones); otherwise they are loaded from
    `decoder_training.lpips_weights` / `disc_backbone` when their loss weight is > 0.
    """

    def __init__(self, profile: Profile, rae: RAE, data: str | Path, run_dir: str | Path, backend: Backend, *,
                 reporter: Reporter | None = None, lpips: nn.Module | None = None,
                 discriminator: nn.Module | None = None) -> None:
        self.profile, self.cfg, self.backend = profile, profile.decoder_training, backend
        self.rae, self.run_dir = rae, Path(run_dir)
        self.reporter = reporter or Reporter()
        cfg = self.cfg
        self.lpips = lpips if cfg.lpips_weight > 0 else None
        if cfg.lpips_weight > 0 and lpips is None:
            if not cfg.lpips_weights:
                raise ConfigError(
                    f"{profile.source}: decoder_training.lpips_weight = {cfg.lpips_weight} needs "
                    f"decoder_training.lpips_weights: {LPIPS_HINT}; or set lpips_weight = 0"
                )
            from scale_rae_core.train.lpips import LPIPS

            self.lpips = LPIPS.load(cfg.lpips_weights)
        self.disc = discriminator if cfg.gan_weight > 0 else None
        if cfg.gan_weight > 0 and discriminator is None:
            if not cfg.disc_backbone:
                raise ConfigError(
                    f"{profile.source}: decoder_training.gan_weight = {cfg.gan_weight} needs "
                    f"decoder_training.disc_backbone: {DISC_HINT}; or set gan_weight = 0"
                )
            from scale_rae_core.train.gan import DinoDiscriminator, DiscriminatorConfig

            self.disc = DinoDiscriminator.from_pretrained(DiscriminatorConfig(backbone=cfg.disc_backbone))
        if cfg.image_size != rae.decoder.cfg.image_size:
            raise ConfigError(
                f"{profile.source}: decoder_training.image_size = {cfg.image_size} but the decoder outputs "
                f"{rae.decoder.cfg.image_size} px (model.decoder.image_size); make them equal"
            )
        self.stream: ImageStream = open_images(
            data, image_size=cfg.image_size, train=True, rank=backend.rank, world_size=backend.world_size,
            seed=profile.run.seed, shuffle_buffer=profile.data.shuffle_buffer,
        )
        self.plan = self._plan()

        dev = backend.device
        rae.encoder.to(dev)
        rae.decoder.to(dev)
        if self.lpips is not None:
            self.lpips.to(dev)
        if self.disc is not None:
            self.disc.to(dev)
        self.ema = EMA(rae.decoder)
        self.state = _State(rae.decoder, self.ema.module, self.disc)
        groups = [{"params": list(rae.decoder.parameters()), "lr": cfg.lr}]
        if self.disc is not None:
            groups.append({"params": [p for p in self.disc.parameters() if p.requires_grad], "lr": cfg.disc_lr})
        self.opt = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=0.0, eps=1e-8)
        p = self.plan
        if cfg.min_lr > cfg.lr:
            raise ConfigError(f"{profile.source}: decoder_training.min_lr = {cfg.min_lr} exceeds lr = {cfg.lr}; lower min_lr")
        shape = WarmupCosine(min(p.warmup, p.steps), p.steps, cfg.min_lr / cfg.lr)
        lambdas = [shape]
        if self.disc is not None:
            disc_shape = WarmupCosine(min(p.warmup, max(p.steps - p.disc_start, 0)), max(p.steps - p.disc_start, 0),
                                      cfg.min_lr / cfg.lr)
            lambdas.append(_disc_factor(disc_shape, p.disc_start))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambdas)
        from scale_rae_core.train.checkpoint import CheckpointManager

        self.ckpt = CheckpointManager(self.run_dir, profile.checkpoint.keep, backend)
        self.step = 0

    # ------------------------------------------------------------------------------------------ setup
    def _plan(self) -> Plan:
        cfg, be = self.cfg, self.backend
        per_step = cfg.micro_batch_size * be.world_size
        if cfg.global_batch_size % per_step:
            raise ConfigError(
                f"{self.profile.source}: decoder_training.global_batch_size = {cfg.global_batch_size} is not a multiple "
                f"of micro_batch_size {cfg.micro_batch_size} x {be.world_size} processes"
            )
        total_images = self.stream.images_per_epoch * be.world_size
        spe = max(1, total_images // cfg.global_batch_size)
        steps = cfg.steps or math.ceil(cfg.epochs * spe)
        return Plan(
            steps=steps, steps_per_epoch=spe, accum=cfg.global_batch_size // per_step,
            warmup=round(cfg.warmup_epochs * spe),
            disc_start=round(cfg.disc_update_start_epoch * spe), gan_start=round(cfg.gan_start_epoch * spe),
        )

    def _batches(self):
        """Endless micro-batches [micro, 3, S, S] on the device, with their data positions."""
        # micro_batch_size per data-parallel rank; under xla SPMD one process feeds all its host's chips
        per_process = self.cfg.micro_batch_size * self.profile.backend.data_parallel_size // self.backend.world_size
        empty_passes = 0  # a pass resumed mid-epoch may hold only the epoch's dropped tail: allow one such pass
        while True:
            got = False
            for x, pos in batches(self.stream, per_process, drop_last=True):
                got = True
                yield self.backend.shard_batch(x), pos
            empty_passes = 0 if got else empty_passes + 1
            if empty_passes == 2:
                raise ConfigError(
                    f"decoder_training.micro_batch_size = {self.cfg.micro_batch_size} ({per_process} per process) is larger "
                    f"than this process's {self.stream.images_per_epoch} images per epoch; lower it or add data"
                )

    def _sync_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients over processes with one flattened all-reduce."""
        if not self.backend.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = self.backend.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    # ------------------------------------------------------------------------------------------ steps
    def _generator_step(self, micro: list[torch.Tensor], use_gan: bool) -> dict[str, float]:
        cfg, rae, be = self.cfg, self.rae, self.backend
        rae.train()
        dec_params = list(rae.decoder.parameters())
        sums = {"loss": 0.0, "l1": 0.0, "lpips": 0.0, "gan": 0.0, "d_weight": 0.0}
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the generator term must not train the discriminator
        for x in micro:
            with be.autocast():
                recon = rae(x).float()  # (B, 3, S, S), train mode: noisy latents
            l1 = (recon - x).abs().mean()
            rec = cfg.l1_weight * l1
            lp = torch.zeros((), device=x.device)
            if self.lpips is not None:
                with be.autocast():
                    lp = self.lpips(2 * x - 1, 2 * recon - 1).float().mean()
                rec = rec + cfg.lpips_weight * lp
            total = rec
            g_loss = torch.zeros((), device=x.device)
            d_weight = torch.zeros((), device=x.device)
            if use_gan:
                from scale_rae_core.train.gan import DiffAug, adaptive_weight, generator_loss

                with be.autocast():
                    g_loss = generator_loss(self.disc(DiffAug()(2 * recon - 1)))
                d_weight = adaptive_weight(rec, g_loss, rae.decoder.pred.weight, cfg.max_d_weight)
                d_weight = be.all_reduce_mean(d_weight).to(x.device, torch.float32)
                total = total + cfg.gan_weight * d_weight * g_loss
            (total / len(micro)).backward()
            for k, v in (("loss", total), ("l1", l1), ("lpips", lp), ("gan", g_loss), ("d_weight", d_weight)):
                sums[k] += float(v.detach()) / len(micro)
        if self.disc is not None:
            self.disc.requires_grad_(True)  # the heads only: the frozen backbone is not a registered module
        self._sync_grads(dec_params)
        if cfg.grad_clip > 0:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(dec_params, cfg.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(rae.decoder, cfg.ema_decay)
        return sums

    def _disc_step(self, micro: list[torch.Tensor]) -> dict[str, float]:
        from scale_rae_core.train.gan import DiffAug, disc_accuracy, hinge_d_loss, quantize_8bit

        rae, be, disc = self.rae, self.backend, self.disc
        assert disc is not None
        rae.eval()  # clean latents for the fakes, as RAE
        out = {"disc_loss": 0.0, "disc_acc": 0.0}
        aug = DiffAug()
        for x in micro:
            with torch.no_grad(), be.autocast():
                fake = quantize_8bit(2 * rae(x).float() - 1)
            fake_aug, real_aug = aug(fake), aug(2 * x - 1)
            with be.autocast():
                logits = disc(torch.cat([real_aug, fake_aug]))  # per-sample norms: one pass == two passes
            real_l, fake_l = logits.chunk(2)
            loss = hinge_d_loss(real_l, fake_l)
            (loss / len(micro)).backward()
            out["disc_loss"] += float(loss.detach()) / len(micro)
            out["disc_acc"] += float(disc_accuracy(real_l.detach(), fake_l.detach())) / len(micro)
        params = [p for p in disc.parameters() if p.requires_grad]
        self._sync_grads(params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out

    # ------------------------------------------------------------------------------------------ loop
    def resume(self) -> int:
        """Continue from the newest complete checkpoint of `run_dir`; returns its step."""
        latest = self.ckpt.latest()
        if latest is None:
            raise CheckpointError(
                f"--resume: no complete checkpoint under {self.ckpt.dir}; drop --resume to start a new run there"
            )
        info = self.ckpt.load(latest, self.state, self.opt, self.sched)
        if info["data_position"] is None:
            raise CheckpointError(
                f"{latest}: saved by {info['world_size']} processes, this run has {self.backend.world_size}; "
                "resume with the same process count"
            )
        self.stream.load_state_dict(info["data_position"])
        self.step = info["step"]
        return self.step

    def _save(self, metrics: dict[str, float]) -> Path:
        return self.ckpt.save(self.step, self.state, self.opt, self.sched, data_position=self.stream.state_dict(),
                              metrics=metrics, profile=self.profile)

    def train(self, *, stop_at: int | None = None) -> TrainResult:
        """Run until the planned last step (or `stop_at`), checkpointing every `checkpoint.every_steps`."""
        cfg, p, be, rep = self.cfg, self.plan, self.backend, self.reporter
        end = min(p.steps, stop_at) if stop_at is not None else p.steps
        history: list[dict[str, float]] = []
        if be.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "profile.json").write_text(json.dumps(self.profile.to_toml_dict(), indent=1))
        rep.event("train_decoder.start", start_step=self.step, steps=p.steps, steps_per_epoch=p.steps_per_epoch,
                  accum=p.accum, world_size=be.world_size, warmup=p.warmup, disc_start=p.disc_start,
                  gan_start=p.gan_start)
        data = self._batches()
        window_t, window_imgs = time.perf_counter(), 0
        last_saved = self.step
        metrics: dict[str, float] = {}
        with rep.task("train decoder", p.steps) as advance:
            if self.step:
                advance(self.step, total=p.steps)
            while self.step < end:
                micro, positions = [], []
                for _ in range(p.accum):
                    x, pos = next(data)
                    micro.append(x)
                    positions += pos
                self.stream.mark_consumed(positions)
                lrs = [g["lr"] for g in self.opt.param_groups]
                use_gan = self.disc is not None and self.step >= p.gan_start
                metrics = self._generator_step(micro, use_gan)
                if self.disc is not None and self.step >= p.disc_start:
                    metrics.update(self._disc_step(micro))
                self.sched.step()
                be.mark_step()
                self.step += 1
                metrics["lr"] = lrs[0]
                if self.disc is not None:
                    metrics["disc_lr"] = lrs[1]
                history.append({"step": self.step, **metrics})
                window_imgs += cfg.global_batch_size
                if self.step % self.profile.output.log_every == 0 or self.step == end:
                    dt = time.perf_counter() - window_t
                    metrics["images_per_s"] = window_imgs / max(dt, 1e-9)
                    rep.event("train_decoder.step", step=self.step, **metrics)
                    window_t, window_imgs = time.perf_counter(), 0
                advance(1, loss=metrics["loss"], l1=metrics["l1"])
                if self.step % self.profile.checkpoint.every_steps == 0 or self.step == end:
                    path = self._save(metrics)
                    last_saved = self.step
                    rep.event("train_decoder.checkpoint", step=self.step, path=str(path))
        if last_saved != self.step:
            self._save(metrics)
        export_dir = None
        if self.step >= p.steps and self.profile.checkpoint.export:
            export_dir = self.export()
        rep.event("train_decoder.done", step=self.step, export=str(export_dir) if export_dir else None)
        return TrainResult(self.run_dir, self.step, export_dir, history)

    def export(self) -> Path:
        """Write the EMA decoder in our format to `<run>/decoder` (rank 0; every rank waits)."""
        out = self.run_dir / "decoder"
        if self.backend.is_main:
            save_decoder(self.ema.module, out)
        self.backend.barrier()
        return out


def train_decoder(profile: Profile, data: str | Path, run_dir: str | Path, *, resume: bool = False,
                  reporter: Reporter | None = None, stop_at: int | None = None,
                  lpips: nn.Module | None = None, discriminator: nn.Module | None = None) -> TrainResult:
    """Build everything from the profile, then train (the engine behind `srae train decoder`)."""
    from scale_rae_core.backends.base import backend_for
    from scale_rae_core.models.build import build_rae

    profile.check_runtime()
    run_dir = Path(run_dir)
    with backend_for(profile.backend) as backend:
        ckpt_dir = run_dir / "checkpoints"
        if not resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out")
        backend.seed_everything(profile.run.seed, per_rank=False)  # same initial weights on every rank
        rae = build_rae(profile, noise_tau=profile.decoder_training.noise_tau, with_stats=False)
        backend.seed_everything(profile.run.seed)  # then per-rank noise, crops and augmentation
        trainer = DecoderTrainer(profile, rae, data, run_dir, backend, reporter=reporter, lpips=lpips,
                                 discriminator=discriminator)
        if resume:
            trainer.resume()
        return trainer.train(stop_at=stop_at)
