"""Decoder quality on the shapes world: train the tiny-cpu decoder for a time budget, print the PSNR curve.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_decoder.py [--minutes 10] [--data images,cache]
                                                                  [--set decoder_training.lr=2e-3 ...]

Synthesizes the 64-px shapes world (`--images`, a tenth held out), trains with `srae train decoder`'s engine
on the training image folder (`images`: the encoder runs every step) and/or on its latent cache (`cache`:
`srae latent cache --for decoder`, made once, its time printed), one after the other with the same seed and
budget, and every `--eval-every` steps reconstructs the held-out images with the EMA decoder. Prints one table:
data, steps, minutes, train loss (mean over the window), held-out PSNR / SSIM, and decoder-training images/s
(training time only: evaluation and the cache's making excluded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget (evaluation not counted)")
    ap.add_argument("--images", type=int, default=1600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="tiny-cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--data", default="images,cache", help="what to train on, in order: images and/or cache")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from scale_rae_core.backends import backend_for
    from scale_rae_core.config import load_profile
    from scale_rae_core.eval.metrics import psnr, ssim
    from scale_rae_core.models.build import build_rae
    from scale_rae_core.models.rae import RAE
    from scale_rae_core.shapes.synth import synthesize
    from scale_rae_core.train.decoder import DecoderTrainer, open_decoder_data
    from scale_rae_core.train.decoder_data import batches, open_images
    from scale_rae_core.train.latent_cache import cache_latents
    from scale_rae_core.train.loop import TrainLoop

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-decoder-"))
    world = work / "shapes"
    if not (world / "synth.json").is_file():
        synthesize(world, args.images, image_size=64, seed=0)
    profile = load_profile(args.profile, ["checkpoint.every_steps=1000000", "checkpoint.export=false", *args.sets])
    held = torch.cat([x for x, _ in batches(open_images(world / "heldout" / "captioned", image_size=64, train=False), 256)])

    print(f"# {args.profile} {' '.join(args.sets)}: batch {profile.decoder_training.global_batch_size}, "
          f"{held.shape[0]} held-out images, {args.threads} threads, budget {args.minutes} min per data")
    print(f"{'data':>6} {'step':>6} {'min':>6} {'train loss':>10} {'PSNR dB':>8} {'SSIM':>6} {'img/s':>7}")
    for kind in args.data.split(","):
        with backend_for(profile.backend) as backend:
            data = world / "classes"
            if kind == "cache":
                shutil.rmtree(work / "cache", ignore_errors=True)
                t0 = time.perf_counter()
                cache_latents(profile, data, work / "cache", backend, for_="decoder")
                print(f"# cache: {time.perf_counter() - t0:.1f} s to encode the training images once")
                data = work / "cache"
            shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run each time (the shapes world is reused)
            loop = TrainLoop("train_decoder", profile, work / "run", backend, resume=False)
            backend.seed_everything(profile.run.seed, per_rank=False)
            rae = build_rae(profile, noise_tau=profile.decoder_training.noise_tau, with_stats=False)
            trainer = DecoderTrainer(profile, rae, open_decoder_data(profile, data, backend), work / "run", backend)
            phases = trainer.phases
            train_s = 0.0
            while loop.step < phases.steps and train_s < args.minutes * 60:
                t0 = time.perf_counter()
                res = loop.run(trainer, stop_at=min(loop.step + args.eval_every, phases.steps))
                dt = time.perf_counter() - t0
                train_s += dt
                ema = RAE(rae.encoder, trainer.ema.module).eval()
                with torch.no_grad():
                    rec = torch.cat([ema(x).clamp(0, 1) for x in held.split(64)])
                p, s = psnr(held, rec).mean().item(), ssim(held, rec).mean().item()
                loss = sum(h["loss"] for h in res.records) / len(res.records)
                ips = len(res.records) * profile.decoder_training.global_batch_size / dt
                print(f"{kind:>6} {loop.step:>6} {train_s / 60:>6.2f} {loss:>10.4f} {p:>8.2f} {s:>6.3f} {ips:>7.1f}",
                      flush=True)
    print(f"# machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
