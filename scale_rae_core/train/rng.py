"""Random-number-generator state of one process, saved as safetensors (never pickle).

Captured: python's ``random``, numpy's global ``RandomState``, torch's CPU generator and whatever the backend
drives (CUDA, XLA) via :meth:`Backend.device_rng_state`. Integer states are stored as int64 tensors, the
few scalars as JSON in the safetensors metadata (floats as ``float.hex`` so they round-trip exactly).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from scale_rae_core.backends.base import Backend
from scale_rae_core.errors import CheckpointError

_DEVICE_PREFIX = "device."


def capture_rng_state(backend: Backend | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's generator states as (tensors, metadata) ready for ``safetensors.torch.save_file``."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if backend is not None:
        for name, state in backend.device_rng_state().items():
            tensors[_DEVICE_PREFIX + name] = state.cpu()
    scalars = {
        "python_version": py_version,
        "python_gauss": None if py_gauss is None else float(py_gauss).hex(),
        "numpy_kind": np_kind,
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss).hex(),
    }
    return tensors, {"rng": json.dumps(scalars)}


def restore_rng_state(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], backend: Backend | None = None
) -> None:
    """Inverse of :func:`capture_rng_state`."""
    scalars = json.loads(metadata["rng"])
    gauss = scalars["python_gauss"]
    random.setstate(
        (
            scalars["python_version"],
            tuple(int(v) for v in tensors["python"].tolist()),
            None if gauss is None else float.fromhex(gauss),
        )
    )
    np.random.set_state(
        (
            scalars["numpy_kind"],
            tensors["numpy"].numpy().astype(np.uint32),
            scalars["numpy_pos"],
            scalars["numpy_has_gauss"],
            float.fromhex(scalars["numpy_gauss"]),
        )
    )
    torch.set_rng_state(tensors["torch_cpu"])
    if backend is not None:
        device = {k[len(_DEVICE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_DEVICE_PREFIX)}
        if device:
            backend.set_device_rng_state(device)


def save_rng_state(path: str | Path, backend: Backend | None = None) -> None:
    tensors, metadata = capture_rng_state(backend)
    save_file(tensors, str(path), metadata=metadata)


def load_rng_state(path: str | Path, backend: Backend | None = None) -> None:
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        restore_rng_state(tensors, metadata, backend)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: RNG state is unreadable ({type(exc).__name__}); delete this checkpoint and resume from an earlier one"
        ) from None
