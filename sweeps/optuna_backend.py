"""Optuna back end of ``locoprop sweep`` (SPEC §8).

- Storage: a SQLite file in ``--out`` by default; any RDB URL (PostgreSQL on
  a cluster); or a journal file (``journal:PATH``, or a path ending in
  ``.log``/``.journal``).
- The same command again continues the same study (``load_if_exists``)
  until ``trials`` trials have *finished* (complete or pruned): after a
  crash it runs the missing ones, never more. Several workers may run the
  same command against one storage.
- RDB storages (SQLite included) keep a heartbeat: a trial whose worker died
  becomes stale after ``grace_period`` seconds, is marked failed and is
  retried once with the same parameters; the retry resumes the dead trial's
  run directory from its last epoch checkpoint, so no finished work is lost.
- Each epoch's loss is reported; the pruner (median by default, Hyperband
  on request) may stop a trial, and a diverged run becomes a pruned trial
  with status "diverged", never a silent failure.
- A password in the storage URL is never printed, logged or exported.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
import time
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from sweeps.results import export_results, mask_url
from sweeps.spaces import SearchSpace
from sweeps.train import RunConfig, train

__all__ = ["make_storage", "run_optuna_sweep"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNERS = ("median", "hyperband", "none")


def make_storage(url: str | None, out: pathlib.Path, heartbeat_interval: int = 60, grace_period: int = 120):
    """An Optuna storage from ``--storage`` (None: SQLite file in ``out``)."""
    if url is None:
        url = f"sqlite:///{(out / 'optuna.db').resolve()}"
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = pathlib.Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    if "://" not in url:
        raise ValueError(
            f"Invalid storage {mask_url(url)!r}: expected an RDB URL (sqlite:///FILE, postgresql://USER@HOST/DB) "
            "or a journal file (journal:PATH)"
        )
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period, **_retry_callback()
            )
    except Exception as err:  # SQLAlchemy and drivers raise many types; the URL is what matters
        message = str(err).replace(url, mask_url(url))
        raise ValueError(f"Cannot open storage {mask_url(url)}: {type(err).__name__}: {message}") from None


def _retry_callback() -> dict:
    # Optuna ≥ 2.8 (experimental) names it heartbeat_stale_trial_callback;
    # older releases only have failed_trial_callback.
    parameters = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    if "heartbeat_stale_trial_callback" in parameters:
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}


def _original_number(trial) -> int:
    """The number of the trial this one retries (its own number if none)."""
    frozen = trial if isinstance(trial, optuna.trial.FrozenTrial) else trial.study._storage.get_trial(trial._trial_id)
    callbacks = [
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None),
        optuna.storages.RetryFailedTrialCallback,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for callback in filter(None, callbacks):
            number = callback.retried_trial_number(frozen)
            if number is not None:
                return number
    return frozen.number


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"Invalid pruner: {name!r}; expected one of {', '.join(PRUNERS)}")


def _suggest(trial: optuna.Trial, name: str, dist) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def run_optuna_sweep(
    base: RunConfig,
    space: SearchSpace,
    *,
    study_name: str,
    out: pathlib.Path,
    trials: int,
    storage: str | None = None,
    metric: str = "train_loss",
    pruner: str = "median",
    sampler_seed: int = 0,
    heartbeat_interval: int = 60,
    grace_period: int = 120,
    progress: bool | None = None,
) -> pathlib.Path:
    """Run (or continue) the study until ``trials`` trials have finished; export its table.

    Returns the path of the exported CSV table.
    """
    if trials < 1:
        raise ValueError(f"Invalid trials: {trials}; expected ≥ 1")
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_object = make_storage(storage, out, heartbeat_interval, grace_period)
    # Only RDB storages keep heartbeats; with a journal file a dead worker's
    # trial stays "running", so there only finished trials are counted.
    has_heartbeat = isinstance(storage_object, optuna.storages.RDBStorage)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_object,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=_pruner(pruner),
        direction="minimize",
        load_if_exists=True,
    )
    _check_same_sweep(study, base, space)
    print(f"optuna study {study_name!r} in {mask_url(storage) if storage else out / 'optuna.db'}", flush=True)

    def objective(trial: optuna.Trial) -> float:
        params = {name: _suggest(trial, name, dist) for name, dist in space.distributions.items()}
        number = _original_number(trial)
        run_dir = out / "trials" / f"trial-{number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        config = dataclasses.replace(
            base, optimizer=space.optimizer, hparams=space.to_hparams(params), out=str(run_dir)
        )

        def on_epoch(row: dict) -> bool:
            value = row[metric]
            if math.isfinite(value):
                trial.report(value, step=int(row["epoch"]))
            return trial.should_prune()

        result = train(config, resume=True, on_epoch=on_epoch, progress=progress)
        value = result.summary.get(f"final_{metric}")
        status = {"ok": "ok", "stopped": "pruned", "diverged": "diverged"}[result.status]
        trial.set_user_attr("status", status)
        print(f"trial {trial.number}: {status}, final {metric} {value} ({_short(config.hparams)})", flush=True)
        if status != "ok":
            raise optuna.TrialPruned(f"run {status}")
        return value

    while True:
        if has_heartbeat:
            # Trials of dead workers become stale, fail, and are queued again.
            # (study._storage is Optuna's caching wrapper, not the RDBStorage.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished = sum(s in FINISHED for s in states)
        running = sum(s == TrialState.RUNNING for s in states) if has_heartbeat else 0
        waiting = sum(s == TrialState.WAITING for s in states)
        if finished >= trials:
            break
        if finished + running >= trials and not waiting:
            # Other workers (or dead ones, until their heartbeat goes stale)
            # hold the remaining trials: wait for them.
            print(f"waiting for {running} running trial(s) held by other workers", flush=True)
            time.sleep(max(1, heartbeat_interval))
            continue
        study.optimize(objective, n_trials=1)
    return export_results(optuna_rows(study, space, base), out)


def _check_same_sweep(study: optuna.Study, base: RunConfig, space: SearchSpace) -> None:
    identity = {"optimizer": space.optimizer, "workload": base.workload, "data": base.data, "epochs": base.epochs}
    saved = study.user_attrs.get("sweep")
    if saved is None:
        study.set_user_attr("sweep", identity)
    elif saved != identity:
        raise ValueError(f"Study {study.study_name!r} is a sweep of {saved}, not {identity}; choose another --study")


def optuna_rows(study: optuna.Study, space: SearchSpace, base: RunConfig) -> list[dict]:
    """One record per finished trial (a retried trial appears once)."""
    trials = study.get_trials(deepcopy=False)
    retried = {_original_number(t) for t in trials if _original_number(t) != t.number}
    rows = []
    for trial in trials:
        if trial.state not in FINISHED and not (trial.state == TrialState.FAIL and trial.number not in retried):
            continue
        status = trial.user_attrs.get("status") or ("failed" if trial.state == TrialState.FAIL else "pruned")
        rows.append(
            {
                "trial": trial.number,
                "run_dir": trial.user_attrs.get("run_dir"),
                "status": status,
                "optimizer": space.optimizer,
                "workload": base.workload,
                "data": base.data,
                "seed": base.seed,
                "hparams": space.to_hparams(trial.params),
            }
        )
    return rows


def _short(hparams: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items())
