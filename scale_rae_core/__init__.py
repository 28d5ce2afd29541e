"""srae engine: everything below the command line (models, data, training, inference, backends).

``from scale_rae_core import Pipeline`` is the Python API (:mod:`scale_rae_core.api`); it is imported on first use,
so ``import scale_rae_core`` (and ``srae --help``) stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scale_rae_core.version import __version__

__all__ = ["Pipeline", "__version__"]

if TYPE_CHECKING:
    from scale_rae_core.api import Pipeline


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from scale_rae_core.api import Pipeline

        return Pipeline
    raise AttributeError(f"module 'scale_rae_core' has no attribute {name!r}")
