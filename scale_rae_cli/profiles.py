"""`srae profiles list|show`."""

from __future__ import annotations

from typing import Annotated

import typer

from scale_rae_cli.options import SetOpt, load

HELP = "List and show the shipped profiles."
LIST_EPILOG = "Example: srae profiles list"
SHOW_EPILOG = "Example: srae profiles show v4-256 --set stage1.lr=1e-4"


def list_() -> None:
    """List the shipped profiles with their backend and process layout."""
    from rich.console import Console
    from rich.table import Table

    from scale_rae_core.config import list_profiles, load_profile

    table = Table("profile", "backend", "precision", "devices", "LLM", "DiT", "stage-1 global batch")
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(
            name, p.backend.kind, p.backend.precision, str(p.backend.num_devices),
            p.model.llm.preset, p.model.dit.preset, str(p.stage1.global_batch_size),
        )
    Console().print(table)


def show(
    name: Annotated[str | None, typer.Argument(help="Profile name or path to a TOML file. Default: $SRAE_PROFILE or tiny-cpu.")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML-like text.")] = False,
) -> None:
    """Print a profile's resolved values (after --set, SRAE_* variables and defaults)."""
    import json

    profile = load(name, set_)
    data = profile.to_toml_dict()
    if as_json:
        typer.echo(json.dumps({"source": profile.source, **data}, indent=2))
        return
    typer.echo(f"# resolved from {profile.source}")
    for section, values in data.items():
        _print_section(section, values)


def _print_section(prefix: str, values: dict) -> None:
    import json

    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    typer.echo(f"\n[{prefix}]")
    for key, value in scalars.items():
        typer.echo(f"{key} = {json.dumps(value)}")
    for key, value in values.items():
        if isinstance(value, dict):
            _print_section(f"{prefix}.{key}", value)
