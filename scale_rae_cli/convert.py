"""`srae convert decoder`: a decoder (released RAE / Scale-RAE, diffusers AutoencoderRAE, or ours) into srae's format
or into a diffusers AutoencoderRAE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EPILOG = (
    "Example: srae convert decoder nyu-visionx/siglip2_decoder models/siglip2-decoder   (and the other way: "
    "srae convert decoder runs/dec/decoder models/rae-diffusers --to diffusers --stats runs/stats.safetensors)"
)

def convert_decoder(
    src: Annotated[str, typer.Argument(help="Decoder: a released one (folder with model.pt, a model.pt, or repo id), a diffusers AutoencoderRAE folder or repo, or an srae decoder folder.")],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    to: Annotated[str, typer.Option("--to", help="Output format: srae (config.json + model.safetensors) or diffusers "
                                    "(an AutoencoderRAE folder: config.json + diffusion_pytorch_model.safetensors).")] = "srae",
    stats: Annotated[Path | None, typer.Option("--stats", help="Latent statistics to write with the decoder (srae stats "
                                               "file or RAE stat.pt). Default: those the source carries, if any.")] = None,
    encoder_kind: Annotated[str | None, typer.Option(
        "--encoder-kind", help="Encoder a released decoder reads: siglip | siglip2 | dinov2-reg | webssl-dino | mae (known hub repos fill it in).",
    )] = None,
    encoder_id: Annotated[str | None, typer.Option("--encoder-id", help="Encoder repo id or folder: recorded in the config; with --to diffusers its weights go into the AutoencoderRAE (default: the decoder's encoder).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="vit_mae config.json to use when none sits next to model.pt.")] = None,
    subfolder: Annotated[str | None, typer.Option("--subfolder", help="Path of the decoder inside a hub repo.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision.")] = None,
) -> None:
    """Convert a decoder (strict key check, sizes from the weights or the AutoencoderRAE config) into srae's format or a diffusers AutoencoderRAE."""
    from scale_rae_core.models import convert as core

    path = core.convert_decoder(src, out, to=to, stats=stats, encoder_kind=encoder_kind, encoder_id=encoder_id, config=config,
                   subfolder=subfolder, revision=revision)
    cfg = core.read_decoder(path)[0].cfg
    typer.echo(
        f"converted {src} -> {path} ({to}): {cfg.num_layers} layers x {cfg.hidden_size} wide ({cfg.preset or 'custom'}), "
        f"{cfg.num_patches} tokens x {cfg.latent_dim} ch -> {cfg.image_size} px, encoder {cfg.encoder_kind}"
    )
