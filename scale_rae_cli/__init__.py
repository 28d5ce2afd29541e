"""The `srae` command line: thin Typer commands over scale_rae_core."""
