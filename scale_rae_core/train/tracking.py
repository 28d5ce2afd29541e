"""Experiment trackers: every record of ``RUN/metrics.jsonl`` mirrored to TensorBoard or Weights & Biases.

``output.tracker`` chooses one (``none`` by default); the training loop (:class:`~scale_rae_core.train.loop.MetricsLog`,
main process only) hands each record to the tracker right after writing it to ``metrics.jsonl``, so every trainer
logs the same numbers to both. Only numbers are mirrored (bools as 0/1); ``step`` is the x-axis. The run's
resolved profile is the run's config (W&B ``config``; TensorBoard: a ``profile`` text entry).

* ``tensorboard`` (extra ``srae[tensorboard]``): event files in ``RUN/tensorboard/``, written with
  ``torch.utils.tensorboard.SummaryWriter`` (which needs the ``tensorboard`` package). A resumed run opens its
  writer with ``purge_step`` = the checkpoint's step + 1, so TensorBoard drops what a killed run logged after its
  last checkpoint, as ``metrics.jsonl`` does.
* ``wandb`` (extra ``srae[wandb]``): one W&B run per training run, its id kept in ``RUN/wandb_run.json`` and
  reopened with ``resume="allow"``, files under ``RUN/wandb/``. W&B reads its own settings from the environment
  (``WANDB_PROJECT`` — default ``srae`` —, ``WANDB_ENTITY``, ``WANDB_MODE=offline`` to log without a network;
  ``wandb sync RUN/wandb/offline-run-*`` uploads later). W&B keeps the first value it got for a step: after a resume
  the steps a killed run had logged past its checkpoint keep their old values there (metrics.jsonl and
  TensorBoard hold the new ones).

A tracker that is not installed is refused when the loop starts, in one line naming the extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from scale_rae_core.errors import ConfigError
from scale_rae_core.files import atomic_write

TRACKERS = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_FILE = "wandb_run.json"
_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it imports (= its extra)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module entry set to None
        return False


def check_tracker(kind: str, source: str) -> None:
    """Refuse a tracker whose package is not installed (one line naming the extra); cheap, no import."""
    module = _NEEDS.get(kind)
    if module is not None and not _installed(module):
        raise ConfigError(
            f"{source}: output.tracker = '{kind}' needs the {module} package, which is not installed; "
            f"pip install 'srae[{kind}]' or set output.tracker = 'none' (--set output.tracker=none)"
        )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics record (``step`` excluded): what a tracker mirrors."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}


class Tracker(ABC):
    """Mirrors metrics records; opens lazily on the first record, and again after :meth:`close`."""

    def __init__(self, run_dir: Path, config: dict[str, Any], name: str, resume_step: int) -> None:
        self.run_dir, self.config, self.name = run_dir, config, name
        self.resume_step: int | None = resume_step  # the first open continues a run from here; later opens append
        self._open = False

    def log(self, record: dict[str, Any]) -> None:
        if not self._open:
            self._start(self.resume_step)
            self._open, self.resume_step = True, None
        self._log(int(record["step"]), scalars(record))

    def close(self) -> None:
        if self._open:
            self._finish()
            self._open = False

    @abstractmethod
    def _start(self, resume_step: int | None) -> None: ...

    @abstractmethod
    def _log(self, step: int, values: dict[str, float]) -> None: ...

    @abstractmethod
    def _finish(self) -> None: ...


class TensorBoardTracker(Tracker):
    def _start(self, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.run_dir / TENSORBOARD_DIR
        continuing = resume_step is not None and folder.is_dir() and any(folder.iterdir())
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if continuing else None)
        text = json.dumps(self.config, indent=1)
        self.writer.add_text("profile", "```\n" + text + "\n```", global_step=resume_step or 0)

    def _log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def _finish(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def run_id(self) -> str:
        """This run's W&B id: read from RUN/wandb_run.json, made (and stored) by the first run."""
        path = self.run_dir / WANDB_RUN_FILE
        if path.is_file():
            try:
                return str(json.loads(path.read_text())["id"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}: not {{\"id\": ...}}; delete it to start a new W&B run") from None
        run_id = secrets.token_hex(4)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"id": run_id}) + "\n"))
        return run_id

    def _start(self, resume_step: int | None) -> None:
        import wandb

        project = None if os.environ.get("WANDB_PROJECT") else "srae"
        try:
            self.run = wandb.init(id=self.run_id(), resume="allow", dir=str(self.run_dir), config=self.config,
                                  name=self.run_dir.name, group=self.name, project=project,
                                  settings=wandb.Settings(console="off"))
        except Exception as exc:  # no login, no network, a bad setting: one line, not W&B's traceback
            first = " ".join(str(exc).split())[:200]
            raise ConfigError(
                f"output.tracker = 'wandb': wandb.init failed ({type(exc).__name__}: {first}); run `wandb login`, "
                "or set WANDB_MODE=offline to log without a network, or --set output.tracker=none"
            ) from None

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def _finish(self) -> None:
        self.run.finish()


def open_tracker(kind: str, run_dir: Path, config: dict[str, Any], name: str, resume_step: int) -> Tracker | None:
    """The tracker ``output.tracker`` names for RUN (None for ``none``); it opens on its first record.

    ``config``: the resolved profile; ``name``: the trainer (W&B group); ``resume_step``: the step this invocation
    continues from (0 for a fresh run)."""
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config, name, resume_step)
    if kind == "wandb":
        return WandbTracker(run_dir, config, name, resume_step)
    assert kind == "none", kind  # the profile's Literal admits only TRACKERS
    return None
