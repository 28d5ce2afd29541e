"""`srae scale` (best-of-N generation with scores) and `srae verify` (select the best K per prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scale_rae_cli.options import (
    AcceptChangesOpt,
    DecoderOpt,
    DtypeOpt,
    GuidanceOpt,
    LayoutOpt,
    ModelOpt,
    ProfileOpt,
    QuietOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    TextTokensOpt,
    VerifyOnOpt,
    int_option,
    load,
    require_model,
)

VERIFY_EPILOG = (
    "Example: srae verify runs/scale/Scale-RAE-Qwen1-5B_DiT2-4B/2_verify_scale_latent --metric combined --keep 4 "
    "--layout geneval   (writes ..._combined_verified/{index}/samples/*.png for GenEval, plus report.json)"
)


def verify(
    directory: Annotated[Path, typer.Argument(help="A scaling run: {index:05d}/metadata.jsonl + samples/{k:05d}.png per prompt (srae scale or the reference's scaling_experiment.py).")],
    metric: Annotated[str, typer.Option("--metric", "-m", help="combined | image_reward | answer_conf | answer_logits | prompt_conf | image_conf | response_conf | loss | any score recorded under 'scores' (e.g. shapes).")] = "combined",
    keep: Annotated[int, int_option("--keep", "-k", min=1, help="Samples kept per prompt (all are kept where a prompt has fewer).")] = 4,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output tree. Default: DIR_<metric>_verified beside DIR.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier `srae verify` output at --out.")] = False,
    layout: LayoutOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the output path, no table.")] = False,
) -> None:
    """Keep the best K samples per prompt by a metric; write the per-prompt tree (checked for GenEval with --layout
    geneval) or DPG-Bench grids (--layout dpg), and a report."""
    from scale_rae_core.scale.select import write_selection

    report = write_selection(directory, metric, keep, out, overwrite=overwrite, layout=layout)
    if not quiet:
        _print_report(report)
    typer.echo(f"wrote {report['out']} ({report['prompts']} prompts, {len(report['failed'])} failed, "
               f"report in {Path(report['out']) / 'report.json'})")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()  # folder names and reasons are escaped: printed as they are, not read as markup
    scores = sorted({n for row in report["metrics"].values() for n in row["scores"]})
    table = Table(title=f"selection of {report['keep']} per prompt over {report['prompts']} prompts "
                        f"({report['samples_per_prompt']['min']}-{report['samples_per_prompt']['max']} samples each)")
    table.add_column("metric")
    table.add_column("own value: selected / all", justify="right")
    for name in scores:
        table.add_column(f"{name}: selected / all", justify="right")
    for metric, row in report["metrics"].items():
        mark = " *" if metric == report["metric"] else ""
        cells = [f"{_fmt(row['value']['selected'])} / {_fmt(row['value']['all'])}"]
        cells += [f"{_fmt(row['scores'][n]['selected'])} / {_fmt(row['scores'][n]['all'])}" for n in scores]
        table.add_row(metric + mark, *cells)
    console.print(table)
    if report["short"]:
        console.print(f"[yellow]fewer than {report['keep']} samples, all kept:[/] "
                      + escape(", ".join(f"{k} ({v})" for k, v in report["short"].items())))
    if report["unscored"]:
        console.print("[yellow]samples without self-verification scores (not candidates):[/] "
                      + escape(", ".join(f"{k} ({v})" for k, v in report["unscored"].items())))
    for name, reason in report["failed"].items():
        console.print(f"[yellow]failed {escape(name)} (no samples in the output):[/] {escape(reason)}")


SCALE_EPILOG = (
    "Example: srae scale --prompts geneval_metadata.jsonl --n 4 --rounds 2 --model nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B "
    "--decoder nyu-visionx/siglip2_decoder --profile gpu-1 --out runs/scale   (then: srae verify <run dir>)"
)


def scale(
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompts: reference JSONL {index, prompt}, GenEval metadata JSONL {prompt, tag, include, ...} or text (one per line).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output root; the run goes to OUT/<model>/<rounds>_verify_scale_<mode>/.")],
    model: ModelOpt = None,
    decoder: DecoderOpt = None,
    n: Annotated[int, int_option("--n", help="Samples per round.")] = 4,
    rounds: Annotated[int, int_option("--rounds", help="Scaling rounds: n × rounds samples per prompt.")] = 1,
    verify_on: VerifyOnOpt = "latent",
    scorer: Annotated[list[str] | None, typer.Option("--scorer", help="Scorer (repeatable): image_reward | shapes | a registered name | package.module:factory | none (no scorer: self-verification only).")] = None,
    ir_weights: Annotated[str, typer.Option("--ir-weights", help="ImageReward.pt: file, directory or hub repo id.")] = "THUDM/ImageReward",
    ir_tokenizer: Annotated[str | None, typer.Option("--ir-tokenizer", help="BERT vocab.txt (file, dir or repo) for ImageReward.")] = None,
    seed: SeedOpt = None,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 1.0,
    batch_size: Annotated[int, int_option("--batch-size", help="Images per head batch.")] = 4,
    max_new_tokens: TextTokensOpt = 64,
    verify_max_new_tokens: Annotated[int, int_option("--verify-max-new-tokens", help="Tokens of the yes/no answer.")] = 64,
    dtype: DtypeOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    accept_changes: AcceptChangesOpt = False,
) -> None:
    """Best-of-N generation: n × rounds samples per prompt, each scored by scorers and by self-verification."""
    from scale_rae_core.events import Reporter
    from scale_rae_core.infer.pipeline import SamplerSettings, Session
    from scale_rae_core.scale.run import (
        ScaleSettings,
        failed_prompts,
        read_prompt_file,
        run_scaling,
        scorer_names,
    )
    from scale_rae_core.scale.scorers import build_scorer

    model = require_model(model)
    names = scorer_names(scorer)
    prof = load(profile, set_)
    settings = ScaleSettings(n=n, rounds=rounds, verify_on=verify_on, seed=prof.run.seed if seed is None else seed,
                             batch_size=batch_size, max_new_tokens=max_new_tokens,
                             verify_max_new_tokens=verify_max_new_tokens)
    lines = read_prompt_file(prompts)
    with Session.open(model, prof, dtype=dtype, decoder=decoder) as session:
        device = session.runtime.device
        options = {"image_reward": {"weights": ir_weights, "tokenizer": ir_tokenizer}}
        scorers = [build_scorer(name, device=device, **options.get(name, {})) for name in names]
        with Reporter(None, show_progress=prof.output.progress and not quiet) as rep:
            root = run_scaling(session, lines, out, model, settings, SamplerSettings(steps=steps, guidance=guidance),
                               scorers, rep, accept_changes=accept_changes)
    failed = failed_prompts(root, lines)
    for name, reason in failed.items():
        typer.echo(f"failed {name}: {reason}", err=True)
    typer.echo(f"wrote {root} ({len(lines)} prompts × {settings.total} samples, {len(failed)} failed); "
               f"select with: srae verify {root}")
