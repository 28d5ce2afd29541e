"""The embedded default, end to end: the shapes world through every stage srae has, on the tiny profile.

    synth → pack → inspect → verify → decoder → stat → stage1 [→ stage2] → model → generate → understand → scale
          → eval → report

Two recipes train the model: the quick one (the profile as it is: ~11 minutes on 2 cores) and the recipe of the
model that ships with the package, ``BUNDLED_RECIPE`` (stage 1 trained longer, then a stage-2 finetune on the same
data: ~65 minutes). ``srae demo --retrain`` runs the second; ``infer.bundle.install_bundled`` then puts the result
in the package as the default ``--model`` (``--install``), with its provenance and benchmark in ``ABOUT.json``.

Every stage writes into one run folder (``OUT/<stage output>``) and keeps a record in
``OUT/stages/<name>.json``: ``{"status": "running" | "done", "inputs": ..., "info": ...}``. ``inputs`` are the
settings the stage's output depends on (its profile section, the demo options it reads) plus the ``stamp`` of
each stage it needs, so a stage that ran again (in this or an earlier invocation) invalidates what read its old
output. On a re-run a stage is **reused** when its record is done, its inputs are unchanged and its outputs are
still on disk; a stage whose record says "running" with the same inputs was interrupted
and **continues** (the trainers resume from their last checkpoint, the scaling loop from its last sample);
anything else **starts over** (its output folder is deleted first). ``redo`` names stages to start over
whatever their state; everything that needs them follows.

Quality: ``QUALITY_BARS`` lists the numbers the demo must reach (stage, key in that stage's info, minimum).
They are checked at the end and written to ``demo.json``; ``strict`` turns a miss into an error. Tighten a bar
by editing its minimum; add one by naming a stage and a key its info already reports.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale_rae_core.config import Profile
from scale_rae_core.errors import ConfigError, DataError, SraeError
from scale_rae_core.events import Reporter

GENERATION_REQUEST = "Generate an image of {prompt}."  # the form of the world's training prompts
# The recipe of the bundled model: profile overrides applied before the user's --set, plus the stage-2 stage
# (DemoOptions.finetune). Stage 1 learns colour by step ~3,000 at flow_weight 12 (BENCHMARKS.md, "Long runs");
# stage 2 finetunes at the same flow weight.
BUNDLED_RECIPE: tuple[str, ...] = ("stage1.steps=6000", "stage2.steps=2000", "stage2.flow_weight=12")


@dataclass(frozen=True)
class DemoOptions:
    """How much each stage does (the profile decides how long training runs)."""

    n_images: int = 1200  # images in the synthetic world (a tenth held out)
    gen_prompts: int = 6  # prompts for the generate stage (the first of the benchmark's fixed set)
    gen_per_prompt: int = 2  # images per prompt
    understand_images: int = 4  # held-out images asked the world's four questions
    scale_prompts: int = 3  # prompts for scale + verify
    scale_n: int = 2  # samples per round
    scale_rounds: int = 2  # rounds (n x rounds samples per prompt)
    bench_prompts: int | None = None  # benchmark prompts (None = the whole fixed set of 36)
    bench_k: int = 8  # benchmark samples per prompt (best-of-8 by self-verification vs single samples)
    bench_images: int = 24  # benchmark held-out images (4 questions each)
    sampler_steps: int = 25  # flow sampler steps per image (Euler)
    guidance: float = 3.0  # CFG weight for every sample the demo draws (3: colour+shape 66% → 84% on the shipped model)
    finetune: bool = False  # run stage 2 on the stage-1 model (the bundled recipe); the model is its export

    def __post_init__(self) -> None:
        for name in ("n_images", "gen_prompts", "gen_per_prompt", "understand_images", "scale_prompts", "scale_n",
                     "scale_rounds", "bench_k", "bench_images", "sampler_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo option {name} = {getattr(self, name)} must be at least 1")
        if self.guidance < 1.0:
            raise ConfigError(f"--guidance {self.guidance}: use 1 (off) or more")
        if self.n_images < 10:
            raise ConfigError(f"--n {self.n_images}: the demo needs at least 10 images (one in ten is held out)")


@dataclass(frozen=True)
class Bar:
    """A quality bar: ``stages[stage][key] >= minimum`` (``> minimum`` when ``strict``)."""

    label: str
    stage: str
    key: str
    minimum: float
    strict: bool = False

    def met(self, value: float) -> bool:
        return value > self.minimum if self.strict else value >= self.minimum


# The bars for the embedded default (BENCHMARKS.md records where the tiny recipe stands against them).
QUALITY_BARS: tuple[Bar, ...] = (
    Bar("decoder held-out PSNR (dB)", "decoder", "psnr", 25.0),
    # the rate over all k samples per prompt (36 × k draws; the first sample alone is 36 draws and swings ±7 points)
    Bar("generation: colour + shape prompt match, mean over the k samples", "eval", "gen_colour_shape_mean", 0.8),
    Bar("understanding: exact-match accuracy", "eval", "understanding", 0.9),
    Bar("best-of-k by self-verification minus a single sample (full match)", "eval", "gain", 0.0, strict=True),
)


def check_bars(stages: dict[str, dict[str, Any]], bars: tuple[Bar, ...] = QUALITY_BARS) -> list[dict[str, Any]]:
    """Each bar whose stage ran or was reused in ``stages``, with its value and whether it is met."""
    out = []
    for bar in bars:
        value = stages.get(bar.stage, {}).get(bar.key)
        if value is not None:
            out.append({"label": bar.label, "stage": bar.stage, "key": bar.key, "value": value,
                        "minimum": bar.minimum, "strict": bar.strict, "ok": bar.met(value)})
    return out


@dataclass
class DemoResult:
    out: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "continued" | "reused"
    quality: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Context: paths and shared state of one demo run
# ----------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    out: Path
    profile: Profile
    reporter: Reporter
    options: DemoOptions
    command: str = "srae demo"  # the command line that makes this run's model (recorded in model/ABOUT.json)
    _session: Any = None

    @property
    def world(self) -> Path:
        return self.out / "shapes"

    @property
    def packed(self) -> Path:
        return self.out / "packed"

    @property
    def stats(self) -> Path:
        return self.out / "stats.safetensors"

    @property
    def decoder_dir(self) -> Path:
        return self.out / "decoder" / "decoder"

    def export(self, stage: str) -> Path:
        return self.out / stage / "export"

    @property
    def model_export(self) -> Path:
        """The export the model is made of: stage 2's when the run finetunes, else stage 1's."""
        return self.export("stage2" if self.options.finetune else "stage1")

    @property
    def model(self) -> Path:
        """The trained model with its decoder in one folder (``srae generate --model runs/demo/model``)."""
        return self.out / "model"

    @property
    def seed(self) -> int:
        return self.profile.run.seed

    def child_reporter(self, run_dir: Path) -> Reporter:
        """A reporter for a trainer: its events in the trainer's run folder, progress as the demo's."""
        return Reporter(run_dir / self.profile.output.events_file, show_progress=self.reporter.show_progress)

    def stage1_profile(self) -> Profile:
        prof = self.profile.model_copy(deep=True)
        prof.model.stats = str(self.stats)
        heldout = self.world / "heldout" / "conversations.jsonl"
        if not prof.data.eval and heldout.is_file():  # held-out curves, incl. whether the head follows the prompt
            prof.data.eval = str(heldout)
        return prof

    def session(self) -> Any:
        """The trained model and decoder, loaded once for every inference stage."""
        if self._session is None:
            from scale_rae_core.infer.pipeline import Session

            self._session = Session.open(str(self.model), self.profile)  # the decoder is the folder's decoder/
        return self._session

    def sampler(self) -> Any:
        from scale_rae_core.infer.pipeline import SamplerSettings

        return SamplerSettings(steps=self.options.sampler_steps, guidance=self.options.guidance)


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Ctx, bool], dict[str, Any]]  # (ctx, continue an interrupted run) -> info, with "summary"
    outputs: Callable[[Ctx], list[Path]]  # must all exist for the stage to be reused
    inputs: Callable[[Ctx], dict[str, Any]] = lambda ctx: {}
    workdir: Callable[[Ctx], Path | None] = lambda ctx: None  # deleted when the stage starts over
    always: bool = False  # never reused (cheap views of other stages' outputs)
    enabled: Callable[[Ctx], bool] = lambda ctx: True  # a disabled stage is left out (and out of its dependents' inputs)


# ----------------------------------------------------------------------------------------------------
# Data stages
# ----------------------------------------------------------------------------------------------------


def _synth(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.data.synth import synthesize

    _remove(ctx.world)  # synthesis writes into an empty folder only
    s = synthesize(ctx.world, ctx.options.n_images, image_size=ctx.profile.model.decoder.image_size, seed=ctx.seed)
    train, held = s["train"]["n"], s.get("heldout", {}).get("n", 0)
    return {"train_images": train, "heldout_images": held, "root": str(ctx.world),
            "summary": f"{train} training images ({s['train']['n_conversations']} conversations), {held} held out"}


def _pack(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.data.pack import pack

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
    from scale_rae_core.data.shards import inspect

    info = inspect(ctx.packed, samples=3)
    return {"total": info["total"], "shards": len(info["shards"]),
            "examples": [s["conversations"] for s in info["samples"]],
            "summary": f"{info['total']} samples, e.g. {info['samples'][0]['conversations'][0]['value']!r}"}


def _verify(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.data.shards import verify

    report = verify(ctx.packed)
    if not report.ok:
        p = report.problems[0]
        raise DataError(f"{ctx.packed}: verification found {len(report.problems)} problems, first: {p.file}: {p.reason}; "
                        "re-run with --redo pack")
    return {"samples": report.samples, "problems": 0, "summary": f"{report.samples} samples re-read, 0 problems"}


# ----------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step-*/meta.json"))


def _decoder(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.backends.base import backend_for
    from scale_rae_core.eval.recon import evaluate_reconstruction
    from scale_rae_core.models.build import build_encoder, build_stats, load_trained_decoder
    from scale_rae_core.models.rae import RAE
    from scale_rae_core.train.decoder import train_decoder

    run_dir = ctx.out / "decoder"
    resume = resume and _has_checkpoint(run_dir)
    if not resume:
        _remove(run_dir)  # interrupted before its first complete checkpoint
    with ctx.child_reporter(run_dir) as rep:
        result = train_decoder(ctx.profile, ctx.world / "classes", run_dir, resume=resume, reporter=rep)
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
    from scale_rae_core.eval.recon import dataset_latent_stats
    from scale_rae_core.models.build import build_encoder

    encoder = build_encoder(ctx.profile.model.encoder)
    stats = dataset_latent_stats(encoder, ctx.world / "classes", ctx.stats)
    return {"images": stats.count, "out": str(ctx.stats),
            "summary": f"latent mean/var over {stats.count} images → {ctx.stats.name}"}


def _unified(stage: str) -> Callable[[Ctx, bool], dict[str, Any]]:
    """The demo stage that runs ``srae train stage1`` (from scratch) or ``stage2`` (from the stage-1 run)."""

    def run(ctx: Ctx, resume: bool) -> dict[str, Any]:
        from scale_rae_core.train.unified import train_unified

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
    import datetime

    from scale_rae_core.infer.bundle import bundle_model

    about = {"made_by": ctx.command, "commit": _commit(), "profile": ctx.profile.source,
             "date": datetime.date.today().isoformat()}
    path = bundle_model(ctx.model_export, ctx.decoder_dir, ctx.model, half=True, about=about)
    made_of = "stage-2" if ctx.options.finetune else "stage-1"
    return {"path": str(path), "summary": f"{path} (the {made_of} export in fp16 + decoder/: srae generate --model {path} ...)"}


def _commit() -> str | None:
    """The git commit of the srae checkout this runs from, when it is one (provenance for ABOUT.json)."""
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _last_metrics(path: Path) -> dict[str, Any]:
    rows = _jsonl(path)
    return rows[-1] if rows else {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------
# Inference and evaluation stages
# ----------------------------------------------------------------------------------------------------


def _generate(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.eval.shapes import match
    from scale_rae_core.eval.shapes_bench import bench_prompts
    from scale_rae_core.infer.generate import generate_images

    folder = ctx.out / "generate"
    shutil.rmtree(folder, ignore_errors=True)  # cheap: always whole, never half
    prompts = bench_prompts(min(ctx.options.gen_prompts, len(bench_prompts())))
    requests = [GENERATION_REQUEST.format(prompt=p) for p in prompts]
    result = generate_images(ctx.session(), requests, folder, ctx.sampler(), seed=ctx.seed, n=ctx.options.gen_per_prompt,
                             max_new_tokens=8)
    from scale_rae_core.data.images import read_image

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
    from scale_rae_core.data.synth import QUESTIONS
    from scale_rae_core.eval.shapes_bench import normalise_answer
    from scale_rae_core.infer.understand import understand_image

    folder = ctx.out / "understand"
    shutil.rmtree(folder, ignore_errors=True)
    heldout = ctx.world / "heldout"
    by_image: dict[str, list[tuple[str, str]]] = {}
    asked = {question for question, _ in QUESTIONS}  # the four one-word questions (not the free-form caption)
    for rec in _jsonl(heldout / "conversations.jsonl"):
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
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
    from scale_rae_core.eval.shapes_bench import bench_prompts
    from scale_rae_core.scale.run import ScaleSettings, run_scaling
    from scale_rae_core.scale.scorers import build_scorer
    from scale_rae_core.scale.select import write_selection

    o = ctx.options
    lines = [{"index": i, "prompt": p} for i, p in enumerate(bench_prompts(min(o.scale_prompts, len(bench_prompts()))))]
    settings = ScaleSettings(n=o.scale_n, rounds=o.scale_rounds, seed=ctx.seed, batch_size=o.scale_n,
                             max_new_tokens=8, verify_max_new_tokens=4)
    root = run_scaling(ctx.session(), lines, ctx.out / "scale", "stage1", settings, ctx.sampler(),
                       [build_scorer("shapes")], ctx.reporter, rank=0, world_size=1)
    report = write_selection(root, "answer_conf", 1, ctx.out / "scale" / "selected", overwrite=True)
    shapes = report["metrics"]["answer_conf"]["scores"]["shapes"]
    return {"root": str(root), "prompts": len(lines), "samples_per_prompt": settings.total,
            "shapes_selected": shapes["selected"], "shapes_all": shapes["all"],
            "summary": f"{len(lines)} prompts × {settings.total} samples; shapes score of the self-verified pick "
                       f"{shapes['selected']:.2f} vs {shapes['all']:.2f} on average"}


def _eval(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.eval.shapes_bench import run_benchmark, summary

    o = ctx.options
    result = run_benchmark(ctx.session(), ctx.out / "eval_shapes.json", n_prompts=o.bench_prompts, k=o.bench_k,
                           n_images=o.bench_images, seed=ctx.seed, steps=o.sampler_steps, guidance=o.guidance, reporter=ctx.reporter)
    s = summary(result)
    g = result["generation"]
    return {**s, "gain": round(g["gain"], 4), "out": str(ctx.out / "eval_shapes.json"),
            "summary": f"generation full match {100 * s['gen_full_first']:.1f}% (best of {g['k']} "
                       f"{100 * s['gen_full_best_of_k']:.1f}%, oracle {100 * s['gen_full_oracle']:.1f}%), "
                       f"understanding {100 * s['understanding']:.1f}%"}


def _report(ctx: Ctx, resume: bool) -> dict[str, Any]:
    from scale_rae_core.demo_report import build_report
    from scale_rae_core.report import write_report

    path = write_report(ctx.out / "report.html", build_report(ctx.out))
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
          lambda c: {"seed": c.seed, **_sections(c.profile, "decoder_training", "model.encoder", "model.decoder")},
          lambda c: c.out / "decoder"),
    Stage("stat", ("synth",), _stat, lambda c: [c.stats], lambda c: _sections(c.profile, "model.encoder"), lambda c: c.stats),
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
          lambda c: {k: getattr(c.options, k) for k in ("scale_prompts", "scale_n", "scale_rounds", "sampler_steps", "guidance")},
          lambda c: c.out / "scale"),
    Stage("eval", ("model",), _eval, lambda c: [c.out / "eval_shapes.json"],
          lambda c: {k: getattr(c.options, k) for k in ("bench_prompts", "bench_k", "bench_images", "sampler_steps", "guidance")},
          lambda c: c.out / "eval_shapes"),
    Stage("report", (), _report, lambda c: [c.out / "report.html"], always=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ----------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_demo(
    out: Path, profile: Profile, reporter: Reporter, *, options: DemoOptions | None = None, fresh: bool = False,
    redo: tuple[str, ...] | list[str] = (), strict: bool = False, command: str = "srae demo",
    on_stage: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Run (or continue) the demo in ``out``; ``on_stage(name, status, info)`` is called after each stage.

    ``command``: the command line that makes this run's model, recorded in ``OUT/model/ABOUT.json``."""
    options = options or DemoOptions()
    unknown = [name for name in redo if name not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"--redo {unknown[0]}: unknown stage; choose from {', '.join(STAGE_NAMES)}")
    profile.check_runtime()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out, profile, reporter, options, command)
    result = DemoResult(out)
    enabled = {stage.name for stage in STAGES if stage.enabled(ctx)}
    for stage in STAGES:
        if stage.name not in enabled:
            continue
        record_path = out / "stages" / f"{stage.name}.json"
        record = _read_record(record_path)
        # what the output depends on: the stage's own settings, and which output of each stage it needs it read
        after = {n: (_read_record(out / "stages" / f"{n}.json") or {}).get("stamp") for n in stage.needs if n in enabled}
        inputs = json.loads(json.dumps({**stage.inputs(ctx), "after": after}, default=str))
        outputs = stage.outputs(ctx)
        forced = stage.name in redo
        same = record is not None and record.get("inputs") == inputs
        if (not stage.always and not forced and same and record.get("status") == "done"
                and all(p.exists() for p in outputs)):
            info, status = record["info"], "reused"
            reporter.event(f"demo.{stage.name}.reused", **_fields(info))
        else:
            resume = not forced and same and record.get("status") == "running"
            workdir = stage.workdir(ctx)
            if not resume and workdir is not None:
                _remove(workdir)  # start over: nothing half-made or stale may mix in
            _write_record(record_path, {"status": "running", "inputs": inputs})
            reporter.event(f"demo.{stage.name}.start", resume=resume)
            t0 = time.perf_counter()
            info = stage.run(ctx, resume)
            info["seconds"] = round(time.perf_counter() - t0, 2)
            _write_record(record_path, {"status": "done", "inputs": inputs, "info": info, "stamp": time.time_ns()})
            reporter.event(f"demo.{stage.name}.done", **_fields(info))
            status = "continued" if resume else "ran"
        result.stages[stage.name] = info
        result.status[stage.name] = status
        if on_stage is not None:
            on_stage(stage.name, status, info)
    result.quality = check_bars(result.stages)
    summary = {**result.stages, "status": result.status, "quality": result.quality}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    missed = [q for q in result.quality if not q["ok"]]
    if strict and missed:
        q = missed[0]
        raise SraeError(f"quality bar missed: {q['label']} = {q['value']:.4g} {'<=' if q['strict'] else '<'} "
                        f"{q['minimum']:.4g}; train longer "
                        f"(e.g. --set stage1.steps=..., or --retrain: the bundled model's recipe) "
                        f"(details in {out / 'demo.json'})")
    return result


def _fields(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("examples",)}
