"""The one training loop every trainer runs: the RAE decoder, unified stage 1 / stage 2, the class-conditional DiT.

A trainer is a :class:`TrainTask`. It builds its networks, optimiser, scheduler and data, and supplies:

* ``plan`` (the :class:`~scale_rae_core.config.BatchPlan` of its profile section) and ``total_steps`` (the
  schedule's length in optimiser steps);
* :meth:`TrainTask.state`: the module, optimizer and scheduler a checkpoint holds;
* :meth:`TrainTask.train_step`: ONE optimiser step, gradient accumulation included (``plan.accum_steps``
  micro-steps of ``plan.per_process_micro_batch`` samples on each process), returning its metrics;
* :meth:`TrainTask.data_position` / :meth:`TrainTask.restore`: the data position a checkpoint stores, and
  putting it back after the loop has restored the weights;
* :meth:`TrainTask.export`: the final model folder (today's export functions, unchanged);
* optionally :meth:`TrainTask.evaluate` (held-out metrics on logged steps), ``progress_keys``,
  ``throughput_key``, :meth:`TrainTask.start_fields` and :meth:`TrainTask.summary` (extra fields of the
  start / done events).

:class:`TrainLoop` owns the rest, the same for every trainer:

* **one writer.** The main process holds RUN's lock (:mod:`scale_rae_core.runlock`) from the loop's construction,
  before anything is written into RUN, to the end of :meth:`TrainLoop.run` (or of a ``with TrainLoop(...)`` block):
  a second training pointed at the same ``--out`` is refused in one line naming the holder, on every process.
* **resume.** ``--resume`` means: continue from the newest complete checkpoint under ``RUN/checkpoints``, or,
  when there is none, start fresh and report a ``<name>.fresh_start`` event. A preemptible job's launch line
  can therefore always carry ``--resume``. A run folder that already holds a checkpoint is refused without
  ``--resume`` (one line), never overwritten. What an interrupted save left behind is removed first. The
  checkpoint's profile is compared with this invocation's on the keys that change the trajectory (``trajectory``:
  by default the model, the trained section — batch sizes, learning rates, the step schedule —, ``run.seed``,
  ``backend.precision`` and the data order settings) and the ``inputs`` the trainer names (the data path): a
  difference is refused in one line listing every changed key, unless ``accept_changes``
  (:mod:`scale_rae_core.fingerprint`). The process count, checkpoint cadence and logging may change.
* **divergence.** A step whose ``loss`` or ``grad_norm`` is NaN or infinite stops the run with one line naming
  the step (:class:`TrainingDiverged`); nothing is logged, saved or exported after it, so the newest checkpoint
  is the last good one. Weights are checked finite (on every process) before each save and before the export.
* **the step counter and cadence.** A metrics record every ``output.log_every`` steps and at the last step
  of the call (the step's metrics and the throughput ``<throughput_key>``: ``plan.samples_per_step`` × steps /
  seconds since the previous record), with the task's held-out metrics every ``output.eval_every`` steps (0: in
  every record; a step due for evaluation also writes a record) and at the last step; a checkpoint whenever
  :meth:`CheckpointManager.due` says so (every ``checkpoint.every_steps`` and at the last step). ``stop_at``
  simulates a preemption: the run saves at that step, then stops; the schedule still spans ``total_steps``.
* **files.** ``RUN/metrics.jsonl`` has one writer (rank 0; a resumed run first drops the records after its
  checkpoint's step), and ``output.tracker`` mirrors each record to TensorBoard or W&B
  (:mod:`scale_rae_core.train.tracking`, rank 0 too); ``RUN/profile.json`` (the resolved profile) is written once per invocation,
  atomically, by rank 0; events and progress go through :class:`~scale_rae_core.events.Reporter` on the one
  process the backend names main (``backend.is_main``); the others report nothing.
* **export** at the end, when the run reached ``total_steps`` and ``checkpoint.export`` is set.

Usage, inside a backend (collective: every process runs it)::

    with TrainLoop("train_dit", profile, run_dir, backend, resume=resume, reporter=reporter,
                   inputs={"data": data}, accept_changes=accept_changes) as loop:
        task = MyTask(profile, ..., fresh=not loop.resuming)   # e.g. no fresh-model initialisation on resume
        result = loop.run(task, stop_at=stop_at)               # TrainResult: step, records, export_dir, ...

Validate what the task will read (the data) before constructing the loop, and write into RUN only after.

A task builds its model and optimiser before ``run`` (which restores the checkpoint into them), seeds its
per-rank randomness itself (``backend.seed_everything``), and starts reading data lazily in its first
``train_step``, so a restored data position is the one it reads from.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from scale_rae_core import fingerprint
from scale_rae_core.backends.base import Backend
from scale_rae_core.config import BatchPlan, Profile
from scale_rae_core.errors import CheckpointError, SraeError
from scale_rae_core.events import Reporter
from scale_rae_core.files import atomic_write, finite_json, output_folder
from scale_rae_core.runlock import hold_on_main
from scale_rae_core.train.checkpoint import CheckpointManager
from scale_rae_core.train.tracking import Tracker, check_tracker, open_tracker

METRICS_FILE = "metrics.jsonl"
PROFILE_FILE = "profile.json"
# Profile keys (dotted prefixes) that change a run's trajectory, compared on resume besides the trained section.
TRAJECTORY = ("run.seed", "backend.precision", "model", "data.image_folder", "data.shuffle_buffer")
WATCHED = ("loss", "grad_norm")  # metrics whose non-finite value stops a run


class TrainingDiverged(SraeError):
    """The loss, the gradient norm or the weights went NaN or infinite."""


@dataclass
class TrainState:
    """What a checkpoint holds for a trainer (besides RNG and data positions, which the loop adds)."""

    module: nn.Module  # every trained (and EMA) weight, in one module
    optimizer: Optimizer
    scheduler: LRScheduler


class TrainTask(ABC):
    """A trainer, as the loop sees it. Subclasses set ``plan`` and ``total_steps`` in their constructor."""

    plan: BatchPlan  # the profile section's batch plan (the loop reports it and times throughput with it)
    backend: Backend
    stream: Any  # the resumable data stream (state_dict / load_state_dict) the default data position uses
    total_steps: int  # optimiser steps of the whole run (the schedule's length)
    progress_keys: tuple[str, ...] = ("loss",)  # metrics shown next to the progress bar
    throughput_key = "samples_per_s"  # the loop's logged throughput (global batch × steps / seconds since the last log)

    @abstractmethod
    def state(self) -> TrainState:
        """The module, optimizer and scheduler to checkpoint and restore."""

    @abstractmethod
    def train_step(self, done: int) -> dict[str, Any]:
        """Run one optimiser step (``done`` steps are complete before it), gradient accumulation and the
        backend's ``mark_step`` included; return its metrics as JSON numbers (the same on every process)."""

    def data_position(self) -> Any:
        """This process's data position after the last step (any JSON value), saved with each checkpoint. By
        default the state of ``self.stream``, the task's one resumable data stream."""
        return self.stream.state_dict()

    def restore(self, info: dict[str, Any]) -> dict[str, Any]:
        """Put the data position back from :meth:`CheckpointManager.load`'s ``info`` (weights, optimiser,
        scheduler and RNG are restored already); return extra fields for the resume event. By default
        ``self.stream`` continues where it stopped, which needs the saving run's process count."""
        if info["data_position"] is None:
            raise CheckpointError(
                f"{info['path']}: saved by {info['world_size']} processes, this run has {self.backend.num_processes}; "
                "resume with the same process count"
            )
        self.stream.load_state_dict(info["data_position"])
        return {}

    @abstractmethod
    def export(self) -> Path:
        """*Collective.* Write the final model; return its folder."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, added to the logged records (and written as step 0 of a fresh run); none by default."""
        return {}

    def start_fields(self) -> dict[str, Any]:
        """Extra fields of the start event (e.g. phase boundaries)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Extra fields of the done event and of :attr:`TrainResult.summary` (e.g. skip counts)."""
        return {}


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimiser steps completed
    start_step: int  # where this invocation started (> 0 after a resume)
    records: list[dict[str, Any]] = field(default_factory=list)  # every step run here: {"step", **metrics}
    export_dir: Path | None = None
    resumed_from: Path | None = None  # the checkpoint this invocation continued, if any
    summary: dict[str, Any] = field(default_factory=dict)  # the trainer's end-of-run fields
    is_main: bool = True  # this process reports (backend.is_main): print summaries only where True

    @property
    def losses(self) -> list[float]:
        """The total loss of every step run here (averaged over processes)."""
        return [r["loss"] for r in self.records]


class MetricsLog:
    """RUN/metrics.jsonl, appended by rank 0; on resume, records after the resumed step are dropped first.
    Each record also goes to the ``tracker`` (``output.tracker``: TensorBoard or W&B), if any."""

    def __init__(self, path: Path, enabled: bool, resume_step: int, tracker: Tracker | None = None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        if enabled and path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            line = finite_json(record, str(self.path))
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
            if self.tracker is not None:
                self.tracker.log(record)

    def close(self) -> None:
        """Close the tracker (a later record opens it again)."""
        if self.tracker is not None:
            self.tracker.close()


class TrainLoop:
    """Resume, step, log, save, stop and export one run of one :class:`TrainTask` (see the module docstring).

    ``name`` prefixes the events (``<name>.start``, ``.step``, ``.checkpoint``, ``.resume``, ``.fresh_start``,
    ``.changes_accepted``, ``.done``) and labels the progress bar. Constructing it is *collective*: it takes RUN's
    lock, finds (and cleans) the run's checkpoints, compares the newest one's settings with this invocation's and
    decides whether this invocation resumes (:attr:`resuming`).

    ``inputs``: what the task reads besides the profile, recorded in each checkpoint and compared on resume (paths
    are made absolute). ``trajectory``: the profile keys compared on resume (dotted prefixes); by default
    :data:`TRAJECTORY` plus the profile section called ``name``, if there is one. ``accept_changes``: resume
    although they differ (the differences are reported as ``<name>.changes_accepted``).
    """

    def __init__(self, name: str, profile: Profile, run_dir: str | Path, backend: Backend, *, resume: bool,
                 reporter: Reporter | None = None, inputs: Mapping[str, Any] | None = None,
                 trajectory: Sequence[str] | None = None, accept_changes: bool = False) -> None:
        self.name, self.profile, self.backend = name, profile, backend
        self.run_dir = Path(run_dir).expanduser()
        check_tracker(profile.output.tracker, profile.source)  # on every process, before anything is written
        self.reporter = reporter if (reporter is not None and backend.is_main) else Reporter()
        self.inputs = {k: str(Path(v).expanduser().resolve()) if isinstance(v, Path) else v
                       for k, v in (inputs or {}).items()}
        sections = profile.to_toml_dict()
        self.trajectory = tuple(trajectory) if trajectory is not None else TRAJECTORY + ((name,) if name in sections else ())
        if backend.is_main:
            output_folder(self.run_dir)
        self._lock = hold_on_main(self.run_dir, backend, flag="--out")  # before anything is written into RUN
        try:
            self.manager = CheckpointManager(self.run_dir, profile.checkpoint.keep, backend,
                                             every_steps=profile.checkpoint.every_steps)
            self.checkpoint = self.manager.latest()  # removes what interrupted saves left behind
            if self.checkpoint is not None and not resume:
                raise CheckpointError(
                    f"{self.run_dir} already holds a run (checkpoint {self.checkpoint.name}); pass --resume to continue "
                    "it or choose a new --out"
                )
            if self.checkpoint is not None:
                self._compare(self.checkpoint, accept_changes)
        except BaseException:
            self.close()
            raise
        if resume and self.checkpoint is None:
            self.reporter.event(f"{name}.fresh_start", reason=f"--resume: no complete checkpoint under {self.manager.dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.step = 0  # optimiser steps completed
        self._metrics: MetricsLog | None = None  # opened by the first run()

    def _compare(self, checkpoint: Path, accept: bool) -> None:
        """Refuse (or with ``accept`` report) a resume whose trajectory settings or inputs differ from the checkpoint's."""
        record = self.manager.read_record(checkpoint)
        if record["profile"] is None:
            return  # written before checkpoints carried their profile
        recorded = fingerprint.pick(fingerprint.flatten(record["profile"]), self.trajectory)
        recorded |= fingerprint.flatten(record["inputs"], "inputs")
        current = fingerprint.pick(fingerprint.flatten(self.profile.to_toml_dict()), self.trajectory)
        current |= fingerprint.flatten(self.inputs, "inputs")
        diffs = fingerprint.check_unchanged(
            recorded, current, made=f"{self.run_dir}: checkpoint {checkpoint.name} was made", accept=accept,
            fix="resume with the same settings (--set / profile / --data), choose a new --out",
        )
        if diffs:
            self.reporter.event(f"{self.name}.changes_accepted", checkpoint=str(checkpoint),
                                changes={k: [a, b] for k, a, b in diffs})

    @property
    def resuming(self) -> bool:
        """True when this invocation continues a checkpoint (the task should not initialise fresh weights)."""
        return self.checkpoint is not None

    def close(self) -> None:
        """Release RUN's lock (:meth:`run` does at its end; a later :meth:`run` takes it again)."""
        self._lock.release()

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ running
    def run(self, task: TrainTask, *, stop_at: int | None = None) -> TrainResult:
        """*Collective.* Train until ``task.total_steps`` (or ``stop_at``: save there, then stop), then export.

        May be called again on the same task to continue in-process (benchmarks do); the first call restores
        the checkpoint and opens the run's files.
        """
        assert task.plan.num_processes == self.backend.num_processes, "the backend checks the process layout"
        self._lock.acquire()  # held since construction; taken again by a later call
        try:
            return self._run(task, stop_at)
        finally:
            if self._metrics is not None:
                self._metrics.close()
            self.close()

    def _run(self, task: TrainTask, stop_at: int | None) -> TrainResult:
        metrics = self._metrics or self._begin(task)
        start = self.step
        end = task.total_steps if stop_at is None else min(stop_at, task.total_steps)
        result = TrainResult(self.run_dir, start, start, resumed_from=self.checkpoint, is_main=self.backend.is_main)
        window = _Throughput(task.plan.samples_per_step)
        with self.reporter.task(self.name, task.total_steps) as advance:
            if start:
                advance(start, total=task.total_steps)
            while self.step < end:
                record = {"step": self.step + 1, **task.train_step(self.step)}
                self._check_finite_metrics(record)
                self.step += 1
                result.records.append(record)
                window.add()
                evaluate = self._due(self.profile.output.eval_every or self.profile.output.log_every, end)
                if evaluate or self._due(self.profile.output.log_every, end):
                    if evaluate:
                        record.update(task.evaluate())
                    logged = {**record, task.throughput_key: window.rate()}
                    metrics.write(logged)
                    self.reporter.event(f"{self.name}.step", **logged)
                advance(1, **{k: record[k] for k in task.progress_keys if k in record})
                if self.manager.due(self.step, end):
                    self._save(task, record)
        result.step = self.step
        result.summary = task.summary()
        if self.step >= task.total_steps and self.profile.checkpoint.export:
            self._check_finite_weights(task, "exporting")
            result.export_dir = task.export()
        self.reporter.event(f"{self.name}.done", step=self.step,
                            export=str(result.export_dir) if result.export_dir else None, **result.summary)
        return result

    # ------------------------------------------------------------------------------------------ divergence
    def _newest(self) -> str:
        found = self.manager.complete()
        return f"the newest checkpoint is {found[-1][1].name}" if found else "no checkpoint was saved"

    def _check_finite_metrics(self, record: dict[str, Any]) -> None:
        """Stop at a step whose loss or gradient norm is not finite (the values are the same on every process)."""
        bad = {k: record[k] for k in WATCHED if isinstance(record.get(k), float) and not math.isfinite(record[k])}
        if bad:
            what = ", ".join(f"{k} {v}" for k, v in bad.items())
            raise TrainingDiverged(
                f"{self.name} diverged at step {record['step']} ({what}); stopped without saving or exporting it, "
                f"{self._newest()} in {self.run_dir}; lower the learning rate (e.g. --set {self._section()}.lr=...) "
                "and resume from there with --resume --accept-changes"
            )

    def _section(self) -> str:
        return next((p for p in self.trajectory if "." not in p and p != "model"), self.name)

    def _check_finite_weights(self, task: TrainTask, doing: str) -> None:
        """*Collective.* Refuse to save or export weights holding NaN or inf (every process agrees)."""
        module = task.state().module
        ok = torch.ones((), device=self.backend.device)
        with torch.no_grad():
            for t in itertools.chain(module.parameters(), module.buffers()):
                local = t.to_local() if hasattr(t, "to_local") else t
                if local.is_floating_point() and local.numel():
                    ok = ok * torch.isfinite(local).all().to(ok.device, ok.dtype)
        if self.backend.distributed:
            ok = self.backend.all_reduce_mean(ok)
        if float(ok) < 1.0:
            raise TrainingDiverged(
                f"{self.name}: the weights hold NaN or inf after step {self.step}; not {doing} them, "
                f"{self._newest()} in {self.run_dir}; lower the learning rate and resume from there with --resume "
                "--accept-changes"
            )

    def _begin(self, task: TrainTask) -> MetricsLog:
        """Restore the checkpoint (if resuming), write RUN/profile.json, open the metrics log, evaluate step 0."""
        if self.checkpoint is not None:
            st = task.state()
            info = self.manager.load(self.checkpoint, st.module, st.optimizer, st.scheduler)
            fields = task.restore(info)
            self.step = int(info["step"])
            self.reporter.event(f"{self.name}.resume", step=self.step, checkpoint=str(self.checkpoint), **fields)
        if self.backend.is_main:
            text = json.dumps(self.profile.to_toml_dict(), indent=1)
            atomic_write(self.run_dir / PROFILE_FILE, lambda tmp: Path(tmp).write_text(text))
        tracker = (open_tracker(self.profile.output.tracker, self.run_dir, self.profile.to_toml_dict(), self.name, self.step)
                   if self.backend.is_main else None)
        self._metrics = MetricsLog(self.run_dir / METRICS_FILE, self.backend.is_main, self.step, tracker)
        self.reporter.event(f"{self.name}.start", step=self.step, steps=task.total_steps, run_dir=str(self.run_dir),
                            **task.plan.as_dict(), **task.start_fields())
        if self.step == 0:
            initial = task.evaluate()
            if initial:
                self._metrics.write({"step": 0, **initial})
        return self._metrics

    def _due(self, every: int, end: int) -> bool:
        return self.step % every == 0 or self.step == end

    def _save(self, task: TrainTask, record: dict[str, Any]) -> None:
        self._check_finite_weights(task, "saving")
        st = task.state()
        path = self.manager.save(self.step, st.module, st.optimizer, st.scheduler, data_position=task.data_position(),
                                 metrics=record, profile=self.profile, inputs=self.inputs)
        self.reporter.event(f"{self.name}.checkpoint", step=self.step, path=str(path))


class _Throughput:
    """Samples per second since the last logged record (the plan's samples per optimiser step, all processes)."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.t0, self.steps = time.perf_counter(), 0

    def add(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.steps * self.samples_per_step / max(now - self.t0, 1e-9)
        self.t0, self.steps = now, 0
        return rate
