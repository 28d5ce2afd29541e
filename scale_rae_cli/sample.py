"""`srae sample`: class-conditional samples of a DiT on RAE latents (PNGs + an ADM .npz for srae eval fid)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import ProfileOpt, QuietOpt, SetOpt, load

EPILOG = (
    "Example: srae sample --model runs/dit --n 120 --out samples/ --guidance 1.5   "
    "(RAE's release: --model stage2_model.pt --preset DiTDH-XL --stats stat.pt --decoder DEC --guide-model "
    "DiTDH-S_ep14.pt --guidance 1.42; a rerun resumes it; torchrun --nproc-per-node 8 -m scale_rae_cli.main sample "
    "--model runs/dit -n 50000 --out samples/ shards it)"
)

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="An srae train dit run (or its model/ folder), or a released RAE stage2_model.pt (with --preset).")]
NOpt = Annotated[int, typer.Option("--n", "-n", help="Number of samples (indices 0..n-1); under torchrun write -n (torchrun reads --n as its own).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder: 000000.png ..., plan.json, samples.npz (ADM layout).")]
SamplerOpt = Annotated[str, typer.Option(
    "--sampler", help="euler | heun (ODE to t = 0) | sde | sde-heun | rae-euler | rae-heun (RAE's grid) | reference.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Sampler steps (intervals of the time grid).")]
GuidanceOpt = Annotated[float, typer.Option(
    "--guidance", help="w: classifier-free guidance with the null class, or autoguidance with --guide-model; 1 = none.")]
IntervalOpt = Annotated[str | None, typer.Option(
    "--guidance-interval", help="lo,hi: guide only where lo <= t <= hi (t = 1 noise, 0 data).")]
GuideOpt = Annotated[str | None, typer.Option(
    "--guide-model", help="Autoguidance model: a weaker class DiT on the same latents (run, folder or .pt).")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Size of a released --model .pt (RAE: DiTDH-XL).")]
GuidePresetOpt = Annotated[str | None, typer.Option(
    "--guide-preset", help="Size of a released --guide-model .pt (default DiTDH-S, RAE's guidance model).")]
StatsOpt = Annotated[str | None, typer.Option(
    "--stats", help="Latent statistics of a released --model .pt (RAE's stat.pt); srae model folders carry theirs.")]
DecoderOpt = Annotated[str | None, typer.Option(
    "--decoder", help="RAE pixel decoder (folder, model.pt or hub id); default: the one the model folder records.")]
LabelSamplingOpt = Annotated[str, typer.Option(
    "--label-sampling", help="equal (exactly n / classes per class) | random (uniform).")]
LabelsOpt = Annotated[str | None, typer.Option("--labels", help="Only these classes, e.g. 3,7.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the label plan and of every sample's noise.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per sampler batch (per process).")]


def _labels(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        from scale_rae_core.errors import ConfigError

        raise ConfigError(f"--labels '{text}' is not a comma-separated list of class indices (e.g. 3,7)") from None


def sample(model: ModelOpt, n: NOpt, out: OutOpt, sampler: SamplerOpt = "euler", steps: StepsOpt = 50,
           guidance: GuidanceOpt = 1.0, guidance_interval: IntervalOpt = None, guide_model: GuideOpt = None,
           preset: PresetOpt = None, guide_preset: GuidePresetOpt = None, stats: StatsOpt = None,
           decoder: DecoderOpt = None, label_sampling: LabelSamplingOpt = "equal", labels: LabelsOpt = None,
           seed: SeedOpt = 0, batch_size: BatchOpt = 32, profile: ProfileOpt = None, set_: SetOpt = None,
           quiet: QuietOpt = False) -> None:
    """Sample n class-conditional images, sharded over processes (torchrun), skipping indices already written."""
    from scale_rae_core.backends.base import backend_for
    from scale_rae_core.eval.samples import SampleRequest, sample_class_model
    from scale_rae_core.events import Reporter
    from scale_rae_core.flow.sampler import SamplerConfig
    from scale_rae_core.infer.pipeline import parse_interval

    request = SampleRequest(
        model=model, out=out, plan_n=n, label_sampling=label_sampling, labels=_labels(labels), seed=seed,
        sampler=SamplerConfig(sampler, steps), guidance=guidance,
        interval=parse_interval(guidance_interval) or (0.0, 1.0), guide_model=guide_model, preset=preset,
        guide_preset=guide_preset, stats=stats, decoder=decoder, batch_size=batch_size,
    )
    prof = load(profile, set_)
    prof.check_runtime()
    with backend_for(prof.backend) as backend:
        main = backend.is_main
        with Reporter(None, show_progress=main and prof.output.progress and not quiet) as rep:
            with rep.task("sample", None) as advance:
                result = sample_class_model(request, backend, progress=advance)
    if main:
        typer.echo(f"{result['n']} samples in {out} (this process wrote {result['written']}, skipped {result['skipped']} "
                   f"already there); {result['npz']}")
        typer.echo(f"next: srae eval fid {result['npz']} --ref REF.npz")
