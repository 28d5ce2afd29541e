"""`srae understand`: answer a question about an image (encoder -> projector -> LLM), with a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import (
    AnswerTokensOpt,
    DecoderOpt,
    DtypeOpt,
    GuidanceOpt,
    IntervalOpt,
    ModelOpt,
    ProfileOpt,
    SamplerOpt,
    SamplesOutOpt,
    SaveLatentOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    load,
    require_model,
    sampler_settings,
    samples_dir,
)

EPILOG = (
    "Example: srae understand cat.png \"What is on the windowsill?\" --model nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B "
    "--profile gpu-1"
)


def understand(
    image: Annotated[Path, typer.Argument(help="Image file (png, jpg, webp, ...).")],
    question: Annotated[str, typer.Argument(help="The question; the image goes before it unless it contains <image>.")],
    model: ModelOpt = None,
    max_new_tokens: AnswerTokensOpt = 512,
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
) -> None:
    """Answer a question about an image; if the model answers with an image, it is sampled and saved too."""
    from scale_rae_core.infer.pipeline import Session
    from scale_rae_core.infer.understand import understand_image

    prof = load(profile, set_)
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
