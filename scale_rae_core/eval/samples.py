"""Class-conditional sample sets (what `srae sample --model RUN --n N` writes, and gFID scores).

A `SamplePlan` fixes, for every index i in 0 … N−1, a class label and a seed, from (N, classes, label sampling,
seed) alone:

* `equal`: exactly N / K images per class (N must be a multiple of K), in an order shuffled by the seed
  (RAE's `sample_ddp.py` is exact only when N divides evenly over its batches, rae.md §12.12);
* `random`: labels drawn uniformly by the seed.

`classes` (`--labels 3,7`) restricts the labels to those classes (K = their count); empty means all of them.

The seed of index i is derived from (plan seed, i), and the index's initial noise and every SDE step noise come
from a generator seeded with it, on the CPU. So an image depends only on its index and the settings, not on the
batch it was drawn in or on how the work was split over processes.

Output folder:

    plan.json       the plan and the sampling settings; a rerun into the folder must match it
    000000.png …    one PNG per index (written atomically), the resume state: existing indices are skipped
    samples.npz     `arr_0` uint8 (N, H, W, 3) in index order (ADM layout), packed once all N exist

`shard(n, rank, world)` gives each process a contiguous range; the ranges cover 0 … N−1 exactly once.
`generate_samples` draws one process's pending indices; `pack_samples` writes the npz when all are present.

`sample_class_model` is `srae sample`: it loads the model (an `srae train dit` run or model folder, or a released
RAE `stage2_model.pt` with its size preset), an optional autoguidance model, the RAE decoder the model folder
records (or `--decoder`) and the latent statistics, then runs this process's shard, waits for every process and
packs the npz on the main one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.eval.adm_npz import AdmNpzWriter
from scale_rae_core.files import atomic_write
from scale_rae_core.flow.class_flow import sample_class_latents
from scale_rae_core.flow.guidance import Guidance
from scale_rae_core.flow.sampler import PerSampleNoise, SamplerConfig

LABEL_SAMPLING = ("equal", "random")
PLAN_FILE = "plan.json"
NPZ_FILE = "samples.npz"

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents (B, C, g, g) -> images (B, 3, H, W) in [0, 1]


@dataclass(frozen=True)
class SamplePlan:
    n: int
    num_classes: int
    label_sampling: str = "equal"
    seed: int = 0
    classes: tuple[int, ...] = ()  # the labels to draw from (--labels); () = all num_classes

    def __post_init__(self) -> None:
        if self.n < 1 or self.num_classes < 1:
            raise ConfigError(f"--n and the number of classes must be positive, got {self.n} and {self.num_classes}")
        if self.label_sampling not in LABEL_SAMPLING:
            raise ConfigError(f"--label-sampling must be one of {', '.join(LABEL_SAMPLING)}, got '{self.label_sampling}'")
        bad = [c for c in self.classes if not 0 <= c < self.num_classes]
        if bad:
            raise ConfigError(f"--labels {bad[0]} is outside the model's {self.num_classes} classes "
                              f"(0..{self.num_classes - 1}); pass labels in that range")
        k, what = (len(self.classes), "labels given") if self.classes else (self.num_classes, "classes")
        if self.label_sampling == "equal" and self.n % k:
            raise ConfigError(
                f"--label-sampling equal needs --n to be a multiple of the {k} {what}, got {self.n}; "
                f"use --n {self.n - self.n % k or k} or --label-sampling random"
            )

    def labels(self) -> np.ndarray:
        """(n,) int64 label of every index."""
        rng = np.random.default_rng(self.seed)
        pool = np.asarray(self.classes, dtype=np.int64) if self.classes else np.arange(self.num_classes)
        if self.label_sampling == "equal":
            return rng.permutation(np.repeat(pool, self.n // len(pool)))
        if not self.classes:
            return rng.integers(0, self.num_classes, self.n)
        return pool[rng.integers(0, len(pool), self.n)]

    def seed_of(self, index: int) -> int:
        """The noise seed of one index (a 64-bit hash of (seed, index))."""
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0])


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous index range of process `rank` out of `world_size`."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def image_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{index:06d}.png"


def pending(out_dir: Path, indices: range) -> list[int]:
    """Indices whose PNG is not written yet (a PNG appears only once complete)."""
    return [i for i in indices if not image_path(out_dir, i).is_file()]


def prepare_folder(out_dir: Path, plan: SamplePlan, settings: dict[str, Any]) -> None:
    """Create `out_dir` with plan.json, or check that an existing one holds the same plan and settings."""
    record = json.loads(json.dumps({"plan": asdict(plan), "settings": settings}))  # as plan.json holds it
    path = out_dir / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            raise ConfigError(
                f"{out_dir} holds samples of another plan or other settings ({path}); "
                "use a new --out folder, or the same --n, --seed, labels and sampler settings to resume"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_plan(out_dir: Path) -> SamplePlan:
    """The plan a samples folder was drawn with (its plan.json, as :func:`prepare_folder` wrote it)."""
    plan = json.loads((Path(out_dir) / PLAN_FILE).read_text())["plan"]
    return SamplePlan(**{**plan, "classes": tuple(plan["classes"])})


def _write_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, clamped and rounded."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_samples(
    model: nn.Module,
    decode: Decode,
    out_dir: str | Path,
    plan: SamplePlan,
    *,
    shift: float,
    sampler: SamplerConfig,
    guidance: Guidance,
    guide_model: nn.Module | None = None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    settings: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Write this process's missing PNGs of `plan` into `out_dir`; returns counts {shard, skipped, written}.

    `settings` (model id, precision, ...) are recorded in plan.json with the sampler and guidance settings so a
    resume cannot mix different runs.
    """
    if plan.num_classes != model.cfg.num_classes:
        raise ConfigError(f"the plan has {plan.num_classes} classes but the model {model.cfg.num_classes}; they must agree")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    record = {"sampler": asdict(sampler), "guidance": asdict(guidance), **(settings or {})}
    prepare_folder(out_dir, plan, json.loads(json.dumps(record)))
    indices = shard(plan.n, rank, world_size)
    todo = pending(out_dir, indices)
    labels = plan.labels()
    device = next(model.parameters()).device
    cfg = model.cfg
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        noise = PerSampleNoise([plan.seed_of(i) for i in batch], device)
        x1 = noise((len(batch), cfg.in_channels, cfg.grid, cfg.grid))
        y = torch.from_numpy(labels[batch]).to(device)
        latents = sample_class_latents(model, y, x1, shift, sampler, guidance, guide_model, step_noise=noise)
        for index, image in zip(batch, to_uint8(decode(latents)), strict=True):
            _write_png(image_path(out_dir, index), image)
        if progress is not None:
            progress(len(batch))
    return {"shard": len(indices), "skipped": len(indices) - len(todo), "written": len(todo)}


def pack_samples(out_dir: str | Path, plan: SamplePlan) -> Path:
    """Pack 000000.png … into `out_dir/samples.npz` (ADM layout) once every index of the plan exists."""
    out_dir = Path(out_dir)
    missing = pending(out_dir, range(plan.n))
    if missing:
        raise DataError(
            f"{out_dir}: {len(missing)} of {plan.n} samples are missing (first: {image_path(out_dir, missing[0]).name}); "
            "finish sampling (rerun to resume) before packing"
        )
    first = np.asarray(Image.open(image_path(out_dir, 0)).convert("RGB"))
    writer = AdmNpzWriter(out_dir / NPZ_FILE, plan.n, first.shape[0], first.shape[1])
    try:
        for i in range(plan.n):
            with Image.open(image_path(out_dir, i)) as im:
                writer.write(np.asarray(im.convert("RGB"))[None])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# ----------------------------------------------------------------------------------------------------------
# srae sample: models, decoder and statistics from their files
# ----------------------------------------------------------------------------------------------------------

RAE_ENCODER = {"kind": "dinov2-reg", "path": "facebook/dinov2-with-registers-base", "input_size": 224}  # RAE's DiTs


@dataclass
class ClassModel:
    """A loaded class DiT (eval mode) with what `srae sample` needs to decode its latents."""

    model: nn.Module
    spec: str  # where it came from
    latents: dict[str, Any]  # the model folder's "latents" record (encoder, decoder, stats, shift_base_dim)
    stats: Any  # LatentStats or None


def load_class_model(spec: str, device: torch.device | str, *, preset: str | None = None, default_preset: str | None = None,
                     flag: str = "--model", preset_flag: str = "--preset") -> ClassModel:
    """An `srae train dit` run or model folder, or a released RAE stage-2 checkpoint of size `preset` (else
    `default_preset`)."""
    from scale_rae_core.models.adapters.class_dit import is_class_dit_folder, load_class_dit, load_rae_stage2
    from scale_rae_core.models.class_dit import CLASS_DIT_PRESETS
    from scale_rae_core.models.stats import load_stats

    path = Path(spec).expanduser()
    if path.is_dir() and not is_class_dit_folder(path) and is_class_dit_folder(path / "model"):
        path = path / "model"  # a run folder: its exported EMA model
    if is_class_dit_folder(path):
        if preset is not None:
            raise ConfigError(f"{preset_flag} is for released RAE checkpoints; {spec} is an srae model folder, "
                              "which records its own size")
        model, info = load_class_dit(path, device)
        stats = info["latents"].get("stats")
        return ClassModel(model, str(path), info["latents"], load_stats(path / stats) if stats else None)
    if not path.is_file():
        raise ConfigError(f"{flag} {spec}: neither an srae class-DiT model (the --out of srae train dit, or its "
                          "model/ folder) nor a released RAE stage2_model.pt")
    preset = preset or default_preset
    if preset not in CLASS_DIT_PRESETS:
        raise ConfigError(f"{flag} {spec} is a checkpoint file: pass {preset_flag} with the size it was trained as "
                          f"(one of {', '.join(CLASS_DIT_PRESETS)}; RAE: DiTDH-XL, its guidance model DiTDH-S)")
    model = load_rae_stage2(path, CLASS_DIT_PRESETS[preset], device, fit_latents=True)
    return ClassModel(model, str(path), {"encoder": RAE_ENCODER, "decoder": "", "stats": None,
                                         "shift_base_dim": 4096}, None)


@dataclass(frozen=True)
class SampleRequest:
    """What `srae sample` was asked for (the CLI's options)."""

    model: str
    out: Path
    plan_n: int
    label_sampling: str = "equal"
    labels: tuple[int, ...] = ()
    seed: int = 0
    sampler: SamplerConfig = SamplerConfig()
    guidance: float = 1.0  # w: CFG, or autoguidance with guide_model
    interval: tuple[float, float] = (0.0, 1.0)
    guide_model: str | None = None
    preset: str | None = None
    guide_preset: str | None = None
    stats: str | None = None  # latent statistics for a released checkpoint (RAE's stat.pt)
    decoder: str | None = None
    batch_size: int = 32


def sample_class_model(req: SampleRequest, backend: Any, progress: Callable[[int], None] | None = None
                       ) -> dict[str, Any]:
    """*Collective.* `srae sample`: this process's shard of the plan, then (main process) the npz."""
    from scale_rae_core.config import EncoderSettings
    from scale_rae_core.flow.class_flow import check_class_guidance, latent_shift
    from scale_rae_core.infer.loading import load_pixel_decoder
    from scale_rae_core.infer.pipeline import Runtime, check_decoder, decode_pixels
    from scale_rae_core.models.dit import grid_to_tokens
    from scale_rae_core.models.stats import load_stats

    device = backend.device
    main = load_class_model(req.model, device, preset=req.preset)
    guide = (load_class_model(req.guide_model, device, preset=req.guide_preset, default_preset="DiTDH-S",
                              flag="--guide-model", preset_flag="--guide-preset") if req.guide_model else None)
    guidance = Guidance("autoguidance" if guide else "cfg", req.guidance, req.interval)
    check_class_guidance(main.model, guidance, guide.model if guide else None)
    stats = main.stats
    released = Path(main.spec).is_file()
    if req.stats is not None:
        if not released:
            raise ConfigError(f"--stats is for released RAE checkpoints; {main.spec} is an srae model folder, which "
                              "records its own latent statistics (or that it was trained without)")
        stats = load_stats(req.stats)
    elif released:
        raise ConfigError(f"--model {req.model} is a released RAE checkpoint: pass --stats with its latent statistics "
                          "(RAE's stat.pt, e.g. stats/dinov2/wReg_base/imagenet1k/stat.pt)")
    cfg = main.model.cfg
    decoder_spec = req.decoder or main.latents.get("decoder") or ""
    if not decoder_spec:
        raise ConfigError(f"{main.spec} records no pixel decoder: pass --decoder (the RAE decoder of its encoder)")
    decoder, _ = load_pixel_decoder(decoder_spec, EncoderSettings(**main.latents["encoder"]), device)
    check_decoder(decoder, cfg.num_tokens, cfg.in_channels, decoder_spec)
    runtime = Runtime(torch.device(device), "fp32")
    if stats is not None:
        stats.mean, stats.var = stats.mean.to(device), stats.var.to(device)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        tokens = grid_to_tokens(latents)  # (B, N, C), normalised
        return decode_pixels(decoder, stats.denormalize(tokens) if stats is not None else tokens, runtime)

    plan = SamplePlan(req.plan_n, cfg.num_classes, req.label_sampling, req.seed, req.labels)
    shift = latent_shift((cfg.in_channels, cfg.grid, cfg.grid), main.latents.get("shift_base_dim", 4096))
    settings = {"model": main.spec, "guide_model": guide.spec if guide else None, "decoder": decoder_spec,
                "stats": req.stats}
    counts = generate_samples(main.model, decode, req.out, plan, shift=shift, sampler=req.sampler, guidance=guidance,
                              guide_model=guide.model if guide else None, batch_size=req.batch_size,
                              rank=backend.rank, world_size=backend.num_processes, settings=settings, progress=progress)
    backend.barrier()
    npz = pack_samples(req.out, plan) if backend.is_main else None
    backend.barrier()
    return {**counts, "npz": str(npz) if npz else None, "n": plan.n, "guidance": guidance.method}
