"""`srae eval fid`: FID, sFID, Inception Score, precision and recall of samples against an ADM reference batch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import FidNetOpt, ProfileOpt, QuietOpt, SetOpt, int_option, load

EPILOG = (
    "Example: srae eval fid samples/samples.npz --ref VIRTUAL_imagenet256_labeled.npz "
    "--fid-net pt_inception-2015-12-05-6726825d.pth --out fid.json"
)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fid(
    samples: Annotated[Path, typer.Argument(help="Samples: an ADM .npz (arr_0 uint8 N x H x W x 3, as srae sample writes) or a folder of images.")],
    ref: Annotated[Path, typer.Option("--ref", help="Reference batch: an ADM .npz at the samples' resolution (see srae data npz).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the result JSON here.")] = None,
    fid_net: FidNetOpt = None,
    batch_size: Annotated[int, int_option("--batch-size", help="Images per forward of the feature network.")] = 50,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score samples as the ADM evaluation suite does (pool3 FID, mixed_6 sFID, IS, k=3 precision/recall)."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.eval.fid import evaluate_fid
    from scale_rae_core.events import Reporter

    prof = load(profile, set_)
    with backend_for(prof.backend) as backend, Reporter(None, show_progress=prof.output.progress and not quiet) as rep:
        with rep.task("inception features", None) as advance:
            r = evaluate_fid(samples, ref, fid_net=fid_net, batch_size=batch_size, device=backend.device, out=out,
                             progress=advance)
    typer.echo(
        f"{r['num_samples']} samples vs {r['num_reference']} reference images at {r['image_size'][1]}x{r['image_size'][0]}: "
        f"FID {_fmt(r['fid'], 3)}, sFID {_fmt(r['sfid'], 3)}, IS {_fmt(r['inception_score'], 2)}, "
        f"precision {_fmt(r['precision'], 3)}, recall {_fmt(r['recall'], 3)} [{r['network']}]"
    )
    if out is not None:
        typer.echo(f"wrote {out}")
