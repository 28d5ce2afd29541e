"""A model directory that carries its pixel decoder: an srae export plus ``decoder/`` (what ``srae demo`` writes
to ``runs/demo/model`` and what ships as the bundled shapes demo model; ``demo.install`` installs one).

    MODEL/config.json, model.safetensors, llm/, latent_stats.safetensors   (the stage-1/2 export, either version)
    MODEL/decoder/config.json, model.safetensors                                       (the `srae train decoder` output)
    MODEL/ABOUT.json                                                                   (optional: how it was made)

Every command that takes ``--model`` uses ``MODEL/decoder`` when ``--decoder`` is not given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scale_rae_core.errors import CheckpointError
from scale_rae_core.infer.loading import BUNDLED_DECODER
from scale_rae_core.models.io import WEIGHTS_FILE, ExtraFile, write_model_folder
from scale_rae_core.models.scale_rae import is_export

ABOUT_FILE = "ABOUT.json"


def bundle_model(export: str | Path, decoder: str | Path, dest: str | Path, *, half: bool = False,
                 about: dict[str, Any] | None = None) -> Path:
    """Write ``dest`` = ``export`` + ``decoder/`` (atomically: ``models.io.write_model_folder``).

    ``half`` stores the model weights (``model.safetensors`` and ``llm/model.safetensors``) as fp16 (half the size; loading casts them back to fp32; what the package
    ships). ``about`` goes to ``ABOUT.json`` (provenance: command, data, benchmark).
    """
    from safetensors.torch import load_file

    export, decoder, dest = Path(export), Path(decoder), Path(dest)
    if not is_export(export):
        raise CheckpointError(f"{export}: not an srae export (config.json + {WEIGHTS_FILE}); train stage 1 first")
    if not (decoder / "config.json").is_file():
        raise CheckpointError(f"{decoder}: not a decoder directory (config.json missing); train one with `srae train decoder`")
    files: dict[str, ExtraFile] = {}
    for p in sorted(export.rglob("*")):  # the weights (model.safetensors, llm/model.safetensors) go through `half`
        if p.is_file() and p != export / WEIGHTS_FILE:
            files[p.relative_to(export).as_posix()] = load_file(str(p)) if p.name == WEIGHTS_FILE else p
    files[BUNDLED_DECODER] = decoder
    if about is not None:
        files[ABOUT_FILE] = _about_text(about)
    return write_model_folder(dest, load_file(str(export / WEIGHTS_FILE)), None, files, half=half)


def copy_bundle(model: str | Path, dest: str | Path, about: dict[str, Any]) -> Path:
    """Copy the model folder ``model`` to ``dest`` with ``about`` as its ``ABOUT.json``, replacing ``dest`` whole."""
    model = Path(model)
    files: dict[str, str | Path] = {p.name: p for p in sorted(model.iterdir()) if p.name != ABOUT_FILE}
    files[ABOUT_FILE] = _about_text(about)
    return write_model_folder(dest, None, None, files)


def _about_text(about: dict[str, Any]) -> str:
    return json.dumps(about, indent=1) + "\n"
