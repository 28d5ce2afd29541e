"""`srae understand`: answer a question about an image (encoder -> projector -> LLM), with a manifest; or a whole
questions file, batched, with one model load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scale_rae_cli.options import (
    AnswerTokensOpt,
    DecoderOpt,
    DtypeOpt,
    GuidanceOpt,
    IntervalOpt,
    ModelOpt,
    ProfileOpt,
    QuietOpt,
    SamplerOpt,
    SamplesOutOpt,
    SaveLatentOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    int_option,
    load,
    require_model,
    sampler_settings,
    samples_dir,
)

EPILOG = (
    "Example: srae understand cat.png \"What is on the windowsill?\" --model nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B "
    "--profile gpu-1   (a benchmark: srae understand --questions-file vqa.jsonl --out answers.jsonl)"
)


def understand(
    image: Annotated[Path | None, typer.Argument(help="Image file (png, jpg, webp, ...).")] = None,
    question: Annotated[str | None, typer.Argument(help="The question; the image goes before it unless it contains <image>.")] = None,
    model: ModelOpt = None,
    max_new_tokens: AnswerTokensOpt = 512,
    questions_file: Annotated[Path | None, typer.Option(
        "--questions-file", help="Answer many questions with one model load: a JSONL with one "
        "{\"image\", \"question\"[, \"id\"]} per line (image paths relative to the file). Answers go to --out "
        "when it ends in .jsonl, else to OUT/answers.jsonl; a rerun skips the ids already answered; bad lines "
        "go to answers.rejects.jsonl.")] = None,
    batch_size: Annotated[int, int_option("--batch-size", help="Questions answered together (with --questions-file).")] = 8,
    decoder: DecoderOpt = None,
    seed: SeedOpt = None,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 1.0,
    guidance_interval: IntervalOpt = None,
    sampler: SamplerOpt = "euler",
    out: SamplesOutOpt = None,
    save_latent: SaveLatentOpt = False,
    dtype: DtypeOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Answer a question about an image; if the model answers with an image, it is sampled and saved too."""
    from scale_rae_core.errors import ConfigError
    from scale_rae_core.infer.pipeline import Session
    from scale_rae_core.infer.understand import understand_image

    if questions_file is not None and (image is not None or question is not None):
        raise ConfigError("pass IMAGE QUESTION or --questions-file FILE, not both")
    if questions_file is None and (image is None or question is None):
        raise ConfigError("pass IMAGE and QUESTION (or --questions-file FILE for many)")
    prof = load(profile, set_)
    if questions_file is not None:
        _answer_file(questions_file, model, out, prof, batch_size, max_new_tokens, decoder, dtype, quiet)
        return
    settings = sampler_settings(steps, guidance, guidance_interval, sampler)
    with Session.open(require_model(model), prof, dtype=dtype, decoder=decoder) as session:
        result = understand_image(
            session, image, question, samples_dir(out, prof), settings,
            seed=prof.run.seed if seed is None else seed, max_new_tokens=max_new_tokens, save_latents=save_latent,
        )
    typer.echo(result.text)
    if result.png:
        typer.echo(f"image: {result.png}")
    typer.echo(f"manifest: {result.manifest}")


def _answer_file(questions_file: Path, model: str | None, out: Path | None, prof: Any, batch_size: int,
                 max_new_tokens: int, decoder: str | None, dtype: str | None, quiet: bool) -> None:
    from scale_rae_core.events import Reporter
    from scale_rae_core.infer.pipeline import Session
    from scale_rae_core.infer.understand import answer_questions_file

    answers = out if out is not None and out.suffix == ".jsonl" else samples_dir(out, prof) / "answers.jsonl"
    show = prof.output.progress and not quiet
    with Session.open(require_model(model), prof, dtype=dtype, decoder=decoder) as session:
        result = answer_questions_file(session, questions_file, answers, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, reporter=Reporter(show_progress=show))
        load_s = session.load_seconds
    rejected = f", {result.rejected} rejected (see {result.rejects})" if result.rejected else ""
    typer.echo(f"{result.answered} answered, {result.skipped} already answered{rejected} -> {result.answers} "
               f"(load {load_s:.1f}s, answering {result.seconds:.2f}s)")
