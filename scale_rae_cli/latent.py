"""`srae latent decode|qa|continue`: work on saved latents (ours .safetensors, or the reference's bare .pt)."""

from __future__ import annotations

from collections.abc import Callable

import typer

from scale_rae_cli.options import (
    AnswerTokensOpt,
    DecoderOpt,
    DtypeOpt,
    GuidanceOpt,
    IntervalOpt,
    LatentArg,
    ModelOpt,
    ProfileOpt,
    PromptArg,
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

HELP = "Decode saved latents to images, or ask the model about them."
DECODE_EPILOG = "Example: srae latent decode samples/00000-a-cat-s0.safetensors --decoder nyu-visionx/siglip2_decoder"
QA_EPILOG = "Example: srae latent qa samples/00000-a-cat-s0.safetensors \"Is there a cat?\" --model nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B"
CONTINUE_EPILOG = "Example: srae latent continue samples/00000-a-cat-s0.safetensors \"Now make it night.\" --model runs/stage2/export"


def decode(
    latent: LatentArg,
    decoder: DecoderOpt = None,
    out: SamplesOutOpt = None,
    dtype: DtypeOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Latent -> PNG (one per image in the file) with the pixel decoder only; no LLM is loaded."""
    from scale_rae_core.infer.understand import decode_latent_file

    prof = load(profile, set_)
    for png in decode_latent_file(latent, samples_dir(out, prof), decoder, prof, dtype=dtype):
        typer.echo(str(png))


def _answer_command(action: str, doc: str) -> Callable[..., None]:
    """``srae latent qa`` or ``continue``: the same options, one core call (``infer.understand.latent_answer``)."""

    def command(
        latent: LatentArg,
        prompt: PromptArg,
        model: ModelOpt = None,
        max_new_tokens: AnswerTokensOpt = 64,
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
        from scale_rae_core.infer.pipeline import Session
        from scale_rae_core.infer.understand import latent_answer

        prof = load(profile, set_)
        settings = sampler_settings(steps, guidance, guidance_interval, sampler)
        with Session.open(require_model(model), prof, dtype=dtype, decoder=decoder) as session:
            result = latent_answer(
                session, latent, prompt, action, samples_dir(out, prof), settings,
                seed=prof.run.seed if seed is None else seed, max_new_tokens=max_new_tokens, save_latents=save_latent,
            )
        typer.echo(result.text)
        if result.png:
            typer.echo(f"image: {result.png}")
        typer.echo(f"manifest: {result.manifest}")

    command.__doc__ = doc
    return command


qa = _answer_command("qa", "Ask about a latent: it goes through the projector as a context image, then PROMPT.")
continue_ = _answer_command(
    "continue", "Continue the conversation that made the latent (our files remember the prompt); a reference .pt acts like qa."
)
