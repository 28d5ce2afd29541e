"""Progress and events: one object the engine reports to, for people (a rich progress bar with rate and
ETA) and for machines (a JSON-lines file, one event per line with a timestamp).

Engine functions take ``reporter: Reporter | None``; ``None`` means silent. The CLI builds one per command
(``--quiet`` turns the bar off, the JSON-lines log stays).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Reporter:
    def __init__(self, events_path: str | Path | None = None, show_progress: bool = False):
        self.events_path = Path(events_path) if events_path else None
        self.show_progress = show_progress
        self._file = None

    # -- machines --------------------------------------------------------------------------------
    def event(self, name: str, **fields: Any) -> None:
        """Append one JSON line ``{"time": ..., "event": name, ...fields}``."""
        if self.events_path is None:
            return
        if self._file is None:
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.events_path.open("a", encoding="utf-8")
        self._file.write(json.dumps({"time": round(time.time(), 3), "event": name, **fields}, default=str) + "\n")
        self._file.flush()

    # -- people ----------------------------------------------------------------------------------
    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """A progress bar; yields ``advance(n=1, total=None, **postfix)`` (``total`` updates the bar's length)."""
        if not self.show_progress:
            yield lambda n=1, total=None, **_: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[postfix]}"),
        ]
        start = time.perf_counter()
        bar: Progress | None = None  # drawn at the first advance, so an early error prints alone
        tid = None
        done = 0

        def advance(n: int = 1, total: int | None = None, **postfix: Any) -> None:
            nonlocal bar, tid, done
            if bar is None:
                bar = Progress(*columns, transient=False)
                bar.start()
                tid = bar.add_task(description, total=total, rate="", postfix="")
            done += n
            rate = done / max(time.perf_counter() - start, 1e-9)
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
            bar.update(tid, advance=n, rate=f"{rate:.1f}/s", postfix=text, **({"total": total} if total else {}))

        try:
            yield advance
        finally:
            if bar is not None:
                bar.stop()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
