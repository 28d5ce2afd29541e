"""`srae push`: upload a run's export (or an export / model folder) to the Hugging Face hub with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EPILOG = "Example: srae push runs/stage2 your-name/scale-rae-shapes --private   (see what goes up first: --dry-run)"


def push(
    source: Annotated[Path, typer.Argument(help="A training run (its export/ goes up) or an export / model folder.")],
    repo: Annotated[str, typer.Argument(help="Hub model repo, owner/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to upload to (created from main if missing). Default: main.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and print the model card; no network.")] = False,
) -> None:
    """Upload a trained model with a generated model card (README.md) in one commit."""
    from scale_rae_core.publish import push as publish

    result = publish(source, repo, private=private, revision=revision, dry_run=dry_run)
    listing = result.listing()
    total = sum(size for _, size in listing)
    for name, size in listing:
        typer.echo(f"{size:>12,}  {name}")
    typer.echo(f"{len(listing)} files, {total / 2**20:.1f} MiB from {result.folder}")
    if dry_run:
        typer.echo(f"--- README.md (dry run: nothing was uploaded to {repo}) ---")
        typer.echo(result.card)
    else:
        typer.echo(f"pushed to https://huggingface.co/{repo}" + (f" (branch {revision})" if revision else "") + f": {result.url}")
