"""Budgets (SPEC §7): epochs, steps or training seconds; the clock excludes evaluation; the validation split."""

import dataclasses
import json
import re
import time

import pytest
import torch

from sweeps.runner import RunConfig, budget, run_directory, train
from sweeps.runner.budget import Horizon
from sweeps.runner.config import run_identity
from sweeps.runner.data import load_dataset, synthetic
from sweeps.runner.train import OffPace, _Run

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


class FakeClocks:
    """Wall and CPU clocks that steps advance by hand: a step of ``cost`` seconds of work takes ``cost`` of CPU
    time, and ``cost`` × 8 of wall time while a neighbour is busy (between ``busy`` seconds of wall time)."""

    def __init__(self, monkeypatch, busy: tuple[float, float]):
        self.wall, self.cpu, self.busy = 0.0, 0.0, busy
        monkeypatch.setattr(budget.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(budget.time, "thread_time", lambda: self.cpu)

    def work(self, cost: float) -> None:
        self.cpu += cost
        self.wall += cost * (8.0 if self.busy[0] <= self.wall < self.busy[1] else 1.0)


def steps_of(clocks: FakeClocks) -> dict:
    """A reference step of 1/64 s, and one that alternates 3/64 and 5/64 s (periodic work: 4/64 on average)."""
    alternate = iter([3, 5] * 1000)
    return {"ref": lambda: clocks.work(1 / 64), "opt": lambda: clocks.work(next(alternate) / 64)}


def test_step_costs_are_ratios_to_the_reference_in_the_same_round_so_load_moves_no_ratio(monkeypatch):
    # From 1 s to 2 s of wall time a neighbour makes every step 8x slower: it disturbs two of the five rounds.
    clocks = FakeClocks(monkeypatch, busy=(1.0, 2.0))
    times = budget.interleaved_step_times(steps_of(clocks), rounds=5, steps_per_round=4, warmup=2)
    assert [len(t) for t in times.wall.values()] == [5, 5]
    assert times.cpu["opt"] == [4 / 64] * 5 and sum(t != 4 / 64 for t in times.wall["opt"]) >= 2
    clocks = FakeClocks(monkeypatch, busy=(1.0, 2.0))
    costs = budget.step_costs(steps_of(clocks), "ref", rounds=5, steps_per_round=4, warmup=2, clock="wall")
    assert costs["opt"].ratio == 4.0  # the median of the ratios in each round: the disturbed ones drop out
    assert costs["opt"] == budget.StepCost(step_time_s=4 / 64, reference_step_time_s=1 / 64)
    assert costs["ref"].ratio == 1.0
    assert costs["opt"].steps(30.0) == 480 and costs["opt"].steps(0.01) == 1  # at least one step


def test_on_the_cpu_clock_a_neighbour_moves_no_step_cost_at_all(monkeypatch):
    # Busy from 0.5 s on: four of the five rounds, every step 8x slower by the wall clock.
    clocks = FakeClocks(monkeypatch, busy=(0.5, 1e9))
    by_cpu = budget.step_costs(steps_of(clocks), "ref", rounds=5, steps_per_round=4, warmup=2, clock="cpu")
    assert by_cpu["opt"] == budget.StepCost(step_time_s=4 / 64, reference_step_time_s=1 / 64, clock="cpu")
    clocks = FakeClocks(monkeypatch, busy=(0.5, 1e9))
    by_wall = budget.step_costs(steps_of(clocks), "ref", rounds=5, steps_per_round=4, warmup=2, clock="wall")
    assert by_wall["opt"].ratio == 4.0 and by_wall["opt"].reference_step_time_s == 8 / 64  # same ratio, 8x slower
    with pytest.raises(ValueError, match="Invalid clock: 'gpu'"):
        budget.step_costs(steps_of(clocks), "ref", clock="gpu")


def test_one_thread_on_cpu_counts_cpu_time_and_anything_else_wall_time(monkeypatch):
    monkeypatch.setattr(budget.torch, "get_num_threads", lambda: 1)
    assert budget.budget_clock(torch.device("cpu")) == "cpu"
    assert budget.budget_clock(torch.device("cpu"), data_parallel=True) == "wall"  # waits on the others count
    assert budget.budget_clock(torch.device("cuda")) == "wall"
    monkeypatch.setattr(budget.torch, "get_num_threads", lambda: 2)
    assert budget.budget_clock(torch.device("cpu")) == "wall"


def test_interleaved_rounds_rotate_their_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    budget.interleaved_step_times(steps, rounds=3, steps_per_round=1, warmup=0)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_an_optimizer_with_periodic_work_is_timed_over_whole_periods(monkeypatch):
    """Work every third step (7/64 s, else 1/64: 3/64 on average) in rounds of 4 steps: each round's mean
    depends on how many refreshes fall in it, and a refresh in one round of three would be missed by the
    median (the bug: Shampoo refreshing every 30 steps, timed in rounds of 10, priced at half its cost).
    Rounded up to whole periods, 6 steps a round, every round holds two and the cost is exact."""

    def steps(clocks):
        pattern = iter([7, 1, 1] * 1000)
        return {"ref": lambda: clocks.work(1 / 64), "opt": lambda: clocks.work(next(pattern) / 64)}

    kwargs = dict(rounds=5, steps_per_round=4, warmup=0, clock="cpu")
    mispriced = budget.step_costs(steps(FakeClocks(monkeypatch, busy=(0, 0))), "ref", **kwargs)
    assert mispriced["opt"].ratio != 3.0
    priced = budget.step_costs(steps(FakeClocks(monkeypatch, busy=(0, 0))), "ref", periods={"opt": 3}, **kwargs)
    assert priced["opt"].ratio == 3.0 and priced["ref"].ratio == 1.0
    assert budget.round_steps(4, 3) == 6 and budget.round_steps(10, 30) == 30 and budget.round_steps(10, 1) == 10


def test_the_steps_of_a_shorter_share_are_spread_over_the_round():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    budget.interleaved_step_times(steps, rounds=1, steps_per_round=2, periods={"b": 3}, warmup=1)
    assert calls[:2] == ["a", "b"]  # the untimed steps
    # b takes 3 steps in the round, one every turn; a its 2, in the 2nd and 3rd turns; the order rotates.
    assert calls[2:] == ["b", "b", "a", "a", "b"]


def test_runs_train_with_one_fewer_thread_than_cores_and_give_the_count_back(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(budget.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert budget.default_threads() == 1  # 2 cores: a busy neighbour gets the other one
    monkeypatch.setattr(budget.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert budget.default_threads() == 1
    before = torch.get_num_threads()
    with budget.run_threads(None) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.fixture
def short_calibration(monkeypatch):
    """3 rounds of 1 step after the 3 untimed ones: a calibration of the tiny model takes milliseconds."""
    monkeypatch.setattr(budget, "CALIBRATION_ROUNDS", 3)
    monkeypatch.setattr(budget, "CALIBRATION_ROUND_STEPS", 1)


def test_a_comparison_prices_periodic_optimizers_over_whole_periods(monkeypatch, short_calibration):
    """The table's measurement and a lone run's calibration take each optimizer's refresh period from the
    registry (``baselines.registry.cost_period``): Shampoo's preconditioners every P steps."""
    from sweeps.runner import calibration

    seen, real = {}, calibration.step_costs
    monkeypatch.setattr(calibration, "step_costs", lambda *args, **kwargs: seen.update(kwargs) or real(*args, **kwargs))
    base = RunConfig(time_budget=5.0, **TINY)
    entries = {"shampoo (P=3)": {"preconditioning_compute_steps": 3}, "sgd": {}}
    table = calibration.price_steps(base, entries, DATA, {"shampoo (P=3)": "shampoo"})
    assert seen["periods"] == {"shampoo (P=3)": 3, "sgd": 1, "adam": 1}
    assert set(table.costs) == set(entries)
    lone = dataclasses.replace(base, optimizer="shampoo", hparams={"preconditioning_compute_steps": 3})
    split = DATA.with_validation(base.valid_fraction)
    recorded = calibration.calibrate_run(lone, DATA.shape, split.train_x, split.train_y, torch.device("cpu"))
    assert seen["periods"] == {"shampoo": 3, "adam": 1}
    assert recorded.timed_steps == budget.CALIBRATION_ROUNDS * 3  # rounds of 1 step, rounded up to 3


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


def test_a_time_budget_runs_its_calibrated_steps_and_resume_keeps_them(tmp_path, monkeypatch, short_calibration):
    config = RunConfig(time_budget=1.0, eval_every=1, out=str(tmp_path), **{**TINY, "optimizer": "sgd"})

    def interrupt(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_evaluation=interrupt, progress=False, data=DATA)  # after its first step
    stored = json.loads((tmp_path / "config.json").read_text())
    calibration = stored["calibration"]
    assert calibration["steps"] == int(1.0 // calibration["step_time_s"]) and calibration["timed_steps"] == 3
    assert calibration["reference_step_time_s"] > 0  # sgd was timed against Adam, the reference
    assert calibration["threads"] == budget.default_threads()
    assert calibration["clock"] == ("cpu" if calibration["threads"] == 1 else "wall")  # one thread: its CPU time
    assert RunConfig.from_dict(stored) == config  # the calibration is not part of what the run is

    # Resuming must not calibrate again: the step count, and so the schedule, is the one recorded.
    monkeypatch.setattr(_Run, "_calibrate", lambda self: pytest.fail("calibrated again"))
    result = train(config, resume=True, progress=False, data=DATA)
    assert result.status == "ok" and result.summary["steps"] == calibration["steps"]
    assert result.summary["calibration"] == calibration
    assert result.summary["budget"] == {"kind": "time", "value": 1.0, "steps": calibration["steps"]}
    assert 0 < result.summary["train_cpu_seconds"]


def test_calibrating_does_not_change_the_run(tmp_path, short_calibration):
    """A time-budget run is the steps-budget run of its step count: same losses, same weights."""
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
    history = run_directory.read_history(tmp_path / "metrics.csv")
    assert all(row["valid_loss"] > 0 and 0 <= row["valid_error"] <= 1 for row in history)
    assert result.summary["final_valid_loss"] == history[-1]["valid_loss"]


def test_a_batch_above_the_training_split_is_refused_before_anything_is_written(tmp_path):
    config = dataclasses.replace(RunConfig(steps=1, out=str(tmp_path / "run"), **TINY), batch_size=470)
    with pytest.raises(ValueError, match="has 461 examples once the validation split is held out"):
        train(config, data=DATA)
    assert not (tmp_path / "run").exists()


def test_a_calibration_that_timed_skipped_steps_says_so(tmp_path, short_calibration):
    """A batch with an infinite input makes Adam skip its steps; those are cheaper than real ones."""
    poisoned = synthetic()
    poisoned.train_x[:, 0] = float("inf")  # every batch
    config = RunConfig(time_budget=0.05, out=str(tmp_path), **TINY)
    with pytest.warns(budget.CalibrationSkipped, match="6 of the 6 steps that timed the budget were skipped"):
        run = _Run(config, tmp_path, poisoned, None)
    assert run.calibration.skipped_steps == 6
    clean = _Run(config, tmp_path, DATA, None)
    assert clean.calibration.skipped_steps == 0


# ------------------------------------------------------ step costs given
def test_a_run_given_its_step_cost_takes_its_steps_from_it_without_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(_Run, "_calibrate", lambda self: pytest.fail("the run timed its own steps"))
    cost = {"step_time_s": 0.25, "reference_step_time_s": 0.05}
    config = RunConfig(time_budget=3.0, step_cost=cost, out=str(tmp_path), **TINY)
    result = train(config, progress=False, data=DATA)
    assert result.summary["steps"] == 12  # ⌊3 / 0.25⌋
    assert result.summary["calibration"]["reference_step_time_s"] == 0.05
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["step_cost"] == {**cost, "clock": "wall", "variants": None} and RunConfig.from_dict(stored) == config


def test_the_new_fields_leave_older_run_directories_their_names():
    plain = dataclasses.asdict(RunConfig(time_budget=3.0, **TINY))
    assert "step_cost" not in run_identity(plain) and "threads" not in run_identity(plain)
    priced = dataclasses.asdict(RunConfig(time_budget=3.0, step_cost=budget.StepCost(0.25, 0.05), threads=2, **TINY))
    assert {"step_cost", "threads"} <= set(run_identity(priced))
    # A step cost without variants (no cost knob tuned) is the one older runs recorded, before variants existed.
    older = {**priced, "step_cost": {k: v for k, v in priced["step_cost"].items() if k != "variants"}}
    assert run_identity(older) == run_identity(priced)
    knobs = {**priced, "step_cost": {**priced["step_cost"], "variants": {"local_iters=1": 0.1}}}
    assert run_identity(knobs) != run_identity(priced)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(steps=5, step_cost={"step_time_s": 0.1, "reference_step_time_s": 0.1}), "converts a time budget"),
        (dict(time_budget=1.0, step_cost={"step_time_s": 0.0, "reference_step_time_s": 0.1}),
         "Invalid step_cost step_time_s: 0.0; expected seconds"),
        (dict(time_budget=1.0, step_cost={"step_time_s": 0.1, "seconds": 0.1}), "unknown field.s. seconds"),
        (dict(threads=0), "Invalid threads: 0; expected an integer ≥ 1"),
    ],
)  # fmt: skip
def test_bad_step_costs_and_threads_are_refused_naming_them(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RunConfig(**{**TINY, **fields}).validate()


def test_a_run_says_once_when_its_steps_cost_other_than_calibrated(tmp_path):
    """Steps priced at 2^-17 s (8 µs) take longer than that on any machine, and steps priced at 100 s far less."""
    tick = 2.0**-17  # a power of two: the budget of 30 ticks is exactly 30 steps
    slow = RunConfig(time_budget=30 * tick, step_cost={"step_time_s": tick, "reference_step_time_s": tick},
                     eval_every=10, out=str(tmp_path / "slow"), **TINY)  # fmt: skip
    with pytest.warns(OffPace) as said:
        result = train(slow, progress=False, data=DATA)
    assert result.summary["steps"] == 30
    (notice,) = [w for w in said if issubclass(w.category, OffPace)]  # at steps 10, 20 and 30: said once
    assert re.search(r"its 10 steps so far took [\d.]+× the 7.63e-06 s per step that converted its budget into 30 "
                     r"steps \(is the machine busier than then\?\)", str(notice.message))  # fmt: skip
    fast = dataclasses.replace(slow, time_budget=3000.0, step_cost=budget.StepCost(100.0, 100.0), out=str(tmp_path))
    with pytest.warns(OffPace, match=r"0\.00× the 100 s per step .* quieter than then"):
        train(fast, progress=False, data=DATA)
