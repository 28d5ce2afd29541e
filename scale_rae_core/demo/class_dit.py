"""The demo's class-conditional stage: RAE stage 2 on the shapes world, judged by the shapes reader.

A DiT^DH (the profile's ``[dit_training]``) learns the 12 colour x shape classes (``SHAPE_CLASSES``) in the latent
space the demo already has — the encoder, the decoder the ``decoder`` stage trained and the statistics of
``stat`` — then::

    [srae latent cache →] srae train dit → srae sample (``class_samples`` per class, equal labels)
        → class accuracy of the samples (``shapes.scorer.class_accuracy``)
        → FID of the samples against the held-out renders (``srae eval fid``; its feature net named in the record)
        → linear probe of the encoder on the class folders (``srae eval probe``: top-1 on its held-out split)
        → grid.png: one row per class, its samples left to right

Files, in ``OUT/dit/``::

    latents/        the latent cache (when ``class_latent_cache``)        train/       the srae train dit run
    samples/        srae sample's PNGs, plan.json and samples.npz         train/model/ the EMA model it exported
    heldout.npz     the FID reference                                     fid.json, probe.json
    results.json    every sample: index, PNG, class, the class the reader saw; accuracy overall and per class
    grid.png        the samples, one row per class in SHAPE_CLASSES order

Each step continues what an interrupted run left: the cache skips written chunks, the trainer resumes from its
newest checkpoint (exactly), sampling skips written PNGs; the judging steps are cheap and run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from scale_rae_core.backends import backend_for
from scale_rae_core.data.images import read_image
from scale_rae_core.demo.context import Ctx
from scale_rae_core.demo.records import has_checkpoint, read_jsonl, remove
from scale_rae_core.errors import ConfigError
from scale_rae_core.eval.adm_npz import folder_to_npz
from scale_rae_core.eval.fid import evaluate_fid
from scale_rae_core.eval.probe import linear_probe
from scale_rae_core.eval.samples import (
    NPZ_FILE,
    SampleRequest,
    image_path,
    read_plan,
    sample_class_model,
)
from scale_rae_core.files import atomic_write
from scale_rae_core.flow.sampler import SamplerConfig
from scale_rae_core.models.build import build_encoder
from scale_rae_core.shapes.scorer import class_accuracy
from scale_rae_core.shapes.synth import SHAPE_CLASSES
from scale_rae_core.train.dit import train_dit
from scale_rae_core.train.latent_cache import MANIFEST, cache_latents

RESULTS = "results.json"
GRID = "grid.png"
OPTIONS = ("class_samples", "class_sampler", "class_steps", "class_guidance", "class_latent_cache")  # its DemoOptions


def run_class_dit(ctx: Ctx, resume: bool) -> dict[str, Any]:
    """The stage (see the module docstring) -> its info, with ``summary``."""
    folder, o = ctx.dit_dir, ctx.options
    steps, classes = _train(ctx, resume)
    samples = _sample(ctx)
    judged = judge_samples(samples, classes, folder / RESULTS)
    grid = write_grid(samples, judged["samples"], classes, folder / GRID)
    ref = folder_to_npz(ctx.world / "heldout" / "classes", folder / "heldout.npz")["out"]
    fid = evaluate_fid(samples / NPZ_FILE, ref, out=folder / "fid.json")
    probe = linear_probe(build_encoder(ctx.profile.model.encoder), ctx.world / "classes", seed=ctx.seed,
                         out=folder / "probe.json")
    last = (read_jsonl(folder / "train" / "metrics.jsonl") or [{}])[-1]
    acc, n = judged["accuracy"], len(judged["samples"])
    return {
        "steps": steps, "loss": last.get("loss"), "preset": ctx.profile.dit_training.preset,
        "latent_cache": o.class_latent_cache, "samples": n, "per_class": o.class_samples,
        "sampler": o.class_sampler, "sampler_steps": o.class_steps, "guidance": o.class_guidance,
        "class_accuracy": round(acc, 4), "class_accuracy_per_class": judged["per_class"],
        "colour_accuracy": round(judged["colour_accuracy"], 4), "shape_accuracy": round(judged["shape_accuracy"], 4),
        "fid": round(fid["fid"], 3), "fid_network": fid["network"], "fid_reference_images": fid["num_reference"],
        "probe_top1": round(probe["top1"], 4), "probe_heldout_images": probe["num_heldout"],
        "model": str(folder / "train" / "model"), "grid": str(grid),
        "summary": f"DiT^DH {ctx.profile.dit_training.preset}, {steps} steps; {n} samples "
                   f"({o.class_samples} per class): class accuracy {100 * acc:.1f}% by the shapes reader (colour "
                   f"{100 * judged['colour_accuracy']:.0f}%, shape {100 * judged['shape_accuracy']:.0f}%), "
                   f"FID {fid['fid']:.2f} vs {fid['num_reference']} held-out renders [{fid['network']}]; encoder "
                   f"linear probe {100 * probe['top1']:.1f}% ({probe['num_heldout']} held-out images)",
    }


def _train(ctx: Ctx, resume: bool) -> tuple[int, list[str]]:
    """``srae train dit`` on the class folders (or their latent cache) -> (its steps, the class names of its labels)."""
    prof, run_dir, data = ctx.dit_profile(), ctx.dit_dir / "train", ctx.world / "classes"
    if prof.dit_training.num_classes != len(SHAPE_CLASSES):
        raise ConfigError(f"{prof.source}: dit_training.num_classes = {prof.dit_training.num_classes}, but the shapes "
                          f"world has {len(SHAPE_CLASSES)} classes (colour x shape); set it to {len(SHAPE_CLASSES)}")
    if ctx.options.class_latent_cache:
        cache = ctx.dit_dir / "latents"
        if not (cache / MANIFEST).is_file():  # written last: until then a rerun continues the chunks
            with backend_for(prof.backend) as backend:
                cache_latents(prof, data, cache, backend, reporter=ctx.reporter)
        data = cache
    resume = resume and has_checkpoint(run_dir)
    if not resume:
        remove(run_dir)  # interrupted before its first complete checkpoint
    with ctx.child_reporter(run_dir) as rep:
        result = train_dit(prof, data, run_dir, resume=resume, reporter=rep)
    if result.export_dir is None:
        raise ConfigError(f"{prof.source}: checkpoint.export = false leaves the demo without a class DiT; set it to true")
    config = json.loads((result.export_dir / "config.json").read_text())
    return result.step, config["classes"]


def _sample(ctx: Ctx) -> Path:
    """``srae sample`` of the trained model: ``class_samples`` per class, equal labels -> the samples folder."""
    o, out = ctx.options, ctx.dit_dir / "samples"
    request = SampleRequest(model=str(ctx.dit_dir / "train"), out=out, plan_n=o.class_samples * len(SHAPE_CLASSES),
                            label_sampling="equal", seed=ctx.seed, sampler=SamplerConfig(o.class_sampler, o.class_steps),
                            guidance=o.class_guidance, batch_size=len(SHAPE_CLASSES) * 4)
    with backend_for(ctx.profile.backend) as backend, ctx.reporter.task("class samples", request.plan_n) as advance:
        sample_class_model(request, backend, progress=advance)
    return out


def judge_samples(samples: Path, classes: list[str], out: Path) -> dict[str, Any]:
    """Read every sample of the plan in ``samples`` with the shapes reader; the verdicts are also written to ``out``.

    ``classes`` names the model's labels (label i is ``classes[i]``)."""
    plan = read_plan(samples)
    labels = [classes[y] for y in plan.labels()]
    acc = class_accuracy([read_image(image_path(samples, i)) for i in range(plan.n)], labels)
    rows = [{"index": i, "png": image_path(samples, i).name, "class": label, "read": seen, "ok": seen == label}
            for i, (label, seen) in enumerate(zip(labels, acc["read"], strict=True))]
    colour = sum(r["read"].split("_")[0] == r["class"].split("_")[0] for r in rows if r["read"]) / len(rows)
    shape = sum(r["read"].split("_")[-1] == r["class"].split("_")[-1] for r in rows if r["read"]) / len(rows)
    result = {"classes": classes, "accuracy": acc["accuracy"], "colour_accuracy": colour, "shape_accuracy": shape,
              "per_class": acc["per_class"], "samples": rows}
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    return result


def write_grid(samples: Path, rows: list[dict[str, Any]], classes: list[str], out: Path) -> Path:
    """One PNG of the samples: a row per class (``classes`` order), its samples by index left to right."""
    by_class = {c: [r for r in rows if r["class"] == c] for c in classes}
    width = max(len(v) for v in by_class.values())
    w, h = read_image(samples / rows[0]["png"]).size
    grid = Image.new("RGB", (width * w, len(classes) * h), (255, 255, 255))
    for i, c in enumerate(classes):
        for j, r in enumerate(by_class[c]):
            grid.paste(read_image(samples / r["png"]), (j * w, i * h))
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    return out
