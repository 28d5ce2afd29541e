"""RAE decoder training (stage 1): a frozen encoder, a ViT decoder, L1 + LPIPS + GAN (rae.md §3).

Every optimiser step consumes exactly ``decoder_training.global_batch_size`` images: the profile's
:class:`~scale_rae_core.config.BatchPlan` gives ``accum_steps`` micro-steps of ``per_process_micro_batch``
images on each of ``num_processes`` processes (``micro_batch_size`` per data-parallel device; on xla one
process per host feeds all of its chips). Each step:

1. generator: `recon = RAE(x)` in train mode (encoder-noise augmentation tau), loss
   `l1_weight * |recon - x| + lpips_weight * LPIPS(2x-1, 2recon-1)`; from `gan_start` on, plus
   `gan_weight * lambda * (-mean D(DiffAug(2recon-1)))` with VQGAN's adaptive weight
   `lambda = ||dL_rec/dW|| / (||dL_G/dW|| + 1e-6)` on the decoder's last layer W (`pred.weight`), computed in
   fp32 outside autocast, clamped to `max_d_weight`, and averaged over processes so every rank uses one value;
   backward, gradient clipping, AdamW step, LR step, EMA update;
2. discriminator (from `disc_update_start` on): fakes from CLEAN latents (`RAE.eval()`, as RAE), clamped and
   quantised to 8 bits, independent DiffAug for fakes and reals, hinge loss, AdamW step.

Epoch-based settings (`warmup_epochs`, `disc_update_start_epoch`, `gan_start_epoch`, `epochs`) become steps
with `steps_per_epoch = images per epoch (all processes) // global_batch_size`; `decoder_training.steps` (or
`--steps`) overrides the length. Schedules: warmup from zero + cosine to `min_lr` at the last step (decoder);
the discriminator's schedule has the same shape but counts only its own updates (it starts at
`disc_update_start`), as the reference steps its scheduler only while the discriminator trains.

Parallelism: the decoder and discriminator heads are small next to the encoder activations, so they are
replicated (data parallel) and their gradients averaged with one flattened all-reduce per step each; the
discriminator's gradients are therefore synchronised (rae.md §12.4: the reference trained one discriminator
per rank). Weights stay identical on all ranks, which keeps the EMA, the adaptive weight and the export plain.

Cached latents: `--data` may be a latent cache made for the decoder (`srae latent cache --for decoder`). Each
micro-batch is then (pixels, latents) and `recon = decode(from_encoder(latents))` replaces `RAE(x)`: the same maths
without the frozen encoder's forward (in eval mode it gives the same latents every epoch), so a step costs the
decoder alone. The cache holds centre crops, so there are no random crops (at the shapes world's 64 px there are
none anyway).

State: the decoder, its EMA and the discriminator heads live in one container module, and one AdamW holds
two parameter groups (decoder, discriminator) so a single checkpoint (DCP, atomic, retention) holds
everything; a step of one group leaves the other untouched because its gradients are None. The loop
(:mod:`scale_rae_core.train.loop`) resumes, logs, saves and exports; with the RNG states and the data
position also saved, a resumed run repeats the uninterrupted run's losses exactly (same process count). At
the end the EMA decoder is exported in our format (`<run>/decoder`, read by `load_decoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scale_rae_core.backends.base import Backend
from scale_rae_core.config import BatchPlan, DecoderTrainSettings, Profile
from scale_rae_core.errors import ConfigError
from scale_rae_core.events import Reporter
from scale_rae_core.models.decoder import Decoder, save_decoder
from scale_rae_core.models.rae import RAE
from scale_rae_core.train.decoder_data import ImageStream, batches, open_images
from scale_rae_core.train.ema import EMA
from scale_rae_core.train.latent_cache import encoder_record, is_cache, open_cached_images
from scale_rae_core.train.loop import TrainLoop, TrainResult, TrainState, TrainTask
from scale_rae_core.train.schedule import WarmupCosine

LPIPS_HINT = (
    "a folder with torchvision's vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth) "
    "and the LPIPS v0.1 vgg.pth (`pip download lpips==0.1.4 --no-deps`, unzip, lpips/weights/v0.1/vgg.pth)"
)
DISC_HINT = "a DINO ViT-S/8 transformers ViTModel: `hf download facebook/dino-vits8` and give its repo id or folder"


@dataclass
class Phases:
    """The run's length and phase boundaries, in optimiser steps of ``global_batch_size`` images."""

    steps: int
    steps_per_epoch: int
    warmup: int
    disc_start: int
    gan_start: int

    @classmethod
    def of(cls, cfg: DecoderTrainSettings, plan: BatchPlan, images_per_process: int) -> Phases:
        """From the epoch-based settings; an epoch is every process's images once."""
        spe = max(1, images_per_process * plan.num_processes // plan.global_batch_size)
        return cls(
            steps=cfg.steps or math.ceil(cfg.epochs * spe), steps_per_epoch=spe,
            warmup=round(cfg.warmup_epochs * spe),
            disc_start=round(cfg.disc_update_start_epoch * spe), gan_start=round(cfg.gan_start_epoch * spe),
        )


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


def _load_lpips(profile: Profile, given: nn.Module | None) -> nn.Module | None:
    cfg = profile.decoder_training
    if cfg.lpips_weight == 0:
        return None
    if given is not None:
        return given
    if not cfg.lpips_weights:
        raise ConfigError(
            f"{profile.source}: decoder_training.lpips_weight = {cfg.lpips_weight} needs "
            f"decoder_training.lpips_weights: {LPIPS_HINT}; or set lpips_weight = 0"
        )
    from scale_rae_core.train.lpips import LPIPS

    return LPIPS.load(cfg.lpips_weights)


def _load_discriminator(profile: Profile, given: nn.Module | None) -> nn.Module | None:
    cfg = profile.decoder_training
    if cfg.gan_weight == 0:
        return None
    if given is not None:
        return given
    if not cfg.disc_backbone:
        raise ConfigError(
            f"{profile.source}: decoder_training.gan_weight = {cfg.gan_weight} needs "
            f"decoder_training.disc_backbone: {DISC_HINT}; or set gan_weight = 0"
        )
    from scale_rae_core.train.gan import DinoDiscriminator, DiscriminatorConfig

    return DinoDiscriminator.from_pretrained(DiscriminatorConfig(backbone=cfg.disc_backbone))


class DecoderTrainer(TrainTask):
    """Train `rae.decoder` on the images at `data`; the EMA decoder is exported to `run_dir/decoder`.

    `lpips` / `discriminator` may be passed in (tests use random-weight ones); otherwise they are loaded from
    `decoder_training.lpips_weights` / `disc_backbone` when their loss weight is > 0. `data` is a path, or the
    `ImageStream` of this process when the caller opened it already (:func:`train_decoder` does, to check the data
    before it locks and writes RUN). Run it with :class:`~scale_rae_core.train.loop.TrainLoop`.
    """

    progress_keys = ("loss", "l1")
    throughput_key = "images_per_s"

    def __init__(self, profile: Profile, rae: RAE, data: str | Path | ImageStream, run_dir: str | Path, backend: Backend, *,
                 lpips: nn.Module | None = None, discriminator: nn.Module | None = None) -> None:
        self.profile, self.cfg, self.backend = profile, profile.decoder_training, backend
        self.rae, self.run_dir = rae, Path(run_dir)
        cfg = self.cfg
        self.lpips = _load_lpips(profile, lpips)
        self.disc = _load_discriminator(profile, discriminator)
        if cfg.image_size != rae.decoder.cfg.image_size:
            raise ConfigError(
                f"{profile.source}: decoder_training.image_size = {cfg.image_size} but the decoder outputs "
                f"{rae.decoder.cfg.image_size} px (model.decoder.image_size); make them equal"
            )
        if cfg.min_lr > cfg.lr:
            raise ConfigError(f"{profile.source}: decoder_training.min_lr = {cfg.min_lr} exceeds lr = {cfg.lr}; lower min_lr")
        self.plan = profile.batch_plan("decoder_training")
        self.stream: ImageStream = data if isinstance(data, ImageStream) else open_decoder_data(profile, data, backend)
        self.phases = Phases.of(cfg, self.plan, self.stream.images_per_epoch)
        self.total_steps = self.phases.steps

        for module in (rae.encoder, rae.decoder, self.lpips, self.disc):
            if module is not None:
                module.to(backend.device)
        self.ema = EMA(rae.decoder)
        self.module = _State(rae.decoder, self.ema.module, self.disc)
        self.opt, self.sched = self._optimizer()
        self._data = None  # the micro-batch generator, started at the first step (after a restore)

    # ------------------------------------------------------------------------------------------ setup
    def _optimizer(self) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """One AdamW, two groups (decoder, discriminator), each with its warmup-cosine schedule."""
        cfg, p = self.cfg, self.phases
        groups = [{"params": list(self.rae.decoder.parameters()), "lr": cfg.lr}]
        if self.disc is not None:
            groups.append({"params": [q for q in self.disc.parameters() if q.requires_grad], "lr": cfg.disc_lr})
        opt = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=0.0, eps=1e-8)
        lambdas = [WarmupCosine(min(p.warmup, p.steps), p.steps, cfg.min_lr / cfg.lr)]
        if self.disc is not None:
            disc_steps = max(p.steps - p.disc_start, 0)
            disc_shape = WarmupCosine(min(p.warmup, disc_steps), disc_steps, cfg.min_lr / cfg.lr)
            lambdas.append(_disc_factor(disc_shape, p.disc_start))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)

    def _batches(self):
        """Endless micro-batches on the device, with their data positions: pixels [per_process_micro_batch, 3, S, S],
        or (pixels, latents) from a latent cache."""
        per_process = self.plan.per_process_micro_batch
        empty_passes = 0  # a pass resumed mid-epoch may hold only the epoch's dropped tail: allow one such pass
        while True:
            got = False
            for x, pos in batches(self.stream, per_process, drop_last=True):
                got = True
                if isinstance(x, tuple):
                    yield tuple(self.backend.shard_batch(part) for part in x), pos
                else:
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
    def _reconstruct(self, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels, reconstruction in fp32) of one micro-batch: through the encoder, or from cached latents."""
        with self.backend.autocast():
            if isinstance(item, tuple):
                x, z = item
                return x, self.rae.decode(self.rae.from_encoder(z)).float()
            return item, self.rae(item).float()

    def _generator_step(self, micro: list[Any], use_gan: bool) -> dict[str, float]:
        cfg, rae, be = self.cfg, self.rae, self.backend
        rae.train()
        dec_params = list(rae.decoder.parameters())
        sums = {"loss": 0.0, "l1": 0.0, "lpips": 0.0, "gan": 0.0, "d_weight": 0.0}
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the generator term must not train the discriminator
        for item in micro:
            x, recon = self._reconstruct(item)  # (B, 3, S, S), train mode: noisy latents
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

    def _disc_step(self, micro: list[Any]) -> dict[str, float]:
        from scale_rae_core.train.gan import DiffAug, disc_accuracy, hinge_d_loss, quantize_8bit

        rae, be, disc = self.rae, self.backend, self.disc
        assert disc is not None
        rae.eval()  # clean latents for the fakes, as RAE
        out = {"disc_loss": 0.0, "disc_acc": 0.0}
        aug = DiffAug()
        for item in micro:
            with torch.no_grad():
                x, recon = self._reconstruct(item)
            fake = quantize_8bit(2 * recon - 1)
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

    # ------------------------------------------------------------------------------------------ the loop's hooks
    def state(self) -> TrainState:
        return TrainState(self.module, self.opt, self.sched)

    def train_step(self, done: int) -> dict[str, Any]:
        """`accum_steps` micro-batches → generator step (+ discriminator step) → LR step."""
        if self._data is None:
            self._data = self._batches()
        micro, positions = [], []
        for _ in range(self.plan.accum_steps):
            x, pos = next(self._data)
            micro.append(x)
            positions += pos
        self.stream.mark_consumed(positions)
        lrs = [g["lr"] for g in self.opt.param_groups]
        metrics = self._generator_step(micro, use_gan=self.disc is not None and done >= self.phases.gan_start)
        if self.disc is not None and done >= self.phases.disc_start:
            metrics.update(self._disc_step(micro))
        self.sched.step()
        self.backend.mark_step()
        metrics["lr"] = lrs[0]
        if self.disc is not None:
            metrics["disc_lr"] = lrs[1]
        return metrics

    def start_fields(self) -> dict[str, Any]:
        p = self.phases
        return {"steps_per_epoch": p.steps_per_epoch, "warmup": p.warmup, "disc_start": p.disc_start,
                "gan_start": p.gan_start}

    def export(self) -> Path:
        """Write the EMA decoder in our format to `<run>/decoder` (rank 0; every rank waits)."""
        out = self.run_dir / "decoder"
        if self.backend.is_main:
            save_decoder(self.ema.module, out)
        self.backend.barrier()
        return out


def open_decoder_data(profile: Profile, data: str | Path, backend: Backend) -> ImageStream:
    """The images at `data`, or the (pixels, latents) of a decoder latent cache there (checked against the profile)."""
    if is_cache(data):
        return open_cached_images(data, encoder=encoder_record(profile.model.encoder),
                                  image_size=profile.decoder_training.image_size, rank=backend.rank,
                                  world_size=backend.num_processes, seed=profile.run.seed)
    return open_images(
        data, image_size=profile.decoder_training.image_size, train=True, rank=backend.rank,
        world_size=backend.num_processes, seed=profile.run.seed, shuffle_buffer=profile.data.shuffle_buffer,
    )


# Profile keys that change the decoder's trajectory (compared on --resume).
TRAJECTORY = ("run.seed", "backend.precision", "model.encoder", "model.decoder", "data.shuffle_buffer",
              "decoder_training")


def train_decoder(profile: Profile, data: str | Path, run_dir: str | Path, *, resume: bool = False,
                  reporter: Reporter | None = None, stop_at: int | None = None,
                  lpips: nn.Module | None = None, discriminator: nn.Module | None = None,
                  accept_changes: bool = False) -> TrainResult:
    """Build everything from the profile, then train (the engine behind `srae train decoder`).

    ``resume``: continue from the newest complete checkpoint in ``run_dir``, or start fresh when there is
    none (see :mod:`scale_rae_core.train.loop`); ``accept_changes``: resume even though the trajectory
    settings or the data differ from the checkpoint's. ``stop_at``: save after that step and stop.
    Collective. The data is opened (and so checked) before RUN is locked and anything is written into it.
    """
    from scale_rae_core.backends import backend_for
    from scale_rae_core.models.build import build_rae

    profile.check_runtime()
    with backend_for(profile.backend) as backend:
        stream = open_decoder_data(profile, data, backend)
        with TrainLoop("train_decoder", profile, run_dir, backend, resume=resume, reporter=reporter,
                       inputs={"data": Path(data)}, trajectory=TRAJECTORY, accept_changes=accept_changes) as loop:
            backend.seed_everything(profile.run.seed, per_rank=False)  # same initial weights on every rank
            rae = build_rae(profile, noise_tau=profile.decoder_training.noise_tau, with_stats=False)
            backend.seed_everything(profile.run.seed)  # then per-rank noise, crops and augmentation
            trainer = DecoderTrainer(profile, rae, stream, loop.run_dir, backend, lpips=lpips,
                                     discriminator=discriminator)
            return loop.run(trainer, stop_at=stop_at)
