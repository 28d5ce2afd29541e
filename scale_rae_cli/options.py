"""Options shared by several commands, as Annotated aliases (one definition, same help everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Profile name (see `srae profiles list`) or path to a TOML file. Default: $SRAE_PROFILE or tiny-cpu."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a profile value, e.g. --set stage1.lr=1e-4 (repeatable). Beats SRAE_* variables and the file."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; only the final summary.")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]


def load(profile: str | None, overrides: list[str] | None):
    """Load and validate the profile for a command (imports the config machinery lazily)."""
    from scale_rae_core.config import load_profile

    return load_profile(profile, overrides or [])
