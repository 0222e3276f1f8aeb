"""Equal time on a busy machine (SPEC §7): a CPU-bound neighbour during the measurement of step costs, all
through it or from part-way, changes no ratio of step counts between optimizers by more than 15%.

A busy machine may give every optimizer fewer steps; what must not change is their ratio. The machine that
runs the tests may itself be shared, so every figure is compared with one measured in the same way just
before, and the runs use the runner's setting for a machine that may be shared: one intra-op thread, whose
step ratios come from its own CPU time (``sweeps.runner.budget.ratio_clock``).
"""

import contextlib
import subprocess
import sys

import pytest

from sweeps.runner import RunConfig, budget, calibration
from sweeps.runner.calibration import price_steps
from sweeps.runner.data import synthetic

# Small enough that one measurement takes seconds: steps of about 5 ms (Adam) and 35 ms (LocoProp-M).
BASE = RunConfig(workload="autoencoder", data="synthetic", width_mult=0.1, batch_size=64, time_budget=30.0, threads=1)
HPARAMS = {"adam": {}, "locoprop-m": {}}
DATA = synthetic()
TOLERANCE = 0.15


@contextlib.contextmanager
def neighbour():
    """A CPU-bound process beside the tests, as another user's job would be."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def step_count_ratio() -> float:
    """Adam's step count over LocoProp-M's for the 30 s budget, from one table of step costs."""
    costs = price_steps(BASE, HPARAMS, DATA).costs
    return costs["adam"].steps(BASE.time_budget) / costs["locoprop-m"].steps(BASE.time_budget)


def test_a_neighbour_all_through_the_measurement_changes_no_ratio_of_step_counts():
    quiet = step_count_ratio()
    with neighbour():
        busy = step_count_ratio()
    assert busy == pytest.approx(quiet, rel=TOLERANCE)


def test_a_neighbour_that_starts_part_way_changes_no_ratio_of_step_counts(monkeypatch):
    quiet = step_count_ratio()
    # The neighbour starts with the reference's first step of round 3 of 5: a known point, whatever the speed.
    start_at = budget.CALIBRATION_WARMUP + 2 * budget.CALIBRATION_ROUND_STEPS
    real_step = calibration._throwaway_step
    started = []

    def throwaway_step(config, *args):
        step, optimizer = real_step(config, *args)
        if config.optimizer != budget.REFERENCE_OPTIMIZER:
            return step, optimizer
        calls = [0]

        def step_starting_the_neighbour():
            calls[0] += 1
            if calls[0] == start_at:
                started.append(stack.enter_context(neighbour()))
            step()

        return step_starting_the_neighbour, optimizer

    monkeypatch.setattr(calibration, "_throwaway_step", throwaway_step)
    with contextlib.ExitStack() as stack:
        partly = step_count_ratio()
        assert len(started) == 1 and started[0].poll() is None  # it was running when the measurement ended
    assert partly == pytest.approx(quiet, rel=TOLERANCE)
