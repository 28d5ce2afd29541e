"""`srae generate`: text to image with a Scale-RAE model (ours or released), one PNG + manifest per image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import ProfileOpt, QuietOpt, SetOpt, load

EPILOG = (
    "Example: srae generate \"Can you generate a photo of a cat on a windowsill?\" "
    "--model nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B --profile gpu-1 --n 4 --guidance 3 --out samples"
)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", envvar="SRAE_MODEL_PATH", show_envvar=True,
        help="Model: a local directory (srae export or released layout) or a hub repo id, optionally @revision "
        "(e.g. nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B@main). Default: the bundled shapes demo model.",
    ),
]
DecoderOpt = Annotated[
    str | None,
    typer.Option(
        "--decoder",
        help="Pixel decoder: directory or hub repo id (optionally @revision). Default: the model directory's decoder/, "
        "else the released decoder for the model's encoder, else model.decoder.path of the profile.",
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed of the first image of each prompt (image j uses seed+j). Default: run.seed.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Sampler steps.")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="CFG weight w in v_u + w·(v_c − v_u) with the learned null condition; 1 = off.")]
VerifyOnOpt = Annotated[str, typer.Option("--verify-on", help="Self-verify the latent (reference) or the decoded image re-encoded.")]
IntervalOpt = Annotated[str | None, typer.Option("--guidance-interval", help="Guide only for t in lo,hi (t=1 noise, t=0 data), e.g. 0.1,0.9.")]
SamplerOpt = Annotated[str, typer.Option("--sampler", help="euler | heun | reference (the released grid, bugs included).")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="fp32 | bf16 | fp16: the dtype the weights are loaded and held in (CPU or CUDA; norms, the sampler "
    "state and the timestep embedding stay fp32). Default: backend.weights_dtype (auto: backend.precision).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: <run.out_dir>/samples.")]
SaveLatentOpt = Annotated[bool, typer.Option("--save-latent", help="Also write each latent as .safetensors (for srae latent ...).")]
NoiseOpt = Annotated[str, typer.Option(
    "--noise", help="Start noise: seed (each image its own CPU generator, seed+j) | reference (as the released CLI: the "
    "global generator seeded with --seed, one draw per image on the model's device, in the order images are made).")]
NoiseFileOpt = Annotated[Path | None, typer.Option(
    "--noise-file", help="Start noise from a .safetensors file: one (K, C, g, g) tensor, row k for the run's k-th image.")]


def require_model(model: str | None) -> str:
    """``--model``, else the bundled shapes demo model (said on stderr), else a one-line error."""
    from scale_rae_core.errors import ConfigError
    from scale_rae_core.infer.loading import bundled_model

    if model:
        return model
    bundled = bundled_model()
    if bundled is None:
        raise ConfigError(
            "--model is required: pass a model directory or hub repo id (e.g. nyu-visionx/Scale-RAE-Qwen1.5B_DiT2.4B), "
            "or set SRAE_MODEL_PATH"
        )
    typer.echo(f"no --model: using the bundled shapes demo model ({bundled}); it knows only the shapes world", err=True)
    return str(bundled)


def out_dir(out: Path | None, prof: object) -> Path:
    return out if out is not None else Path(prof.run.out_dir) / "samples"  # type: ignore[attr-defined]


def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts, used as given (e.g. \"Can you generate a photo of ...?\").")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts-file", help="More prompts: a text file (one per line) or JSONL with \"prompt\".")] = None,
    model: ModelOpt = None,
    decoder: DecoderOpt = None,
    seed: SeedOpt = None,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 1.0,
    guidance_interval: IntervalOpt = None,
    sampler: SamplerOpt = "euler",
    n: Annotated[int, typer.Option("--n", help="Images per prompt.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per LLM batch and images per head batch.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Text tokens before <im_start> is forced (0 = at once).")] = 64,
    out: OutOpt = None,
    save_latent: SaveLatentOpt = False,
    skip_decoder: Annotated[bool, typer.Option("--skip-decoder", help="Write latents only, no PNG (needs --save-latent).")] = False,
    dtype: DtypeOpt = None,
    noise: NoiseOpt = "seed",
    noise_file: NoiseFileOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from text: greedy text with a KV cache until <im_start>, then the flow head and the pixel decoder."""
    from scale_rae_core.events import Reporter
    from scale_rae_core.infer.generate import generate_images, read_prompts
    from scale_rae_core.infer.noise import start_noise
    from scale_rae_core.infer.pipeline import SamplerSettings, Session, parse_interval

    prof = load(profile, set_)
    texts = read_prompts(list(prompts or []), prompts_file)
    settings = SamplerSettings(steps=steps, guidance=guidance, interval=parse_interval(guidance_interval), method=sampler)
    first_seed = prof.run.seed if seed is None else seed
    start = start_noise(noise, first_seed, noise_file)  # a bad --noise-file fails before the model loads
    folder = out_dir(out, prof)
    with (Session.open(require_model(model), prof, dtype=dtype, decoder=decoder) as session,
          Reporter(folder / prof.output.events_file, show_progress=prof.output.progress and not quiet) as rep):
        result = generate_images(
            session, texts, folder, settings, seed=first_seed, n=n, batch_size=batch_size,
            max_new_tokens=max_new_tokens, save_latents=save_latent, decode=not skip_decoder, reporter=rep, noise=start,
        )
    for rec in result.images:
        what = rec.png or rec.latent
        typer.echo(f"{what}  seed={rec.seed}" + (f"  text={rec.text!r}" if rec.text else ""))
    t = result.timings
    typer.echo(
        f"{len(result.images)} image(s) in {folder} (load {t['load']:.1f}s, text {t['text']:.2f}s, "
        f"sample {t['sample']:.2f}s, decode {t['decode']:.2f}s)"
    )
