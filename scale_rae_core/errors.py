"""Errors a user can fix.

Every message names the file, key or flag at fault and says how to fix it, in one line. The CLI prints
``error: <message>`` and exits 1 (a traceback only with ``SRAE_DEBUG=1``). ``assert`` is kept for internal
invariants; anything a user can cause raises one of these.
"""

from __future__ import annotations


class SraeError(Exception):
    """A problem the user can fix; ``str(err)`` is the one line shown."""

    exit_code = 1


class ConfigError(SraeError):
    """A profile, override or environment variable is wrong."""


class DataError(SraeError):
    """An input file, dataset, manifest or shard is missing or malformed."""


class CheckpointError(SraeError):
    """A checkpoint or model directory is missing, incomplete or does not match the model."""


class BackendError(SraeError):
    """The requested backend (cuda, xla, a process layout) is not available here."""
