"""`srae demo`: the whole pipeline on the embedded shapes world, offline, on the tiny profile."""

from __future__ import annotations

from pathlib import Path

import typer

from scale_rae_cli.options import ProfileOpt, QuietOpt, SetOpt, load

EPILOG = "Example: srae demo --out runs/demo   (re-running continues; --fresh starts over)"


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder for every stage's output."),
    n: int = typer.Option(1200, "--n", help="Images in the synthetic world."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run folder first instead of continuing it."),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the pipeline on the shapes world: synth → pack → inspect → verify."""
    from scale_rae_core.demo import run_demo
    from scale_rae_core.events import Reporter

    prof = load(profile, set_)
    with Reporter(out / prof.output.events_file, show_progress=not quiet) as rep:
        result = run_demo(out, prof, rep, n_images=n, fresh=fresh)
    for name, info in result.stages.items():
        details = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("examples", "root"))
        typer.echo(f"{name:8s} {details}")
    typer.echo(f"done: {out} (summary in {out / 'demo.json'})")
