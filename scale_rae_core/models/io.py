"""Model folders on disk: one atomic writer, one strict loader.

Every folder srae writes (a training export, ``RUN/model``, a decoder, a bundled model) is built by
:func:`write_model_folder`::

    DEST/model.safetensors   the tensors (tied / shared storages written once each; fp16 on request)
    DEST/config.json         the config (JSON)
    DEST/<extra files>       text, bytes, tensors (another safetensors file, e.g. an export's llm/), or copies of
                             files and folders (tokenizer, latent stats, decoder/)

It writes everything into ``.DEST.tmp-<pid>`` beside ``DEST``, fsyncs it, then renames it into place; a previous
``DEST`` stays whole until that rename, and a failure at any point leaves it untouched and no temporary folder
behind. A folder that holds other things (no ``config.json``) is never replaced.

Every weight file srae reads goes through :func:`load_state`: each tensor is copied into the module's own, and
one one-line error lists the unknown keys (in the file's names), the missing keys and the wrong shapes together.
``models.scale_rae.load_scale_rae`` is the unified model's whole sequence: build on the meta device (no memory, no init) ->
cast to the weights' dtype (:func:`cast_weights`, still on meta) -> ``to_empty`` on the target device (the only
allocation: the model in its final dtype) -> strict load, one file tensor at a time, each cast into place -> tie
the embeddings -> the DiT's fixed tables (computed; a released file's stored ones kept) -> rebuild the LLM's
rotary embedding (its ``inv_freq`` is a non-persistent buffer that ``to_empty`` left uninitialised). No float32
copy of a half-precision model is ever made; peak memory is the model plus the largest tensor of the file.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scale_rae_core.errors import CheckpointError
from scale_rae_core.files import apply_umask, fsync_path

if TYPE_CHECKING:
    from scale_rae_core.backends.base import Backend

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SHOWN_KEYS = 8  # keys listed per kind in a mismatch error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype names

ExtraFile = str | bytes | Path | Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def write_model_folder(
    dest: str | Path,
    tensors: Mapping[str, torch.Tensor] | None = None,
    config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, ExtraFile] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    half: bool = False,
) -> Path:
    """Write ``dest`` whole and atomically (see the module docstring); returns ``dest``.

    ``tensors`` -> ``model.safetensors`` with ``metadata`` (default ``{"format": "pt"}``); ``half`` stores the
    floating-point ones as fp16 (loading casts back to fp32). ``config`` -> ``config.json``. ``extra_files``:
    name (``/`` makes sub-folders) -> text, bytes, tensors (a safetensors file with metadata ``{"format": "pt"}``,
    ``half`` applies too), or the :class:`~pathlib.Path` of a file or folder to copy.
    """
    dest = Path(dest)
    _check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if tensors is not None:
            from safetensors.torch import save_file

            plain = _plain_tensors(tensors, half, dest)
            save_file(plain, str(tmp / WEIGHTS_FILE), metadata=dict(metadata or {"format": "pt"}))
        if config is not None:
            (tmp / CONFIG_FILE).write_text(_json_text(config, dest / CONFIG_FILE), encoding="utf-8")
        for name, content in (extra_files or {}).items():
            _write_extra(tmp / name, content, half, dest)
        apply_umask(tmp)  # safetensors and copied temporary folders start private
        for path in sorted(tmp.rglob("*"), reverse=True):  # files first, then their folders
            fsync_path(path)
        fsync_path(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_replaceable(dest: Path) -> None:
    if dest.is_file():
        raise CheckpointError(f"{dest} is a file; pass a folder for the model")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{dest} exists and is not a model folder (no {CONFIG_FILE}); choose a new or empty folder"
        )


def _plain_tensors(tensors: Mapping[str, torch.Tensor], half: bool, dest: Path) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each with its own storage (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{dest}: tensor {name} holds NaN or inf; refusing to write a broken model "
                                  "(the weights diverged: lower the learning rate and train again)")
        if half and t.is_floating_point():
            if t.numel() and t.abs().max() > torch.finfo(torch.float16).max:
                raise CheckpointError(f"{dest}: tensor {name} exceeds the fp16 range; write it without half=True")
            t = t.half()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # tied weights: one copy per name
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _json_text(config: Mapping[str, Any], where: Path) -> str:
    try:
        return json.dumps(dict(config), indent=1, allow_nan=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the config is not JSON ({exc}); pass numbers, strings, lists and dicts") from None


def _write_extra(dest: Path, content: ExtraFile, half: bool, folder: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Mapping):
        from safetensors.torch import save_file

        save_file(_plain_tensors(content, half, folder), str(dest), metadata={"format": "pt"})
    elif isinstance(content, Path):
        if content.is_dir():
            shutil.copytree(content, dest)
        elif content.is_file():
            shutil.copyfile(content, dest)
        else:
            raise CheckpointError(f"model folder file {content} does not exist; pass an existing file or folder")
    elif isinstance(content, bytes):
        dest.write_bytes(content)
    else:
        dest.write_text(content, encoding="utf-8")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``; the old ``dest`` is renamed aside first and put back on failure."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    had_old = dest.exists()
    if had_old:
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if had_old:
            os.rename(old, dest)
        raise
    fsync_path(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def export_model(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_files: Mapping[str, ExtraFile] | None = None,
    *,
    backend: Backend | None = None,
) -> Path:
    """A trained model's folder: ``model.safetensors`` + ``config.json`` (+ ``extra_files``), atomically.

    ``state_dict``: full tensors (``Backend.full_model_state``). With a ``backend``, only the main rank writes
    and every rank waits at a barrier (*collective*).
    """
    out_dir = Path(out_dir)
    if backend is not None and not backend.is_main:
        backend.barrier()
        return out_dir
    try:
        if not state_dict:
            raise CheckpointError(
                f"export to {out_dir}: the state dict is empty; gather it with full_model_state_dict() on rank 0"
            )
        return write_model_folder(out_dir, state_dict, config, extra_files)
    finally:
        if backend is not None:
            backend.barrier()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def read_safetensors(files: Iterable[Path], *, fix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in ``files``, one at a time (a sharded checkpoint never sits in memory)."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as st:
                names = list(st.keys())
                for name in names:
                    yield name, st.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{file}: cannot read the weights ({first}); {fix}") from None


def key_mismatch(source: str, what: str, fix: str, *, unknown: Collection[str] = (), missing: Collection[str] = (),
                 wrong: Collection[str] = (), hint: str = "") -> str:
    """The one-line error for weights that do not fit: unknown, missing and wrong-shape keys, then the fix."""
    parts = []
    for label, keys in (("unknown keys", unknown), ("missing keys", missing), ("wrong shapes", wrong)):
        keys = sorted(keys)
        if keys:
            more = f", ... (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"{label}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    return f"{source}: weights do not match {what} ({'; '.join(parts)}){hint}; {fix}"


def load_state(
    module: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    source: str,
    fix: str,
    what: str = "the model",
    rename: Callable[[str], str | None] | None = None,
    file_key: Callable[[str], str] | None = None,
    optional: Collection[str] = (),
) -> set[str]:
    """Copy ``tensors`` into ``module``'s parameters and buffers, strictly; returns the names it filled.

    ``rename`` maps a file's key to the module's (None: not part of it), ``file_key`` back (to name missing keys
    as the file would). Every key must map onto a tensor of the same shape, and every tensor of the module but
    ``optional`` must be filled; otherwise one CheckpointError (:func:`key_mismatch`) names them all. Values are
    cast to the module's dtypes.
    """
    own = module.state_dict()
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    filled: set[str] = set()
    unknown: list[str] = []
    wrong: dict[str, str] = {}
    with torch.no_grad():
        for key, value in items:
            ours = rename(key) if rename is not None else key
            if ours is None or ours not in own:
                unknown.append(key)
            elif tuple(value.shape) != tuple(own[ours].shape):
                wrong[ours] = f"{key} {tuple(value.shape)} vs {tuple(own[ours].shape)}"
            else:
                own[ours].copy_(value)
                filled.add(ours)
    missing = {file_key(k) if file_key else k for k in set(own) - filled - set(wrong) - set(optional)}
    if unknown or missing or wrong:
        raise CheckpointError(key_mismatch(source, what, fix, unknown=unknown, missing=missing, wrong=wrong.values()))
    return filled


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place (free on the meta device),
    except what a module lists in its ``keep_fp32`` (names of its own tensors or sub-modules), which stays float32.
    """
    model.to(dtype)
    if dtype == torch.float32:
        return model
    for module in model.modules():
        for name in getattr(module, "keep_fp32", ()):
            item = getattr(module, name)
            if isinstance(item, nn.Module):
                item.float()
            elif name in module._parameters:
                module._parameters[name] = nn.Parameter(item.float(), requires_grad=item.requires_grad)
            else:
                module._buffers[name] = item.float()
    return model


def largest_difference(a: torch.Tensor, b: torch.Tensor, rows: int = 4096) -> tuple[float, float]:
    """(largest |a − b|, that relative to the largest |b|), in float32, ``rows`` rows at a time (an embedding matrix
    is compared without a float32 copy of it)."""
    largest = scale = 0.0
    with torch.no_grad():
        for x, y in zip(a.detach().reshape(a.shape[0] if a.dim() else 1, -1).split(rows),
                        b.detach().reshape(b.shape[0] if b.dim() else 1, -1).split(rows), strict=True):
            x, y = x.float(), y.to(x.device).float()
            if x.numel():
                largest = max(largest, float((x - y).abs().max()))
                scale = max(scale, float(y.abs().max()))
    return largest, largest / scale if scale else largest


def warn_if_differs(source: str, what: str, stored: torch.Tensor, other: str, expected: torch.Tensor,
                     outcome: str) -> None:
    """One warning naming ``what``, the largest difference from ``other`` and the ``outcome``, if they differ."""
    largest, relative = largest_difference(stored, expected)
    if largest > 0:
        warnings.warn(f"{source}: {what} differs from {other} by up to {largest:.3g} ({relative:.3g} relative to its "
                      f"largest value); {outcome}", stacklevel=3)
