"""Ray Tune back end of ``locoprop sweep`` (SPEC §8).

``ray.tune.Tuner`` over ``tune.with_resources`` (CPUs and fractional GPUs
per trial), Optuna's TPE sampler through ``OptunaSearch`` (the same search
space file as the Optuna back end), ``ASHAScheduler`` on the epoch, one
``tune.report`` with a checkpoint (the trial's run directory) per epoch, and
``FailureConfig`` retries that resume a trial from its last checkpoint.
On this machine by default, on an existing cluster with ``--address`` (or
``RAY_ADDRESS``); the experiment lives under ``--out`` (shared storage on a
cluster), and running the same command again restores it
(``Tuner.can_restore`` / ``Tuner.restore``). Only the current ``ray.tune``
API is used (``tune.RunConfig`` etc., Ray ≥ 2.40).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tempfile

from sweeps.results import export_results
from sweeps.spaces import SearchSpace, load_space
from sweeps.train import RunConfig, train

__all__ = ["run_ray_sweep"]


def locoprop_trial(params: dict, *, base: dict, space_file: str, metric: str) -> None:
    """One trial, run inside a Ray worker: train() with a report per epoch."""
    from ray import tune

    space = load_space(path=space_file)
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="locoprop-trial-"))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        # Restarted after a failure (or on restore): continue from the last epoch.
        checkpoint.to_directory(str(run_dir))
    config = RunConfig(
        **{**base, "optimizer": space.optimizer, "hparams": space.to_hparams(params), "out": str(run_dir)}
    )

    def report(row: dict, status: str) -> None:
        metrics = {k: v for k, v in row.items() if v is not None}
        value = metrics.get(metric)
        # Schedulers and searchers need a number: a diverged loss counts as +inf.
        metrics[metric] = value if value is not None and math.isfinite(value) else math.inf
        metrics["status"] = status
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(run_dir)))

    result = train(config, resume=True, on_epoch=lambda row: report(row, "running"), progress=False)
    if result.status != "ok":
        report(result.history[-1], result.status)


def run_ray_sweep(
    base: RunConfig,
    space: SearchSpace,
    *,
    study_name: str,
    out: pathlib.Path,
    trials: int,
    address: str | None = None,
    metric: str = "train_loss",
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    sampler_seed: int = 0,
    num_cpus: int | None = None,
) -> pathlib.Path:
    """Run or restore the Ray Tune experiment ``out/study_name``; export its table."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    if trials < 1:
        raise ValueError(f"Invalid trials: {trials}; expected ≥ 1")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ValueError(f"Invalid resources per trial: {cpus_per_trial} CPU, {gpus_per_trial} GPU")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = out / study_name
    address = address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(
                locoprop_trial, base=dataclasses.asdict(base), space_file=str(pathlib.Path(space.source).resolve()),
                metric=metric,
            ),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
        )  # fmt: skip
        if tune.Tuner.can_restore(str(experiment)):
            print(f"restoring Ray Tune experiment {experiment}", flush=True)
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=OptunaSearch(space.distributions, metric=metric, mode="min", seed=sampler_seed),
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=1),
                    num_samples=trials,
                    metric=metric,
                    mode="min",
                ),
                run_config=tune.RunConfig(
                    name=study_name,
                    storage_path=str(out),
                    failure_config=tune.FailureConfig(max_failures=1),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    verbose=1,
                ),
            )
        grid = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    return export_results(_ray_rows(grid, space, base), out)


def _ray_rows(grid, space: SearchSpace, base: RunConfig) -> list[dict]:
    rows = []
    for index, result in enumerate(grid):
        metrics = result.metrics or {}
        epochs_done = metrics.get("epoch", 0)
        if result.error is not None:
            status = "failed"
        elif metrics.get("status") in ("diverged",):
            status = "diverged"
        elif epochs_done < base.epochs:
            status = "pruned"  # stopped early by ASHA
        else:
            status = "ok"
        params = {k: v for k, v in (result.config or {}).items() if k in space.distributions}
        rows.append(
            {
                "trial": metrics.get("trial_id", index),
                "run_dir": result.checkpoint.path if result.checkpoint is not None else None,
                "status": status,
                "optimizer": space.optimizer,
                "workload": base.workload,
                "data": base.data,
                "seed": base.seed,
                "hparams": space.to_hparams(params),
            }
        )
    return rows
