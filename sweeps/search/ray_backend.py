"""Ray Tune back end of ``locoprop sweep`` (SPEC §8).

``ray.tune.Tuner`` over ``tune.with_resources`` (CPUs and fractional GPUs
per trial), Optuna's TPE sampler through ``OptunaSearch`` (the same search
space file and the same per-trial seeding as the Optuna back end),
``ASHAScheduler`` on the share of the budget done, one ``tune.report`` with a checkpoint per
evaluation, and ``FailureConfig`` retries that resume a trial from its last
checkpoint. On this machine by default, on an existing cluster with
``--address`` (or ``RAY_ADDRESS``).

With ``workers_per_trial`` W > 1 (``--workers-per-trial``) a trial trains
data-parallel (SPEC §11) on W Ray Train workers, as Ray Train V2 runs Train
inside Tune: the Tune function only drives a ``TorchTrainer`` (it reserves
nothing; the workers reserve the trial's CPUs and GPUs, shared equally, in
their own placement group), Ray Train makes the process group (gloo on CPU,
NCCL on GPU) in which every worker runs the same ``train()``, and
``TuneReportCallback`` passes rank 0's report of each evaluation on to Tune,
so that ASHA stops trials as before. Tune gets no checkpoint then: every
rank resumes from rank 0's checkpoint in the trial's run directory, which
must be on storage all workers share. The study records W in its setup.

A study lives in ``--out``/STUDY (shared storage on a cluster):

- ``sweep.json``: its setup (:func:`sweeps.search.results.sweep_setup`; another
  setup is refused) and its parts;
- ``part-0``, ``part-1``, …: one Tune experiment per part. The first part
  runs the trials asked for; a later command with a larger ``--trials``
  adds a part with the missing ones, whose searcher is restored from the
  previous part so that it knows every earlier result. Running the same
  command again restores every unfinished part (``Tuner.restore``);
- ``trials/TRIAL_ID``: each trial's run directory (config, metrics,
  checkpoint), where a restarted or restored trial resumes;
- ``sweep_results.csv`` and ``.parquet``: the study's results table.

Ctrl-C or SIGTERM (a scheduler's stop) ends Tune's run as Ray's own Ctrl-C
does: Tune saves the experiment and stops its trials. The sweep then raises
:class:`~sweeps.interrupts.Interrupted` (the CLI says in one line that the
same command continues: exit 130, or 143), and that command restores the
experiment, whose interrupted trials continue their runs
(:func:`sweeps.search.ray_trial.train_reporting`). A second signal stops at once.

Only the current ``ray.tune`` API is used (``tune.RunConfig`` etc., Ray ≥ 2.40).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal

from sweeps import interrupts
from sweeps.extras import require
from sweeps.runner import run_directory
from sweeps.runner.config import RunConfig
from sweeps.runner.train import BUDGET_PERCENT, check_data_parallel
from sweeps.search.checks import check_sweep
from sweeps.search.ray_trial import train_reporting, trial_config
from sweeps.search.results import check_same_setup, export_results, sweep_setup
from sweeps.search.search_space import SearchSpace, TrialSeededSampler

__all__ = ["run_ray_sweep"]

STATE_FILE = "sweep.json"
TRIALS_DIR = "trials"
WORKERS = "workers_per_trial"  # in the study's setup
DRIVER_MEMORY = 2**20  # bytes reserved by the Tune function of a trial on several workers, which only drives them


def locoprop_trial(params: dict, *, base: dict, space_file: str, metric: str, trials_dir: str) -> None:
    """One trial, run inside a Ray worker: train() in ``trials_dir/TRIAL_ID`` with a report per evaluation."""
    from ray import tune

    run_dir = pathlib.Path(trials_dir) / tune.get_context().get_trial_id()
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None and not (run_dir / run_directory.CHECKPOINT).exists():
        # Restarted on a node that cannot see the run directory: continue from Ray's copy of it.
        checkpoint.to_directory(str(run_dir))
    config = trial_config(params, base, space_file, run_dir)

    def send(metrics: dict) -> bool:
        try:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(run_dir)))
        except SystemExit:  # how tune.report ends a trial that Tune stops: let the run end and record it
            return True
        return False

    train_reporting(config, metric, send)


def run_ray_sweep(
    base: RunConfig,
    space: SearchSpace,
    *,
    study_name: str,
    out: pathlib.Path,
    trials: int,
    address: str | None = None,
    metric: str = "valid_loss",
    cpus_per_trial: float | None = None,
    gpus_per_trial: float = 0.0,
    sampler_seed: int | None = 0,
    num_cpus: int | None = None,
    workers_per_trial: int = 1,
) -> pathlib.Path:
    """Run, restore or extend the study ``out/study_name`` until it has ``trials`` trials; export its table.

    A trial reserves ``cpus_per_trial`` CPUs (default: one per worker) and
    ``gpus_per_trial`` GPUs; with ``workers_per_trial`` > 1 it trains
    data-parallel on that many Ray Train workers, which share them equally.

    Raises:
        ValueError: bad arguments, or a study made with another setup.
        KeyboardInterrupt: Tune was stopped (Ctrl-C) before its trials
            finished; the same command continues.
        RuntimeError: trials failed (after the table of the others is written).
        MissingExtra: Ray Tune is not installed (the 'ray' extra).
    """
    require("ray.tune", "ray")  # before anything is written
    import ray

    check_sweep(base, study_name=study_name, trials=trials, metric=metric, sampler_seed=sampler_seed,
                own_checks=lambda: _cpus_per_trial(workers_per_trial, cpus_per_trial, gpus_per_trial))  # fmt: skip
    cpus_per_trial = _cpus_per_trial(workers_per_trial, cpus_per_trial, gpus_per_trial)
    if workers_per_trial > 1:
        check_data_parallel(dataclasses.replace(base, optimizer=space.optimizer), workers_per_trial)
    study_dir = out.resolve() / study_name
    state = _plan_parts(study_dir, {**sweep_setup(base, space), WORKERS: workers_per_trial}, trials)

    started_here = _start_ray(address, num_cpus)
    try:
        trainable = _trainable(base, space, study_dir, metric, workers_per_trial, cpus_per_trial, gpus_per_trial)
        concurrent = _concurrent_trials(workers_per_trial, cpus_per_trial, gpus_per_trial)
        grids = _fit_parts(trainable, space, study_dir, state["parts"], metric, sampler_seed, concurrent)
    finally:
        if started_here:
            ray.shutdown()
    rows = [row for grid in grids for row in _ray_rows(grid, study_dir)]
    table = export_results(rows, study_dir)
    failed = sum(grid.num_errors for grid in grids)
    if failed:
        raise RuntimeError(
            f"{failed} of {sum(len(grid) for grid in grids)} trials failed (see error.txt in their folders under "
            f"{study_dir}); the others are in {table}; the same command retries the failed ones"
        )
    return table


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to the cluster at ``address`` (default: RAY_ADDRESS), else start a local Ray of ``num_cpus`` CPUs;
    whether Ray was started here, to be shut down after (not when it was running already)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _cpus_per_trial(workers: int, cpus_per_trial: float | None, gpus_per_trial: float) -> float:
    """The CPUs a trial reserves (default: one per worker), refusing resources its workers cannot use."""
    _check_workers(workers, gpus_per_trial)
    cpus_per_trial = float(workers) if cpus_per_trial is None else cpus_per_trial
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ValueError(f"Invalid resources per trial: {cpus_per_trial} CPU, {gpus_per_trial} GPU")
    return cpus_per_trial


def _check_workers(workers: int, gpus_per_trial: float) -> None:
    """Refuse a worker count, or GPUs that its workers cannot share, naming the flag."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"Invalid --workers-per-trial: {workers!r}; expected an integer ≥ 1")
    per_worker = gpus_per_trial / workers
    if workers > 1 and gpus_per_trial and (per_worker < 1 or per_worker != int(per_worker)):
        # NCCL refuses two ranks on one GPU.
        raise ValueError(
            f"Invalid --gpus-per-trial: {gpus_per_trial:g} for --workers-per-trial {workers}; each worker needs whole "
            f"GPUs of its own: use --gpus-per-trial {workers} (one each)"
        )


def _plan_parts(study_dir: pathlib.Path, setup: dict, trials: int) -> dict:
    """The study's state (:func:`_load_state`) with a new part of the trials still missing to reach
    ``trials``, if any, written to its sweep.json; a smaller ``trials`` removes none."""
    state = _load_state(study_dir, setup)
    planned = sum(part["trials"] for part in state["parts"])
    if trials > planned:
        if planned:
            print(f"extending Ray Tune study {study_dir} from {planned} to {trials} trials", flush=True)
        state["parts"].append({"name": f"part-{len(state['parts'])}", "trials": trials - planned})
    elif trials < planned:
        print(f"Ray Tune study {study_dir} already has {planned} trials; a smaller --trials removes none", flush=True)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return state


def _load_state(study_dir: pathlib.Path, setup: dict) -> dict:
    """The study's sweep.json (setup and parts), checked against ``setup``; a new one if there is none."""
    path = study_dir / STATE_FILE
    if not path.exists():
        if (study_dir / "tuner.pkl").exists():
            raise ValueError(
                f"{study_dir} is a Ray Tune experiment made by an older locoprop (no {STATE_FILE}); "
                "choose another --study"
            )
        return {"setup": setup, "parts": []}
    state = json.loads(path.read_text())
    state["setup"].setdefault(WORKERS, 1)  # recorded since --workers-per-trial; before it, every trial had one
    check_same_setup(state["setup"], setup, f"Ray Tune study {study_dir}")
    return state


def _trainable(base, space, study_dir, metric, workers: int, cpus_per_trial: float, gpus_per_trial: float):
    """The Tune trainable of a trial and the resources it reserves: on one worker all of the trial's; on several
    none (the Tune function only drives them), since Ray Train reserves its workers' own."""
    from ray import tune

    common = dict(
        base=dataclasses.asdict(base), space_file=str(pathlib.Path(space.source).resolve()), metric=metric,
        trials_dir=str(study_dir / TRIALS_DIR),
    )  # fmt: skip
    if workers == 1:
        return tune.with_resources(
            tune.with_parameters(locoprop_trial, **common), {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        )
    from sweeps.search.ray_workers import WorkersTrial

    trainable = tune.with_parameters(WorkersTrial, **common, workers=workers, cpus=cpus_per_trial, gpus=gpus_per_trial)
    # Tune schedules no trial that asks for nothing: the trial's actor asks for no CPU, only a token of memory.
    return tune.with_resources(trainable, {"cpu": 0, "memory": DRIVER_MEMORY})


def _concurrent_trials(workers: int, cpus_per_trial: float, gpus_per_trial: float) -> int | None:
    """How many trials on several workers the cluster fits at once (None: a trial on one worker, which Tune
    schedules on its own resources). Without this cap every trial's Tune function would start, and those
    whose workers do not fit would wait for them."""
    import ray

    if workers == 1:
        return None
    available = ray.cluster_resources()
    fits = [available.get("CPU", 0.0) / cpus_per_trial]
    if gpus_per_trial:
        fits.append(available.get("GPU", 0.0) / gpus_per_trial)
    return max(1, math.floor(min(fits)))


def _fit_parts(trainable, space, study_dir, parts, metric, sampler_seed, concurrent: int | None) -> list:
    """Run or restore every part in order; the ResultGrid of each."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    grids = []
    for index, part in enumerate(parts):
        part_dir = study_dir / part["name"]
        if tune.Tuner.can_restore(str(part_dir)):
            print(f"restoring Ray Tune experiment {part_dir}", flush=True)
            tuner = tune.Tuner.restore(str(part_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            searcher = OptunaSearch(
                space.distributions, metric=metric, mode="min", sampler=TrialSeededSampler(sampler_seed)
            )
            if index > 0:
                # The new part's proposals follow every earlier result (and new trial numbers, hence new seeds).
                searcher.restore_from_dir(str(study_dir / parts[index - 1]["name"]))
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=ASHAScheduler(time_attr=BUDGET_PERCENT, max_t=100, grace_period=10),
                    num_samples=part["trials"],
                    max_concurrent_trials=concurrent,
                    metric=metric,
                    mode="min",
                ),
                run_config=tune.RunConfig(
                    name=part["name"],
                    storage_path=str(study_dir),
                    failure_config=tune.FailureConfig(max_failures=1),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    verbose=1,
                ),
            )
        with _EndsTuneOnSignals() as stop:
            grid = tuner.fit()
        grids.append(grid)
        if stop.signum is not None or len(grid) < part["trials"] or grid.num_terminated + grid.num_errors < len(grid):
            print(f"interrupted: the same command continues Ray Tune study {study_dir}", flush=True)
            raise interrupts.Interrupted(stop.signum or signal.SIGINT)
    return grids


class _EndsTuneOnSignals:
    """While Tune runs (``Tuner.fit``): SIGINT and SIGTERM end its run as Ray's own Ctrl-C does (Tune saves
    the experiment and stops its trials; SIGUSR1 asks for that), and are remembered in ``signum``; a second
    one raises Interrupted at once. Tune's own lines about it (its "Tuner.restore" advice) are left out:
    the CLI says what continues the sweep."""

    DISABLE_TUNES_HANDLER = "TUNE_DISABLE_SIGINT_HANDLER"

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}
        self.quiet = _QuietTuneInterrupt()

    def __enter__(self) -> _EndsTuneOnSignals:
        if interrupts.in_main_thread():
            self.environment = os.environ.get(self.DISABLE_TUNES_HANDLER)
            os.environ[self.DISABLE_TUNES_HANDLER] = "1"
            self.previous = {s: signal.signal(s, self._on_signal) for s in interrupts.SIGNALS}
            self.previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)  # restored after: Tune installs its own
            logging.getLogger("ray.tune.tune").addFilter(self.quiet)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        tunes = signal.getsignal(signal.SIGUSR1)
        if self.signum is not None or not callable(tunes) or tunes is self.previous.get(signal.SIGUSR1):
            raise interrupts.Interrupted(signum)  # a second signal, or Tune is not running (yet)
        self.signum = signum
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc) -> None:
        if not self.previous:
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.environment is None:
            os.environ.pop(self.DISABLE_TUNES_HANDLER, None)
        else:
            os.environ[self.DISABLE_TUNES_HANDLER] = self.environment
        logging.getLogger("ray.tune.tune").removeFilter(self.quiet)


class _QuietTuneInterrupt(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Stop signal received", "Experiment has been interrupted"))


def _ray_rows(grid, study_dir: pathlib.Path) -> list[dict]:
    """One record per trial that reported at least once."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        if "trial_id" not in metrics:
            continue  # failed before its first report: nothing to read
        if result.error is not None:
            status = "failed"
        elif metrics.get("status") == "diverged":
            status = "diverged"
        elif metrics.get(BUDGET_PERCENT, 0) < 100:
            status = "pruned"  # stopped early by ASHA
        else:
            status = "ok"
        trial_id = metrics["trial_id"]
        rows.append({"trial": trial_id, "run_dir": str(study_dir / TRIALS_DIR / trial_id), "status": status})
    return rows
