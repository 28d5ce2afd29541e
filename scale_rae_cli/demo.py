"""`srae demo`: the whole pipeline on the embedded shapes world, offline, on the tiny profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scale_rae_cli.options import ProfileOpt, QuietOpt, SetOpt, float_option, int_option, load

EPILOG = (
    "Example: srae demo --out runs/demo   (re-running reuses finished stages; --fresh starts over; --redo STAGE trains "
    "again; shorter: --set decoder_training.steps=300 --set stage1.steps=60). Rebuild the bundled model: "
    "srae demo --retrain --install (about 40 min on 2 cores)"
)


def _knob(flag: str, help_text: str) -> Any:
    """A test/tuning knob (an integer), kept out of --help."""
    return int_option(flag, hidden=True, help=help_text)


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder for every stage's output.")] = Path("runs/demo"),
    n: Annotated[int, int_option("--n", help="Images in the synthetic world (one in ten held out).")] = 1200,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the run folder first instead of continuing it.")] = False,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train with the recipe of the model bundled with srae: "
                                          "stage 1 for 3,000 steps, then stage 2 for 1,000 (about 40 min on 2 cores); "
                                          "--set still overrides.")] = False,
    install: Annotated[bool, typer.Option("--install", help="At the end, make the run's model the bundled default "
                                          "--model (refused while a quality bar is missed).")] = False,
    redo: Annotated[list[str] | None, typer.Option("--redo", help="Start this stage over, and every stage that needs it (repeatable).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a quality bar (see demo.json) is missed.")] = False,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    sampler_steps: Annotated[int, _knob("--sampler-steps", "Flow sampler steps per image.")] = 25,
    guidance: Annotated[float, float_option("--guidance", help="CFG weight for every sample the demo draws (1 = off).")] = 3.0,
    gen_prompts: Annotated[int, _knob("--gen-prompts", "Prompts in the generate stage.")] = 6,
    understand_images: Annotated[int, _knob("--understand-images", "Held-out images in the understand stage.")] = 4,
    scale_n: Annotated[int, _knob("--scale-n", "Scale stage: samples per round.")] = 2,
    scale_rounds: Annotated[int, _knob("--scale-rounds", "Scale stage: rounds.")] = 2,
    bench_prompts: Annotated[int | None, _knob("--bench-prompts", "Benchmark prompts (default all 36).")] = None,
    bench_k: Annotated[int, _knob("--bench-k", "Benchmark samples per prompt.")] = 8,
    bench_images: Annotated[int, _knob("--bench-images", "Benchmark held-out images.")] = 24,
    class_samples: Annotated[int, _knob("--class-samples", "Class stage: samples drawn per class.")] = 8,
    class_steps: Annotated[int, _knob("--class-steps", "Class stage: sampler steps per sample.")] = 25,
) -> None:
    """Run the pipeline on the shapes world: synth → pack → inspect → verify → decoder → stat → dit (a class-conditional
    DiT^DH on the 12 colour × shape classes) → stage1 [→ stage2 with --retrain] → model → generate → understand → scale
    → eval → report (report.html)."""
    import shlex

    from scale_rae_core.demo.bars import INSTALL_BARS, QUALITY_BARS
    from scale_rae_core.demo.context import DemoOptions
    from scale_rae_core.demo.run import BUNDLED_RECIPE, run_demo
    from scale_rae_core.events import Reporter

    prof = load(profile, [*(BUNDLED_RECIPE if retrain else ()), *(set_ or [])])
    options = DemoOptions(n_images=n, gen_prompts=gen_prompts, understand_images=understand_images, scale_n=scale_n,
                          scale_rounds=scale_rounds, bench_prompts=bench_prompts, bench_k=bench_k,
                          bench_images=bench_images, sampler_steps=sampler_steps,
                          guidance=guidance, finetune=retrain, class_samples=class_samples, class_steps=class_steps)
    # what the model depends on, as a command that makes it again
    made_by = ["srae", "demo", "--n", str(n), *(["--profile", profile] if profile else []), *(["--retrain"] if retrain else []),
               *(arg for item in set_ or [] for arg in ("--set", item))]

    def echo(name: str, status: str, info: dict[str, Any]) -> None:
        tag = "" if status == "ran" else f" ({status})"
        typer.echo(f"{name:10s} {info.get('summary', '')}{tag}")

    with Reporter(out / prof.output.events_file, show_progress=prof.output.progress and not quiet) as rep:
        result = run_demo(out, prof, rep, options=options, fresh=fresh, redo=list(redo or []), strict=strict,
                          command=shlex.join(made_by), on_stage=echo,
                          bars=INSTALL_BARS if retrain or install else QUALITY_BARS)
    _print_quality(result.quality, retrain)
    typer.echo(f"done: {out} (report {out / 'report.html'}, summary {out / 'demo.json'})")
    if install:
        from scale_rae_core.demo.install import install_bundled

        path = install_bundled(out / "model", out / "eval_shapes.json", result.quality)
        typer.echo(f"installed: {path} is now the default --model")


def _print_quality(quality: list[dict[str, Any]], retrain: bool) -> None:
    for q in quality:
        mark = "ok" if q["ok"] else "BELOW BAR"
        typer.echo(f"quality    {q['label']}: {q['value']:.4g} (bar {'>' if q.get('strict') else '>='} {q['minimum']:.4g}) {mark}")
    if quality:
        budget = "with the bundled model's recipe" if retrain else "in the demo's time budget"
        typer.echo(f"           (the bars judge this run's model, trained {budget};" + bundled_line() + ")")


def bundled_line() -> str:
    """The bundled model's own benchmark, from its ABOUT.json, for comparison with the run's."""
    import json

    from scale_rae_core.infer.loading import bundled_model

    path = bundled_model()
    try:
        bench = json.loads((path / "ABOUT.json").read_text())["shapes_benchmark"] if path else None
    except (OSError, ValueError, KeyError):
        bench = None
    if not bench:
        return " no bundled model to compare with"
    return (f" the bundled model (srae demo --retrain): colour+shape {100 * bench['gen_colour_shape_mean']:.1f}%, "
            f"understanding {100 * bench['understanding']:.1f}%, best of k {100 * bench['gen_full_best_of_k']:.1f}% "
            f"vs {100 * bench['gen_full_mean']:.1f}% per sample, see {path / 'ABOUT.json'}")
