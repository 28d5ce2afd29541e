"""`srae generate`: text to image with a Scale-RAE model (ours or released), one PNG + manifest per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import (
    DecoderOpt,
    DtypeOpt,
    GuidanceOpt,
    IntervalOpt,
    LayoutOpt,
    ModelOpt,
    NoiseFileOpt,
    NoiseOpt,
    ProfileOpt,
    QuietOpt,
    SamplerOpt,
    SamplesOutOpt,
    SaveLatentOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    TextTokensOpt,
    int_option,
    load,
    require_model,
    sampler_settings,
    samples_dir,
)

EPILOG = (
    "Example: srae generate \"Can you generate a photo of a cat on a windowsill?\" "
    "--model nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B --profile gpu-1 --n 4 --guidance 3 --out samples   "
    "GenEval: srae generate --prompts-file geneval/prompts/evaluation_metadata.jsonl --layout geneval --n 4 --out geneval_images"
)


def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts, used as given (e.g. \"Can you generate a photo of ...?\").")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts-file", help="More prompts: a text file (one per line), JSONL with \"prompt\" (and GenEval's or DPG's fields), or DPG-Bench's prompts folder.")] = None,
    model: ModelOpt = None,
    decoder: DecoderOpt = None,
    seed: SeedOpt = None,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 1.0,
    guidance_interval: IntervalOpt = None,
    sampler: SamplerOpt = "euler",
    n: Annotated[int, int_option("--n", help="Images per prompt.")] = 1,
    batch_size: Annotated[int, int_option("--batch-size", help="Prompts per LLM batch and images per head batch.")] = 4,
    max_new_tokens: TextTokensOpt = 64,
    out: SamplesOutOpt = None,
    save_latent: SaveLatentOpt = False,
    skip_decoder: Annotated[bool, typer.Option("--skip-decoder", help="Write latents only, no PNG (needs --save-latent).")] = False,
    layout: LayoutOpt = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also a contact sheet: OUT/grid-<first index>.png of all images (a row per prompt), with --layout geneval a grid.png per prompt folder.")] = False,
    dtype: DtypeOpt = None,
    noise: NoiseOpt = "seed",
    noise_file: NoiseFileOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from text: greedy text with a KV cache until <im_start>, then the flow head and the pixel decoder."""
    from scale_rae_core.events import Reporter
    from scale_rae_core.infer.layouts import generate_layout, prepare_output, read_layout_prompts
    from scale_rae_core.infer.noise import start_noise
    from scale_rae_core.infer.pipeline import Session

    prof = load(profile, set_)
    lines = read_layout_prompts(list(prompts or []), prompts_file, layout)
    settings = sampler_settings(steps, guidance, guidance_interval, sampler)
    first_seed = prof.run.seed if seed is None else seed
    start = start_noise(noise, first_seed, noise_file)  # a bad --noise-file fails before the model loads
    folder = samples_dir(out, prof)
    prepare_output(lines, folder, layout, n=n, grid=grid, save_latents=save_latent, decode=not skip_decoder)
    events = folder / prof.output.events_file if layout is None else None  # a benchmark tree holds its images only
    with (Session.open(require_model(model), prof, dtype=dtype, decoder=decoder) as session,
          Reporter(events, show_progress=prof.output.progress and not quiet) as rep):
        result = generate_layout(
            session, lines, folder, settings, layout=layout, grid=grid, seed=first_seed,
            n=n, batch_size=batch_size, max_new_tokens=max_new_tokens, save_latents=save_latent,
            decode=not skip_decoder, reporter=rep, noise=start,
        )
    for rec in result["images"] if layout is None else []:
        what = rec.png or rec.latent
        typer.echo(f"{what}  seed={rec.seed}" + (f"  text={rec.text!r}" if rec.text else ""))
    for name, reason in result["failed"].items():
        typer.echo(f"failed {name}: {reason}", err=True)
    t = result["timings"] or {"load": 0.0, "text": 0.0, "sample": 0.0, "decode": 0.0}
    typer.echo(
        f"{len(result['images'])} image(s) in {folder} (load {t['load']:.1f}s, text {t['text']:.2f}s, "
        f"sample {t['sample']:.2f}s, decode {t['decode']:.2f}s)"
        + (f"; --layout {layout}: {len(lines)} prompts, {len(result['failed'])} failed, report {result['report']}" if layout else "")
        + (f"; grid {result['grid']}" if result["grid"] else "")
    )
