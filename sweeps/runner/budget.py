"""How long a run trains, and when it evaluates (SPEC §7 budgets).

A run's budget is a number of epochs, of optimizer steps, or of seconds of
training time (evaluation excluded, as in AlgoPerf). Every budget becomes a
step count, the run's :class:`Horizon`, before the first step, so that the
learning-rate schedule knows where it ends and the run is reproducible:

- epochs: epochs × steps per epoch (the last partial batch is dropped);
- steps: as given;
- time: ⌊budget / step cost⌋ steps, the step cost measured side by side
  with a reference optimizer (:data:`REFERENCE_OPTIMIZER`, on the same model
  and batch) by :func:`step_costs`: rounds in which each optimizer takes
  :data:`CALIBRATION_ROUND_STEPS` steps, or whole periods of its refresh
  (K-FAC's, Shampoo's: every P steps), their steps interleaved; the cost is
  the median over rounds of its mean step time over the reference's in the
  same round, times the median reference time. Load on the machine reaches
  every optimizer of a round alike, so the ratios between optimizers hardly
  move with it.
  ``locoprop compare`` prices all its optimizers in one such table (each run
  gets its cost as ``RunConfig.step_cost``); a run without one prices its own
  optimizer against the same reference. The calibration is recorded in
  config.json and in the checkpoint, so a resumed run keeps its step count.

The budget's clock (:func:`budget_clock`): a run that trains on one thread
on CPU (the default on two cores, :func:`default_threads`) counts its
training time as that thread's CPU time, which on a quiet machine is its wall
time and which a neighbour taking turns on the cores leaves alone (but for
shared caches): its step costs, and so its step counts and its results, hardly
depend on what else the machine is doing. Runs on several threads, several ranks or a GPU count wall
time; on a busy machine they get fewer steps, all in the same ratio.

A run checks its pace against its calibration as it goes (:func:`pace`) and
says when its steps cost more than :data:`PACE_TOLERANCE` more or less than
the calibration measured: then it will not train for its budget.

Evaluations happen at step 0, every ``eval_every`` steps (default once per
epoch, but at most :data:`MAX_EVALUATIONS` a run) and at the last step.

Runs train with :func:`run_threads` intra-op threads on CPU: by default one
fewer than the cores the process may use. With as many threads as cores, a
single CPU-bound neighbour preempts one of them in every parallel region, and
each region waits for it: on 2 cores one busy process made steps about 20×
slower, and unevenly so between optimizers (README, "Equal time on a busy machine").
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = [
    "CALIBRATION_ROUNDS",
    "CALIBRATION_ROUND_STEPS",
    "CALIBRATION_WARMUP",
    "MAX_EVALUATIONS",
    "PACE_TOLERANCE",
    "REFERENCE_OPTIMIZER",
    "Calibration",
    "CalibrationSkipped",
    "Horizon",
    "RoundTimes",
    "StepCost",
    "budget_clock",
    "default_threads",
    "interleaved_step_times",
    "knob_key",
    "lr_factor",
    "pace",
    "round_steps",
    "run_threads",
    "step_costs",
]

MAX_EVALUATIONS = 50
REFERENCE_OPTIMIZER = "adam"  # every step cost is measured against this optimizer's step on the same model
CLOCKS = ("wall", "cpu")  # what a time budget counts: wall-clock seconds, or the training thread's CPU seconds
CALIBRATION_WARMUP = 3  # untimed steps of each optimizer first: first-call allocations, lazy state
CALIBRATION_ROUNDS = 5  # the median over rounds ignores up to two rounds disturbed by a neighbour
# Steps of each optimizer per round, rounded up to whole periods of one that refreshes its curvature every P
# steps (round_steps): K-FAC and Shampoo by default every 10, so every round's mean prices in one refresh.
CALIBRATION_ROUND_STEPS = 10
PACE_TOLERANCE = 0.1  # a run whose steps cost this much more or less than calibrated is not at equal time


class CalibrationSkipped(UserWarning):
    """Steps of a calibration were skipped as non-finite, so it may have timed the budget short."""


def knob_key(knobs: dict) -> str:
    """The cost knobs' values as one key, ``"local_iters=1"`` (``""`` for an optimizer without knobs)."""
    return ",".join(f"{name}={knobs[name]}" for name in sorted(knobs))


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One optimizer's step cost, measured side by side with the reference optimizer on the same model and batch.

    ``step_time_s`` is the seconds of one step; ``reference_step_time_s`` those of a reference step in the same
    measurement, so that ``ratio`` (the step's cost in reference steps) can be compared across measurements
    made under different loads; ``clock`` what the seconds count (:func:`budget_clock`).

    ``variants``: where a comparison tunes a knob that sets the step's cost (LocoProp's K,
    ``baselines.registry.cost_knobs``), the seconds of a step at each of its values, measured in the same
    table (key :func:`knob_key`); a run takes its own with :meth:`for_knobs`, so that a cheaper step buys
    more steps.
    """

    step_time_s: float
    reference_step_time_s: float
    clock: str = "wall"  # of both times: "wall" or "cpu" (budget_clock)
    variants: dict[str, float] | None = None

    def for_knobs(self, knobs: dict) -> StepCost:
        """The cost of a step at these cost-knob values: its variant's, or this one where none are priced."""
        if self.variants is None:
            return self
        key = knob_key(knobs)
        if key not in self.variants:
            priced = ", ".join(sorted(self.variants)) or "none"
            raise ValueError(f"No step cost priced for {key}: the comparison priced {priced}")
        return StepCost(self.variants[key], self.reference_step_time_s, self.clock)

    @property
    def ratio(self) -> float:
        return self.step_time_s / self.reference_step_time_s

    def steps(self, time_budget: float) -> int:
        """The step count of ``time_budget`` seconds: ⌊budget / step time⌋, at least 1."""
        return max(1, math.floor(time_budget / self.step_time_s))

    def check(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"Invalid step_cost clock: {self.clock!r}; expected wall or cpu")
        seconds = [(name, getattr(self, name)) for name in ("step_time_s", "reference_step_time_s")]
        if self.variants is not None and not isinstance(self.variants, dict):
            raise ValueError(f"Invalid step_cost variants: {self.variants!r}; expected a mapping of knobs to seconds")
        if self.variants is not None:
            seconds += [(f"variants[{key!r}]", value) for key, value in self.variants.items()]
        for name, value in seconds:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"Invalid step_cost {name}: {value!r}; expected seconds, a finite number > 0")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A time budget converted to steps: the seconds of a step, the step count, and how they were measured.

    ``reference_step_time_s`` is the reference optimizer's step in the same measurement (None in runs made
    before it was measured); ``timed_steps`` the timed steps of the run's optimizer; ``threads`` the intra-op
    threads it was measured with; ``clock`` what the seconds, and the run's training time, count.
    """

    step_time_s: float
    steps: int
    timed_steps: int
    skipped_steps: int = 0  # steps the throwaway optimizer skipped as non-finite: their times are not real steps
    reference_step_time_s: float | None = None
    threads: int | None = None
    clock: str = "wall"  # what the run's training time counts (budget_clock)

    @classmethod
    def of(cls, time_budget: float, cost: StepCost, timed_steps: int, skipped_steps: int = 0) -> Calibration:
        return cls(
            step_time_s=cost.step_time_s,
            steps=cost.steps(time_budget),
            timed_steps=timed_steps,
            skipped_steps=skipped_steps,
            reference_step_time_s=cost.reference_step_time_s,
            threads=torch.get_num_threads(),
            clock=cost.clock,
        )

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


@dataclasses.dataclass(frozen=True)
class RoundTimes:
    """Seconds per step of each measured name in every round: by the wall clock, and by the CPU time of the
    measuring thread (which counts a step's work alone when it runs on that one thread)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def round_steps(steps_per_round: int, period: int = 1) -> int:
    """Steps of an optimizer in one round: ``steps_per_round`` rounded up to whole ``period``s, so that each round
    holds its periodic work the same number of times."""
    return math.ceil(steps_per_round / period) * period


def interleaved_step_times(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    steps_per_round: int = 1,
    warmup: int = 0,
    sync: Callable[[], None] = lambda: None,
    periods: Mapping[str, int] | None = None,
) -> RoundTimes:
    """Seconds per step of each of ``steps`` (name -> one step), measured side by side.

    Each runs ``warmup`` untimed steps; then come ``rounds`` rounds. In a round each name takes
    :func:`round_steps` steps: ``steps_per_round`` rounded up to whole periods (``periods``, name -> steps
    after which its work repeats; 1 by default). The round's steps are dealt out in turns: the names with the
    most steps take one in every turn, the others theirs spread evenly over the turns, in an order that
    rotates from turn to turn. A round's time of each is the mean of its steps in that round, so periodic
    work is priced in exactly; as the steps of all alternate, a neighbour's load reaches all of them alike.
    """
    names = list(steps)
    periods = periods or {}
    for name in names:
        for _ in range(warmup):
            steps[name]()
    counts = {name: round_steps(steps_per_round, periods.get(name, 1)) for name in names}
    turns = max(counts.values(), default=0)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    for _ in range(rounds):
        spent = {name: [0.0, 0.0] for name in names}
        for t in range(turns):
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                # The name steps in turn t when ⌊(t + 1)·n/T⌋ passes an integer: n steps spread over T turns.
                if (t + 1) * counts[name] // turns == t * counts[name] // turns:
                    continue
                sync()
                started, started_cpu = time.perf_counter(), time.thread_time()
                steps[name]()
                sync()
                spent[name][0] += time.perf_counter() - started
                spent[name][1] += time.thread_time() - started_cpu
            turn += 1
        for name in names:
            wall[name].append(spent[name][0] / counts[name])
            cpu[name].append(spent[name][1] / counts[name])
    return RoundTimes(wall, cpu)


def budget_clock(device: torch.device, data_parallel: bool = False) -> str:
    """What a run's training time counts: "cpu", the training thread's CPU time, where the run computes on that
    one thread (CPU, one intra-op thread, one rank), so that a neighbour taking turns on the cores changes neither
    its step costs nor its step count; "wall" otherwise (several threads or ranks, whose waits are part of the
    cost, or a GPU)."""
    if device.type == "cpu" and torch.get_num_threads() == 1 and not data_parallel:
        return "cpu"
    return "wall"


def step_costs(
    steps: Mapping[str, Callable[[], object]],
    reference: str,
    rounds: int | None = None,
    steps_per_round: int | None = None,
    warmup: int | None = None,
    sync: Callable[[], None] = lambda: None,
    clock: str = "wall",
    periods: Mapping[str, int] | None = None,
) -> dict[str, StepCost]:
    """The step cost of each of ``steps`` (name -> one step of a throwaway model and optimizer), against ``reference``.

    :func:`interleaved_step_times` over :data:`CALIBRATION_ROUNDS` rounds of
    :data:`CALIBRATION_ROUND_STEPS` steps (whole ``periods`` of an optimizer
    whose work repeats, ``baselines.registry.cost_period``) after
    :data:`CALIBRATION_WARMUP` untimed steps. Each cost is
    the median over rounds of the step's mean time over the reference step's
    in the same round, times the median time of the reference step, all by
    ``clock`` ("wall" or "cpu", :func:`budget_clock`): load that comes and
    goes changes a round's times, but hardly the ratios within it, and the
    median drops the rounds it changed. The torch RNG state is restored
    afterwards: measuring does not change the runs.
    """
    if reference not in steps:
        raise ValueError(f"The reference {reference!r} is not among the steps measured ({', '.join(steps)})")
    if clock not in CLOCKS:
        raise ValueError(f"Invalid clock: {clock!r}; expected wall or cpu")
    rng = torch.get_rng_state()
    try:
        times = interleaved_step_times(
            steps,
            rounds=CALIBRATION_ROUNDS if rounds is None else rounds,
            steps_per_round=CALIBRATION_ROUND_STEPS if steps_per_round is None else steps_per_round,
            warmup=CALIBRATION_WARMUP if warmup is None else warmup,
            sync=sync,
            periods=periods,
        )
    finally:
        torch.set_rng_state(rng)
    by_clock = times.cpu if clock == "cpu" else times.wall
    reference_time = statistics.median(by_clock[reference])
    costs = {}
    for name, seconds in by_clock.items():
        ratio = statistics.median(t / r for t, r in zip(seconds, by_clock[reference]))
        costs[name] = StepCost(step_time_s=ratio * reference_time, reference_step_time_s=reference_time, clock=clock)
    return costs


def pace(train_seconds: float, steps: int, step_time_s: float) -> float:
    """How a run's steps so far compare with their calibrated cost: 1 on pace, 2 twice as slow."""
    return train_seconds / steps / step_time_s


def default_threads() -> int:
    """Intra-op threads of a CPU run by default: one fewer than the cores this process may use, at least 1.

    A neighbouring CPU-bound process then finds a core of its own instead of
    preempting one of the run's threads, which every parallel region would
    wait for (the module docstring). ``OMP_NUM_THREADS``, when set, decides
    instead, as it does for torch.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


@contextlib.contextmanager
def run_threads(threads: int | None) -> Iterator[int]:
    """Train with ``threads`` intra-op threads (None: :func:`default_threads`); the count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(default_threads() if threads is None else threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
