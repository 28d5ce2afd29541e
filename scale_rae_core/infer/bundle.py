"""A model directory that carries its pixel decoder: an srae export plus ``decoder/`` (what ``srae demo`` writes
to ``runs/demo/model`` and what ships as the bundled shapes demo model).

    MODEL/config.json, model.safetensors, tokenizer files, latent_stats.safetensors   (the stage-1/2 export)
    MODEL/decoder/config.json, model.safetensors                                       (the `srae train decoder` output)
    MODEL/ABOUT.json                                                                   (optional: how it was made)

Every command that takes ``--model`` uses ``MODEL/decoder`` when ``--decoder`` is not given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from scale_rae_core.errors import CheckpointError
from scale_rae_core.infer.loading import BUNDLED_DECODER
from scale_rae_core.models.scale_rae import WEIGHTS_FILE, is_export

ABOUT_FILE = "ABOUT.json"


def _half_copy(src: Path, dst: Path) -> None:
    """Copy a safetensors file with its floating-point tensors stored as fp16 (loading casts back to fp32)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    for name, tensor in state.items():
        if tensor.is_floating_point():
            if tensor.abs().max() > torch.finfo(torch.float16).max:
                raise CheckpointError(f"{src}: tensor {name} exceeds the fp16 range; bundle it without half=True")
            state[name] = tensor.half().contiguous()
    save_file(state, str(dst), metadata={"format": "pt"})


def bundle_model(export: str | Path, decoder: str | Path, dest: str | Path, *, half: bool = False,
                 about: dict[str, Any] | None = None) -> Path:
    """Write ``dest`` = ``export`` + ``decoder/`` (atomically: a temporary folder renamed into place).

    ``half`` stores the model weights as fp16 (half the size; what the package ships). ``about`` goes to
    ``ABOUT.json`` (provenance: command, data, benchmark).
    """
    export, decoder, dest = Path(export), Path(decoder), Path(dest)
    if not is_export(export):
        raise CheckpointError(f"{export}: not an srae export (config.json + {WEIGHTS_FILE}); train stage 1 first")
    if not (decoder / "config.json").is_file():
        raise CheckpointError(f"{decoder}: not a decoder directory (config.json missing); train one with `srae train decoder`")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(export.iterdir()):
        if not path.is_file():
            continue
        if half and path.name == WEIGHTS_FILE:
            _half_copy(path, tmp / path.name)
        else:
            shutil.copyfile(path, tmp / path.name)
    shutil.copytree(decoder, tmp / BUNDLED_DECODER)
    if about is not None:
        (tmp / ABOUT_FILE).write_text(json.dumps(about, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
