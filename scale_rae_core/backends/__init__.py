"""Backends: ``base.Backend`` is what the engine asks of one; :func:`get_backend` picks the implementation.

A backend is chosen from the profile's ``[backend]`` section:

* ``cpu`` / ``cuda`` → :class:`scale_rae_core.backends.cpu_cuda.CpuCudaBackend` (one process, or torchrun
  with torch.distributed and FSDP2),
* ``xla`` → ``scale_rae_core.backends.xla`` (the only module that imports ``torch_xla``; imported lazily).

Both are imported when asked for, so importing this package costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from scale_rae_core.errors import BackendError

if TYPE_CHECKING:
    from scale_rae_core.backends.base import Backend
    from scale_rae_core.config import BackendSettings


def get_backend(settings: BackendSettings) -> Backend:
    """The backend the profile's ``[backend]`` section asks for, initialised for this process."""
    if settings.kind in ("cpu", "cuda"):
        from scale_rae_core.backends.cpu_cuda import CpuCudaBackend

        return CpuCudaBackend(settings)
    if settings.kind == "xla":
        try:
            module = importlib.import_module("scale_rae_core.backends.xla")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "torch_xla":
                raise BackendError(
                    "backend.kind = 'xla' needs torch_xla, which is not installed here; run "
                    "pip install 'srae[tpu]' on a TPU VM, or choose a cpu/cuda profile"
                ) from None
            if exc.name != "scale_rae_core.backends.xla":
                raise
            raise BackendError(
                "backend.kind = 'xla' but this srae build has no XLA backend (scale_rae_core/backends/xla.py "
                "is missing); reinstall srae from a release that includes it, or choose a cpu/cuda profile"
            ) from None
        return module.XlaBackend(settings)
    raise BackendError(f"backend.kind = '{settings.kind}' is not one of cpu, cuda, xla; fix it in the profile")


@contextlib.contextmanager
def backend_for(settings: BackendSettings) -> Iterator[Backend]:
    """``with backend_for(profile.backend) as backend:`` — :func:`get_backend` that closes on exit."""
    with get_backend(settings) as backend:  # the backend's __exit__ sees whether the block failed
        yield backend
