"""`srae convert decoder`: a released RAE / Scale-RAE decoder (config.json + model.pt) into srae's format."""

from __future__ import annotations

from pathlib import Path

import typer

EPILOG = "Example: srae convert decoder nyu-visionx/siglip2_decoder models/siglip2-decoder"


def convert_decoder(
    src: str = typer.Argument(..., help="Released decoder: a folder with model.pt (+ config.json), a model.pt, or a hub repo id."),
    out: Path = typer.Argument(..., help="Output folder (config.json + model.safetensors)."),
    encoder_kind: str | None = typer.Option(
        None, "--encoder-kind", help="Encoder the decoder reads: siglip | siglip2 | dinov2-reg | webssl-dino | mae (known hub repos fill it in)."
    ),
    encoder_id: str | None = typer.Option(None, "--encoder-id", help="Encoder repo id or folder, recorded in the config."),
    config: Path | None = typer.Option(None, "--config", help="vit_mae config.json to use when none sits next to model.pt."),
    subfolder: str | None = typer.Option(None, "--subfolder", help="Path of the decoder inside a hub repo."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision."),
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
