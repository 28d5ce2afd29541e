"""The demo's stages, in order: what each runs, what it reads and writes, and what makes it run again."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scale_rae_core.backends import backend_for
from scale_rae_core.config import Profile
from scale_rae_core.data.images import read_image
from scale_rae_core.data.pack import pack
from scale_rae_core.data.shards import inspect, verify
from scale_rae_core.demo.class_dit import GRID, OPTIONS, RESULTS, run_class_dit
from scale_rae_core.demo.context import Ctx, Stage
from scale_rae_core.demo.page import write_report
from scale_rae_core.demo.records import has_checkpoint, read_jsonl, remove
from scale_rae_core.demo.report import build_report
from scale_rae_core.errors import ConfigError, DataError
from scale_rae_core.eval.recon import dataset_latent_stats, evaluate_reconstruction
from scale_rae_core.infer.bundle import bundle_model
from scale_rae_core.infer.generate import generate_images
from scale_rae_core.infer.understand import understand_image
from scale_rae_core.models.build import build_encoder, build_stats, load_trained_decoder
from scale_rae_core.models.rae import RAE
from scale_rae_core.prompts import DEMO_GENERATION_REQUEST, SHAPES_QUESTIONS, with_images
from scale_rae_core.scale.run import ScaleSettings, run_scaling
from scale_rae_core.scale.select import write_selection
from scale_rae_core.shapes.bench import bench_prompts, normalise_answer, run_benchmark, summary
from scale_rae_core.shapes.scorer import ShapesScorer, match
from scale_rae_core.shapes.synth import synthesize
from scale_rae_core.train.decoder import train_decoder
from scale_rae_core.train.latent_cache import MANIFEST, cache_latents
from scale_rae_core.train.unified import train_unified

# ----------------------------------------------------------------------------------------------------
# Data stages
# ----------------------------------------------------------------------------------------------------


def _synth(ctx: Ctx, resume: bool) -> dict[str, Any]:
    remove(ctx.world)  # synthesis writes into an empty folder only
    s = synthesize(ctx.world, ctx.options.n_images, image_size=ctx.profile.model.decoder.image_size, seed=ctx.seed)
    train, held = s["train"]["n"], s.get("heldout", {}).get("n", 0)
    return {"train_images": train, "heldout_images": held, "root": str(ctx.world),
            "summary": f"{train} training images ({s['train']['n_conversations']} conversations), {held} held out"}


def _pack(ctx: Ctx, resume: bool) -> dict[str, Any]:
    with ctx.reporter.task("packing", None) as advance:
        last = 0

        def progress(done: int, total: int) -> None:
            nonlocal last
            advance(done - last, total=total)
            last = done

        s = pack(ctx.world / "conversations.jsonl", ctx.packed, resume=resume, samples_per_shard=1000, progress=progress)
    return {"packed": s.packed, "skipped": s.skipped, "shards": s.shards, "resumed_shards": s.resumed_shards,
            "summary": f"{s.packed} samples in {s.shards} shards, {s.skipped} skipped"}


def _inspect(ctx: Ctx, resume: bool) -> dict[str, Any]:
    info = inspect(ctx.packed, samples=3)
    return {"total": info["total"], "shards": len(info["shards"]),
            "examples": [s["conversations"] for s in info["samples"]],
            "summary": f"{info['total']} samples, e.g. {info['samples'][0]['conversations'][0]['value']!r}"}


def _verify(ctx: Ctx, resume: bool) -> dict[str, Any]:
    report = verify(ctx.packed)
    if not report.ok:
        p = report.problems[0]
        raise DataError(f"{ctx.packed}: verification found {len(report.problems)} problems, first: {p.file}: {p.reason}; "
                        "re-run with --redo pack")
    return {"samples": report.samples, "problems": 0, "summary": f"{report.samples} samples re-read, 0 problems"}


# ----------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------


def _decoder(ctx: Ctx, resume: bool) -> dict[str, Any]:
    run_dir, data = ctx.out / "decoder", ctx.world / "classes"
    resume = resume and has_checkpoint(run_dir)
    if not resume:
        remove(run_dir)  # interrupted before its first complete checkpoint
    if ctx.options.decoder_latent_cache:
        cache = ctx.out / "decoder_latents"
        if not resume:
            remove(cache)  # made for this run's settings; a few seconds
        if not (cache / MANIFEST).is_file():  # written last: until then a rerun continues the chunks
            with backend_for(ctx.profile.backend) as backend:
                cache_latents(ctx.profile, data, cache, backend, for_="decoder", reporter=ctx.reporter)
        data = cache
    with ctx.child_reporter(run_dir) as rep:
        result = train_decoder(ctx.profile, data, run_dir, resume=resume, reporter=rep)
    if result.export_dir is None:
        raise ConfigError(f"{ctx.profile.source}: checkpoint.export = false leaves the demo without a decoder; set it to true")
    with backend_for(ctx.profile.backend) as backend:
        encoder = build_encoder(ctx.profile.model.encoder)
        rae = RAE(encoder, load_trained_decoder(str(result.export_dir), encoder, what="decoder"),
                  stats=build_stats(ctx.profile.model)).to(backend.device)
        recon = evaluate_reconstruction(rae, ctx.world / "heldout" / "captioned", fid_net="random",
                                        out=run_dir / "recon.json")
    last = result.records[-1] if result.records else {}
    return {"steps": result.step, "l1": last.get("l1"), "psnr": round(recon["psnr"], 3), "ssim": round(recon["ssim"], 4),
            "export": str(result.export_dir),
            "summary": f"{result.step} steps, held-out PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f} "
                       f"({recon['num_images']} images)"}


def _stat(ctx: Ctx, resume: bool) -> dict[str, Any]:
    encoder = build_encoder(ctx.profile.model.encoder)
    stats = dataset_latent_stats(encoder, ctx.world / "classes", ctx.stats)
    return {"images": stats.count, "out": str(ctx.stats),
            "summary": f"latent mean/var over {stats.count} images → {ctx.stats.name}"}


def _unified(stage: str) -> Callable[[Ctx, bool], dict[str, Any]]:
    """The demo stage that runs ``srae train stage1`` (from scratch) or ``stage2`` (from the stage-1 run)."""

    def run(ctx: Ctx, resume: bool) -> dict[str, Any]:
        run_dir = ctx.out / stage
        init_from = ctx.out / "stage1" if stage == "stage2" else None
        with ctx.child_reporter(run_dir) as rep:
            r = train_unified(ctx.stage1_profile(), stage, ctx.packed, run_dir, init_from=init_from, resume=resume,
                              reporter=rep)
        if r.export_dir is None:
            raise ConfigError(f"{ctx.profile.source}: checkpoint.export = false leaves the demo without a model; set it to true")
        last = _last_metrics(run_dir / "metrics.jsonl")
        start = " from the stage-1 model," if init_from else ","
        return {"steps": r.step, "loss": last.get("loss"), "ce": last.get("ce"), "flow": last.get("flow"),
                "export": str(r.export_dir),
                "summary": f"{r.step} steps{start} loss {last.get('loss', float('nan')):.4f} "
                           f"(ce {last.get('ce', float('nan')):.4f}, flow {last.get('flow', float('nan')):.4f})"}

    return run


def _model(ctx: Ctx, resume: bool) -> dict[str, Any]:
    about = {"made_by": ctx.command, "commit": _commit(), "profile": ctx.profile.source,
             "date": datetime.date.today().isoformat()}
    path = bundle_model(ctx.model_export, ctx.decoder_dir, ctx.model, half=True, about=about)
    made_of = "stage-2" if ctx.options.finetune else "stage-1"
    return {"path": str(path), "summary": f"{path} (the {made_of} export in fp16 + decoder/: srae generate --model {path} ...)"}


def _commit() -> str | None:
    """The git commit of the srae checkout this runs from, when it is one (provenance for ABOUT.json)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _last_metrics(path: Path) -> dict[str, Any]:
    rows = read_jsonl(path)
    return rows[-1] if rows else {}


# ----------------------------------------------------------------------------------------------------
# Inference and evaluation stages
# ----------------------------------------------------------------------------------------------------


def _generate(ctx: Ctx, resume: bool) -> dict[str, Any]:
    folder = ctx.out / "generate"
    shutil.rmtree(folder, ignore_errors=True)  # cheap: always whole, never half
    prompts = bench_prompts(min(ctx.options.gen_prompts, len(bench_prompts())))
    requests = [DEMO_GENERATION_REQUEST.format(prompt=p) for p in prompts]
    result = generate_images(ctx.session(), requests, folder, ctx.sampler(), seed=ctx.seed, n=ctx.options.gen_per_prompt,
                             max_new_tokens=8)
    rows = []
    for rec in result.images:
        caption = prompts[requests.index(rec.prompt)]
        m = match(caption, read_image(rec.png))
        rows.append({"prompt": caption, "request": rec.prompt, "seed": rec.seed, "png": rec.png.name,
                     "full": bool(m["full"]), "colour": bool(m["colour"]), "shape": bool(m["shape"]),
                     "position": bool(m["position"])})
    (folder / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    full = sum(r["full"] for r in rows)
    return {"images": len(rows), "full_match": round(full / len(rows), 4),
            "summary": f"{len(rows)} images for {len(prompts)} prompts, {full}/{len(rows)} match their prompt fully"}


def _understand(ctx: Ctx, resume: bool) -> dict[str, Any]:
    folder = ctx.out / "understand"
    shutil.rmtree(folder, ignore_errors=True)
    heldout = ctx.world / "heldout"
    by_image: dict[str, list[tuple[str, str]]] = {}
    asked = {question for question, _ in SHAPES_QUESTIONS}  # the four one-word questions (not the free-form caption)
    for rec in read_jsonl(heldout / "conversations.jsonl"):
        question = rec["conversations"][0]["value"].removeprefix(with_images(""))
        if rec["metadata"].get("task") == "understanding" and question in asked:
            by_image.setdefault(rec["image"], []).append((question, rec["conversations"][1]["value"]))
    if not by_image:
        raise DataError(f"{heldout}: no held-out understanding samples; re-run with more images (--n)")
    rows = []
    for image in list(by_image)[: ctx.options.understand_images]:
        qa = []
        for question, expected in by_image[image]:
            a = understand_image(ctx.session(), heldout / image, question, folder, ctx.sampler(), seed=ctx.seed,
                                 max_new_tokens=8)
            qa.append({"question": question, "expected": expected, "answer": a.text,
                       "correct": normalise_answer(a.text) == expected})
        rows.append({"image": str(heldout / image), "qa": qa})
    (folder / "answers.json").write_text(json.dumps(rows, indent=1) + "\n")
    right = sum(q["correct"] for r in rows for q in r["qa"])
    total = sum(len(r["qa"]) for r in rows)
    return {"images": len(rows), "questions": total, "accuracy": round(right / total, 4),
            "summary": f"{right}/{total} answers right on {len(rows)} held-out images"}


def _scale(ctx: Ctx, resume: bool) -> dict[str, Any]:
    o = ctx.options
    lines = [{"index": i, "prompt": p} for i, p in enumerate(bench_prompts(min(o.scale_prompts, len(bench_prompts()))))]
    settings = ScaleSettings(n=o.scale_n, rounds=o.scale_rounds, seed=ctx.seed, batch_size=o.scale_n,
                             max_new_tokens=8, verify_max_new_tokens=4, verify_on=o.verify_on)
    root = run_scaling(ctx.session(), lines, ctx.out / "scale", "stage1", settings, ctx.sampler(),
                       [ShapesScorer()], ctx.reporter, rank=0, world_size=1)
    report = write_selection(root, o.selector, 1, ctx.out / "scale" / "selected", overwrite=True)
    shapes = report["metrics"][o.selector]["scores"]["shapes"]
    return {"root": str(root), "prompts": len(lines), "samples_per_prompt": settings.total,
            "shapes_selected": shapes["selected"], "shapes_all": shapes["all"],
            "summary": f"{len(lines)} prompts × {settings.total} samples; shapes score of the self-verified pick "
                       f"{shapes['selected']:.2f} vs {shapes['all']:.2f} on average"}


def _eval(ctx: Ctx, resume: bool) -> dict[str, Any]:
    o = ctx.options
    result = run_benchmark(ctx.session(), ctx.out / "eval_shapes.json", n_prompts=o.bench_prompts, k=o.bench_k,
                           n_images=o.bench_images, seed=ctx.seed, steps=o.sampler_steps, guidance=o.guidance,
                           verify_on=o.verify_on, selector=o.selector, reporter=ctx.reporter)
    s = summary(result)
    g = result["generation"]
    return {**s, "out": str(ctx.out / "eval_shapes.json"),
            "summary": f"generation colour+shape {100 * s['gen_colour_shape_mean']:.1f}% per sample (best of {g['k']} "
                       f"by {g['selector']} {100 * g['best_of_k']['colour_shape']:.1f}%; full match oracle "
                       f"{100 * s['gen_full_oracle']:.1f}%), understanding {100 * s['understanding']:.1f}%"}


def _report(ctx: Ctx, resume: bool) -> dict[str, Any]:
    path = write_report(ctx.out / "report.html", build_report(ctx.out, STAGE_NAMES))
    return {"path": str(path), "bytes": path.stat().st_size, "summary": f"{path} ({path.stat().st_size // 1024} KiB)"}


def _sections(profile: Profile, *names: str) -> dict[str, Any]:
    data = profile.to_toml_dict()
    out: dict[str, Any] = {}
    for name in names:
        node: Any = data
        for part in name.split("."):
            node = node[part]
        out[name] = node
    return out


STAGES: tuple[Stage, ...] = (
    Stage("synth", (), _synth, lambda c: [c.world / "synth.json"],
          lambda c: {"n": c.options.n_images, "seed": c.seed, "image_size": c.profile.model.decoder.image_size},
          lambda c: c.world),
    Stage("pack", ("synth",), _pack, lambda c: [c.packed / "wds_manifest.json"], workdir=lambda c: c.packed),
    Stage("inspect", ("pack",), _inspect, lambda c: [], always=True),
    Stage("verify", ("pack",), _verify, lambda c: []),
    Stage("decoder", ("synth",), _decoder, lambda c: [c.decoder_dir / "config.json"],
          lambda c: {"seed": c.seed, "latent_cache": c.options.decoder_latent_cache,
                     **_sections(c.profile, "decoder_training", "model.encoder", "model.decoder")},
          lambda c: c.out / "decoder"),
    Stage("stat", ("synth",), _stat, lambda c: [c.stats], lambda c: _sections(c.profile, "model.encoder"), lambda c: c.stats),
    Stage("dit", ("synth", "decoder", "stat"), run_class_dit, lambda c: [c.dit_dir / RESULTS, c.dit_dir / GRID],
          lambda c: {"seed": c.seed, **_sections(c.profile, "dit_training", "model.encoder"),
                     **{k: getattr(c.options, k) for k in OPTIONS}},
          lambda c: c.dit_dir),
    Stage("stage1", ("pack", "stat"), _unified("stage1"), lambda c: [c.export("stage1") / "config.json"],
          lambda c: {"seed": c.seed, **_sections(c.profile, "stage1", "model.encoder", "model.llm", "model.dit", "data")},
          lambda c: c.out / "stage1"),
    Stage("stage2", ("pack", "stage1"), _unified("stage2"), lambda c: [c.export("stage2") / "config.json"],
          lambda c: {"seed": c.seed, **_sections(c.profile, "stage2", "data")}, lambda c: c.out / "stage2",
          enabled=lambda c: c.options.finetune),
    Stage("model", ("stage1", "stage2", "decoder"), _model,
          lambda c: [c.model / "config.json", c.model / "decoder" / "config.json"],
          lambda c: {"finetune": c.options.finetune}),
    Stage("generate", ("model",), _generate, lambda c: [c.out / "generate" / "results.json"],
          lambda c: {k: getattr(c.options, k) for k in ("gen_prompts", "gen_per_prompt", "sampler_steps", "guidance")},
          lambda c: c.out / "generate"),
    Stage("understand", ("model", "synth"), _understand, lambda c: [c.out / "understand" / "answers.json"],
          lambda c: {"understand_images": c.options.understand_images}, lambda c: c.out / "understand"),
    Stage("scale", ("model",), _scale, lambda c: [c.out / "scale" / "selected" / "report.json"],
          lambda c: {k: getattr(c.options, k) for k in ("scale_prompts", "scale_n", "scale_rounds", "sampler_steps", "guidance",
                                                        "selector", "verify_on")},
          lambda c: c.out / "scale"),
    Stage("eval", ("model",), _eval, lambda c: [c.out / "eval_shapes.json"],
          lambda c: {k: getattr(c.options, k) for k in ("bench_prompts", "bench_k", "bench_images", "sampler_steps", "guidance",
                                                        "selector", "verify_on")},
          lambda c: c.out / "eval_shapes"),
    Stage("report", (), _report, lambda c: [c.out / "report.html"], always=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
