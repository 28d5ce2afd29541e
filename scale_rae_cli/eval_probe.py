"""`srae eval probe`: linear-probe top-1 of the profile's frozen encoder on a class-folder dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import ProfileOpt, SetOpt, float_option, int_option, load

EPILOG = "Example: srae data synth shapes --n 600 && srae eval probe --data shapes/classes --out probe.json"


def probe(
    data: Annotated[Path, typer.Option("--data", "-d", help="Class-folder dataset: DATA/<class>/<image>.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Result JSON.")] = Path("probe.json"),
    heldout: Annotated[float, float_option("--heldout", help="Fraction of each class held out for the top-1 score.")] = 0.2,
    seed: Annotated[int | None, int_option("--seed", help="Seed of the per-class held-out split. Default: run.seed.")] = None,
    weight_decay: Annotated[float, float_option("--weight-decay", help="L2 penalty on the linear layer's weights.")] = 1e-4,
    batch_size: Annotated[int, int_option("--batch-size", help="Images per encoder forward.")] = 32,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Mean-pool the frozen encoder's tokens, fit a linear classifier on a split, report held-out top-1 as JSON."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.eval.probe import linear_probe
    from scale_rae_core.models.build import build_encoder

    prof = load(profile, set_)
    with backend_for(prof.backend) as backend:
        encoder = build_encoder(prof.model.encoder).to(backend.device)
        r = linear_probe(encoder, data, heldout=heldout, seed=prof.run.seed if seed is None else seed, batch_size=batch_size,
                         weight_decay=weight_decay, out=out)
    typer.echo(
        f"{r['encoder']}: top-1 {r['top1']:.4f} on {r['num_heldout']} held-out images "
        f"({r['num_classes']} classes, trained on {r['num_train']}, train top-1 {r['train_top1']:.4f})"
    )
    typer.echo(f"wrote {out}")
