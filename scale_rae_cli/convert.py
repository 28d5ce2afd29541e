"""`srae convert decoder`: a released RAE / Scale-RAE decoder (config.json + model.pt) into srae's format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EPILOG = "Example: srae convert decoder nyu-visionx/siglip2_decoder models/siglip2-decoder"


def convert_decoder(
    src: Annotated[str, typer.Argument(help="Released decoder: a folder with model.pt (+ config.json), a model.pt, or a hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Output folder (config.json + model.safetensors).")],
    encoder_kind: Annotated[str | None, typer.Option(
        "--encoder-kind", help="Encoder the decoder reads: siglip | siglip2 | dinov2-reg | webssl-dino | mae (known hub repos fill it in).",
    )] = None,
    encoder_id: Annotated[str | None, typer.Option("--encoder-id", help="Encoder repo id or folder, recorded in the config.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="vit_mae config.json to use when none sits next to model.pt.")] = None,
    subfolder: Annotated[str | None, typer.Option("--subfolder", help="Path of the decoder inside a hub repo.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision.")] = None,
) -> None:
    """Convert a released decoder (strict key check, sizes from the weights) into config.json + model.safetensors."""
    from scale_rae_core.models.convert import convert_released_decoder
    from scale_rae_core.models.decoder import load_decoder

    path = convert_released_decoder(
        src, out, encoder_kind=encoder_kind, encoder_id=encoder_id, config=config, subfolder=subfolder, revision=revision
    )
    cfg = load_decoder(path).cfg
    typer.echo(
        f"converted {src} -> {path}: {cfg.num_layers} layers x {cfg.hidden_size} wide ({cfg.preset or 'custom'}), "
        f"{cfg.num_patches} tokens x {cfg.latent_dim} ch -> {cfg.image_size} px, encoder {cfg.encoder_kind}"
    )
