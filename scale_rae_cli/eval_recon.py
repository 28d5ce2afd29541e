"""`srae eval recon`: PSNR, SSIM and rFID of a decoder's reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scale_rae_cli.options import FidNetOpt, ProfileOpt, QuietOpt, SetOpt, int_option, load

EPILOG = "Example: srae eval recon --decoder runs/decoder/decoder --data shapes/heldout --out recon.json --fid-net random"


def recon(
    decoder: Annotated[str, typer.Option("--decoder", help="Decoder folder (ours, or a released model.pt folder / hub repo id).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Packed dataset or image folder of held-out images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output JSON file.")],
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    fid_net: FidNetOpt = None,
    max_images: Annotated[int | None, int_option("--max-images", help="Evaluate at most this many images.")] = None,
    batch_size: Annotated[int, int_option("--batch-size", help="Images per forward.")] = 32,
    quiet: QuietOpt = False,
) -> None:
    """Reconstruct held-out images with the profile's encoder and --decoder; report PSNR, SSIM, rFID as JSON."""
    from scale_rae_core.backends import backend_for
    from scale_rae_core.eval.recon import evaluate_reconstruction
    from scale_rae_core.events import Reporter
    from scale_rae_core.models.build import build_encoder, build_stats, load_trained_decoder
    from scale_rae_core.models.rae import RAE

    prof = load(profile, set_)
    prof.check_runtime()
    with backend_for(prof.backend) as backend, Reporter(None, show_progress=prof.output.progress and not quiet) as rep:
        encoder = build_encoder(prof.model.encoder)
        dec = load_trained_decoder(decoder, encoder, what="--decoder")
        rae = RAE(encoder, dec, stats=build_stats(prof.model)).to(backend.device)
        r = evaluate_reconstruction(rae, data, fid_net=fid_net, batch_size=batch_size, max_images=max_images, out=out, reporter=rep)
    typer.echo(
        f"{r['num_images']} images at {r['image_size']} px: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, "
        f"rFID {r['rfid']:.3f} [{r['fid_network']}]"
    )
    typer.echo(f"wrote {out}")
