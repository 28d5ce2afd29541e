"""A demo run's files on disk: stage records (written atomically), JSON lines, checkpoints, and removal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def read_record(path: Path) -> dict[str, Any] | None:
    """A stage record, or None when it is missing or unreadable (the stage then starts over)."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (temp + rename): a killed run leaves the old record or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; none when it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a trainer's run folder holds a complete checkpoint to continue from."""
    return any((run_dir / "checkpoints").glob("step-*/meta.json"))


def remove(path: Path) -> None:
    """Delete a file or a folder, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
