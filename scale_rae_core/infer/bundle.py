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

from scale_rae_core.errors import CheckpointError, SraeError
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
    _swap_into_place(tmp, dest)
    return dest


def copy_bundle(model: str | Path, dest: str | Path, about: dict[str, Any]) -> Path:
    """Copy the model folder ``model`` to ``dest`` with ``about`` as its ``ABOUT.json``, replacing ``dest`` whole."""
    model, dest = Path(model), Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    (tmp / ABOUT_FILE).write_text(json.dumps(about, indent=1) + "\n")
    _swap_into_place(tmp, dest)
    return dest


def install_bundled(model: str | Path, bench_file: str | Path, quality: list[dict[str, Any]],
                    dest: str | Path | None = None) -> Path:
    """Make ``model`` (a demo's ``OUT/model``) the package's bundled model, the default ``--model``.

    Refused while a quality bar in ``quality`` (the demo's ``check_bars`` rows) is missed: the bundled model is what
    ``srae generate`` uses when nothing is named. ``ABOUT.json`` keeps the model's provenance (``made_by``, commit,
    profile, date) and gains the shapes benchmark in ``bench_file`` and the bars.
    """
    from scale_rae_core.eval.shapes_bench import about_fields
    from scale_rae_core.infer import loading

    model, bench_file = Path(model), Path(bench_file)
    missed = [q for q in quality if not q["ok"]]
    if missed:
        q = missed[0]
        raise SraeError(f"--install: {q['label']} = {q['value']:.4g} misses its bar ({q['minimum']:.4g}); "
                        f"the bundled model stays as it is (train longer, e.g. --retrain)")
    if not (model / "config.json").is_file() or not bench_file.is_file():
        raise SraeError(f"--install: no finished model ({model}) and benchmark ({bench_file}); run the demo to the end first")
    about = json.loads((model / ABOUT_FILE).read_text()) if (model / ABOUT_FILE).is_file() else {}
    about.update(about_fields(json.loads(bench_file.read_text())))
    about["quality_bars"] = {q["key"]: {"value": q["value"], "minimum": q["minimum"]} for q in quality}
    return copy_bundle(model, dest or loading.BUNDLED_MODEL, about)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``; the old ``dest`` stays whole until then."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
