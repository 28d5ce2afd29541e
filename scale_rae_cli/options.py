"""Every option and argument that several commands take, as Annotated aliases (one definition, the same help
everywhere), and the checks every number option gets.

A command module takes its shared options from here and nothing from another command module (a contract in
pyproject.toml holds it to that). Numbers go through :func:`int_option` / :func:`float_option`: an integer
must fit in int64 (what torch takes; seeds, steps and counts reach it), a float must be finite (no nan, no
inf); a bad value is one line naming the flag, like every other usage error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int64(value: int | None) -> int | None:
    if value is not None and not INT64_MIN <= value <= INT64_MAX:
        raise typer.BadParameter(f"{value} does not fit in 64 bits (-2**63 .. 2**63-1)")
    return value


def int_option(*names: str, help: str, **kwargs: Any) -> Any:
    """An integer option that must fit in int64 (``min=`` / ``max=`` narrow it further, shown in --help)."""
    return typer.Option(*names, help=help, callback=_int64, **kwargs)


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def float_option(*names: str, help: str, **kwargs: Any) -> Any:
    """A float option that refuses nan and ±inf."""
    return typer.Option(*names, help=help, callback=_finite, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Every command that reads a profile
# ----------------------------------------------------------------------------------------------------

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Profile name (see `srae profiles list`) or path to a TOML file. Default: $SRAE_PROFILE or tiny-cpu."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a profile value, e.g. --set stage1.lr=1e-4 (repeatable). Beats SRAE_* variables and the file."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; only the final summary.")]
SeedOpt = Annotated[int | None, int_option("--seed", help="Seed of the first sample of each prompt (sample k uses seed + k). Default: run.seed.")]


def load(profile: str | None, overrides: list[str] | None):
    """Load and validate the profile for a command (imports the config machinery lazily)."""
    from scale_rae_core.config import load_profile

    return load_profile(profile, overrides or [])


# ----------------------------------------------------------------------------------------------------
# Inference: generate, understand, latent, scale, eval shapes
# ----------------------------------------------------------------------------------------------------

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
StepsOpt = Annotated[int, int_option("--steps", help="Sampler steps per image.")]
GuidanceOpt = Annotated[float, float_option("--guidance", help="CFG weight w in v_u + w·(v_c − v_u) with the learned null condition; 1 = off.")]
IntervalOpt = Annotated[str | None, typer.Option("--guidance-interval", help="Guide only for t in lo,hi (t=1 noise, t=0 data), e.g. 0.1,0.9.")]
SamplerOpt = Annotated[str, typer.Option(
    "--sampler", help="euler | heun (ODE to t = 0) | sde | sde-heun | rae-euler | rae-heun (RAE's ODE grid) | "
    "reference (the released Scale-RAE grid, bugs included).")]
VerifyOnOpt = Annotated[str, typer.Option("--verify-on", help="Self-verify the latent (reference) or the decoded image re-encoded.")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="fp32 | bf16 | fp16: the dtype the weights are loaded and held in (CPU or CUDA; norms, the sampler "
    "state and the timestep embedding stay fp32). Default: backend.weights_dtype (auto: backend.precision).")]
NoiseOpt = Annotated[str, typer.Option(
    "--noise", help="Start noise: seed (each image its own CPU generator, seed+j) | reference (as the released CLI: the "
    "global generator seeded with --seed, one draw per image on the model's device, in the order images are made).")]
NoiseFileOpt = Annotated[Path | None, typer.Option(
    "--noise-file", help="Start noise from a .safetensors file: one (K, C, g, g) tensor, row k for the run's k-th image.")]
SamplesOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: <run.out_dir>/samples.")]
SaveLatentOpt = Annotated[bool, typer.Option("--save-latent", help="Also write each latent as .safetensors (for srae latent ...).")]
TextTokensOpt = Annotated[int, int_option("--max-new-tokens", help="Text tokens before <im_start> is forced (0 = at once).")]
AnswerTokensOpt = Annotated[int, int_option("--max-new-tokens", help="Longest answer in tokens.")]
LatentArg = Annotated[Path, typer.Argument(help="A latent from `srae generate --save-latent` (.safetensors) or a reference .pt (256·n × C).")]
PromptArg = Annotated[str, typer.Argument(help="The question or follow-up request.")]
LayoutOpt = Annotated[str | None, typer.Option(
    "--layout", help="A benchmark tree: geneval (OUT/{index:05d}/metadata.jsonl + samples/{k:05d}.png; the prompts "
    "need GenEval's tag and include) | dpg (OUT/{item_id}.png, a 2x2 grid of 4 samples per prompt id).")]


def sampler_settings(steps: int, guidance: float, interval: str | None, method: str) -> Any:
    """What ``--steps``, ``--guidance``, ``--guidance-interval`` and ``--sampler`` ask of the flow sampler."""
    from scale_rae_core.infer.pipeline import SamplerSettings, parse_interval

    return SamplerSettings(steps=steps, guidance=guidance, interval=parse_interval(interval), method=method)


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


def samples_dir(out: Path | None, prof: Any) -> Path:
    """``--out``, else ``<run.out_dir>/samples``."""
    return out if out is not None else Path(prof.run.out_dir) / "samples"


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------

def run_trainer(out: Path, profile: str | None, overrides: list[str] | None, steps: int | None, steps_key: str,
                resume: bool, quiet: bool, train: Callable[[Any, Any], Any]) -> Any:
    """The frame of every `srae train` command: ``--steps`` as the ``steps_key`` override, the profile, one reporter
    into OUT's events file for ``train(profile, reporter)``; -> its result on the reporting process, else None (the
    caller prints its summary only when it gets a result)."""
    from scale_rae_core.errors import ConfigError
    from scale_rae_core.events import Reporter

    items = list(overrides or [])
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: train at least 1 step")
        items.append(f"{steps_key}={steps}")
    prof = load(profile, items)
    # every process passes the same reporter; the engine keeps it on the main process only
    with Reporter(out / prof.output.events_file, show_progress=prof.output.progress and not quiet) as rep:
        result = train(prof, rep)
    if not result.is_main:
        return None
    if resume and result.resumed_from is None:
        typer.echo(f"--resume: {out} held no checkpoint yet, so this was a new run")
    return result


RunOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, metrics.jsonl, model/, export/.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in --out (a fresh start if there is none yet).")]
AcceptChangesOpt = Annotated[bool, typer.Option("--accept-changes", help="Continue although the run was made with other weights or settings (they are listed otherwise, and refused).")]
StageStepsOpt = Annotated[int | None, int_option("--steps", help="Optimiser steps in total (overrides [stageN].steps).")]
PackedArg = Annotated[Path, typer.Argument(help="Packed folder or its wds_manifest.json (its tars may be remote: https://, hf://, pipe:).")]
TrainDataOpt = Annotated[
    Path | None,
    typer.Option("--data", "-d", help="Packed folder (srae data pack) or its wds_manifest.json, or a reference JSONL. Default: data.train."),
]
FidNetOpt = Annotated[
    str | None,
    typer.Option(
        "--fid-net",
        help="Feature network: a path to pt_inception-2015-12-05-6726825d.pth, 'inception' ($SRAE_INCEPTION_WEIGHTS), "
        "'efficientnet-lite0' or 'random' (the fallbacks give FID, precision and recall only, labelled as such). "
        "Default: inception if configured, else efficientnet-lite0, else random.",
    ),
]


# ----------------------------------------------------------------------------------------------------
# Class-conditional RAE stage 2: train dit, latent cache, sample
# ----------------------------------------------------------------------------------------------------

LabelledDataOpt = Annotated[Path, typer.Option(
    "--data", "-d", help="Labelled images: class folders root/<class>/<image>, or srae data pack --format classes "
                         "(with --for decoder: any packed dataset or image folder srae train decoder reads).")]
CacheForOpt = Annotated[str, typer.Option(
    "--for", help="dit: [dit_training]'s encoder, labels and flips, for srae train dit | decoder: [model.encoder]'s "
                  "latents with the pixels, for srae train decoder.")]
DiTDataOpt = Annotated[Path, typer.Option(
    "--data", "-d", help="Labelled images (class folders root/<class>/<image>, or srae data pack --format classes) "
                         "or a latent cache (srae latent cache).")]
DiTRunOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Run folder: checkpoints/, metrics.jsonl, and the exported EMA model in model/.")]
DiTStepsOpt = Annotated[int | None, int_option("--steps", help="Optimiser steps in total (overrides dit_training.steps / epochs).")]
CacheOutOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Cache folder: latents-*.safetensors chunks, latent_stats.safetensors, latent_cache.json.")]
ChunkOpt = Annotated[int, int_option("--chunk-size", min=1, help="Images per cache file.")]
EncodeBatchOpt = Annotated[int, int_option("--batch-size", min=1, help="Images per encoder forward.")]
CacheDtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Stored dtype: float32 (training sees exactly the encoder's output) | float16 | bfloat16 (half the disk).")]
ClassModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="An srae train dit run (or its model/ folder), or a released RAE stage2_model.pt (with --preset).")]
NSamplesOpt = Annotated[int, int_option(
    "--n", "-n", min=1, help="Number of samples (indices 0..n-1); under torchrun write -n (torchrun reads --n as its own).")]
ClassSamplesOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder: 000000.png ..., plan.json, samples.npz (ADM layout).")]
ClassGuidanceOpt = Annotated[float, float_option(
    "--guidance", help="w: classifier-free guidance with the null class, or autoguidance with --guide-model; 1 = none.")]
GuideModelOpt = Annotated[str | None, typer.Option(
    "--guide-model", help="Autoguidance model: a weaker class DiT on the same latents (run, folder or .pt).")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Size of a released --model .pt (RAE: DiTDH-XL).")]
GuidePresetOpt = Annotated[str | None, typer.Option(
    "--guide-preset", help="Size of a released --guide-model .pt (default DiTDH-S, RAE's guidance model).")]
ReleasedStatsOpt = Annotated[str | None, typer.Option(
    "--stats", help="Latent statistics of a released --model .pt (RAE's stat.pt); srae model folders carry theirs.")]
RaeDecoderOpt = Annotated[str | None, typer.Option(
    "--decoder", help="RAE pixel decoder (folder, model.pt or hub id); default: the one the model folder records.")]
LabelSamplingOpt = Annotated[str, typer.Option(
    "--label-sampling", help="equal (exactly n / classes per class) | random (uniform).")]
LabelsOpt = Annotated[str | None, typer.Option("--labels", help="Only these classes, e.g. 3,7.")]
PlanSeedOpt = Annotated[int, int_option("--seed", help="Seed of the label plan and of every sample's noise.")]
SampleBatchOpt = Annotated[int, int_option("--batch-size", min=1, help="Samples per sampler batch (per process).")]
