"""The training loop: ``train(config) -> RunResult`` (SPEC §6).

The one loop used by the CLI, Optuna and Ray Tune. It owns time,
evaluation and budget; optimizers only update. Per run directory:

- ``config.json``: the :class:`RunConfig`, and for a time budget the
  calibration that converted it into steps (:mod:`sweeps.runner.budget`:
  the config's ``step_cost`` from a comparison's table, or the run's own
  optimizer timed against the reference); a run whose steps then cost more
  than 10% more or less than calibrated says so (:class:`OffPace`);
- ``metrics.csv``: one row per evaluation (at step 0, then every
  ``eval_every`` steps and at the last step): step, epoch (fractional),
  wall_time_s (training time: the clock pauses during evaluation),
  train_loss, valid_loss and test_loss on the whole splits (on a fixed
  subset of each where the workload says so: ``Workload.eval_examples``),
  a classifier's error rates, a language model's perplexities, lr, mean
  seconds per step and per phase of a step, and the count of skipped steps;
- ``summary.json``: final and best losses, status, seconds, split sizes,
  budget and horizon, peak memory, versions, seed;
- ``checkpoint.pt``: written at every evaluation, with the metrics rows so
  far, and at the step where a signal stopped the run; ``resume=True``
  continues from it (rewriting metrics.csv from its rows) and gives the same
  numbers as an uninterrupted run on CPU.

A signal taken by the command (:mod:`sweeps.interrupts`: Ctrl-C, or a
scheduler's SIGTERM) stops the run between two steps: the step under way is
finished, the run checkpoints at it, summary.json says "interrupted", and
:class:`sweeps.interrupts.Interrupted` is raised. On several ranks the
ranks agree in each step's all-reduce on whether one of them was signalled,
so that all of them stop after the same step.

A run of ``precision`` "bf16" runs its model's forward, in training and in
evaluation, under bfloat16 autocast, its weights and optimizer state in
float32 (:mod:`sweeps.runner.precision`); a resume in another precision is
refused as any other changed setting is.

The validation split is carved from the training split
(``valid_fraction``, the same examples for every run); the run trains on
the rest.

A non-finite loss, or one above ``divergence_factor`` times the initial
training loss, ends the run with status ``diverged``.

The loop talks to every optimizer (the registry's, ``baselines``) only
through the contract of :mod:`sweeps.runner.contract`: beside ``zero_grad``,
``step`` and its state, optional members whose defaults are written there
(the steps it skipped, the phases of its step it times, the hyperparameters
it adapts itself, whether it communicates over the ranks itself, its hooks).

What happens to a run directory that already holds a run:

- a finished run (status ok, diverged or stopped) is never replaced:
  ``resume=True`` returns it (if it was made with the same config), without
  it the run is refused (:class:`RunExists`);
- a failed or interrupted run is continued from its checkpoint with
  ``resume=True``; without it the run is refused while its checkpoint is
  there (:class:`RunExists`), and started afresh where there is none.

Everything that can refuse a run (the config, the data, the model, the
optimizer's own checks, the checkpoint) is checked before the first write,
so a refused run leaves the directory as it was. The CLI names each run
directory after its config (:func:`config_digest`), so different configs
never share one and the same command finds its own again.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from baselines import make_optimizer
from baselines.registry import cost_knobs
from sweeps import interrupts, schema
from sweeps.runner import contract, run_directory
from sweeps.runner.budget import (
    CALIBRATION_WARMUP,
    PACE_TOLERANCE,
    Calibration,
    CalibrationSkipped,
    Horizon,
    lr_factor,
    pace,
    run_threads,
)
from sweeps.runner.calibration import calibrate_run
from sweeps.runner.config import RunConfig, run_identity
from sweeps.runner.data import Dataset, DataShape, data_shape, load_dataset
from sweeps.runner.precision import forward, optimizer_hparams
from sweeps.runner.ranks import Ranks
from sweeps.runner.workloads import Workload, build_model, get_workload

__all__ = [
    "BUDGET_PERCENT",
    "FINISHED",
    "OffPace",
    "RunExists",
    "RunResult",
    "check_builds",
    "check_data_parallel",
    "check_fits_data",
    "check_optimizer_takes_model",
    "check_run",
    "loss_text",
    "record_rank_failure",
    "train",
]

FINISHED = schema.FINISHED  # statuses of a run that is over; "failed" can be resumed
BUDGET_PERCENT = "budget_percent"  # in the rows given to on_evaluation
MIN_PACE_STEPS = 10  # the pace of fewer steps says more about first-step allocations than about the machine


class RunExists(ValueError):
    """The run directory holds a finished run that a fresh run would replace."""


class OffPace(UserWarning):
    """A time-budget run's steps cost more (or less) than its calibration priced them: it will not train for
    its budget, and the report will not count it as an equal-time run."""


def loss_text(value: float | None) -> str:
    """A loss of a summary for a one-line message (None: it was not finite)."""
    return "not finite" if value is None else f"{value:.6g}"


@dataclasses.dataclass
class RunResult:
    """What a run ended with (the content of summary.json) and its history."""

    run_dir: pathlib.Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def status(self) -> str:
        return self.summary["status"]


class _Diverged(Exception):
    pass


def train(
    config: RunConfig,
    resume: bool = False,
    on_evaluation: Callable[[dict[str, Any]], bool | None] | None = None,
    progress: bool | None = None,
    data: Dataset | None = None,
    resume_stopped: bool = False,
) -> RunResult:
    """Train one run and write its run directory.

    Args:
        config: the run.
        resume: continue from the run directory's checkpoint if there is one,
            and return a finished run as it is (both only for the same
            config). Without it a finished run, or an unfinished one with a
            checkpoint, is refused (never replaced).
        on_evaluation: called with each evaluation row after the first, and
            its ``budget_percent`` (how much of the run's steps are done, 0..100:
            what sweeps compare trials of different step counts at);
            returning True stops the run early (status "stopped"), as a
            sweep's pruner does.
        progress: show a progress bar (default: when stderr is a terminal).
        data: an already loaded data set (sweeps load it once per worker).
        resume_stopped: with ``resume``, continue a run that ended "stopped"
            from its checkpoint instead of returning it: Ray Tune ends the
            trials of an interrupted experiment as it ends those its scheduler
            stops, but starts only the former again.

    Raises:
        ValueError: a bad config. RunExists: ``config.out`` holds a finished
            run, or an unfinished one with a checkpoint, and ``resume`` is
            False. sweeps.runner.run_directory.DamagedRecord: a record of the run to
            resume or return cannot be read.
            sweeps.runner.data.DataUnavailable: missing data. Each before anything
            is written.
        sweeps.interrupts.Interrupted: a signal stopped the run, after it
            checkpointed at its last step and summary.json recorded it as interrupted.
        Any exception from training, after summary.json records it as failed.
    """
    config.validate()
    # A data-parallel rank keeps the share of the cores its launcher gave it.
    threads = config.threads or (torch.get_num_threads() if Ranks().many else None)
    with run_threads(threads):
        return _train(config, resume, on_evaluation, progress, data, resume_stopped)


def _train(
    config: RunConfig, resume: bool, on_evaluation, progress: bool | None, data: Dataset | None, resume_stopped: bool
) -> RunResult:
    finished, checkpoint = _check_run_directory(config, resume, resume_stopped)
    if finished is not None:
        return finished
    run_dir = pathlib.Path(config.out)
    metrics_path = run_dir / run_directory.METRICS
    damage = run_directory.metrics_damage(metrics_path, checkpoint["metrics"]) if checkpoint is not None else None
    run = _Run(config, run_dir, data, checkpoint)  # may refuse too: nothing is written before this
    run.open_records()
    if damage is not None and run.ranks.writes:
        warnings.warn(
            run_directory.RecordRebuilt(f"{metrics_path} {damage}; rebuilt it from the checkpoint's rows"), stacklevel=2
        )
    with interrupts.deferred():  # a signal ends the step under way first (the loop checks after each step)
        try:
            status = run.loop(on_evaluation, progress)
        except KeyboardInterrupt as err:
            run.write_summary(schema.INTERRUPTED, signal=interrupts.signal_name(getattr(err, "signum", 2)))
            raise
        except BaseException as err:
            run.write_summary(schema.FAILED, error=f"{type(err).__name__}: {err}")
            raise
        summary = run.write_summary(status)
    return RunResult(run_dir, summary, list(run.rows))


def _check_run_directory(
    config: RunConfig, resume: bool, resume_stopped: bool = False
) -> tuple[RunResult | None, dict | None]:
    """What is in the run directory, checked against ``resume``: (the finished run to return, None) or
    (None, the checkpoint to continue from or None). Writes nothing.

    Raises:
        ValueError, RunExists, DamagedRecord: as :func:`train`.
    """
    config.validate()
    run_dir = pathlib.Path(config.out)
    finished = _finished_run(run_dir, config, resume, resume_stopped)
    if finished is not None:
        return finished, None
    if not resume and (run_dir / run_directory.CHECKPOINT).is_file():
        raise RunExists(
            f"{run_dir} holds an unfinished run with a checkpoint (interrupted, or failed), which a new run would "
            "replace; use --resume (resume=True in Python) to continue it, or remove that directory to start afresh"
        )
    return None, _checkpoint_to_resume(run_dir, config) if resume else None


def check_run(config: RunConfig, resume: bool = False) -> RunResult | None:
    """Refuse, before any process of a data-parallel run starts, what :func:`train` would refuse on every rank
    alike: the config, the run directory (a finished run, or a checkpoint without ``resume``), the data, and
    the model and optimizer's own checks (built once on the CPU). Returns the finished run that ``train``
    would return (with ``resume``), or None. Writes nothing.

    What depends on the ranks (the batch shards, an optimizer's checks of its process group) is still
    checked by each rank.
    """
    finished, _ = _check_run_directory(config, resume)
    if finished is not None:
        return finished
    data = check_fits_data(config).with_validation(config.valid_fraction)
    check_builds(config, data.shape)
    return None


def check_builds(config: RunConfig, shape: DataShape | None = None) -> None:
    """Refuse (ValueError) a config whose optimizer refuses its workload's model (the exact solve on a
    convolution, …): :func:`check_optimizer_takes_model`. ``shape``: the data's (default: from its name, no
    file read)."""
    shape = shape if shape is not None else data_shape(config.data)
    check_optimizer_takes_model(config.workload, shape, config.width_mult, config.depth_mult, config.optimizer,
                                config.hparams, config.precision)  # fmt: skip


def check_optimizer_takes_model(
    workload: str, shape: DataShape, width_mult: float, depth_mult: int, optimizer: str, hparams: dict,
    precision: str,
) -> None:  # fmt: skip
    """Build the workload's model and the optimizer on it once, on the CPU: the optimizer's own refusals
    (ValueError) come out before anything runs. Leaves the caller's random state and the model unhooked."""
    spec = get_workload(workload)
    with torch.random.fork_rng(devices=[]):
        model = build_model(spec, shape, width_mult, depth_mult, torch.device("cpu"))
        built = make_optimizer(
            optimizer, model, loss=spec.loss_kind, **optimizer_hparams(optimizer, hparams, precision)
        )
    contract.remove_hooks(built)


def record_rank_failure(run_dir: pathlib.Path, error: str, world_size: int) -> None:
    """Record ``error``, a failing rank's own cause, as what ended the data-parallel run in ``run_dir``.

    Rank 0 writes summary.json, but when another rank fails first, rank 0 only sees its collectives fail
    ("Connection closed by peer") and records that; the parent of the ranks knows which rank failed and why
    (:func:`sweeps.runner.ranks.root_cause`). Where rank 0 itself was killed before it could write one, the
    summary says only that (status, error, world size). Nothing is written where the run has no records yet,
    or over a finished run's summary.
    """
    path = run_dir / run_directory.SUMMARY
    if path.is_file():
        summary = run_directory.read_json(path)
        if summary.get("status") in FINISHED:
            return
        summary.pop("signal", None)
    elif (run_dir / run_directory.CONFIG).is_file():
        summary = {"world_size": world_size}
    else:
        return
    run_directory.write_json(path, {**summary, "status": schema.FAILED, "error": error})


def _finished_run(
    run_dir: pathlib.Path, config: RunConfig, resume: bool, resume_stopped: bool = False
) -> RunResult | None:
    """The finished run in ``run_dir`` if ``resume`` asks for it; None if there is none (or it ended "stopped"
    and ``resume_stopped`` continues it).

    Raises:
        RunExists: a finished run is there and ``resume`` is False.
        ValueError: it was made with another config.
        DamagedRecord: one of its files cannot be read, or its metrics.csv
            lacks rows.
    """
    summary_path = run_dir / run_directory.SUMMARY
    if not summary_path.is_file():
        return None
    summary = run_directory.read_json(summary_path)
    status = summary.get("status")
    if status not in FINISHED or (resume and resume_stopped and status == schema.STOPPED):
        return None
    if not resume:
        raise RunExists(
            f"{run_dir} holds a finished run (status {status}), which a new run would replace; use --resume "
            "(resume=True in Python) to get it back, or remove that directory to run it again"
        )
    _check_same_config(
        run_directory.read_json(run_dir / run_directory.CONFIG), config, f"The finished run in {run_dir}"
    )
    metrics_path = run_dir / run_directory.METRICS
    history = run_directory.read_history(metrics_path)
    try:
        horizon, steps = Horizon(**summary["horizon"]), summary["steps"]
    except (KeyError, TypeError) as err:
        raise run_directory.DamagedRecord(
            f"{summary_path} has no horizon or steps ({err}); {run_directory.RUN_AGAIN}"
        ) from None
    _check_evaluations(
        history, horizon, steps, f"{metrics_path} of the finished run", run_directory.RUN_AGAIN, ends_with_row=True
    )
    return RunResult(run_dir, summary, history)


def _checkpoint_to_resume(run_dir: pathlib.Path, config: RunConfig) -> dict | None:
    """The checkpoint in ``run_dir``, checked: its config is ``config`` and it
    holds the metrics rows of every evaluation up to its own step; None if there is none."""
    path = run_dir / run_directory.CHECKPOINT
    if not path.is_file():
        return None
    checkpoint = run_directory.load_checkpoint(path)
    if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["metrics"], list):
        raise run_directory.DamagedRecord(f"{path} holds no config or no metrics rows; {run_directory.START_AFRESH}")
    _check_same_config(checkpoint["config"], config, f"The checkpoint in {run_dir}")
    try:
        horizon = Horizon(**checkpoint["horizon"])
    except TypeError as err:
        raise run_directory.DamagedRecord(f"{path} holds no horizon ({err}); {run_directory.START_AFRESH}") from None
    _check_evaluations(checkpoint["metrics"], horizon, checkpoint["step"], str(path), run_directory.START_AFRESH)
    return checkpoint


def _check_evaluations(
    rows: list[dict], horizon: Horizon, last_step: int, what: str, what_to_do: str, ends_with_row: bool = False
) -> None:
    """Refuse records that lack an evaluation: one row per evaluation step up
    to ``last_step``, in order. A finished run (``ends_with_row``) that
    diverged or stopped early ends with a row at the step where it ended; a
    checkpoint that a signal made between two evaluations has none there."""
    expected = horizon.evaluation_steps(until=last_step)
    if ends_with_row and expected[-1] != last_step:
        expected.append(last_step)
    steps = [row.get("step") if isinstance(row, dict) else None for row in rows]
    if steps != expected:
        raise run_directory.DamagedRecord(
            f"{what} holds rows for steps {_ranges(steps, horizon.eval_every)}, expected "
            f"{_ranges(expected, horizon.eval_every)}; {what_to_do}"
        )


def _ranges(steps: list, every: int) -> str:
    """[0, 10, 20, 50, 60], every=10 -> "0-20 every 10, 50-60 every 10": what a damaged file holds, in a message."""
    if not steps:
        return "none"
    parts, start = [], 0
    for i in range(1, len(steps) + 1):
        ends = i == len(steps) or not (isinstance(steps[i - 1], int) and steps[i] == steps[i - 1] + every)
        if ends:
            span = f"{steps[start]}-{steps[i - 1]}" + (f" every {every}" if every > 1 else "")
            parts.append(f"{steps[start]}" if start == i - 1 else span)
            start = i
    return ", ".join(parts)


def _check_same_config(stored: dict, config: RunConfig, what: str) -> None:
    """Refuse to resume (or to return) a run made with another config.

    A run directory may be moved or copied (sweep back ends restore trials
    into new folders): where it lives is not part of what the run is.
    """
    differences = run_directory.field_differences(stored, dataclasses.asdict(config), ("there", "asked"), run_identity)
    if differences:
        raise ValueError(
            f"{what} is for another config ({'; '.join(differences)}); use another --out, or remove that run "
            "directory to run it again"
        )


def check_fits_data(config: RunConfig, data: Dataset | None = None) -> Dataset:
    """Refuse a config that its data set cannot run (a batch larger than the
    training set, a warmup longer than the run); returns the data set, loaded if not given. Sweeps call it
    before they record a study, so that a setup no trial can run is refused
    before it is stored."""
    config.validate()
    data = data if data is not None else load_dataset(config.data, config.data_dir)
    n = data.with_validation(config.valid_fraction).split_sizes()["train"]
    if config.batch_size > n:
        raise ValueError(
            f"Invalid batch_size: {config.batch_size}; the training split of {config.data!r} has {n} examples "
            f"once the validation split is held out (use --batch-size {n} or less)"
        )
    if config.time_budget is None:  # a time budget's length is known once calibrated: the run checks it then
        Horizon.of(config.budget, n // config.batch_size, config.warmup_epochs, config.eval_every)
    return data


def check_data_parallel(config: RunConfig, world_size: int) -> None:
    """Refuse a run that W ranks cannot share, naming why."""
    if config.batch_size % world_size:
        raise ValueError(
            f"Invalid batch_size: {config.batch_size} does not split into {world_size} equal shards; "
            f"use a multiple of {world_size}"
        )
    if config.optimizer == "kfac":
        raise ValueError(
            "K-FAC is not data-parallel here: its curvature factors would differ between ranks; train it in one process"
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Run:
    """The state of one run between evaluations; everything a checkpoint holds."""

    def __init__(self, config: RunConfig, run_dir: pathlib.Path, data: Dataset | None, checkpoint: dict | None):
        self.config = config
        self.run_dir = run_dir
        self.device = _device(config.device)
        self.workload: Workload = get_workload(config.workload)
        data = check_fits_data(config, data)
        self.ranks = Ranks()
        if self.ranks.many:
            check_data_parallel(config, self.ranks.size)
        self.data = data.with_validation(config.valid_fraction)
        self.steps_per_epoch = len(self.data.train_x) // config.batch_size  # the last partial batch is dropped
        self.splits = {
            split: (getattr(self.data, f"{split}_x").to(self.device), getattr(self.data, f"{split}_y").to(self.device))
            for split in ("train", "valid", "test")
        }
        # What evaluations read: the splits, or a fixed subset of each where whole splits would cost too much.
        self.evaluated = self.splits
        if self.workload.eval_examples is not None:
            subsets = self.data.evaluated(self.workload.eval_examples)
            self.evaluated = {split: (x.to(self.device), y.to(self.device)) for split, (x, y) in subsets.items()}
        self.calibration: Calibration | None = None
        self.calibration_seconds = 0.0
        if checkpoint is not None and checkpoint["calibration"] is not None:
            self.calibration = Calibration(**checkpoint["calibration"])
        elif config.step_cost is not None:  # priced beside the other optimizers of a comparison, at its knobs
            cost = config.step_cost.for_knobs(cost_knobs(config.optimizer, config.hparams))
            self.calibration = Calibration.of(config.time_budget, cost, timed_steps=0)
        elif config.time_budget is not None:
            started = time.perf_counter()
            self.calibration = self._calibrate()
            self.calibration_seconds = time.perf_counter() - started
        self.horizon = Horizon.of(
            config.budget,
            self.steps_per_epoch,
            config.warmup_epochs,
            config.eval_every,
            self.calibration.steps if self.calibration else None,
        )
        torch.manual_seed(config.seed)  # the same on every rank: the ranks start from one model
        self.model = build_model(self.workload, self.data.shape, config.width_mult, config.depth_mult, self.device)
        hparams = optimizer_hparams(config.optimizer, config.hparams, config.precision)
        self.optimizer = make_optimizer(config.optimizer, self.model, loss=self.workload.loss_kind, **hparams)
        self.net = self._data_parallel(self.model, self.optimizer)
        # The optimizer contract: what it times, and a GPU sync for honest timings.
        self.phases = ("forward_backward", *contract.step_phases(self.optimizer))
        contract.set_synchronize_timing(self.optimizer, self.device.type == "cuda")
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.step, self.wall_time, self.eval_seconds = 0, 0.0, 0.0
        self.cpu_time = 0.0  # of the training thread in its steps: the training time of a budget on the CPU clock
        self._order, self._order_epoch = None, -1  # the batch order of the current epoch
        self.initial_train_loss: float | None = None
        self.step_times: list[float] = []  # of every step up to the last evaluation
        # The steps since the last evaluation, which its next metrics row averages (a checkpoint between two
        # evaluations keeps them).
        self.interval_step_times: list[float] = []
        self.interval_phase_times: list[dict[str, float]] = []
        self.agreed_signal: int | None = None  # the signal the ranks agreed on in the last step
        self.off_pace_said = False
        self.rows: list[dict[str, Any]] = []  # the evaluations so far, as metrics.csv holds them
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            try:
                self._restore(checkpoint)
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
                raise run_directory.DamagedRecord(
                    f"{run_dir / run_directory.CHECKPOINT} does not fit this run ({run_directory.first_line(err)}); "
                    f"{run_directory.START_AFRESH}"
                ) from err
        self.metrics: run_directory.MetricsWriter | None = None
        self.started = time.perf_counter()
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _calibrate(self) -> Calibration:
        """The time budget as a step count: this config's step against the reference optimizer's, on throwaway
        models (:func:`~sweeps.runner.calibration.calibrate_run`); on several ranks, the slowest rank's.

        Steps that the throwaway optimizer skipped as non-finite cost less than real ones: a warning says so.
        """
        config = self.config
        x, y = self.splits["train"]
        shard = self.ranks.shard(config.batch_size)
        calibration = calibrate_run(
            config, self.data.shape, x, y, self.device, shard, self._data_parallel, data_parallel=self.ranks.many
        )
        if self.ranks.many:  # every rank must run the same steps: those of the slowest
            step_time = self.ranks.max(calibration.step_time_s, self.device)
            reference = self.ranks.max(calibration.reference_step_time_s, self.device)
            calibration = dataclasses.replace(
                calibration, step_time_s=step_time, steps=max(1, math.floor(config.time_budget / step_time)),
                reference_step_time_s=reference,
            )  # fmt: skip
        skipped = calibration.skipped_steps
        if skipped:
            warnings.warn(
                CalibrationSkipped(
                    f"{self.run_dir}: {skipped} of the {CALIBRATION_WARMUP + calibration.timed_steps} steps that "
                    "timed the budget were skipped as non-finite, so the step count may overrun the time budget"
                ),
                stacklevel=3,
            )
        return calibration

    def _data_parallel(self, model: torch.nn.Module, optimizer) -> torch.nn.Module:
        """What the forward pass runs: the model, in DDP on several ranks unless the optimizer communicates
        itself (the contract's ``data_parallel``, as LocoProp's)."""
        if not self.ranks.many or contract.data_parallel(optimizer):
            return model
        return torch.nn.parallel.DistributedDataParallel(model)

    @property
    def epoch(self) -> float:
        """Epochs done: passes over the training split, fractional."""
        return self.step / self.steps_per_epoch

    def open_records(self) -> None:
        """The run's first writes: config.json, and metrics.csv with the
        checkpoint's rows; a fresh run removes an earlier run's summary and
        checkpoint, a resumed one its summary (it is running again). Only rank 0 writes."""
        if not self.ranks.writes:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(self.config)
        if self.calibration is not None:
            config[schema.CALIBRATION] = self.calibration.as_dict()
        run_directory.write_json(self.run_dir / run_directory.CONFIG, config)
        (self.run_dir / run_directory.SUMMARY).unlink(missing_ok=True)
        if not self.resumed:
            (self.run_dir / run_directory.CHECKPOINT).unlink(missing_ok=True)
        columns = schema.metric_columns(
            self.workload.loss_kind == "cross_entropy", self.phases, self.adapted_columns,
            perplexity=self.workload.inputs == "tokens",
        )  # fmt: skip
        # Rows after the checkpoint's step are redone; the checkpoint's own
        # rows replace the file's, which may be damaged or cut short.
        self.metrics = run_directory.MetricsWriter(self.run_dir / run_directory.METRICS, columns, rows=self.rows)

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.ranks.writes:
            self.metrics.append(row)

    # ------------------------------------------------------------ the loop
    def loop(self, on_evaluation, progress) -> str:
        if self.initial_train_loss is None:
            row = self.evaluate(step_times=[], phase_times=[])
            self.initial_train_loss = row["train_loss"]
            self.record(row)
            if not math.isfinite(row["train_loss"]):
                return schema.DIVERGED
            self.save_checkpoint()
        bar = _progress_bar(
            progress if self.ranks.writes else False, total=self.horizon.total_steps, initial=self.step,
            desc=self._describe(),
        )  # fmt: skip
        try:
            while self.step < self.horizon.total_steps:
                x, y = self.batch(self.step)
                try:
                    seconds, phases = self.train_step(x, y)
                except _Diverged:
                    self.record(self.evaluate(self.interval_step_times, self.interval_phase_times))
                    return schema.DIVERGED
                self.interval_step_times.append(seconds)
                self.interval_phase_times.append(phases)
                bar.update(1)
                evaluated = self.horizon.evaluates_after(self.step)
                if evaluated:
                    row = self.evaluate(self.interval_step_times, self.interval_phase_times)
                    self.interval_step_times, self.interval_phase_times = [], []
                    self.record(row)
                    self._check_pace()
                    bar.set_postfix(train=f"{row['train_loss']:.4g}", valid=f"{row['valid_loss']:.4g}")
                    if not self._sane(row["train_loss"]):
                        return schema.DIVERGED
                    self.save_checkpoint()
                    progress_row = {**row, BUDGET_PERCENT: round(100 * self.step / self.horizon.total_steps)}
                    if on_evaluation is not None and on_evaluation(progress_row):
                        return schema.STOPPED
                self._stop_if_signalled(checkpointed=evaluated)
        finally:
            bar.close()
        return schema.OK

    def _stop_if_signalled(self, checkpointed: bool) -> None:
        """After a step: if a signal asks the run to stop, checkpoint at this step and raise Interrupted.

        On several ranks the signal is the one the ranks agreed on in this step's all-reduce, so every rank
        stops after the same step; in one process it is the one noted by now. A signal after the last step
        stops nothing: the run is done, and the signal is raised once its summary is written.
        """
        signum = self.agreed_signal if self.ranks.many else interrupts.pending()
        if signum is None or self.step >= self.horizon.total_steps:
            return
        interrupts.take()
        if not checkpointed:
            self.save_checkpoint()
        raise interrupts.Interrupted(signum)

    def _check_pace(self) -> None:
        """Say once (:class:`OffPace`) when the steps so far cost more than ``PACE_TOLERANCE`` more or less than
        the calibration priced them: the machine got busier or quieter, and the run will not train for its budget."""
        if self.calibration is None or self.off_pace_said or not self.ranks.writes or self.step < MIN_PACE_STEPS:
            return
        ratio = pace(self.budget_seconds, self.step, self.calibration.step_time_s)
        if abs(ratio - 1) <= PACE_TOLERANCE:
            return
        self.off_pace_said = True
        total, priced = self.horizon.total_steps, self.calibration.step_time_s
        why = "busier" if ratio > 1 else "quieter"
        clock = " (CPU time of its thread)" if self.calibration.clock == "cpu" else ""
        warnings.warn(
            OffPace(
                f"{self.run_dir}: its {self.step} steps so far took {ratio:.2f}× the {priced:.3g} s per step{clock} "
                f"that converted its budget into {total} steps (is the machine {why} than then?); it keeps its "
                f"{total} steps, so it will train for about {ratio * total * priced:.3g} s of its "
                f"{self.config.time_budget:g} s budget, and the report will not count it as an equal-time run"
            ),
            stacklevel=5,
        )

    @property
    def budget_seconds(self) -> float:
        """Training time so far on the clock of the budget (:func:`~sweeps.runner.budget.budget_clock`)."""
        return self.cpu_time if self.calibration is not None and self.calibration.clock == "cpu" else self.wall_time

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step``: each epoch visits the training split in its own seeded order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.data.train_x), generator=generator).to(self.device)
            self._order_epoch = epoch
        batch = self._order[index * self.config.batch_size : (index + 1) * self.config.batch_size]
        x, y = self.splits["train"]
        return x[batch], y[batch]

    def train_step(self, x, y) -> tuple[float, dict[str, float]]:
        horizon = self.horizon
        factor = lr_factor(self.config.schedule, self.step, horizon.total_steps, horizon.warmup_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._sync()
        started, started_cpu = time.perf_counter(), time.thread_time()
        self.optimizer.zero_grad(set_to_none=True)
        x, y = x[self.ranks.shard(len(x))], y[self.ranks.shard(len(y))]
        loss = self.workload.loss(forward(self.net, x, self.config.precision, self.device), self.workload.target(x, y))
        loss.backward()
        backward_done = time.perf_counter()
        # One sync per step (over ranks too: every rank must take the same decisions): it detects divergence,
        # and on several ranks it tells every rank whether one of them was signalled to stop.
        loss_value, self.agreed_signal = self.ranks.mean_and_signal(loss.item(), interrupts.pending(), self.device)
        if not self._sane(loss_value):
            raise _Diverged
        self.optimizer.step()
        self._sync()
        finished = time.perf_counter()
        self.wall_time += finished - started
        self.cpu_time += time.thread_time() - started_cpu
        self.step += 1
        phases = {"forward_backward": backward_done - started, **contract.last_step_seconds(self.optimizer)}
        return finished - started, phases

    def _sane(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        return self.initial_train_loss is None or loss <= self.config.divergence_factor * abs(self.initial_train_loss)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, step_times: list[float], phase_times: list[dict[str, float]]) -> dict[str, Any]:
        """The metrics row at this step: losses on the whole splits, and the mean times of the steps since the last."""
        started = time.perf_counter()
        self.model.eval()
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "wall_time_s": self.wall_time,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        for split, (x, y) in self.evaluated.items():
            total, extra = 0.0, {}
            for start in range(0, len(x), self.config.eval_batch_size):
                xb, yb = x[start : start + self.config.eval_batch_size], y[start : start + self.config.eval_batch_size]
                output = forward(self.model, xb, self.config.precision, self.device)
                target = self.workload.target(xb, yb)
                total += self.workload.loss(output, target).item() * len(xb)
                for key, value in self.workload.metrics(output, target).items():
                    extra[key] = extra.get(key, 0.0) + value
            row[f"{split}_loss"] = total / len(x)
            for key, value in extra.items():
                row[f"{split}_{key}"] = value / len(x)
            for key, value in self.workload.split_metrics(row[f"{split}_loss"]).items():
                row[f"{split}_{key}"] = value
        self.model.train()
        row[schema.STEP_TIME_COLUMN] = statistics.mean(step_times) if step_times else None
        for phase in self.phases:
            row[schema.phase_column(phase)] = statistics.mean(p[phase] for p in phase_times) if phase_times else None
        row[schema.SKIPPED_COLUMN] = contract.skipped_steps(self.optimizer)
        row.update(self.adapted_hyperparameters())
        self.step_times.extend(step_times)
        self.eval_seconds += time.perf_counter() - started
        return row

    def adapted_hyperparameters(self) -> dict[str, float]:
        return contract.adapted_hyperparameters(self.optimizer)

    @property
    def adapted_columns(self) -> tuple[str, ...]:
        return tuple(self.adapted_hyperparameters())

    # ------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        if not self.ranks.writes:
            return
        run_directory.save_checkpoint(
            self.run_dir / run_directory.CHECKPOINT,
            {
                "config": dataclasses.asdict(self.config),
                "calibration": self.calibration.as_dict() if self.calibration else None,
                "horizon": dataclasses.asdict(self.horizon),
                "step": self.step,
                "wall_time": self.wall_time,
                "cpu_time": self.cpu_time,
                "initial_train_loss": self.initial_train_loss,
                "step_times": self.step_times,
                "interval_step_times": self.interval_step_times,
                "interval_phase_times": self.interval_phase_times,
                "metrics": self.rows,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        )

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if Horizon(**checkpoint["horizon"]) != self.horizon:
            raise ValueError(
                f"its horizon {checkpoint['horizon']} is not this run's {dataclasses.asdict(self.horizon)}"
            )
        self.step = checkpoint["step"]
        self.wall_time = checkpoint["wall_time"]
        self.cpu_time = checkpoint.get("cpu_time", 0.0)  # older checkpoints: their budgets count wall time
        self.initial_train_loss = checkpoint["initial_train_loss"]
        self.step_times = list(checkpoint["step_times"])
        # Written only by a checkpoint between two evaluations (and absent from those of older versions).
        self.interval_step_times = list(checkpoint.get("interval_step_times", []))
        self.interval_phase_times = list(checkpoint.get("interval_phase_times", []))
        self.rows = list(checkpoint["metrics"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])

    # ----------------------------------------------------------- summary
    def write_summary(self, status: str, error: str | None = None, signal: str | None = None) -> dict[str, Any]:
        """Write summary.json and return what it holds: a loss that is not
        finite is None there (null in the file), as JSON has no NaN. A failed
        run records its ``error``, an interrupted one the ``signal`` that stopped it."""
        history = self.rows
        finals = history[-1] if history else {}
        kind, value = self.config.budget
        finite = lambda key: [r[key] for r in history if r.get(key) is not None and math.isfinite(r[key])]  # noqa: E731
        summary = {
            "status": status,
            "optimizer": self.config.optimizer,
            "workload": self.config.workload,
            "data": self.config.data,
            "seed": self.config.seed,
            "steps": self.step,
            "epochs": self.epoch,
            "budget": {"kind": kind, "value": value, "steps": self.horizon.total_steps},
            "horizon": dataclasses.asdict(self.horizon),
            "split_sizes": self.data.split_sizes(),
            "evaluated_sizes": {split: len(x) for split, (x, _) in self.evaluated.items()},
            **{f"final_{split}_loss": finals.get(f"{split}_loss") for split in self.splits},
            **{f"best_{split}_loss": min(finite(f"{split}_loss"), default=None) for split in self.splits},
            "train_seconds": self.wall_time,
            "train_cpu_seconds": self.cpu_time,
            "eval_seconds": self.eval_seconds,
            "calibration_seconds": self.calibration_seconds,
            "total_seconds": time.perf_counter() - self.started,
            "median_step_time_s": statistics.median(self.step_times) if self.step_times else None,
            **_peak_memory(self.device),
            "device": str(self.device),
            "versions": run_directory.versions(),
        }
        if self.calibration is not None:
            summary[schema.CALIBRATION] = self.calibration.as_dict()
        if self.workload.loss_kind == "cross_entropy":
            summary.update({f"final_{split}_error": finals.get(f"{split}_error") for split in self.splits})
        if self.workload.inputs == "tokens":
            summary.update({f"final_{split}_perplexity": finals.get(f"{split}_perplexity") for split in self.splits})
        summary["skipped_steps"] = contract.skipped_steps(self.optimizer)
        if error is not None:
            summary["error"] = error
        if signal is not None:
            summary["signal"] = signal
        summary["world_size"] = self.ranks.size
        summary = run_directory.finite_or_null(summary)
        if self.ranks.writes:
            run_directory.write_json(self.run_dir / run_directory.SUMMARY, summary)
        return summary

    def _describe(self) -> str:
        return f"{self.config.optimizer} {self.config.workload}/{self.config.data} seed {self.config.seed}"


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_max_allocated"}
    # ru_maxrss is in kilobytes on Linux; it covers the whole process.
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "process_max_rss",
    }


def _progress_bar(enabled: bool | None, **kwargs):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(disable=not enabled, unit="step", dynamic_ncols=True, leave=False, **kwargs)
