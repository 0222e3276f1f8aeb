"""Sweeps on real services: Optuna on SQLite and PostgreSQL, Ray Tune (SPEC §8)."""

import dataclasses
import importlib
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings

import optuna
import pandas as pd
import pytest
import sqlalchemy
import torch
from helpers import HANG_GUARD_S

from analysis.load import load_results
from sweeps.runner import RunConfig, run_directory
from sweeps.search import optuna_backend
from sweeps.search.checks import BACKENDS
from sweeps.search.optuna_backend import make_storage, run_optuna_sweep
from sweeps.search.ray_backend import run_ray_sweep
from sweeps.search.results import TrialLeftOut, export_results, mask_url, sweep_setup
from sweeps.search.search_space import SPACES_DIR, SpaceError, TrialSeededSampler, load_space

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = RunConfig(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, epochs=3)
ONE_EPOCH = dataclasses.replace(TINY, epochs=1)
POSTGRES_URL = os.environ.get(
    "LOCOPROP_TEST_POSTGRES_URL", "postgresql://locoprop:pg-secret-pw@localhost/locoprop_test"
)


def _sweep_cli(*args, cwd, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "sweeps.commands.cli", "sweep", "--no-progress", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _params(study_name: str, out: pathlib.Path) -> list[dict]:
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'optuna.db'}")
    return [t.params for t in study.get_trials()]


# ----------------------------------------------------------- search spaces
@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_space_files_parse_into_both_back_ends_identically(path):
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(path.stem)
    searcher = OptunaSearch(space.distributions, metric="train_loss", mode="min", sampler=TrialSeededSampler(7))
    from_ray = searcher.suggest("trial-a")

    study = optuna.create_study(sampler=TrialSeededSampler(7))
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


STORAGES = [  # (storage string, what the refusal says, with the password masked)
    ("nonsense", "Invalid storage 'nonsense'"),
    ("user:secretpw@127.0.0.1/db", "Invalid storage 'user:***@127.0.0.1/db'"),
    ("postgresql://u:secretpw@127.0.0.1:9/db", "Cannot open storage postgresql://u:***@127.0.0.1:9/db"),
    # A URL is never a journal file, whatever its suffix: it is opened as a database.
    ("postgresql://user:secretpw@127.0.0.1:1/db.log", "Cannot open storage postgresql://user:***@127.0.0.1:1/db.log"),
    ("postgresql://127.0.0.1:1/db?password=secretpw", "Cannot open storage postgresql://127.0.0.1:1/db?password=***"),
    ("journal:postgresql://user:secretpw@h/x.log", "Invalid journal file 'postgresql://user:***@h/x.log'"),
    ("user:secretpw@h/x.log", "Invalid journal file 'user:***@h/x.log'"),
    ("journal:", "Invalid journal file ''"),
]


@pytest.mark.parametrize("storage, message", STORAGES, ids=[s for s, _ in STORAGES])
def test_bad_storages_are_refused_without_the_password_and_without_creating_files(tmp_path, storage, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        run_optuna_sweep(TINY, load_space("adam"), study_name="s", out=out, trials=1, storage=storage)
    assert str(info.value).startswith(message)
    assert "secretpw" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url, masked",
    [
        ("postgresql+psycopg://u:p%40ss@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        ("postgresql://user:pa@ss@h/db", "postgresql://user:***@h/db"),  # a raw @ in the password
        ("u:pw@h/db?sslmode=require&password=pw", "u:***@h/db?sslmode=require&password=***"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////data/a:b@c.db", "sqlite:////data/a:b@c.db"),  # a path, not user info
        ("journal:/data/a:b@c.log", "journal:/data/a:b@c.log"),
    ],
)
def test_mask_url_hides_every_password_form(url, masked):
    assert mask_url(url) == masked


def test_table_labels_each_trial_with_the_config_it_ran(tmp_path):
    trials = []
    for number, seed in enumerate((0, 5)):
        run_dir = tmp_path / f"trial-{number}"
        run_dir.mkdir()
        config = dataclasses.replace(TINY, optimizer="adam", seed=seed, hparams={"lr": 0.1 * (number + 1)})
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
        (run_dir / "metrics.csv").write_text("step,epoch,train_loss,test_loss\n0,0,1.0,1.0\n")
        trials.append({"trial": number, "run_dir": str(run_dir), "status": "ok"})
    frame = pd.read_csv(export_results(trials, tmp_path))
    assert frame[["trial", "seed", "optimizer", "hp_lr"]].values.tolist() == [[0, 0, "adam", 0.1], [1, 5, "adam", 0.2]]


# ---------------------------------------------------------------- Optuna
def test_optuna_sweep_on_sqlite_runs_resumes_and_extends(tmp_path):
    space = load_space("adam")
    kwargs = dict(study_name="s", out=tmp_path, storage=None, pruner="none")
    table = run_optuna_sweep(TINY, space, trials=4, **kwargs)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    frame = pd.read_csv(table)
    assert frame["run_id"].nunique() == 4 and set(frame["status"]) == {"ok"}
    assert table == tmp_path / "s" / "sweep_results.csv" and (tmp_path / "s" / "sweep_results.parquet").exists()
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


class _PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report (the evaluation after step 0): Optuna's own pruning, at a known trial."""

    def prune(self, study, trial):
        return trial.number == 1


def test_the_report_counts_a_study_s_finished_pruned_and_failed_trials(tmp_path, monkeypatch):
    """A study of 3 trials: trial 1 pruned, trial 2 failed after its first evaluation (the sweep stops there), and
    the same command again finishes the study with trial 3. Its table holds all four; the report counts them by
    outcome, in report.md and sweeps.csv, instead of showing the finished ones alone."""
    from analysis.report import write_report

    real_train = optuna_backend.train

    def train_failing_trial_two(config, **kwargs):
        if config.out.endswith("trial-0002"):

            def fail(row):
                raise RuntimeError("a trial that fails after its first evaluation")

            kwargs["on_evaluation"] = fail
        return real_train(config, **kwargs)

    monkeypatch.setattr(optuna_backend, "_pruner", lambda name: _PruneTrialOne())
    monkeypatch.setattr(optuna_backend, "train", train_failing_trial_two)
    kwargs = dict(study_name="s", out=tmp_path / "sweep", trials=3, pruner="none")
    with pytest.raises(RuntimeError, match="fails after its first evaluation"):
        run_optuna_sweep(TINY, load_space("adam"), **kwargs)
    monkeypatch.setattr(optuna_backend, "train", real_train)
    table = run_optuna_sweep(TINY, load_space("adam"), **kwargs)
    statuses = pd.read_csv(table).drop_duplicates("trial").set_index("trial")["status"].to_dict()
    assert statuses == {0: "ok", 1: "pruned", 2: "failed", 3: "ok"}

    report = write_report([tmp_path / "sweep"], tmp_path / "report")
    text = report.read_text()
    assert "## Sweeps: trials by outcome" in text
    assert "| study | optimizer | workload | data | trials | finished | pruned | diverged | failed |" in text
    assert "| s | adam | autoencoder | synthetic | 4 | 2 | 1 | 0 | 1 |" in text
    counts = pd.read_csv(report.parent / "sweeps.csv")
    columns = ["study", "optimizer", "trials", "finished", "pruned", "diverged", "failed"]
    assert counts[columns].values.tolist() == [["s", "adam", 4, 2, 1, 0, 1]]
    assert counts["table"].tolist() == [str(table.with_suffix(""))]


def test_continuing_a_study_proposes_new_points_reproducibly(tmp_path):
    space = load_space("adam")
    for folder in ("a", "b"):
        for trials in (1, 2, 3):  # the same command, three times, with a larger N
            run_optuna_sweep(ONE_EPOCH, space, study_name="s", out=tmp_path / folder, trials=trials, pruner="none")
    proposed = _params("s", tmp_path / "a")
    assert len(proposed) == 3 and len({json.dumps(p, sort_keys=True) for p in proposed}) == 3
    assert _params("s", tmp_path / "b") == proposed  # the same --sampler-seed, the same sequence


def test_concurrent_workers_on_one_storage_propose_distinct_points(tmp_path, monkeypatch):
    make_storage(None, tmp_path)  # the database exists before the workers open it
    both_running = threading.Barrier(2, timeout=60)
    first_trial = threading.local()
    real_train = optuna_backend.train

    def train_once_both_run(config, **kwargs):
        if not getattr(first_trial, "done", False):
            first_trial.done = True
            both_running.wait()  # each worker holds a trial before either finishes
        return real_train(config, **kwargs)

    monkeypatch.setattr(optuna_backend, "train", train_once_both_run)
    errors = []

    def worker():
        try:
            run_optuna_sweep(ONE_EPOCH, load_space("adam"), study_name="w", out=tmp_path, trials=2, pruner="none",
                             heartbeat_interval=1, grace_period=30)  # fmt: skip
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    assert not errors, errors
    proposed = _params("w", tmp_path)
    assert len(proposed) == 2 and proposed[0] != proposed[1]


def test_an_interrupted_trial_resumes_from_its_run_directory(tmp_path, monkeypatch):
    space, kwargs = load_space("adam"), dict(study_name="i", out=tmp_path, pruner="none")
    real_train = optuna_backend.train

    def ctrl_c_after_epoch_1(config, on_evaluation, **kw):
        def on_evaluation_then_interrupt(row):
            on_evaluation(row)
            if row["epoch"] == 1:
                raise KeyboardInterrupt

        return real_train(config, on_evaluation=on_evaluation_then_interrupt, **kw)

    monkeypatch.setattr(optuna_backend, "train", ctrl_c_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_optuna_sweep(TINY, space, trials=2, **kwargs)

    epochs_trained = []

    def recording(config, on_evaluation, **kw):
        def record(row):
            epochs_trained.append((pathlib.Path(config.out).name, row["epoch"]))
            return on_evaluation(row)

        return real_train(config, on_evaluation=record, **kw)

    monkeypatch.setattr(optuna_backend, "train", recording)
    table = pd.read_csv(run_optuna_sweep(TINY, space, trials=2, **kwargs))
    # The interrupted trial continued after its last finished epoch, with its parameters, in its run directory.
    assert epochs_trained == [("trial-0000", 2), ("trial-0000", 3)] + [("trial-0002", e) for e in (1, 2, 3)]
    study = optuna.load_study(study_name="i", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    assert study.trials[1].params == study.trials[0].params
    # One row per trial and evaluation: the interrupted attempt and its continuation are one trial.
    assert table.groupby("trial")["epoch"].apply(list).to_dict() == {0: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    assert set(table["status"]) == {"ok"}


def test_two_studies_in_one_out_keep_their_own_trials_and_tables(tmp_path, monkeypatch):
    space, kwargs = load_space("adam"), dict(out=tmp_path, trials=1, pruner="none")
    trained = []
    real_train = optuna_backend.train

    def recording(config, **kw):
        trained.append(pathlib.Path(config.out))
        return real_train(config, **kw)

    monkeypatch.setattr(optuna_backend, "train", recording)
    table_a = run_optuna_sweep(ONE_EPOCH, space, study_name="A", **kwargs)
    table_b = run_optuna_sweep(ONE_EPOCH, space, study_name="B", **kwargs)  # the same settings: B trains its own
    table_c = run_optuna_sweep(dataclasses.replace(ONE_EPOCH, batch_size=32), space, study_name="C", **kwargs)
    assert trained == [tmp_path / name / "trials" / "trial-0000" for name in "ABC"]
    for name, table in zip("ABC", (table_a, table_b, table_c)):
        assert table == tmp_path / name / "sweep_results.csv"
        assert set(pd.read_csv(table)["run_dir"]) == {str(tmp_path / name / "trials" / "trial-0000")}
    # The report of --out reads each study's table once: three trials.
    assert load_results([tmp_path])["run_id"].nunique() == 3


def test_a_retry_continues_the_run_directory_its_original_trained_in(tmp_path):
    """A trial interrupted before studies had their own folders resumes where it trained (--out/trials/…)."""
    old = tmp_path / "trials" / "trial-0003"
    old.mkdir(parents=True)
    objective = optuna_backend._Objective(ONE_EPOCH, load_space("adam"), tmp_path / "s", "valid_loss", False, None)
    retry = optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, user_attrs={"run_dir": str(old)})
    assert objective.run_dir(retry, 3) == old
    fresh = optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING)
    assert objective.run_dir(fresh, 3) == tmp_path / "s" / "trials" / "trial-0003"


def test_the_table_an_older_locoprop_shared_between_studies_goes_once_the_study_has_its_own(tmp_path, capsys):
    run_dir = tmp_path / "trials" / "trial-0000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(TINY, optimizer="adam"))))
    (run_dir / "metrics.csv").write_text("step,epoch,train_loss,test_loss\n0,0,1.0,1.0\n")
    trials = [{"trial": 0, "run_dir": str(run_dir), "status": "ok"}]
    shared = tmp_path / "sweep_results.csv"
    pd.DataFrame({"run_id": [0], "run_dir": [str(tmp_path / "trials" / "trial-0009")]}).to_csv(shared, index=False)
    export_results(trials, tmp_path / "s")
    assert shared.exists()  # another study's trial is in it: not ours to remove
    pd.DataFrame({"run_id": [0], "run_dir": [str(run_dir)]}).to_csv(shared, index=False)
    export_results(trials, tmp_path / "s")
    assert not shared.exists() and (tmp_path / "s" / "sweep_results.csv").exists()
    assert f"removed {shared}" in capsys.readouterr().out


def test_a_trial_with_a_truncated_metrics_file_never_reaches_the_table(tmp_path):
    trials = []
    for number in range(2):
        run_dir = tmp_path / f"trial-{number}"
        run_dir.mkdir()
        (run_dir / "config.json").write_text(
            json.dumps(dataclasses.asdict(dataclasses.replace(TINY, optimizer="adam")))
        )
        (run_dir / "metrics.csv").write_text("step,epoch,train_loss,test_loss\n0,0,500.0,500.0\n7,1,494.5,494.75\n")
        (run_dir / "summary.json").write_text(json.dumps({"status": "ok", "steps": 7, "final_train_loss": 494.5}))
        trials.append({"trial": number, "run_dir": str(run_dir), "status": "ok"})
    cut = tmp_path / "trial-1" / "metrics.csv"
    cut.write_text(cut.read_text()[: -len("94.5,494.75\n")])  # a copy cut short: "7,1,4"
    with pytest.warns(TrialLeftOut, match=f"trial 1 left out of the results table: {cut}: its last row is cut short"):
        table = pd.read_csv(export_results(trials, tmp_path / "s"))
    assert set(table["trial"]) == {0}


def test_a_worker_that_loses_the_race_to_create_a_fresh_database_joins_it(tmp_path, monkeypatch):
    """Two workers open a fresh SQLite file at once: both see no tables, both create them, one fails
    ("table studies already exists"). Here the other worker's tables appear just before this one creates them."""
    from optuna.storages._rdb import models

    real_create_all = models.BaseModel.metadata.create_all
    attempts = []

    def the_other_worker_was_first(bind, **kwargs):
        attempts.append(bind)
        if len(attempts) == 1:
            real_create_all(bind)  # the other worker's tables...
            real_create_all(bind, checkfirst=False)  # ...then this one's CREATE TABLE fails as it does in the race
        return real_create_all(bind, **kwargs)

    monkeypatch.setattr(models.BaseModel.metadata, "create_all", the_other_worker_was_first)
    run_optuna_sweep(ONE_EPOCH, load_space("adam"), study_name="r", out=tmp_path, trials=1, pruner="none")
    assert len(attempts) == 2 and len(_params("r", tmp_path)) == 1


# A worker process for the test below: it finds room for a trial, then waits at a barrier of files until the
# other worker has too, so that both start a trial although only one may train.
TWO_PROCESS_WORKER = """
import pathlib, sys, time
import optuna
from sweeps.runner import RunConfig
from sweeps.search.optuna_backend import run_optuna_sweep
from sweeps.search.search_space import load_space

out, storage, me = pathlib.Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3]
real_optimize, waited = optuna.Study.optimize, []

def optimize_after_the_other_worker_checked(self, *args, **kwargs):
    if not waited:
        waited.append(True)
        (out / f"ready-{me}").touch()
        deadline = time.monotonic() + 300
        while len(list(out.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_optimize(self, *args, **kwargs)

optuna.Study.optimize = optimize_after_the_other_worker_checked
config = RunConfig(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, epochs=1)
run_optuna_sweep(config, load_space("adam"), study_name="p", out=out, trials=1, storage=storage, pruner="none",
                 heartbeat_interval=1, grace_period=60)
"""


@pytest.mark.parametrize("journal", [False, True], ids=["sqlite", "journal"])
def test_two_worker_processes_started_together_on_a_fresh_storage_finish_one_trial(tmp_path, journal):
    """SPEC §7: --trials N is the study's total, never more. Two workers on a fresh storage both find room for
    the one trial and both start one (the barrier makes sure of it); one trains, the other's is surplus."""
    storage = f"journal:{tmp_path / 'study.journal'}" if journal else ""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", TWO_PROCESS_WORKER, str(tmp_path), storage]
    workers = [
        subprocess.Popen([*command, str(n)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for n in range(2)
    ]
    outputs = [worker.communicate(timeout=HANG_GUARD_S)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="p", storage=make_storage(storage or None, tmp_path))
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) == 1
    assert [t.user_attrs.get("status") for t in study.trials].count("surplus") == 1
    assert sum("trial 0: ok" in output or "trial 1: ok" in output for output in outputs) == 1
    assert pd.read_csv(tmp_path / "p" / "sweep_results.csv")["trial"].nunique() == 1  # the surplus one is no trial


def test_a_journal_cut_short_by_a_dying_writer_is_mended_and_the_study_continues(tmp_path, monkeypatch):
    journal = tmp_path / "study.journal"
    kwargs = dict(study_name="j", out=tmp_path, storage=f"journal:{journal}", pruner="none")
    space = load_space("adam")
    run_optuna_sweep(ONE_EPOCH, space, trials=1, **kwargs)
    with open(journal, "r+b") as handle:  # a worker killed while writing its last record
        handle.truncate(journal.stat().st_size - 20)
    with pytest.warns(optuna_backend.JournalMended, match=f"journal file {journal}: removed its last line"):
        table = pd.read_csv(run_optuna_sweep(ONE_EPOCH, space, trials=2, **kwargs))
    assert journal.read_bytes().endswith(b"\n")
    assert table.groupby("trial")["status"].first().tolist() == ["ok", "ok"]
    # The record lost was trial 0's last (it finished): trial 0 ran again from its run directory, which held
    # the finished run, and the study went on to its second trial.
    assert set(table["run_dir"]) == {str(tmp_path / "j" / "trials" / f"trial-000{n}") for n in (0, 2)}


def test_a_journal_damaged_inside_names_the_file_and_the_line(tmp_path):
    journal = tmp_path / "study.journal"
    kwargs = dict(study_name="j", out=tmp_path, storage=f"journal:{journal}", pruner="none")
    run_optuna_sweep(ONE_EPOCH, load_space("adam"), trials=1, **kwargs)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:10] + lines[2][20:]
    journal.write_bytes(b"".join(lines))
    with pytest.raises(optuna_backend.DamagedJournal, match=f"Journal file {journal} is damaged: line 3 is not"):
        run_optuna_sweep(ONE_EPOCH, load_space("adam"), trials=2, **kwargs)


@pytest.mark.parametrize("backend", ["optuna", "ray"])
@pytest.mark.parametrize("name", ["a/../../b", "../b", "/tmp/b", "a/b", ".hidden", "", "x" * 129])
def test_a_study_name_that_is_not_a_plain_folder_name_is_refused_before_anything_is_written(tmp_path, backend, name):
    sweep = run_optuna_sweep if backend == "optuna" else run_ray_sweep
    with pytest.raises(ValueError, match=re.escape(f"Invalid --study {name!r}: a study keeps its files in --out")):
        sweep(ONE_EPOCH, load_space("adam"), study_name=name, out=tmp_path / "deep" / "out", trials=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "heartbeat, grace, message",
    [
        (60, 0, "Invalid --grace-period: 0; expected whole seconds ≥ 1"),
        (0, 120, "Invalid --heartbeat-interval: 0; expected whole seconds ≥ 1"),
        (60, 30, "Invalid --grace-period: 30; it must exceed --heartbeat-interval (60 s)"),
    ],
)
def test_heartbeat_settings_that_cannot_work_are_refused_as_such(tmp_path, heartbeat, grace, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_optuna_sweep(ONE_EPOCH, load_space("adam"), study_name="h", out=tmp_path / "out", trials=1,
                         heartbeat_interval=heartbeat, grace_period=grace)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_interrupts_do_not_use_up_the_retry_of_a_dead_worker():
    study = optuna.create_study()
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(0, state=optuna.trial.TrialState.FAIL)
    optuna_backend._queue_retry(study, study.trials[0])  # Ctrl-C: trial 1 continues trial 0
    for _death in range(2):
        trial = study.ask()
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        optuna_backend._retry_stale_trial(study, study.trials[trial.number])
    states = [t.state for t in study.trials]
    # Retried after its first death (though interrupted before), given up after its second.
    assert states == [optuna.trial.TrialState.FAIL] * 3
    assert {t.params["x"] for t in study.trials} == {study.trials[0].params["x"]}
    assert all(optuna_backend._original_number(t) == 0 for t in study.trials)


def test_a_study_refuses_another_setup_naming_each_field(tmp_path):
    space, kwargs = load_space("adam"), dict(study_name="s", out=tmp_path, pruner="none")
    run_optuna_sweep(ONE_EPOCH, space, trials=1, **kwargs)
    changed = dataclasses.replace(ONE_EPOCH, batch_size=32, width_mult=0.1, seed=5)
    with pytest.raises(ValueError, match="Study 's' was run with another setup") as info:
        run_optuna_sweep(changed, space, trials=2, **kwargs)
    for difference in ("batch_size: 64 in the study, 32 now", "seed: 0 in the study, 5 now", "width_mult: 0.05"):
        assert difference in str(info.value)
    assert len(_params("s", tmp_path)) == 1


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_a_setup_no_trial_can_run_is_refused_before_a_study_is_stored(tmp_path, backend):
    too_large = dataclasses.replace(ONE_EPOCH, batch_size=100_000)
    sweep = run_optuna_sweep if backend == "optuna" else run_ray_sweep
    with pytest.raises(ValueError, match="Invalid batch_size: 100000; the training split of 'synthetic' has"):
        sweep(too_large, load_space("adam"), study_name="s", out=tmp_path / "out", trials=1)
    assert not (tmp_path / "out").exists()
    # Mended, the same study starts: nothing of the refused setup was kept.
    if backend == "optuna":
        run_optuna_sweep(ONE_EPOCH, load_space("adam"), study_name="s", out=tmp_path / "out", trials=1, pruner="none")


def _back_ends() -> dict:
    """Every back end of --backend, by its name: run_NAME_sweep of sweeps.search.NAME_backend."""
    return {name: importlib.import_module(f"sweeps.search.{name}_backend") for name in BACKENDS}


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(trials=0), "Invalid trials: 0; expected ≥ 1"),
        (dict(study_name="../b"), "Invalid --study '../b': a study keeps its files in --out/STUDY"),
        (dict(metric="test_loss"), "Invalid metric: 'test_loss'; expected one of valid_loss, train_loss"),
        (dict(sampler_seed=-1), "Invalid sampler seed: -1; expected an integer from 0 to 4294967295"),
        (dict(base=dataclasses.replace(ONE_EPOCH, batch_size=100_000)), "Invalid batch_size: 100000"),
    ],
)
def test_every_back_end_gives_the_same_one_line_refusal_before_it_starts(tmp_path, bad, message):
    """The shared check (sweeps.search.checks): the same bad input, the same line from every back end, before a
    folder is made or Ray is started."""
    import ray

    refusals = {}
    for name, module in _back_ends().items():
        kwargs = {"base": ONE_EPOCH, "study_name": "s", "trials": 1, **bad}
        with pytest.raises(ValueError) as info:
            getattr(module, f"run_{name}_sweep")(kwargs.pop("base"), load_space("adam"), out=tmp_path / name, **kwargs)
        refusals[name] = str(info.value)
    (refusal,) = set(refusals.values())
    assert message in refusal and "\n" not in refusal
    assert list(tmp_path.iterdir()) == [] and not ray.is_initialized()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_back_end_checks_through_the_shared_check_first(tmp_path, monkeypatch, backend):
    module, seen = _back_ends()[backend], []

    def refuse(base, **kwargs):
        seen.append((base, {k: v for k, v in kwargs.items() if k != "own_checks"}))
        raise ValueError("refused by check_sweep")

    monkeypatch.setattr(module, "check_sweep", refuse)
    with pytest.raises(ValueError, match="refused by check_sweep"):
        getattr(module, f"run_{backend}_sweep")(ONE_EPOCH, load_space("adam"), study_name="s", out=tmp_path,
                                                trials=3, metric="train_loss", sampler_seed=5)  # fmt: skip
    assert seen == [(ONE_EPOCH, {"study_name": "s", "trials": 3, "metric": "train_loss", "sampler_seed": 5})]
    assert list(tmp_path.iterdir()) == []


def test_a_study_made_before_setups_were_stored_is_still_checked_on_its_four_fields():
    study = optuna.create_study()
    study.set_user_attr("sweep", {"optimizer": "sgd", "workload": "autoencoder", "data": "synthetic", "epochs": 3})
    with pytest.raises(ValueError, match="optimizer: 'sgd' in the study, 'adam' now"):
        optuna_backend._check_same_setup(study, sweep_setup(TINY, load_space("adam")))
    assert "setup" not in study.user_attrs


def test_a_ray_study_refuses_another_setup_before_starting_ray(tmp_path):
    space = load_space("adam")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"setup": sweep_setup(TINY, space), "parts": []}))
    changed = dataclasses.replace(TINY, epochs=4)
    with pytest.raises(ValueError, match=re.escape("Ray Tune study") + ".*epochs: 3 in the study, 4 now"):
        run_ray_sweep(changed, space, study_name="s", out=tmp_path, trials=1)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.json"]


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
    # Kill the worker in the middle of its first trial, after two epochs of it
    # (proposals are seeded by trial number: trial 0 trains, trial 1 diverges at once).
    deadline = time.time() + 300
    victim = tmp_path / study / "trials" / "trial-0000"
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
    output, _ = again.communicate(timeout=HANG_GUARD_S)
    assert again.returncode == 0, output

    storage = optuna.storages.RDBStorage(postgres_url)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    states = [t.state for t in trials]
    finished = states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED)
    assert finished == 3  # none lost, none extra
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed one, retried once
    frame = pd.read_csv(tmp_path / study / "sweep_results.csv")
    assert frame["run_id"].nunique() == 3
    # The retry continued the killed trial's run directory: every epoch once.
    # Evaluations are once per epoch; a run that diverged ends with one more, at the step where it did.
    epochs = frame[frame["status"] != "diverged"].groupby("run_id")["epoch"].apply(list)
    assert epochs.map(lambda e: e == list(range(len(e)))).all()  # no run repeats or skips an epoch
    steps = frame.groupby("run_id")["step"].apply(list)
    assert steps.map(lambda s: s == sorted(set(s))).all()
    assert frame[frame["trial"] == 0]["epoch"].tolist() == list(range(7))
    for text in (first_output, output, (tmp_path / study / "sweep_results.csv").read_text()):
        assert "pg-secret-pw" not in text


# ---------------------------------------------------------------- Ray Tune
def test_ray_sweep_is_interrupted_restored_and_extended(tmp_path):
    out, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()
    # Trials must leave nothing in the temp folder (Ray's own session folder, with its sockets, stays in /tmp).
    env = {**os.environ, "TMPDIR": str(temp), "RAY_TMPDIR": "/tmp"}
    args = [
        "--backend", "ray", "--num-cpus", "2", "--optimizer", "adam", "--data", "synthetic", "--width-mult", "0.05",
        "--batch-size", "64", "--epochs", "3", "--study", "ray-study", "--out", str(out),
    ]  # fmt: skip
    first = _sweep_cli(*args, "--trials", "3", cwd=tmp_path, env=env)
    deadline = time.time() + 300
    part = out / "ray-study" / "part-0"
    while time.time() < deadline and first.poll() is None:
        if any(p.read_text().strip() for p in part.glob("*/result.json")):
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    first_output, _ = first.communicate(timeout=HANG_GUARD_S)
    assert first.returncode == 130 and (part / "tuner.pkl").exists(), first_output

    second = _sweep_cli(*args, "--trials", "4", cwd=tmp_path, env=env)  # a larger N extends the study
    output, _ = second.communicate(timeout=HANG_GUARD_S)
    assert second.returncode == 0, output
    assert "restoring Ray Tune experiment" in output and "from 3 to 4 trials" in output
    frame = pd.read_csv(out / "ray-study" / "sweep_results.csv")
    assert frame["run_id"].nunique() == 4 and frame["hp_lr"].nunique() == 4
    assert set(frame["status"]) <= {"ok", "pruned"}
    assert (frame.groupby("run_id")["epoch"].apply(lambda e: e.is_unique)).all()
    assert {pathlib.Path(d).parent for d in frame["run_dir"]} == {out / "ray-study" / "trials"}
    assert not list(temp.glob("locoprop-trial-*"))


def test_ctrl_c_in_a_trial_logs_no_traceback_but_other_failures_do(tmp_path, monkeypatch):
    """Optuna logs a failed trial with its traceback; for Ctrl-C the CLI's one line says it all."""
    emitted: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            emitted.append(record)

    handler = Collect()
    logging.getLogger("optuna").addHandler(handler)
    try:

        def interrupted(config, on_evaluation, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(optuna_backend, "train", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_optuna_sweep(TINY, load_space("adam"), study_name="q", out=tmp_path, trials=1, pruner="none")

        def broken(config, on_evaluation, **kw):
            raise RuntimeError("a real failure")

        monkeypatch.setattr(optuna_backend, "train", broken)
        with pytest.raises(RuntimeError, match="a real failure"):
            run_optuna_sweep(TINY, load_space("adam"), study_name="q2", out=tmp_path, trials=1, pruner="none")
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    failures = [r.exc_info[1] for r in emitted if r.exc_info]
    assert [type(e) for e in failures] == [RuntimeError]


def test_two_evaluations_at_one_share_of_the_budget_report_once_without_optuna_warning(tmp_path):
    """200 steps evaluated at 199 and 200: both are 100% of the budget (rounded), where the pruner compares
    trials. The first is reported, the second is not sent to be ignored with Optuna's raw warning."""
    config = dataclasses.replace(TINY, epochs=None, steps=200, eval_every=199)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 200 small steps: spinning threads would make them slow on a busy machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Optuna's "The reported value is ignored because this step=100 ..."
            run_optuna_sweep(config, load_space("adam"), study_name="d", out=tmp_path, trials=1, pruner="none")
    finally:
        torch.set_num_threads(threads)
    (trial,) = optuna.load_study(study_name="d", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    metrics = tmp_path / "d" / "trials" / "trial-0000" / "metrics.csv"
    rows = {row["step"]: row["valid_loss"] for row in run_directory.read_history(metrics)}
    assert trial.intermediate_values == {100: rows[199]}
