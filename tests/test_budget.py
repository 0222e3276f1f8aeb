"""Budgets (SPEC §7): epochs, steps or training seconds; the clock excludes evaluation; the validation split."""

import dataclasses
import json
import time

import pytest
import torch

from sweeps.runner import RunConfig, budget, records, train
from sweeps.runner.budget import Horizon, calibrate
from sweeps.runner.data import load_dataset, synthetic
from sweeps.runner.train import _Run

DATA = synthetic()  # 512 training examples: 461 after the validation split
TINY = dict(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, optimizer="adam")
STEPS_PER_EPOCH = 461 // 64  # 7


# ----------------------------------------------------------------- horizon
def test_each_budget_becomes_a_step_count_with_its_evaluations():
    epochs = Horizon.of(("epochs", 3), steps_per_epoch=7)
    assert (epochs.total_steps, epochs.eval_every, epochs.warmup_steps) == (21, 7, 1)  # 5% of 21, rounded
    assert epochs.evaluation_steps() == [0, 7, 14, 21]
    steps = Horizon.of(("steps", 10), steps_per_epoch=7)
    assert steps.evaluation_steps() == [0, 7, 10]  # the last step is always evaluated
    timed = Horizon.of(("time", 30.0), steps_per_epoch=7, calibrated_steps=1000)
    assert timed.total_steps == 1000 and len(timed.evaluation_steps()) == 51  # at most 50 after step 0
    assert Horizon.of(("steps", 10), steps_per_epoch=7, eval_every=3).evaluation_steps() == [0, 3, 6, 9, 10]
    with pytest.raises(ValueError, match="A time budget needs its calibrated step count"):
        Horizon.of(("time", 30.0), steps_per_epoch=7)


def test_calibration_converts_seconds_into_steps_by_the_mean_step_time(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    durations = iter([5.0, 5.0, 5.0] + [0.015625, 0.046875] * 10)  # 3 untimed steps, then a mean of 1/32 s

    def step(i):
        clock[0] += next(durations)

    result = calibrate(30.0, step)
    assert result.step_time_s == 1 / 32  # the mean: a slow step every other one is priced in
    assert result.steps == 960
    assert result.timed_steps == budget.CALIBRATION_STEPS


# -------------------------------------------------------------- the runs
def test_a_steps_budget_stops_at_its_step_and_evaluates_on_schedule(tmp_path):
    result = train(RunConfig(steps=10, eval_every=4, out=str(tmp_path), **TINY), progress=False, data=DATA)
    assert result.status == "ok" and result.summary["steps"] == 10
    assert [row["step"] for row in result.history] == [0, 4, 8, 10]
    assert [row["epoch"] for row in result.history] == pytest.approx([0, 4 / 7, 8 / 7, 10 / 7])
    assert result.summary["budget"] == {"kind": "steps", "value": 10, "steps": 10}


def test_an_epochs_budget_runs_whole_epochs(tmp_path):
    result = train(RunConfig(epochs=2, out=str(tmp_path), **TINY), progress=False, data=DATA)
    assert result.summary["steps"] == 2 * STEPS_PER_EPOCH
    assert [row["epoch"] for row in result.history] == [0, 1, 2]


def test_a_time_budget_runs_its_calibrated_steps_and_resume_keeps_them(tmp_path, monkeypatch):
    config = RunConfig(time_budget=1.0, eval_every=1, out=str(tmp_path), **TINY)

    def interrupt(row):
        raise KeyboardInterrupt

    monkeypatch.setattr(budget, "CALIBRATION_STEPS", 3)
    with pytest.raises(KeyboardInterrupt):
        train(config, on_evaluation=interrupt, progress=False, data=DATA)  # after its first step
    stored = json.loads((tmp_path / "config.json").read_text())
    calibration = stored["calibration"]
    assert calibration["steps"] == int(1.0 // calibration["step_time_s"]) and calibration["timed_steps"] == 3
    assert RunConfig.from_dict(stored) == config  # the calibration is not part of what the run is

    # Resuming must not calibrate again: the step count, and so the schedule, is the one recorded.
    monkeypatch.setattr(_Run, "_calibrate", lambda self: pytest.fail("calibrated again"))
    result = train(config, resume=True, progress=False, data=DATA)
    assert result.status == "ok" and result.summary["steps"] == calibration["steps"]
    assert result.summary["calibration"] == calibration
    assert result.summary["budget"] == {"kind": "time", "value": 1.0, "steps": calibration["steps"]}


def test_calibrating_does_not_change_the_run(tmp_path, monkeypatch):
    """A time-budget run is the steps-budget run of its step count: same losses, same weights."""
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", 3)
    timed = train(RunConfig(time_budget=0.2, out=str(tmp_path / "t"), **TINY), progress=False, data=DATA)
    steps = timed.summary["steps"]
    counted = train(RunConfig(steps=steps, out=str(tmp_path / "s"), **TINY), progress=False, data=DATA)
    losses = lambda result: [(r["step"], r["train_loss"], r["valid_loss"]) for r in result.history]  # noqa: E731
    assert losses(timed) == losses(counted)


def test_the_clock_pauses_during_evaluation(tmp_path, monkeypatch):
    real_evaluate = _Run.evaluate

    def slow_evaluate(self, *args, **kwargs):
        time.sleep(0.3)
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(_Run, "evaluate", slow_evaluate)
    result = train(RunConfig(steps=4, eval_every=1, out=str(tmp_path), **TINY), progress=False, data=DATA)
    assert len(result.history) == 5  # 1.5 s of evaluation
    assert result.summary["total_seconds"] >= 1.5
    # Training time is the sum of the step times, evaluation excluded.
    steps = [row["step_time_s"] for row in result.history[1:]]
    assert result.summary["train_seconds"] == pytest.approx(sum(steps))
    assert result.history[-1]["wall_time_s"] == pytest.approx(sum(steps)) and sum(steps) < 1.5


def test_a_run_refuses_two_budgets_naming_them():
    with pytest.raises(ValueError, match=r"one budget .* not several: epochs=2, steps=5"):
        RunConfig(epochs=2, steps=5).validate()
    with pytest.raises(ValueError, match="Invalid time_budget: -1.0"):
        RunConfig(time_budget=-1.0).validate()
    assert RunConfig().budget == ("epochs", 10)  # no budget given: 10 epochs


# ------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ["mnist5k", "synthetic"])
def test_the_validation_split_is_fixed_and_disjoint_from_train_and_test(name):
    data = load_dataset(name)
    split = data.with_validation(0.1)
    again = load_dataset(name).with_validation(0.1)
    assert torch.equal(split.valid_x, again.valid_x)  # the same examples for every run
    sizes = split.split_sizes()
    assert sizes["valid"] == round(0.1 * len(data.train_x)) and sizes["train"] + sizes["valid"] == len(data.train_x)
    rows = {name: {tuple(x.tolist()) for x in getattr(split, f"{name}_x")} for name in ("train", "valid", "test")}
    assert not rows["valid"] & rows["train"] and not rows["valid"] & rows["test"]
    assert rows["train"] | rows["valid"] == {tuple(x.tolist()) for x in data.train_x}


def test_runs_record_validation_losses_and_split_sizes(tmp_path):
    config = RunConfig(steps=7, valid_fraction=0.2, out=str(tmp_path), **{**TINY, "workload": "mlp"})
    result = train(config, progress=False, data=DATA)
    assert json.loads((tmp_path / "config.json").read_text())["valid_fraction"] == 0.2
    assert result.summary["split_sizes"] == {"train": 410, "valid": 102, "test": 128}
    history = records.read_history(tmp_path / "metrics.csv")
    assert all(row["valid_loss"] > 0 and 0 <= row["valid_error"] <= 1 for row in history)
    assert result.summary["final_valid_loss"] == history[-1]["valid_loss"]


def test_a_batch_above_the_training_split_is_refused_before_anything_is_written(tmp_path):
    config = dataclasses.replace(RunConfig(steps=1, out=str(tmp_path / "run"), **TINY), batch_size=470)
    with pytest.raises(ValueError, match="has 461 examples once the validation split is held out"):
        train(config, data=DATA)
    assert not (tmp_path / "run").exists()


def test_a_calibration_that_timed_skipped_steps_says_so(tmp_path, monkeypatch):
    """A batch with an infinite input makes Adam skip its steps; those are cheaper than real ones."""
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", 3)
    poisoned = synthetic()
    poisoned.train_x[:, 0] = float("inf")  # every batch
    config = RunConfig(time_budget=0.05, out=str(tmp_path), **TINY)
    with pytest.warns(budget.CalibrationSkipped, match="6 of the 6 steps that timed the budget were skipped"):
        run = _Run(config, tmp_path, poisoned, None)
    assert run.calibration.skipped_steps == 6
    clean = _Run(config, tmp_path, DATA, None)
    assert clean.calibration.skipped_steps == 0
