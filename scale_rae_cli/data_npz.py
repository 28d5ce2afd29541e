"""`srae data npz`: pack a folder of images into an ADM reference batch for `srae eval fid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import int_option

EPILOG = "Example: srae data npz imagenet/val --image-size 256 --out val_256.npz"


def npz(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively, sorted by path).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npz (arr_0: uint8 N x H x W x 3).")],
    image_size: Annotated[int | None, int_option(
        "--image-size", help="Centre-crop every image to this square as ADM does (default: keep; all images must then share one size).",
    )] = None,
) -> None:
    """Write the images as an ADM batch (`arr_0`), the layout the ADM evaluator and `srae eval fid --ref` read."""
    from scale_rae_core.eval.adm_npz import folder_to_npz

    s = folder_to_npz(folder, out, image_size)
    typer.echo(f"wrote {s['count']} images of {s['width']}x{s['height']} to {s['out']}")
