"""Sweeps on real services: Optuna on SQLite and PostgreSQL, Ray Tune (SPEC §8)."""

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pandas as pd
import pytest
import sqlalchemy

from sweeps.optuna_backend import make_storage, run_optuna_sweep
from sweeps.spaces import SPACES_DIR, SpaceError, load_space
from sweeps.train import RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = RunConfig(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, epochs=3)
POSTGRES_URL = os.environ.get(
    "LOCOPROP_TEST_POSTGRES_URL", "postgresql://locoprop:pg-secret-pw@localhost/locoprop_test"
)


def _sweep_cli(*args, cwd, timeout=600):
    return subprocess.Popen(
        [sys.executable, "-m", "sweeps.cli", "sweep", "--no-progress", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


# ----------------------------------------------------------- search spaces
@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_space_files_parse_into_both_back_ends_identically(path):
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(path.stem)
    searcher = OptunaSearch(space.distributions, metric="train_loss", mode="min", seed=7)
    from_ray = searcher.suggest("trial-a")

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7))
    from_optuna = study.ask(space.distributions).params
    assert from_ray == from_optuna
    hparams = space.to_hparams(from_optuna)
    assert all(not name.startswith("one_minus_") for name in hparams)


def test_reparametrisation_and_conditions():
    space = load_space("locoprop-m")
    params = {"lr": 1e-5, "activation_lr": 10.0, "local_iters": 10, "inner": "adam", "one_minus_inner_momentum": 0.01}
    assert "inner_momentum" not in space.to_hparams(params)  # Adam has no such momentum
    params["inner"] = "rmsprop-tf"
    assert space.to_hparams(params)["inner_momentum"] == pytest.approx(0.99)


BAD_SPACES = [
    ("optimizer: adam\nparams: [", "is not valid YAML"),
    ("optimizer: lion\nparams: {lr: {type: float, low: 1, high: 2}}", "unknown optimizer 'lion'"),
    ("optimizer: adam\nparams: {lr: {type: gaussian}}", "parameter 'lr': unknown type 'gaussian'"),
    (
        "optimizer: adam\nparams: {lr: {type: float, low: 2, high: 1}}",
        "parameter 'lr': low 2.0 must not exceed high 1.0",
    ),
    ("optimizer: adam\nparams: {lr: {type: float, low: 0, high: 1, log: true}}", "log-scale range needs low > 0"),
    ("optimizer: adam\nparams: {momentum: {type: float, low: 0, high: 1}}", "sets 'momentum', which 'adam' does not"),
    ("optimizer: adam\nparams: {lr: {type: float, low: 0.1, high: 1, when: {inner: [a]}}}", "refers to 'inner'"),
    ("optimizer: adam\nparams: {lr: {type: categorical, choices: []}}", "non-empty 'choices'"),
    ("optimizer: adam\nparams: {lr: {type: float, low: 0.1, high: 1}}\nextra: 1", "unknown top-level key(s) extra"),
]


@pytest.mark.parametrize("text, message", BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_space_files_are_refused_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=pytest.importorskip("re").escape(message)) as info:
        load_space(path=path)
    assert str(path) in str(info.value)


def test_bad_storage_urls_are_refused_without_leaking_the_password(tmp_path):
    with pytest.raises(ValueError, match="Invalid storage 'nonsense'"):
        make_storage("nonsense", tmp_path)
    with pytest.raises(ValueError, match=r"Cannot open storage postgresql://u:\*\*\*@127.0.0.1:9/db") as info:
        make_storage("postgresql://u:hunter2@127.0.0.1:9/db", tmp_path)
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------- Optuna
def test_optuna_sweep_on_sqlite_runs_resumes_and_extends(tmp_path):
    space = load_space("adam")
    kwargs = dict(study_name="s", out=tmp_path, storage=None, pruner="none")
    table = run_optuna_sweep(TINY, space, trials=4, **kwargs)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    frame = pd.read_csv(table)
    assert frame["run_id"].nunique() == 4 and set(frame["status"]) == {"ok"}
    assert (tmp_path / "sweep_results.parquet").exists()
    assert {"hp_lr", "hp_beta1", "hp_beta2", "hp_eps"} <= set(frame.columns)

    run_optuna_sweep(TINY, space, trials=4, **kwargs)  # same command: nothing more to do
    assert len(study.get_trials()) == 4
    run_optuna_sweep(TINY, space, trials=5, **kwargs)  # a larger N extends it
    assert len(study.get_trials()) == 5


def test_diverged_run_becomes_a_pruned_trial(tmp_path):
    space_file = tmp_path / "sgd.yaml"
    space_file.write_text("optimizer: sgd\nparams: {lr: {type: float, low: 1.0e+3, high: 1.0e+4, log: true}}\n")
    table = run_optuna_sweep(TINY, load_space(path=space_file), study_name="d", out=tmp_path, trials=1, pruner="none")
    study = optuna.load_study(study_name="d", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert study.trials[0].user_attrs["status"] == "diverged"
    assert set(pd.read_csv(table)["status"]) == {"diverged"}


@pytest.fixture
def postgres_url():
    try:
        sqlalchemy.create_engine(POSTGRES_URL).connect().close()
    except Exception as err:
        if os.environ.get("CI"):
            raise  # CI starts PostgreSQL (.ci/run); a missing server is a failure there
        pytest.skip(f"no PostgreSQL server for the test ({type(err).__name__}); .ci/run starts one")
    return POSTGRES_URL


def test_killed_worker_on_postgres_loses_and_duplicates_nothing(tmp_path, postgres_url):
    study = f"kill-{uuid.uuid4().hex[:8]}"
    args = [
        "--backend", "optuna", "--optimizer", "adam", "--data", "synthetic", "--width-mult", "1",
        "--batch-size", "64", "--epochs", "6", "--trials", "3", "--study", study, "--out", str(tmp_path),
        "--storage", postgres_url, "--pruner", "none", "--heartbeat-interval", "1", "--grace-period", "3",
    ]  # fmt: skip
    worker = _sweep_cli(*args, cwd=tmp_path)
    # Kill the worker in the middle of its second trial, after two epochs of it.
    deadline = time.time() + 300
    victim = tmp_path / "trials" / "trial-0001"
    while time.time() < deadline:
        metrics = victim / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4 and not (victim / "summary.json").exists():
            break
        assert worker.poll() is None, worker.stdout.read()
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    first_output = worker.stdout.read()

    again = _sweep_cli(*args, cwd=tmp_path)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output

    storage = optuna.storages.RDBStorage(postgres_url)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3  # none lost, none extra
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed one, retried once
    frame = pd.read_csv(tmp_path / "sweep_results.csv")
    assert frame["run_id"].nunique() == 3
    # The retry continued the killed trial's run directory: every epoch once.
    assert frame.groupby("run_id")["epoch"].apply(list).map(lambda e: e == list(range(7))).all()
    for text in (first_output, output, (tmp_path / "sweep_results.csv").read_text()):
        assert "pg-secret-pw" not in text


# ---------------------------------------------------------------- Ray Tune
def test_ray_sweep_is_interrupted_and_restored(tmp_path):
    args = [
        "--backend", "ray", "--num-cpus", "2", "--optimizer", "adam", "--data", "synthetic", "--width-mult", "0.05",
        "--batch-size", "64", "--epochs", "3", "--trials", "4", "--study", "ray-study", "--out", str(tmp_path),
    ]  # fmt: skip
    first = _sweep_cli(*args, cwd=tmp_path)
    deadline = time.time() + 300
    experiment = tmp_path / "ray-study"
    while time.time() < deadline and first.poll() is None:
        finished = [p for p in experiment.glob("*/result.json") if len(p.read_text().splitlines()) >= 1]
        if finished:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    first_output, _ = first.communicate(timeout=300)
    assert (experiment / "tuner.pkl").exists(), first_output

    second = _sweep_cli(*args, cwd=tmp_path)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert "restoring Ray Tune experiment" in output
    frame = pd.read_csv(tmp_path / "sweep_results.csv")
    assert frame["run_id"].nunique() == 4
    assert set(frame["status"]) <= {"ok", "pruned"}
    assert (frame.groupby("run_id")["epoch"].apply(lambda e: e.is_unique)).all()
