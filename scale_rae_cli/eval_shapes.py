"""`srae eval shapes`: the shapes benchmark (generation match rate, best-of-k gain, understanding accuracy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scale_rae_cli.options import (
    DecoderOpt,
    GuidanceOpt,
    ModelOpt,
    ProfileOpt,
    QuietOpt,
    SetOpt,
    StepsOpt,
    VerifyOnOpt,
    int_option,
    load,
    require_model,
)

EPILOG = "Example: srae eval shapes --model runs/demo/stage1/export --decoder runs/demo/decoder/decoder --out shapes.json"


def shapes(
    model: ModelOpt = None,
    decoder: DecoderOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Result JSON; samples go to the folder of the same name.")] = Path("shapes_bench.json"),
    n_prompts: Annotated[int | None, int_option("--n-prompts", help="Use the first N of the 36 fixed prompts (default: all).")] = None,
    k: Annotated[int, int_option("--k", help="Samples per prompt (best-of-k is chosen by the model's own reading, --select).")] = 4,
    n_images: Annotated[int, int_option("--n-images", help="Held-out images for understanding (4 questions each).")] = 24,
    seed: Annotated[int | None, int_option("--seed", help="Seed of the first sample per prompt and of the held-out images. Default: run.seed.")] = None,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 1.0,
    verify_on: VerifyOnOpt = "image",
    select: Annotated[str, typer.Option("--select", help="Best-of-k by this self-verification metric (see `srae verify`): "
                                        "loss (the prompt's caption loss given the sample), answer_conf (the yes/no "
                                        "answer, the reference's), ...")] = "loss",
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score generated images with the pixel scorer and check answers on held-out images; JSON plus a table."""
    from scale_rae_core.events import Reporter
    from scale_rae_core.infer.pipeline import Session
    from scale_rae_core.shapes.bench import run_benchmark

    prof = load(profile, set_)
    with (Session.open(require_model(model), prof, decoder=decoder) as session,
          Reporter(None, show_progress=prof.output.progress and not quiet) as rep):
        result = run_benchmark(session, out, n_prompts=n_prompts, k=k, n_images=n_images,
                               seed=prof.run.seed if seed is None else seed, steps=steps, guidance=guidance,
                               verify_on=verify_on, selector=select, reporter=rep)
    print_table(result)
    typer.echo(f"wrote {out}")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from scale_rae_core.shapes.bench import percent, table_rows

    g = result["generation"]
    table = Table(title=f"shapes benchmark: {g['n_prompts']} prompts x {g['k']} samples, "
                        f"{result['understanding']['n_images']} held-out images")
    for name in ("", "colour", "shape", "position", "colour+shape", "full / accuracy"):
        table.add_column(name, justify="left" if not name else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for "84.0% [76.1, 90.3]" in one line per cell
        console = Console(width=max(console.width, 140))
    console.print(table)
    typer.echo(f"scale + verify gain (full match, best of {g['k']} by {g['selector']} on the {g.get('verify_on', 'latent')} "
               f"- single sample): {percent(g['gain'], g.get('gain_ci95'), points=True)}"
               + (f"; colour+shape {percent(g['gain_colour_shape'], g.get('gain_colour_shape_ci95'), points=True)}"
                  if "gain_colour_shape" in g else ""))
    typer.echo("[95% intervals: prompt-level bootstrap for the mean over k and the gain, Wilson for the rest]")
