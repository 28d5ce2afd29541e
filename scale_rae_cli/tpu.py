"""`srae tpu clear`: free a TPU VM left busy by a killed run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP = "TPU VM housekeeping."
CLEAR_EPILOG = (
    "Examples: srae tpu clear (dry run) · srae tpu clear --force --clear-cache · "
    "srae tpu clear --all-workers --tpu my-pod --zone us-central2-b --run"
)


def clear(
    force: Annotated[bool, typer.Option("--force", help="End this user's processes holding the TPU and remove a stale lock (default: dry run).")] = False,
    clear_cache: Annotated[bool, typer.Option("--clear-cache", help="Also empty the persistent XLA compilation cache.")] = False,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Cache to clear (default: $XLA_PERSISTENT_CACHE_PATH, else ~/.cache/xla_cache).")] = None,
    all_workers: Annotated[bool, typer.Option("--all-workers", help="Print the command that clears every worker of a pod (with --run: run it).")] = False,
    run: Annotated[bool, typer.Option("--run", help="With --all-workers: run the gcloud command instead of printing it.")] = False,
    tpu: Annotated[str | None, typer.Option("--tpu", envvar="TPU_NAME", help="Pod name for --all-workers (default: $TPU_NAME).")] = None,
    zone: Annotated[str | None, typer.Option("--zone", envvar="ZONE", help="Zone for --all-workers (default: $ZONE).")] = None,
    project: Annotated[str | None, typer.Option("--project", help="GCP project for --all-workers.")] = None,
) -> None:
    """List (and with --force end) the processes holding TPU devices or the libtpu lock; remove a stale lock."""
    from scale_rae_core.errors import BackendError
    from scale_rae_core.ops.tpu_clear import (
        all_workers_command,
        clear_tpu,
        render_report,
        run_all_workers,
    )

    if run and not all_workers:
        raise BackendError("--run only goes with --all-workers; drop --run to clear this VM")
    if all_workers:
        flags = (["--force"] if force else []) + (["--clear-cache"] if clear_cache else [])
        if cache_dir is not None:
            flags += ["--cache-dir", str(cache_dir)]
        if run:
            run_all_workers(tpu or "", zone or "", project, flags)
        else:
            typer.echo(all_workers_command(tpu or "", zone or "", project, flags))
        return
    report = clear_tpu(force=force, clear_cache=clear_cache, cache_dir=cache_dir)
    for line in render_report(report):
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)
