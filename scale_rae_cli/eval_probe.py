"""`srae eval probe`: linear-probe top-1 of the profile's frozen encoder on a class-folder dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from scale_rae_cli.options import ProfileOpt, SetOpt, load

EPILOG = "Example: srae data synth shapes --n 600 && srae eval probe --data shapes/classes --out probe.json"


def probe(
    data: Path = typer.Option(..., "--data", "-d", help="Class-folder dataset: DATA/<class>/<image>."),
    out: Path = typer.Option(Path("probe.json"), "--out", "-o", help="Result JSON."),
    heldout: float = typer.Option(0.2, "--heldout", help="Fraction of each class held out for the top-1 score."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-class held-out split."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="L2 penalty on the linear layer's weights."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per encoder forward."),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Mean-pool the frozen encoder's tokens, fit a linear classifier on a split, report held-out top-1 as JSON."""
    from scale_rae_core.backends.base import backend_for
    from scale_rae_core.eval.probe import linear_probe
    from scale_rae_core.models.build import build_encoder

    prof = load(profile, set_)
    with backend_for(prof.backend) as backend:
        encoder = build_encoder(prof.model.encoder).to(backend.device)
        r = linear_probe(encoder, data, heldout=heldout, seed=seed, batch_size=batch_size,
                         weight_decay=weight_decay, out=out)
    typer.echo(
        f"{r['encoder']}: top-1 {r['top1']:.4f} on {r['num_heldout']} held-out images "
        f"({r['num_classes']} classes, trained on {r['num_train']}, train top-1 {r['train_top1']:.4f})"
    )
    typer.echo(f"wrote {out}")
