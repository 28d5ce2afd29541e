"""`srae sample`: class-conditional samples of a DiT on RAE latents (PNGs + an ADM .npz for srae eval fid)."""

from __future__ import annotations

import typer

from scale_rae_cli.options import (
    ClassGuidanceOpt,
    ClassModelOpt,
    ClassSamplesOutOpt,
    GuideModelOpt,
    GuidePresetOpt,
    IntervalOpt,
    LabelSamplingOpt,
    LabelsOpt,
    NSamplesOpt,
    PlanSeedOpt,
    PresetOpt,
    ProfileOpt,
    QuietOpt,
    RaeDecoderOpt,
    ReleasedStatsOpt,
    SampleBatchOpt,
    SamplerOpt,
    SetOpt,
    StepsOpt,
    load,
)

EPILOG = (
    "Example: srae sample --model runs/dit --n 120 --out samples/ --guidance 1.5   "
    "(RAE's release: --model stage2_model.pt --preset DiTDH-XL --stats stat.pt --decoder DEC --guide-model "
    "DiTDH-S_ep14.pt --guidance 1.42; a rerun resumes it; torchrun --nproc-per-node 8 -m scale_rae_cli.main sample "
    "--model runs/dit -n 50000 --out samples/ shards it)"
)

def _labels(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        from scale_rae_core.errors import ConfigError

        raise ConfigError(f"--labels '{text}' is not a comma-separated list of class indices (e.g. 3,7)") from None


def sample(model: ClassModelOpt, n: NSamplesOpt, out: ClassSamplesOutOpt, sampler: SamplerOpt = "euler",
           steps: StepsOpt = 50, guidance: ClassGuidanceOpt = 1.0, guidance_interval: IntervalOpt = None,
           guide_model: GuideModelOpt = None, preset: PresetOpt = None, guide_preset: GuidePresetOpt = None,
           stats: ReleasedStatsOpt = None, decoder: RaeDecoderOpt = None, label_sampling: LabelSamplingOpt = "equal",
           labels: LabelsOpt = None, seed: PlanSeedOpt = 0, batch_size: SampleBatchOpt = 32,
           profile: ProfileOpt = None, set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Sample n class-conditional images, sharded over processes (torchrun), skipping indices already written."""
    from scale_rae_core.backends import backend_for
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
