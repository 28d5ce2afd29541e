"""Decoders from anywhere: ours (``srae train decoder``) or released (RAE / Scale-RAE ``model.pt``), local or hub.

A released decoder is a plain ``state_dict`` of the reference ``GeneralDecoder`` saved as ``model.pt``, usually
next to a Hugging Face ``vit_mae`` ``config.json`` (``nyu-visionx/siglip2_decoder``,
``nyu-visionx/webssl300m_decoder``); RAE-collections ships only ``model.pt`` (its config is a ViT-XL json).
The key map and the sizes-from-weights rules live in :mod:`scale_rae_core.models.adapters`. Loading is strict:
any missing or extra key is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.files import read_plain_state_dict
from scale_rae_core.hub import Source, resolve
from scale_rae_core.models.adapters import (
    RELEASED_DECODERS,
    check_released_decoder,
    released_decoder_sizes,
    released_decoder_to_srae,
)
from scale_rae_core.models.decoder import FORMAT, Decoder, DecoderConfig, load_decoder, save_decoder
from scale_rae_core.models.encoder import FAMILIES
from scale_rae_core.models.io import load_state

RELEASED_WEIGHTS = "model.pt"
DECODER_FILES = ["config.json", RELEASED_WEIGHTS, "model.safetensors"]


def _is_ours(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_any_decoder(spec: str, *, flag: str, encoder_kind: str, encoder_id: str = "",
                     revision: str | None = None) -> tuple[Decoder, Source]:
    """``spec`` = our decoder folder, or a released one (folder, ``model.pt`` or hub repo id), as a ``Decoder``.

    ``encoder_kind`` / ``encoder_id``: the encoder a released decoder reads, unless its repo is a known one
    (:data:`~scale_rae_core.models.adapters.RELEASED_DECODERS`).
    """
    source = resolve(spec, flag=flag, allow_patterns=DECODER_FILES, revision=revision, files_ok=True,
                     hint="train one with `srae train decoder` or convert a released one with `srae convert decoder`")
    if source.path.is_dir() and _is_ours(source.path):
        return load_decoder(source.path), source
    weights = source.path if source.path.is_file() else source.path / RELEASED_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{flag} {spec}: neither an srae decoder (config.json + model.safetensors) nor a released one "
            f"({RELEASED_WEIGHTS}); pass a decoder directory or repo id"
        )
    known = RELEASED_DECODERS.get(source.repo_id or "", {})
    decoder = _released(weights, _sibling_config(weights), known.get("encoder_kind", encoder_kind),
                        known.get("encoder_id", encoder_id))
    return decoder, source


def load_released_decoder(
    src: str | os.PathLike[str],
    *,
    encoder_kind: str | None = None,
    encoder_id: str | None = None,
    config: str | os.PathLike[str] | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    attn_impl: str = "sdpa",
) -> Decoder:
    """A released decoder (local ``model.pt`` / directory / hub repo id) as our ``Decoder``, loaded strictly.

    encoder_kind / encoder_id: the encoder the decoder reads; known released repos fill them in, otherwise
        ``encoder_kind`` is required (it fixes the pixel mean/std the output is de-normalised with).
    config: a ``vit_mae`` config.json to use when none sits next to model.pt.
    subfolder: path of the decoder inside a hub repo (RAE-collections: ``decoders/dinov2/wReg_base/ViTXL_n08``).
    """
    source = resolve(str(src), flag="decoder", allow_patterns=["config.json", RELEASED_WEIGHTS], revision=revision,
                     subfolder=subfolder, files_ok=True)
    weights = source.path if source.path.is_file() else source.path / RELEASED_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; a released decoder directory holds {RELEASED_WEIGHTS} (+ config.json)")
    known = RELEASED_DECODERS.get(source.repo_id or "", {})
    cfg_path = Path(config) if config is not None else _sibling_config(weights)
    return _released(weights, cfg_path, encoder_kind or known.get("encoder_kind"),
                     encoder_id or known.get("encoder_id", ""), attn_impl=attn_impl, what=str(src))


def _sibling_config(weights: Path) -> Path | None:
    cfg = weights.parent / "config.json"
    return cfg if cfg.is_file() else None


def _released(weights: Path, cfg_path: Path | None, kind: str | None, encoder_id: str, *,
              attn_impl: str = "sdpa", what: str = "") -> Decoder:
    hf: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            hf = json.loads(Path(cfg_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: unreadable decoder config.json ({e})") from e
    if kind is None:
        raise ConfigError(
            f"{what or weights}: which encoder does this decoder read? pass encoder_kind= (one of {sorted(FAMILIES)})"
        )
    if kind not in FAMILIES:
        raise ConfigError(f"encoder_kind {kind!r} is unknown; use one of {sorted(FAMILIES)}")
    state = read_plain_state_dict(weights, fix="pass the decoder's own model.pt")
    num_layers = check_released_decoder(state, str(weights))
    cfg = DecoderConfig(
        **released_decoder_sizes(state, hf, str(weights), num_layers),
        attn_impl=attn_impl,
        encoder_kind=kind,
        encoder_id=encoder_id,
        pixel_mean=list(FAMILIES[kind].mean),
        pixel_std=list(FAMILIES[kind].std),
    )
    decoder = Decoder(cfg)
    fix = "pass the decoder's own model.pt"
    load_state(decoder, released_decoder_to_srae(state, str(weights)), source=str(weights), fix=fix,
               what="the decoder its sizes describe")
    return decoder


def convert_released_decoder(
    src: str | os.PathLike[str], out_dir: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Convert a released decoder into our format (``config.json`` + ``model.safetensors`` in ``out_dir``).

    ``kwargs`` are those of :func:`load_released_decoder`.
    """
    return save_decoder(load_released_decoder(src, **kwargs), out_dir)
