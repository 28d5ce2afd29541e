"""Class-DiT training and sampling throughput against minimal baselines, at several batch sizes (tiny preset).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dit.py [--batches 8,32,128] [--train-steps 12] [--n 128]

Synthesizes the 64-px shapes world, caches its latents once with the tiny-cpu encoder (`srae latent cache`'s
engine), then prints one table:

* **train**: `srae train dit`'s engine (TrainLoop + DiTTrainer reading the latent cache: per-sample reads from the
  safetensors chunks, flips, normalisation, grad clip, EMA, lr schedule, metrics) against a minimal loop of the same
  model (forward + flow loss + backward + fused AdamW on the same latents held in memory). Loop only: the median
  step after `--warmup` steps (the trainer's own per-step images/s in metrics.jsonl; checkpoints excluded).
* **sample**: `srae sample`'s engine (`generate_samples`: per-index noise, the srae Euler sampler with `--steps`
  model calls, RAE-decoder decode, PNG writes) against RAE's sampling loop written from rae.md §6.3/§6.4 on the
  same network (its ODE grid with the same number of model calls; under guidance the batch doubled as RAE's
  scripts do: [z; z] with [y; null] for CFG, and main + guide both on the doubled batch for autoguidance), with
  the same decode and PNG writes. Loop only: model loading and process start excluded; the whole sample set.

Every measurement is repeated `--repeats` times, srae and its baseline alternating, and the median is printed (a
shared machine's load moves both alike).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def prepare(work: Path, images: int):
    """Shapes class folders, a tiny random decoder, and the latent cache (with statistics)."""
    import torch

    from scale_rae_core.backends import get_backend
    from scale_rae_core.config import EncoderSettings, load_profile
    from scale_rae_core.models.build import build_encoder
    from scale_rae_core.models.decoder import Decoder, save_decoder
    from scale_rae_core.models.rae import decoder_config_for
    from scale_rae_core.shapes.synth import synthesize
    from scale_rae_core.train.latent_cache import MANIFEST, cache_latents

    if not (work / "shapes" / "synth.json").is_file():
        synthesize(work / "shapes", images, image_size=64, seed=0)
    if not (work / "dec" / "config.json").is_file():
        torch.manual_seed(0)
        encoder = build_encoder(EncoderSettings(kind="siglip", path="tiny-random", input_size=64))
        save_decoder(Decoder(decoder_config_for(encoder, "tiny", patch_size=8)), work / "dec")
    if not (work / "cache" / MANIFEST).is_file():
        profile = load_profile("tiny-cpu")
        with get_backend(profile.backend) as backend:
            cache_latents(profile, work / "shapes" / "classes", work / "cache", backend, chunk_size=256)


def train_srae(work: Path, batch: int, warmup: int, steps: int) -> float:
    """Median images/s of DiTTrainer steps after `warmup` (its own metrics.jsonl rates)."""
    import json
    import shutil

    from scale_rae_core.backends import backend_for
    from scale_rae_core.config import load_profile
    from scale_rae_core.train.dit import DiTTrainer
    from scale_rae_core.train.loop import TrainLoop

    run = work / f"run-{batch}"
    shutil.rmtree(run, ignore_errors=True)
    profile = load_profile("tiny-cpu", [
        "dit_training.preset=tiny-ddt",  # the baseline's model (tiny-cpu's own preset is the demo's small-ddt)
        f"dit_training.global_batch_size={batch}", f"dit_training.micro_batch_size={batch}",
        f"dit_training.steps={warmup + steps}", f"dit_training.stats={work / 'cache' / 'latent_stats.safetensors'}",
        "checkpoint.every_steps=1000000", "checkpoint.export=false", "output.log_every=1", "output.progress=false"])
    with backend_for(profile.backend) as backend:
        loop = TrainLoop("train_dit", profile, run, backend, resume=False)
        backend.seed_everything(0, per_rank=False)
        trainer = DiTTrainer(profile, work / "cache", run, backend)
        loop.run(trainer, stop_at=warmup)
        loop.run(trainer)
    rates = [json.loads(line)["images_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[warmup:])


def cached_latents(work: Path):
    """Every cached latent grid, normalised, and its label, in memory (the minimal loop's data)."""
    import torch
    from safetensors.torch import load_file

    from scale_rae_core.models.dit import tokens_to_grid
    from scale_rae_core.models.stats import load_stats
    from scale_rae_core.train.latent_cache import read_manifest

    folder, manifest = read_manifest(work / "cache")
    chunks = [load_file(str(folder / c["file"])) for c in manifest["chunks"]]
    stats = load_stats(folder / "latent_stats.safetensors")
    tokens = stats.normalize(torch.cat([c["latents"] for c in chunks]).float())
    return tokens_to_grid(tokens, manifest["grid"]).contiguous(), torch.cat([c["labels"] for c in chunks])


def train_minimal(work: Path, batch: int, warmup: int, steps: int) -> float:
    """Median images/s of a plain forward/backward/AdamW step of the same model on in-memory latents."""
    from dataclasses import replace

    import torch

    from scale_rae_core.flow.class_flow import class_flow, class_flow_loss
    from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, build_class_dit

    x, y = cached_latents(work)
    torch.manual_seed(0)
    model = build_class_dit(replace(CLASS_DIT_PRESETS["tiny-ddt"], in_channels=x.shape[1], grid=x.shape[2]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    flow = class_flow(tuple(x.shape[1:]))
    times = []
    for step in range(warmup + steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % x.shape[0]
        t0 = time.perf_counter()
        class_flow_loss(model, x[idx], y[idx], flow).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[warmup:])


def sampling_setup(work: Path):
    """(model, guide, decode) on the cached latents: a tiny DiT^DH and a tiny LightningDiT guide, random weights."""
    from dataclasses import replace

    import torch

    from scale_rae_core.infer.pipeline import Runtime, decode_pixels
    from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS, build_class_dit
    from scale_rae_core.models.decoder import load_decoder
    from scale_rae_core.models.dit import grid_to_tokens
    from scale_rae_core.models.stats import load_stats

    stats = load_stats(work / "cache" / "latent_stats.safetensors")
    decoder, runtime = load_decoder(work / "dec").eval(), Runtime(torch.device("cpu"), "fp32")
    torch.manual_seed(0)
    model = build_class_dit(replace(CLASS_DIT_PRESETS["tiny-ddt"], in_channels=192)).eval()
    guide = build_class_dit(replace(CLASS_DIT_PRESETS["tiny"], in_channels=192)).eval()
    with torch.no_grad():
        for p in [*model.parameters(), *guide.parameters()]:  # away from the zero init, so outputs are not trivial
            p.add_(0.02 * torch.randn_like(p))
    return model, guide, lambda z: decode_pixels(decoder, stats.denormalize(grid_to_tokens(z)), runtime)


def sample_srae(model, guide, decode, out: Path, n: int, batch: int, steps: int, guidance: str) -> float:
    """Images/s of `srae sample`'s engine over n images."""
    import shutil

    from scale_rae_core.eval.samples import SamplePlan, generate_samples
    from scale_rae_core.flow.class_flow import latent_shift
    from scale_rae_core.flow.guidance import Guidance
    from scale_rae_core.flow.sampler import SamplerConfig

    shutil.rmtree(out, ignore_errors=True)
    g = {"none": Guidance(), "cfg": Guidance("cfg", 1.5), "autoguidance": Guidance("autoguidance", 1.42)}[guidance]
    cfg = model.cfg
    t0 = time.perf_counter()
    generate_samples(model, decode, out, SamplePlan(n, cfg.num_classes, "random"), shift=latent_shift((cfg.in_channels, cfg.grid, cfg.grid)),
                     sampler=SamplerConfig("euler", steps), guidance=g,
                     guide_model=guide if guidance == "autoguidance" else None, batch_size=batch)
    return n / (time.perf_counter() - t0)


def sample_reference(model, guide, decode, out: Path, n: int, batch: int, steps: int, guidance: str) -> float:
    """Images/s of RAE's sampling loop (rae.md §6.3, §6.4, §8) over n images, written from the spec."""
    import numpy as np
    import torch
    from PIL import Image

    from scale_rae_core.flow.class_flow import latent_shift

    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    s = latent_shift((cfg.in_channels, cfg.grid, cfg.grid))
    grid = 1 - torch.linspace(0, 1 - 1 / 1000, steps + 1)  # num_steps = steps + 1 grid points
    grid = s * grid / (1 + (s - 1) * grid)
    w = {"none": 1.0, "cfg": 1.5, "autoguidance": 1.42}[guidance]
    labels = torch.arange(n) % cfg.num_classes
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, batch):
            y = labels[start : start + batch]
            z = torch.randn(len(y), cfg.in_channels, cfg.grid, cfg.grid)
            if w > 1.0:  # the scripts double the batch: [z; z] with [y; null]
                z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, cfg.num_classes)])
            for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
                t = torch.full((z.shape[0],), float(t_cur))
                if guidance == "cfg":  # forward_with_cfg: the conditional half duplicated, guided, duplicated
                    half = z[: len(z) // 2]
                    c, u = model(torch.cat([half, half]), t, y).chunk(2)
                    v = torch.cat([u + w * (c - u)] * 2)
                elif guidance == "autoguidance":  # both models on the doubled batch, same labels
                    yy = torch.cat([y[: len(y) // 2]] * 2)
                    v_main, v_guide = model(z, t, yy), guide(z, t, yy)
                    v = v_guide + w * (v_main - v_guide)
                else:
                    v = model(z, t, y)
                z = z + (t_next - t_cur) * v
            images = decode(z[: len(z) // 2] if w > 1.0 else z)
            arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for i, image in enumerate(arr):
                Image.fromarray(np.ascontiguousarray(image)).save(out / f"{start + i:06d}.png")
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--train-steps", type=int, default=12, help="timed training steps per batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--n", type=int, default=128, help="images sampled per batch size and guidance (random labels)")
    ap.add_argument("--steps", type=int, default=49, help="sampler model calls (RAE: 50 grid points = 49)")
    ap.add_argument("--images", type=int, default=600, help="shapes-world images to cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="alternating srae / baseline measurements (median)")
    ap.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dit-"))
    prepare(work, args.images)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# load average {os.getloadavg()[0]:.2f}, {args.threads} thread(s), median of {args.repeats}, torch {torch.__version__}, tiny-ddt "
          f"(64 × 2 trunk + 96 × 1 head) on 8 × 8 × 192 latents, work {work}")
    print("| part | batch | guidance | srae (images/s) | baseline (images/s) | srae / baseline | scope |")
    print("|---|---|---|---|---|---|---|")
    def median_pair(ours_fn, base_fn) -> tuple[float, float]:
        pairs = [(ours_fn(), base_fn()) for _ in range(args.repeats)]
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)

    for b in batches:
        ours, base = median_pair(lambda b=b: train_srae(work, b, args.warmup, args.train_steps),
                                 lambda b=b: train_minimal(work, b, args.warmup, args.train_steps))
        print(f"| train | {b} | - | {ours:.1f} | {base:.1f} | {ours / base:.2f} | loop only: median step; baseline = "
              "minimal forward/backward/AdamW on in-memory latents |", flush=True)
    model, guide, decode = sampling_setup(work)
    for guidance in ("none", "cfg", "autoguidance"):
        for b in batches:
            ours, base = median_pair(
                lambda b=b, g=guidance: sample_srae(model, guide, decode, work / "srae", args.n, b, args.steps, g),
                lambda b=b, g=guidance: sample_reference(model, guide, decode, work / "ref", args.n, b, args.steps, g))
            print(f"| sample | {b} | {guidance} | {ours:.1f} | {base:.1f} | {ours / base:.2f} | loop only: {args.n} "
                  f"images, {args.steps} model calls, decode + PNG; baseline = RAE-style loop |", flush=True)


if __name__ == "__main__":
    main()
