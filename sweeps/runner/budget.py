"""How long a run trains, and when it evaluates (SPEC §7 budgets).

A run's budget is a number of epochs, of optimizer steps, or of seconds of
training time (evaluation excluded, as in AlgoPerf). Every budget becomes a
step count, the run's :class:`Horizon`, before the first step, so that the
learning-rate schedule knows where it ends and the run is reproducible:

- epochs: epochs × steps per epoch (the last partial batch is dropped);
- steps: as given;
- time: the run first times its own steps (:func:`calibrate`: a fresh
  model and optimizer of the same config, a few untimed steps, then the mean of :data:`CALIBRATION_STEPS` timed ones,
  which includes the periodic work of K-FAC or Shampoo), and runs
  ⌊budget / step time⌋ steps. The
  calibration is recorded in config.json and in the checkpoint, so a
  resumed run keeps its step count; a fresh run on another machine
  calibrates again.

Evaluations happen at step 0, every ``eval_every`` steps (default once per
epoch, but at most :data:`MAX_EVALUATIONS` a run) and at the last step.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch

__all__ = [
    "CALIBRATION_STEPS",
    "MAX_EVALUATIONS",
    "Calibration",
    "CalibrationSkipped",
    "Horizon",
    "calibrate",
    "lr_factor",
]

MAX_EVALUATIONS = 50
CALIBRATION_WARMUP = 3  # untimed: first-call allocations, lazy state
CALIBRATION_STEPS = 20  # timed: K-FAC and Shampoo refresh their inverses every 10 steps by default


class CalibrationSkipped(UserWarning):
    """Steps of a calibration were skipped as non-finite, so it may have timed the budget short."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A time budget converted to steps: the mean seconds of a timed step and the step count."""

    step_time_s: float
    steps: int
    timed_steps: int
    skipped_steps: int = 0  # steps the throwaway optimizer skipped as non-finite: their times are not real steps

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Horizon:
    """The step counts of a run: its length, its warmup, its evaluations."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int

    @classmethod
    def of(
        cls,
        budget: tuple[str, float],
        steps_per_epoch: int,
        warmup_epochs: float | None = None,
        eval_every: int | None = None,
        calibrated_steps: int | None = None,
    ) -> Horizon:
        """The horizon of a run with ``budget`` (kind, value) and ``steps_per_epoch``.

        A time budget needs ``calibrated_steps``. Warmup defaults to 5% of
        the steps (5 of the official 100 epochs); a longer warmup than the run
        is refused (ValueError), as it would leave no decay.
        """
        kind, value = budget
        if kind == "epochs":
            total = int(value) * steps_per_epoch
        elif kind == "steps":
            total = int(value)
        elif calibrated_steps is not None:
            total = calibrated_steps
        else:
            raise ValueError("A time budget needs its calibrated step count")
        warmup = round(warmup_epochs * steps_per_epoch) if warmup_epochs is not None else round(0.05 * total)
        if warmup > total:
            raise ValueError(
                f"Invalid warmup_epochs: {warmup_epochs!r} is {warmup} steps, longer than the run ({total} steps, "
                f"{total / steps_per_epoch:.4g} epochs of {steps_per_epoch} steps); give --warmup-epochs at most "
                f"{total / steps_per_epoch:.4g}, or leave it out for 5% of the run"
            )
        if eval_every is None:
            eval_every = max(steps_per_epoch, math.ceil(total / MAX_EVALUATIONS))
        return cls(steps_per_epoch, total, warmup, eval_every)

    def evaluates_after(self, step: int) -> bool:
        """Whether the run evaluates once ``step`` steps are done."""
        return step % self.eval_every == 0 or step == self.total_steps

    def evaluation_steps(self, until: int | None = None) -> list[int]:
        """The steps at which the run evaluates, from 0 up to ``until`` (default: the end)."""
        last = self.total_steps if until is None else min(until, self.total_steps)
        return [step for step in range(last + 1) if self.evaluates_after(step)]


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Warmup rises linearly to 1 over ``warmup_steps`` (never 0: the first
    step already moves); then "official" decays linearly towards 0 at
    ``total_steps``, "cosine" follows a half cosine, "constant" stays at 1.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = (total_steps - step) / max(total_steps - warmup_steps, 1)
    if schedule == "official":
        return remaining
    return 0.5 * (1.0 - math.cos(math.pi * remaining))


def calibrate(time_budget: float, step: Callable[[int], None], sync: Callable[[], None] = lambda: None) -> Calibration:
    """Convert ``time_budget`` seconds into a step count by timing ``step(i)``.

    ``step(i)`` runs the i-th calibration step of a throwaway model and
    optimizer; :data:`CALIBRATION_WARMUP` untimed steps come first. The step
    time is the mean, not the median, so that periodic work (a
    preconditioner refreshed every few steps) is priced in. The torch RNG
    state is restored afterwards: calibrating does not change the run.
    """
    rng = torch.get_rng_state()
    try:
        for i in range(CALIBRATION_WARMUP):
            step(i)
        seconds = []
        for i in range(CALIBRATION_WARMUP, CALIBRATION_WARMUP + CALIBRATION_STEPS):
            sync()
            started = time.perf_counter()
            step(i)
            sync()
            seconds.append(time.perf_counter() - started)
    finally:
        torch.set_rng_state(rng)
    step_time = statistics.fmean(seconds)
    return Calibration(
        step_time_s=step_time, steps=max(1, math.floor(time_budget / step_time)), timed_steps=len(seconds)
    )
