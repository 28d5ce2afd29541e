"""The training loop on its own, with a tiny task (a linear model on index-derived data): resume meaning,
stop_at, cadence, metrics.jsonl truncation, RUN/profile.json, events and the export hook."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from scale_rae_core.backends.cpu_cuda import CpuCudaBackend
from scale_rae_core.config import BackendSettings, load_profile
from scale_rae_core.errors import CheckpointError, ConfigError
from scale_rae_core.events import Reporter
from scale_rae_core.train.loop import TRAJECTORY, TrainLoop, TrainState, TrainTask

SETS = ["stage1.steps=5", "stage1.global_batch_size=4", "stage1.micro_batch_size=2", "checkpoint.every_steps=2",
        "checkpoint.keep=3", "output.log_every=2"]


class LinearTask(TrainTask):
    """y = x·w on samples x_i = (i, 1) / 10: the data position is the next sample index."""

    def __init__(self, profile, run_dir: Path) -> None:
        torch.manual_seed(0)
        self.plan = profile.batch_plan("stage1")
        self.total_steps = profile.stage1.steps
        self.run_dir = run_dir
        self.model = nn.Linear(2, 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (s + 1))
        self.position = 0
        self.exports = 0

    def state(self) -> TrainState:
        return TrainState(self.model, self.opt, self.sched)

    def train_step(self, done: int) -> dict[str, Any]:
        total = 0.0
        for _ in range(self.plan.accum_steps):
            i = torch.arange(self.position, self.position + self.plan.per_process_micro_batch, dtype=torch.float32)
            self.position += len(i)
            x = torch.stack([i / 10, torch.ones_like(i)], 1)  # (B, 2)
            loss = (self.model(x).squeeze(1) - 3 * i / 10).pow(2).mean() + 0.01 * torch.randn(())  # RNG used
            (loss / self.plan.accum_steps).backward()
            total += float(loss.detach()) / self.plan.accum_steps
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": total, "lr": lr, "position": self.position}

    def data_position(self) -> dict[str, int]:
        return {"position": self.position}

    def restore(self, info: dict[str, Any]) -> dict[str, Any]:
        self.position = info["data_position"]["position"]
        return {"position": self.position}

    def export(self) -> Path:
        self.exports += 1
        out = self.run_dir / "export"
        out.mkdir(exist_ok=True)
        return out


def run(run_dir: Path, *, resume: bool = False, stop_at: int | None = None, events: Path | None = None, sets=()):
    profile = load_profile("tiny-cpu", [*SETS, *sets])
    with CpuCudaBackend(BackendSettings()) as backend, Reporter(events) as rep:
        loop = TrainLoop("toy", profile, run_dir, backend, resume=resume, reporter=rep, trajectory=(*TRAJECTORY, "stage1"))
        backend.seed_everything(0)
        task = LinearTask(profile, loop.run_dir)
        return loop.run(task, stop_at=stop_at), task


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_and_resume_repeat_the_uninterrupted_run(tmp_path):
    full, task = run(tmp_path / "full")
    assert [r["step"] for r in full.records] == [1, 2, 3, 4, 5] and task.exports == 1
    assert [r["position"] for r in full.records] == [4, 8, 12, 16, 20]  # 4 samples per step: the global batch
    assert full.export_dir == tmp_path / "full" / "export"
    assert metrics_steps(tmp_path / "full") == [2, 4, 5]  # every log_every steps, and the last
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004", "step-00000005"]  # every_steps, and the last

    cut, cut_task = run(tmp_path / "cut", stop_at=3)
    assert (cut.step, cut.export_dir, cut_task.exports) == (3, None, 0)  # preempted: saved, not exported
    assert (tmp_path / "cut" / "checkpoints" / "step-00000003").is_dir()
    rest, _ = run(tmp_path / "cut", resume=True)
    assert (rest.start_step, rest.resumed_from.name) == (3, "step-00000003")
    assert cut.records + rest.records == full.records  # every loss, lr and data position, exactly
    assert rest.export_dir is not None


class EvaluatedTask(LinearTask):
    """LinearTask with held-out metrics: ``held`` is the step it was evaluated after."""

    def __init__(self, profile, run_dir: Path) -> None:
        super().__init__(profile, run_dir)
        self.done = 0

    def train_step(self, done: int) -> dict[str, Any]:
        self.done = done + 1
        return super().train_step(done)

    def evaluate(self) -> dict[str, float]:
        return {"held": self.done}


@pytest.mark.parametrize(("eval_every", "records", "evaluated"), [
    (3, [0, 2, 3, 4, 5], [0, 3, 5]),  # its own cadence (a record of its own at 3), the first and the last step
    (0, [0, 2, 4, 5], [0, 2, 4, 5]),  # 0: in every record
])
def test_held_out_metrics_every_eval_every_steps(tmp_path, eval_every, records, evaluated):
    profile = load_profile("tiny-cpu", [*SETS, f"output.eval_every={eval_every}"])
    with CpuCudaBackend(BackendSettings()) as backend, Reporter(None) as rep:
        loop = TrainLoop("toy", profile, tmp_path / "r", backend, resume=False, reporter=rep, trajectory=(*TRAJECTORY, "stage1"))
        backend.seed_everything(0)
        loop.run(EvaluatedTask(profile, loop.run_dir))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == records
    assert [r["held"] for r in rows if "held" in r] == evaluated
    assert all(r["held"] == r["step"] for r in rows if "held" in r)  # evaluated after that step's update


def test_metrics_after_the_resumed_checkpoint_are_dropped(tmp_path):
    """A run killed after logging step 3 but before its step-3 checkpoint completed resumes from step 2:
    metrics.jsonl keeps steps 1-2 and the resumed run writes 3-5 again, once."""
    run(tmp_path / "r", stop_at=3, sets=["output.log_every=1"])
    assert metrics_steps(tmp_path / "r") == [1, 2, 3]
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-00000003")
    rest, _ = run(tmp_path / "r", resume=True, sets=["output.log_every=1"])
    assert rest.start_step == 2
    assert metrics_steps(tmp_path / "r") == [1, 2, 3, 4, 5]


def test_resume_meaning_is_continue_or_start_fresh(tmp_path):
    events = tmp_path / "events.jsonl"
    fresh, _ = run(tmp_path / "r", resume=True, stop_at=2, events=events)
    assert (fresh.start_step, fresh.step, fresh.resumed_from) == (0, 2, None)
    names = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert names == ["toy.fresh_start", "toy.start", "toy.step", "toy.checkpoint", "toy.done"]
    start = json.loads(events.read_text().splitlines()[1])
    assert (start["accum_steps"], start["per_process_micro_batch"], start["global_batch_size"]) == (2, 2, 4)
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoint step-00000002\); pass --resume"):
        run(tmp_path / "r")
    again, _ = run(tmp_path / "r", resume=True)
    assert again.start_step == 2 and again.step == 5


def test_profile_json_is_the_resolved_profile(tmp_path):
    run(tmp_path / "r", stop_at=1)
    saved = json.loads((tmp_path / "r" / "profile.json").read_text())
    assert saved == load_profile("tiny-cpu", SETS).to_toml_dict()
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]  # written atomically


def test_run_can_continue_in_process(tmp_path):
    """Benchmarks call run() again on the same task to evaluate between chunks: no reload, no repeat."""
    profile = load_profile("tiny-cpu", SETS)
    with CpuCudaBackend(BackendSettings()) as backend:
        loop = TrainLoop("toy", profile, tmp_path / "r", backend, resume=False)
        backend.seed_everything(0)
        task = LinearTask(profile, loop.run_dir)
        first = loop.run(task, stop_at=2)
        second = loop.run(task, stop_at=5)
    full, _ = run(tmp_path / "full")
    assert (first.step, second.start_step, second.step) == (2, 2, 5)
    assert first.records + second.records == full.records


# ------------------------------------------------------------------------------------------ one writer, resume checks


def test_a_second_loop_on_a_run_in_use_is_refused_and_the_first_run_is_untouched(tmp_path):
    from scale_rae_core.runlock import FolderInUseError

    profile = load_profile("tiny-cpu", SETS)
    with CpuCudaBackend(BackendSettings()) as backend:
        first = TrainLoop("toy", profile, tmp_path / "r", backend, resume=False)
        with pytest.raises(FolderInUseError) as err:  # the lock is taken before anything is written into RUN
            TrainLoop("toy", profile, tmp_path / "r", backend, resume=True)
        assert "\n" not in str(err.value) and "is in use by" in str(err.value) and "--out" in str(err.value)
        backend.seed_everything(0)
        result = first.run(LinearTask(profile, first.run_dir))  # released at the end of run()
    full, _ = run(tmp_path / "full")
    assert result.records == full.records and metrics_steps(tmp_path / "r") == [2, 4, 5]
    again, _ = run(tmp_path / "r", resume=True)  # free again: continues from the newest checkpoint
    assert (again.start_step, again.step) == (5, 5)


def test_resume_refuses_other_trajectory_settings_and_data_unless_accepted(tmp_path):
    events = tmp_path / "events.jsonl"
    run(tmp_path / "r", stop_at=2)
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "r", resume=True, sets=["stage1.lr=0.5", "stage1.global_batch_size=8", "run.seed=3"])
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint step-00000002 was made with other settings" in msg
    assert "run.seed 0 -> 3, stage1.global_batch_size 4 -> 8, stage1.lr 0.001 -> 0.5;" in msg
    assert "--accept-changes" in msg
    # the process layout, the checkpoint cadence and logging may change
    rest, _ = run(tmp_path / "r", resume=True, stop_at=3, sets=["checkpoint.every_steps=1", "output.log_every=1"])
    assert rest.start_step == 2
    profile = load_profile("tiny-cpu", SETS)
    with CpuCudaBackend(BackendSettings()) as backend:
        with TrainLoop("toy", profile, tmp_path / "d", backend, resume=False, inputs={"data": tmp_path / "a"}) as loop:
            loop.run(_Fixed(profile, loop.run_dir))
        with pytest.raises(ConfigError, match=r"inputs\.data .*/a -> .*/b"):
            TrainLoop("toy", profile, tmp_path / "d", backend, resume=True, inputs={"data": tmp_path / "b"})
        with Reporter(events) as rep, TrainLoop("toy", profile, tmp_path / "d", backend, resume=True, reporter=rep,
                                                inputs={"data": tmp_path / "b"}, accept_changes=True) as loop:
            assert loop.resuming
    accepted = [json.loads(line) for line in events.read_text().splitlines()]
    assert accepted[0]["event"] == "toy.changes_accepted"
    assert accepted[0]["changes"] == {"inputs.data": [str(tmp_path / "a"), str(tmp_path / "b")]}


class _Fixed(LinearTask):
    """LinearTask with two steps, for a run that only needs a checkpoint."""

    def __init__(self, profile, run_dir: Path) -> None:
        super().__init__(profile, run_dir)
        self.total_steps = 2


class _Diverging(LinearTask):
    """The loss goes NaN at step ``bad`` (``weights``: the weights go inf there instead, the loss stays finite)."""

    def __init__(self, profile, run_dir: Path, bad: int, weights: bool = False) -> None:
        super().__init__(profile, run_dir)
        self.bad, self.weights = bad, weights

    def train_step(self, done: int) -> dict[str, Any]:
        metrics = super().train_step(done)
        if done + 1 == self.bad:
            if self.weights:
                with torch.no_grad():
                    self.model.weight.fill_(float("inf"))
            else:
                metrics["loss"] = float("nan")
        return metrics


@pytest.mark.parametrize("weights", [False, True], ids=["nan-loss", "inf-weights"])
def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, weights):
    from scale_rae_core.train.loop import TrainingDiverged

    profile = load_profile("tiny-cpu", [*SETS, "output.log_every=1"])
    with CpuCudaBackend(BackendSettings()) as backend:
        loop = TrainLoop("toy", profile, tmp_path / "r", backend, resume=False)
        task = _Diverging(profile, loop.run_dir, bad=4 if weights else 3, weights=weights)
        with pytest.raises(TrainingDiverged) as err:
            loop.run(task)
    msg = str(err.value)
    assert "\n" not in msg and "the newest checkpoint is step-00000002" in msg and "lower the learning rate" in msg
    if weights:  # finite loss, but the weights went inf: the step-4 save is refused
        assert "the weights hold NaN or inf after step 4; not saving them" in msg
        assert metrics_steps(tmp_path / "r") == [1, 2, 3, 4]
    else:
        assert "toy diverged at step 3 (loss nan)" in msg
        assert metrics_steps(tmp_path / "r") == [1, 2]  # nothing logged for the NaN step
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-00000002"]
    assert task.exports == 0 and not (tmp_path / "r" / "export").exists()
    again, _ = run(tmp_path / "r", resume=True, sets=["output.log_every=1"])  # the last good one resumes (lock free)
    assert again.start_step == 2 and again.step == 5
