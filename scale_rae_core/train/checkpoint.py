"""Resumable training checkpoints (the self-contained model export they feed is ``models.io.export_model``).

Layout of one run::

    run_dir/checkpoints/
        step-00000200/             complete: renamed from step-00000200.tmp after every rank finished
            .metadata, __0_0.distcp, …   model + optimizer tensors (torch.distributed.checkpoint, sharded)
            state.json             step, metrics, LR-scheduler state, the non-tensor optimizer state
            profile.json           the resolved profile of the run
            rng/rank-00000.safetensors   python / numpy / torch / device RNG of each rank
            data/rank-00000.json   data-loader position of each rank (whatever the trainer passed)
            meta.json              written LAST, by rank 0, after a barrier: marks the checkpoint complete
        step-00000300.tmp/         a save in progress (or killed): ignored, and removed by `latest()`
        step-00000200.old/         the previous copy while step 200 is saved again (after resuming from it):
                                   put back by `latest()` when the new copy never arrived, else removed

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict.get_state_dict`` and DCP, so
a plain module and an FSDP2-sharded one write the same format, and a checkpoint saved by N processes loads
into M processes (DCP reshards on load). Only tensors go to DCP: DCP pickles other values and unpickles
them with ``torch.load(weights_only=False)``, so every non-tensor value (optimizer hyper-parameters, the
scheduler, step, metrics) is stored as JSON instead. Loading never unpickles anything that can run code:

* DCP's own index (``.metadata``) is a pickle; it is read, before DCP sees it, with an unpickler that only
  accepts DCP's tensor-metadata classes, ``torch.Size``, dtypes and paths;
* an index that marks any entry as "bytes" (``BytesStorageMetadata``: DCP would ``torch.load`` those bytes
  with ``weights_only=False``) is refused, and the load planner refuses bytes entries as well, so a crafted
  checkpoint cannot reach that code path by any route.

Protocol (every method marked *collective* must be called on all ranks): rank 0 creates the ``.tmp``
directory → barrier → every rank writes its shards and its own per-rank files → rank 0 writes the shared
JSON files → barrier → rank 0 writes ``meta.json``, renames ``.tmp`` to the final name, then deletes
checkpoints beyond ``keep`` → barrier. A run killed at any point leaves either the previous complete
checkpoints untouched or a new complete one; saving a step that already exists moves the old copy to ``.old``
first and removes it only after the new one is in place, and ``latest()`` puts an ``.old`` copy back when the
kill came between the two renames. ``run_dir`` must be on a filesystem every rank sees.

Resume differs from the reference on purpose (scale-rae.md §8 items 5, 6): optimizer moments are restored
(not only the model and LR), resuming never exits the process, and retention follows ``checkpoint.keep``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from scale_rae_core.backends.base import Backend
from scale_rae_core.errors import CheckpointError
from scale_rae_core.files import apply_umask, check_format, fsync_path
from scale_rae_core.models.io import export_model
from scale_rae_core.train.rng import load_rng_state, save_rng_state

FORMAT = "srae-checkpoint"
FORMAT_VERSION = 1
MARKER = "meta.json"
_TMP = ".tmp"
_OLD = ".old"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TUPLE = "__tuple__"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------------------------- small file helpers


def _write_json(path: Path, data: Any) -> None:
    """Write JSON durably under a temporary name, then rename (readers never see half a file)."""
    tmp = path.with_name(path.name + _TMP)
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing ({what}); the checkpoint is damaged, resume from an earlier step directory"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is unreadable ({what}: {type(exc).__name__}); resume from an earlier step directory"
        ) from None


def _refusal(exc: BaseException) -> CheckpointError | None:
    """The CheckpointError a DCP failure wraps (DCP re-raises a rank's error inside CheckpointException), if any."""
    seen = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointError):
            return e
        if isinstance(e, CheckpointException):
            stack.extend(v for v in e.failures.values() if isinstance(v, BaseException))
        stack.extend([e.__cause__, e.__context__])
    return None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------- DCP index, read safely

_DCP_METADATA_MODULE = dcp_metadata.__name__
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
}


# DCP's metadata classes an index may hold; BytesStorageMetadata is left out on purpose (see the module docstring).
_DCP_METADATA_CLASSES = {
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "_MEM_FORMAT_ENCODING",
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index and refuses every other global (no code runs from a checkpoint)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE and name in _DCP_METADATA_CLASSES:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint index")


def read_index(step_dir: Path, name: str = ".metadata") -> dcp_metadata.Metadata:
    """DCP's index of ``step_dir``, read without running code; CheckpointError (one line) if it is anything else
    than plain tensor metadata."""
    path = Path(step_dir) / name
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as exc:
        raise CheckpointError(
            f"{path} is unreadable ({type(exc).__name__}); the checkpoint is damaged, resume from an earlier step directory"
        ) from None
    except Exception as exc:  # UnpicklingError, EOFError, ... from a damaged or crafted file
        raise _untrusted(step_dir, f"{name}: {_one_line(exc)}") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise _untrusted(step_dir, f"{name} holds a {type(metadata).__name__}, not DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise _untrusted(step_dir, f"{name}: entry '{key}' is stored as {type(entry).__name__}, not as a tensor")
    return metadata


def _untrusted(step_dir: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {step_dir}: its tensor index is not plain DCP metadata ({why}); "
        "do not load checkpoints from untrusted sources, resume from another step directory"
    )


class _SafeReader(FileSystemReader):
    """DCP's file reader with :func:`read_index` in place of ``pickle.load`` for the index."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        metadata = read_index(Path(self.path), ".metadata" if rank is None else f"__{rank}.metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, minus the one method that unpickles (``load_bytes`` calls ``torch.load`` with
    ``weights_only=False``): srae checkpoints hold tensors only, so a bytes entry is refused."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(
            f"checkpoint entry '{read_item.dest_index.fqn}' is stored as pickled bytes; srae never unpickles "
            "checkpoint data, resume from a checkpoint written by srae"
        )


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load, although that mode is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# --------------------------------------------------------------------------------------------- state splitting
# DCP gets the tensors; everything else becomes JSON (tuples tagged so they come back as tuples).


def _to_json(value: Any, key: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, key) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, key) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{key}.{k}") for k, v in value.items()}
    raise CheckpointError(
        f"checkpoint entry '{key}' is a {type(value).__name__}; only tensors and JSON values can be saved "
        "(convert it to a tensor, number or string in the component's state_dict)"
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_from_json(v) for v in value[_TUPLE])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _split(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested dict → (the same tree with only tensor leaves, the same tree with only JSON leaves)."""
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for key, value in state.items():
        assert isinstance(key, str), f"state dict keys must be strings, got {key!r} under '{prefix}'"
        where = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, Mapping):
            sub_t, sub_p = _split(value, where + ".")
            if sub_t:
                tensors[key] = sub_t
            if sub_p:
                plain[key] = sub_p
        else:
            plain[key] = _to_json(value, where)
    return tensors, plain


def _merge(tensors: dict[str, Any], plain: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_split` (``plain`` is the decoded JSON tree)."""
    out = dict(tensors)
    for key, value in plain.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _scheduler_state(scheduler: LRScheduler) -> dict[str, Any]:
    state = scheduler.state_dict()
    # LambdaLR stores its lambdas' attributes; the schedule's shape comes from the current profile instead,
    # only its position (last_epoch, base_lrs, ...) comes from the checkpoint.
    state.pop("lr_lambdas", None)
    return _to_json(state, "scheduler")


def _load_scheduler(scheduler: LRScheduler, saved: Mapping[str, Any]) -> None:
    state = dict(_from_json(dict(saved)))
    live = scheduler.state_dict()
    if "lr_lambdas" in live:
        state["lr_lambdas"] = [None] * len(live["lr_lambdas"])  # keep the live lambdas
    scheduler.load_state_dict(state)


# --------------------------------------------------------------------------------------------- export


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """*Collective.* The whole, unsharded model state on CPU; complete on rank 0, empty on other ranks
    (for torch.distributed / FSDP2 models; :meth:`Backend.full_model_state` covers every backend)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run (``run_dir/checkpoints``)."""

    def __init__(self, run_dir: str | Path, keep: int, backend: Backend, *, every_steps: int = 0):
        if keep < 1:
            raise CheckpointError(
                f"checkpoint.keep = {keep}; keep at least 1 checkpoint (set checkpoint.keep >= 1)"
            )
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep
        self.backend = backend
        self.every_steps = every_steps  # save cadence (checkpoint.every_steps); 0 = only where `due` says last

    def due(self, step: int, last: int) -> bool:
        """Whether a run saves after optimiser ``step``: every ``every_steps`` steps, and at ``last`` (the end
        of the schedule, or where a simulated preemption stops it)."""
        return step == last or (self.every_steps > 0 and step % self.every_steps == 0)

    # ------------------------------------------------------------------------------------- finding
    def complete(self) -> list[tuple[int, Path]]:
        """(step, dir) of every complete checkpoint, oldest first. Reads only; any rank may call it."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            m = _STEP_RE.match(path.name)
            if m and path.is_dir() and (path / MARKER).is_file():
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self, *, clean: bool = True) -> Path | None:
        """*Collective.* The newest complete checkpoint, or None. With ``clean``, rank 0 first deletes what
        interrupted saves left behind (``*.tmp`` dirs, step dirs without ``meta.json``)."""
        if clean:
            if self.backend.is_main:
                self._remove_incomplete()
            self.backend.barrier()
        found = self.complete()
        return found[-1][1] if found else None

    def _remove_incomplete(self) -> None:
        if not self.dir.is_dir():
            return
        for old in sorted(self.dir.glob(f"step-*{_OLD}")):  # a re-save killed between its two renames
            final = old.with_name(old.name[: -len(_OLD)])
            if old.is_dir() and (old / MARKER).is_file() and not (final / MARKER).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(old, final)  # the only complete copy of that step: put it back
        for path in self.dir.iterdir():
            if not path.is_dir():
                continue
            partial = path.name.endswith(_TMP) or path.name.endswith(_OLD)
            if partial or (_STEP_RE.match(path.name) and not (path / MARKER).is_file()):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------- saving
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        scheduler: LRScheduler | None = None,
        *,
        data_position: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        profile: Any = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> Path:
        """*Collective.* Save everything needed to resume after optimizer step ``step``; returns the final dir.

        ``data_position``: this rank's data-loader position (any JSON value). ``profile``: the resolved
        profile (a :class:`~scale_rae_core.config.Profile` or a plain dict). ``metrics``: JSON values.
        ``inputs``: what the run read besides the profile (e.g. the data path), compared on resume
        (:meth:`read_record`).
        """
        be = self.backend
        final = self.dir / step_dir_name(step)
        tmp = final.with_name(final.name + _TMP)
        if be.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
            (tmp / "data").mkdir()
        be.barrier()

        state: dict[str, Any] = be.train_state(model, optimizer)
        tensors, plain = _split(state)
        with _quiet_single_process():
            dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not be.distributed)

        save_rng_state(tmp / "rng" / f"rank-{be.rank:05d}.safetensors", be)
        _write_json(tmp / "data" / f"rank-{be.rank:05d}.json", _to_json(data_position, "data_position"))
        if be.is_main:
            _write_json(
                tmp / "state.json",
                {
                    "step": step,
                    "non_tensor_state": plain,
                    "scheduler": None if scheduler is None else _scheduler_state(scheduler),
                    "metrics": _to_json(dict(metrics or {}), "metrics"),
                    "inputs": _to_json(dict(inputs or {}), "inputs"),
                },
            )
            profile_dict = profile.to_toml_dict() if hasattr(profile, "to_toml_dict") else profile
            _write_json(tmp / "profile.json", _to_json(profile_dict, "profile"))
        be.barrier()

        if be.is_main:
            _write_json(
                tmp / MARKER,
                {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "step": step,
                    "world_size": be.world_size,
                    "has_optimizer": optimizer is not None,
                    "time": round(time.time(), 3),
                },
            )
            apply_umask(tmp)  # DCP, safetensors and temporary folders start private
            fsync_path(tmp)
            old = final.with_name(final.name + _OLD)
            if final.exists():  # saving the same step again (e.g. after resuming from it)
                if old.exists():
                    shutil.rmtree(old)  # a complete `final` exists, so this older copy is not needed
                os.rename(final, old)  # from here until the next rename, `old` is the complete copy
                fsync_path(self.dir)
            os.rename(tmp, final)
            fsync_path(self.dir)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(keep_path=final)
        be.barrier()
        return final

    def _prune(self, keep_path: Path) -> None:
        found = self.complete()
        keep = {p for _, p in found[-self.keep :]} | {keep_path}
        for _, path in found:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------- loading
    def read_record(self, step_dir: str | Path) -> dict[str, Any]:
        """What a complete checkpoint recorded about its run: ``profile`` (the resolved profile as a dict, or
        None) and ``inputs`` (what :meth:`save` was given; ``{}`` for checkpoints written before it was kept)."""
        step_dir = Path(step_dir)
        self.read_meta(step_dir)
        saved = _read_json(step_dir / "state.json", "training state")
        profile = _read_json(step_dir / "profile.json", "profile") if (step_dir / "profile.json").is_file() else None
        inputs = saved.get("inputs") if isinstance(saved, dict) else None
        return {"profile": profile if isinstance(profile, dict) else None,
                "inputs": inputs if isinstance(inputs, dict) else {}}

    @staticmethod
    def read_meta(step_dir: str | Path) -> dict[str, Any]:
        """``meta.json`` of a complete checkpoint; CheckpointError if the directory is missing or incomplete."""
        step_dir = Path(step_dir)
        if not step_dir.is_dir():
            raise CheckpointError(
                f"checkpoint {step_dir} does not exist; pass a step directory under <run>/checkpoints/ or start without resuming"
            )
        if step_dir.name.endswith(_TMP) or not (step_dir / MARKER).is_file():
            raise CheckpointError(
                f"checkpoint {step_dir} is incomplete (no {MARKER}: its save was interrupted); resume from an earlier step directory"
            )
        meta = _read_json(step_dir / MARKER, "checkpoint marker")
        fix = "pass a directory written by srae training"
        check_format(meta, FORMAT, FORMAT_VERSION, str(step_dir / MARKER), "an srae checkpoint marker", fix)
        if not isinstance(meta.get("step"), int):
            raise CheckpointError(f"{step_dir / MARKER} is not an srae checkpoint marker (no step); {fix}")
        return meta

    def load(
        self,
        step_dir: str | Path,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        scheduler: LRScheduler | None = None,
    ) -> dict[str, Any]:
        """*Collective.* Restore model (and optimizer, scheduler, this rank's RNG) from ``step_dir``.

        Call after :meth:`Backend.shard_model` and after building the optimizer/scheduler. The world size
        may differ from the saving run's. Returns ``step``, ``world_size`` (of the saving run),
        ``data_position`` (this rank's, or None when the world size changed or none was saved),
        ``data_positions`` (every saving rank's), ``metrics``, ``profile``, ``rng_restored`` and ``path``.
        """
        be = self.backend
        step_dir = Path(step_dir)
        meta = self.read_meta(step_dir)
        saved = _read_json(step_dir / "state.json", "training state")
        if optimizer is not None and not meta.get("has_optimizer", False):
            raise CheckpointError(
                f"checkpoint {step_dir} holds no optimizer state (saved for inference); load it without an optimizer or start a new run"
            )

        read_index(step_dir)  # refuse a crafted index here, before DCP reads it
        template: dict[str, Any] = be.train_state(model, optimizer)
        tensors, _ = _split(template)
        try:
            with _quiet_single_process():
                dcp.load(tensors, storage_reader=_SafeReader(str(step_dir)), planner=_TensorsOnlyPlanner(),
                         no_dist=not be.distributed)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
            refused = _refusal(exc)
            if refused is not None:
                raise refused from None
            raise CheckpointError(
                f"checkpoint {step_dir}: the tensors do not load into this model ({type(exc).__name__}: {_one_line(exc)}); "
                "check that the profile's model settings match the run that saved it, or resume from an earlier step"
            ) from None
        plain = _from_json(saved.get("non_tensor_state", {}))
        restored = _merge(tensors, {k: v for k, v in plain.items() if k in template})
        be.load_train_state(model, optimizer, restored)

        if scheduler is not None:
            if saved.get("scheduler") is None:
                raise CheckpointError(
                    f"checkpoint {step_dir} has no LR-scheduler state; resume without a scheduler or from another checkpoint"
                )
            _load_scheduler(scheduler, saved["scheduler"])

        rng_file = step_dir / "rng" / f"rank-{be.rank:05d}.safetensors"
        rng_restored = rng_file.is_file()
        if rng_restored:
            load_rng_state(rng_file, be)

        world = int(meta.get("world_size", 1))
        positions = []
        for r in range(world):
            path = step_dir / "data" / f"rank-{r:05d}.json"
            positions.append(_from_json(_read_json(path, "data-loader position")) if path.is_file() else None)
        same_layout = world == be.world_size
        be.barrier()
        return {
            "step": int(meta["step"]),
            "world_size": world,
            "data_position": positions[be.rank] if same_layout else None,
            "data_positions": positions,
            "metrics": _from_json(saved.get("metrics", {})),
            "profile": _read_json(step_dir / "profile.json", "profile")
            if (step_dir / "profile.json").is_file()
            else None,
            "rng_restored": rng_restored,
            "path": step_dir,
        }

    # ------------------------------------------------------------------------------------- export
    def export(
        self,
        out_dir: str | Path,
        model: nn.Module,
        config: Mapping[str, Any],
        extra_files: Mapping[str, str | bytes | Path] | None = None,
    ) -> Path:
        """*Collective.* Gather the full model to rank 0 and write it to ``out_dir`` (``models.io.export_model``:
        ``model.safetensors`` + ``config.json`` + ``extra_files``, atomically; tuples in ``config`` are tagged as
        in ``state.json``)."""
        state = self.backend.full_model_state(model)
        return export_model(out_dir, state, _to_json(dict(config), "config"), extra_files, backend=self.backend)
