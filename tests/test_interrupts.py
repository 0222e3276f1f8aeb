"""Stopped by the cluster (SPEC §6): SIGTERM, preemption and failures of ranks lose nothing and say what to do.

A scheduler stops a job with SIGTERM (then SIGKILL after a grace period). Each test sends its signal at a
known step: from inside the process (``os.kill`` of itself, right after that step), or, for another
process, once that process has paused at the step (``tests/pause_hook``). None waits a fixed time.
"""

import importlib
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna
import pandas as pd
import pytest
import torch
from helpers import HANG_GUARD_S

from sweeps.commands.cli import main
from sweeps.runner import run_directory
from sweeps.runner.config import RunConfig
from sweeps.runner.ranks import RankOutcome, root_cause
from sweeps.search import optuna_backend

train_module = importlib.import_module("sweeps.runner.train")  # the module (sweeps.runner.train is also its function)
ROOT = pathlib.Path(__file__).resolve().parents[1]
PAUSE_HOOK = pathlib.Path(__file__).resolve().parent / "pause_hook"
TINY = ["--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64", "--no-progress"]
TRAIN = ["train", *TINY, "--optimizer", "adam", "--steps", "20", "--eval-every", "5"]
EVALUATIONS = [0, 5, 10, 15, 20]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def _one_thread():
    """Small steps, many of them: spinning intra-op threads would make them 30× slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _sigterm_must_be_taken():
    """Without locoprop's handler a SIGTERM would end the test session: make it fail the test instead."""

    def not_taken(signum, frame):
        raise AssertionError("SIGTERM reached the test: the command did not take it")

    previous = signal.signal(signal.SIGTERM, not_taken)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def signal_at(monkeypatch):
    """signal_at(step, signum): this process sends itself ``signum`` right after the first run to finish
    ``step`` has finished it. Returns the (run directory, step) of every step trained."""
    trained: list[tuple[str, int]] = []
    plan: dict = {}
    original = train_module._Run.train_step

    def train_step(self, x, y):
        result = original(self, x, y)
        trained.append((self.run_dir.name, self.step))
        if self.step == plan.get("step"):
            os.kill(os.getpid(), plan.pop("signum"))
            plan.pop("step")
        return result

    monkeypatch.setattr(train_module._Run, "train_step", train_step)

    def arm(step: int | None, signum: int = signal.SIGTERM) -> list[tuple[str, int]]:
        if step is not None:
            plan.update(step=step, signum=signum)
        return trained

    return arm


def _losses(run_dir: pathlib.Path) -> list[tuple]:
    rows = run_directory.read_history(run_dir / "metrics.csv")
    return [(r["step"], r["epoch"], r["lr"], r["train_loss"], r["valid_loss"], r["test_loss"]) for r in rows]


def _the_run(out: pathlib.Path) -> pathlib.Path:
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


# ------------------------------------------------------------------ train
@pytest.mark.parametrize("signum, status, by", [(signal.SIGTERM, 143, " by SIGTERM"), (signal.SIGINT, 130, "")])
def test_a_signal_to_train_checkpoints_at_its_step_and_the_command_continues_exactly(
    tmp_path, capsys, signal_at, signum, status, by
):
    argv = [*TRAIN, "--out", str(tmp_path / "runs")]
    trained = signal_at(7, signum)  # between the evaluations of steps 5 and 10
    code, _, err = run_cli(argv, capsys)
    assert code == status
    resume = shlex.join(["locoprop", *argv, "--resume"])
    assert err == f"locoprop: interrupted{by}; the run is checkpointed at its last finished step and continues with: " \
                  f"{resume}\n"  # fmt: skip
    run_dir = _the_run(tmp_path / "runs")
    summary = run_directory.read_json(run_dir / "summary.json")
    assert (summary["status"], summary["signal"], summary["steps"]) == ("interrupted", signal.Signals(signum).name, 7)
    assert run_directory.load_checkpoint(run_dir / "checkpoint.pt")["step"] == 7  # not the evaluation at 5

    assert run_cli([*argv, "--resume"], capsys)[0] == 0
    assert [step for _, step in trained] == list(range(1, 21))  # every step once: none lost, none repeated
    assert run_directory.read_json(run_dir / "summary.json")["status"] == "ok"
    signal_at(None)
    assert run_cli([*TRAIN, "--out", str(tmp_path / "straight")], capsys)[0] == 0
    assert _losses(run_dir) == _losses(_the_run(tmp_path / "straight"))  # the numbers of an uninterrupted run
    assert [r[0] for r in _losses(run_dir)] == EVALUATIONS


def test_a_signal_during_the_last_step_lets_the_run_finish_then_stops_the_command(tmp_path, capsys, signal_at):
    signal_at(20)
    code, _, _ = run_cli([*TRAIN, "--out", str(tmp_path)], capsys)
    assert code == 143
    summary = run_directory.read_json(_the_run(tmp_path) / "summary.json")
    assert (summary["status"], summary["steps"]) == ("ok", 20)  # done: nothing to continue


# ------------------------------------------------------------------ sweeps
SWEEP = ["sweep", *TINY, "--optimizer", "adam", "--steps", "20", "--eval-every", "5", "--pruner", "none",
         "--trials", "2", "--study", "s"]  # fmt: skip


def _study(out: pathlib.Path, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")


def _straight(run_dir: pathlib.Path, out: pathlib.Path) -> list[tuple]:
    """The losses of the run of ``run_dir``'s config, trained without a stop in ``out``."""
    config = RunConfig.from_dict({**run_directory.read_json(run_dir / "config.json"), "out": str(out)})
    train_module.train(config, progress=False)
    return _losses(out)


def test_a_trial_preempted_twice_resumes_each_time_and_is_not_given_up(tmp_path, capsys, signal_at):
    """SIGTERM (a preemption) twice in one trial: each rerun continues it from the step where it stopped;
    preemptions do not count toward the retries of a dead worker's trial."""
    argv = [*SWEEP, "--out", str(tmp_path)]
    trained = signal_at(7)
    code, out, err = run_cli(argv, capsys)
    assert code == 143, err
    assert "interrupted: trial 0 resumes from" in out and "Traceback" not in out + err
    assert err == f"locoprop: interrupted by SIGTERM; finished runs are kept, and the same command continues: " \
                  f"{shlex.join(['locoprop', *argv])}\n"  # fmt: skip
    signal_at(13)
    assert run_cli(argv, capsys)[0] == 143
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "waiting for" not in out

    first = tmp_path / "s" / "trials" / "trial-0000"  # each study keeps its trials in its own folder
    assert [step for run, step in trained if run == first.name] == list(range(1, 21))
    study = _study(tmp_path)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]  # trial 0, continued twice; then a new trial
    assert not any(optuna_backend.STALE_RETRIES in t.system_attrs for t in study.trials)
    table = pd.read_csv(tmp_path / "s" / "sweep_results.csv")
    assert table.groupby("trial")["step"].apply(list).to_dict() == {0: EVALUATIONS, 3: EVALUATIONS}
    assert set(table["status"]) == {"ok"}
    assert _losses(first) == _straight(first, tmp_path / "straight")


def test_sigterm_during_compare_tuning_then_the_same_command_finishes_without_waiting(tmp_path, capsys, signal_at):
    argv = ["compare", *TINY, "--optimizers", "adam", "--tune", "2", "--seeds", "1", "--steps", "20",
            "--eval-every", "5", "--out", str(tmp_path)]  # fmt: skip
    trained = signal_at(7)
    assert run_cli(argv, capsys)[0] == 143
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "waiting for" not in out
    trial = tmp_path / "tuning" / "adam" / "compare-adam" / "trials" / "trial-0000"
    assert [step for run, step in trained if run == trial.name] == list(range(1, 21))
    assert [r[0] for r in _losses(trial)] == EVALUATIONS


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _pause_env(marker: pathlib.Path, step: int, rank: int = 0) -> dict:
    return {
        **ONE_THREAD,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PAUSE_HOOK), os.environ.get("PYTHONPATH")])),
        "LOCOPROP_TEST_PAUSE_FILE": str(marker),
        "LOCOPROP_TEST_PAUSE_STEP": str(step),
        "LOCOPROP_TEST_PAUSE_RANK": str(rank),
    }


def _start(argv: list[str], cwd: pathlib.Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeps", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _run(argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps", *argv], cwd=cwd, env=ONE_THREAD, text=True,
                          capture_output=True, timeout=HANG_GUARD_S)  # fmt: skip


def _paused_pid(process: subprocess.Popen, marker: pathlib.Path) -> int:
    """The process id written by the process that paused (tests/pause_hook), once it has."""
    deadline = time.monotonic() + 300  # a limit against a hang, not a timing
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    return int(marker.read_text())


def test_a_sweep_whose_worker_was_killed_resumes_its_trial_at_once(tmp_path, capsys):
    """SIGKILL (a scheduler's grace period passed): the rerun sees that no process holds the trial and
    continues it from its run directory, without waiting for a heartbeat that will never come."""
    argv = [*SWEEP, "--out", str(tmp_path)]
    marker = tmp_path / "paused"
    worker = _start(argv, tmp_path, _pause_env(marker, 7))
    pid = _paused_pid(worker, marker)
    os.kill(pid, signal.SIGKILL)
    worker.communicate()
    assert _study(tmp_path).trials[0].state.name == "RUNNING"  # as the dead worker left it

    code, out, err = run_cli(argv, capsys)  # the default grace period, 120 s: a wait would show
    assert code == 0, err
    assert f"trial 0: its worker (process {pid}) is gone; it resumes from its run directory" in out
    assert "waiting for" not in out
    first = tmp_path / "s" / "trials" / "trial-0000"
    assert [r[0] for r in _losses(first)] == EVALUATIONS
    states = [t.state.name for t in _study(tmp_path).trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
    assert _losses(first) == _straight(first, tmp_path / "straight")


def test_a_running_trial_of_a_live_worker_or_of_another_machine_is_left_alone(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="live")
    live = study.ask()
    lock = optuna_backend._TrialLock(study, live, tmp_path)  # held, as a worker in another thread holds it
    elsewhere = study.ask()
    other_machine = {"host": socket.gethostname() + "-other", "pid": 1, "lock": str(tmp_path / "free.lock")}
    (tmp_path / "free.lock").write_text("")
    study._storage.set_trial_system_attr(elsewhere._trial_id, optuna_backend.WORKER, other_machine)
    optuna_backend._fail_trials_of_dead_workers(study)
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]
    lock.release()
    # Released while the trial is still running is never a worker's way; a lock file left free is a dead worker's.
    dead = pathlib.Path(lock.path)
    dead.write_text("")
    optuna_backend._fail_trials_of_dead_workers(study)
    assert [t.state.name for t in study.trials][:2] == ["FAIL", "RUNNING"]
    assert [t.state.name for t in study.trials][2:] == ["WAITING"]  # queued again, with the same parameters
    assert not dead.exists()


# ------------------------------------------------------------------ ranks
def test_the_cause_of_a_failed_run_on_ranks_is_the_failing_ranks_own():
    lost = RankOutcome(0, "communication", 1.0, "lost its peers: RuntimeError: Connection closed by peer")
    own = RankOutcome(1, "failed", 2.0, "failed: ValueError: a weight is used outside the units")
    killed = RankOutcome(1, "killed", 3.0, "was killed by SIGKILL", 9)
    assert root_cause([lost, own]) == own  # rank 0 met the closed connection first; rank 1's error is the cause
    assert root_cause([lost, killed]) == killed
    assert root_cause([lost, RankOutcome(1, "interrupted", 0.5, "was interrupted by SIGTERM", 15)]) == lost


def test_the_parent_records_the_cause_where_rank_0_could_not(tmp_path):
    run_dir = tmp_path / "run"
    train_module.record_rank_failure(run_dir, "rank 0 of 2 was killed by SIGKILL", 2)
    assert not run_dir.exists()  # no records yet: nothing to say it in
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    train_module.record_rank_failure(run_dir, "rank 0 of 2 was killed by SIGKILL", 2)  # rank 0 wrote no summary
    assert run_directory.read_json(run_dir / "summary.json") == {
        "world_size": 2, "status": "failed", "error": "rank 0 of 2 was killed by SIGKILL"
    }  # fmt: skip
    run_directory.write_json(run_dir / "summary.json", {"status": "interrupted", "signal": "SIGTERM", "steps": 8})
    train_module.record_rank_failure(run_dir, "rank 1 of 2 failed: KeyError: 'x'", 2)
    assert run_directory.read_json(run_dir / "summary.json") == {"status": "failed", "steps": 8,
                                                            "error": "rank 1 of 2 failed: KeyError: 'x'"}  # fmt: skip
    run_directory.write_json(run_dir / "summary.json", {"status": "ok"})
    train_module.record_rank_failure(run_dir, "rank 1 of 2 was killed by SIGKILL", 2)
    assert run_directory.read_json(run_dir / "summary.json") == {"status": "ok"}  # a finished run is never rewritten


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused_in_one_line(tmp_path, capsys, nproc):
    code, _, err = run_cli([*TRAIN, "--nproc", nproc, "--out", str(tmp_path)], capsys)
    assert (code, err) == (
        2,
        f"locoprop: Invalid --nproc: {nproc}; expected an integer ≥ 1 (the number of processes)\n",
    )
    assert not list(tmp_path.iterdir())


def test_nproc_under_torchrun_is_refused_in_our_words(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    code, _, err = run_cli([*TRAIN, "--nproc", "2", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert err == "locoprop: --nproc 2 under torchrun: torchrun starts the processes (its --nproc-per-node); " \
                  "drop --nproc\n"  # fmt: skip


def test_what_every_rank_would_refuse_is_refused_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    def no_ranks(*args):
        raise AssertionError("ranks were started")

    monkeypatch.setattr("sweeps.commands.cli.launch", no_ranks)
    argv = [*TRAIN, "--out", str(tmp_path)]
    assert run_cli(argv, capsys)[0] == 0
    code, _, err = run_cli([*argv, "--nproc", "2"], capsys)  # the run exists; no --resume
    assert code == 2 and "holds a finished run (status ok)" in err and len(err.splitlines()) == 1
    code, out, _ = run_cli([*argv, "--nproc", "2", "--resume"], capsys)  # returned as it is
    assert code == 0 and out.startswith("ok: adam")
    code, _, err = run_cli([*argv, "--nproc", "2", "--lr", "-1"], capsys)  # the optimizer's own check
    assert (code, err) == (2, "locoprop: Invalid learning rate: -1.0\n")


TRAIN_RANKS = [*TRAIN, "--steps", "300", "--nproc", "2"]  # cannot end before its pause at step 7 ends


def _one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture
def paused_ranks(monkeypatch, tmp_path):
    """paused_ranks(step, rank, act): the ranks that this process starts load tests/pause_hook, and
    ``act(pid)`` runs (in a thread) once rank ``rank`` has paused after ``step``."""

    def arm(step: int, rank: int, act) -> None:
        marker = tmp_path / "paused"
        for name, value in _pause_env(marker, step, rank).items():
            if name.startswith("LOCOPROP_TEST") or name == "PYTHONPATH":
                monkeypatch.setenv(name, value)

        def watch():
            deadline = time.monotonic() + 300  # a limit against a hang, not a timing
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if marker.exists():
                act(int(marker.read_text()))

        threading.Thread(target=watch, daemon=True).start()

    return arm


def test_sigterm_to_the_parent_of_two_ranks_stops_both_after_one_step_and_resume_continues(
    tmp_path, capfd, paused_ranks
):
    """A scheduler signals the job's main process only: it passes the signal on, and the ranks agree on
    the step to stop after (rank 0 paused after step 7; rank 1 waits in step 8's all-reduce)."""
    argv = [*TRAIN, "--steps", "12", "--nproc", "2", "--out", str(tmp_path / "runs")]
    paused_ranks(7, 0, lambda pid: os.kill(os.getpid(), signal.SIGTERM))  # this process is the ranks' parent
    code = main(argv)
    assert code == 143
    resume = shlex.join(["locoprop", *argv, "--resume"])
    assert _one_line(capfd.readouterr().err) == "locoprop: interrupted by SIGTERM; the run is checkpointed at its " \
                                                f"last finished step and continues with: {resume}"  # fmt: skip
    run_dir = _the_run(tmp_path / "runs")
    summary = run_directory.read_json(run_dir / "summary.json")
    assert (summary["status"], summary["signal"], summary["steps"]) == ("interrupted", "SIGTERM", 8)
    assert run_directory.load_checkpoint(run_dir / "checkpoint.pt")["step"] == 8

    assert main([*argv, "--resume"]) == 0
    assert main([*TRAIN, "--steps", "12", "--out", str(tmp_path / "one")]) == 0
    got, expected = _losses(run_dir), _losses(_the_run(tmp_path / "one"))
    assert [r[0] for r in got] == [0, 5, 10, 12]
    for g, e in zip(got, expected):  # the one-process run: float32 sums over ranks in another order
        assert g == pytest.approx(e, rel=1e-5)


def test_a_rank_killed_hard_ends_the_run_in_one_line_naming_it(tmp_path, capfd, paused_ranks):
    argv = [*TRAIN_RANKS, "--out", str(tmp_path / "runs")]
    paused_ranks(7, 1, lambda pid: os.kill(pid, signal.SIGKILL))
    assert main(argv) == 1
    resume = shlex.join(["locoprop", *argv, "--resume"])
    assert _one_line(capfd.readouterr().err) == "locoprop: rank 1 of 2 was killed by SIGKILL; the run is recorded " \
        f"as failed in its summary.json and continues from its last checkpoint with: {resume}"  # fmt: skip
    summary = run_directory.read_json(_the_run(tmp_path / "runs") / "summary.json")
    # Rank 0 saw its all-reduce fail ("Connection reset by peer"); the run records rank 1's end.
    assert (summary["status"], summary["error"]) == ("failed", "rank 1 of 2 was killed by SIGKILL")


def test_an_error_of_one_rank_is_what_the_run_records_not_its_peers_lost_connection(tmp_path, capfd, monkeypatch):
    """Rank 1 raises in step 7; rank 0 then meets "Connection closed by peer" in its all-reduce, first."""
    monkeypatch.setenv("LOCOPROP_TEST_RAISE", "a weight is used outside the units")
    for name, value in _pause_env(tmp_path / "never", 7, 1).items():
        if name.startswith("LOCOPROP_TEST") or name == "PYTHONPATH":
            monkeypatch.setenv(name, value)
    argv = [*TRAIN_RANKS, "--out", str(tmp_path / "runs")]
    assert main(argv) == 2
    cause = "rank 1 of 2 refused the run: a weight is used outside the units"
    assert _one_line(capfd.readouterr().err).startswith(f"locoprop: {cause}")
    summary = run_directory.read_json(_the_run(tmp_path / "runs") / "summary.json")
    assert (summary["status"], summary["error"]) == ("failed", cause)


def test_a_refusal_raised_on_the_ranks_is_one_line(tmp_path, capfd):
    argv = [*TRAIN, "--optimizer", "locoprop-m", "--hypergrad-lr", "0.1", "--nproc", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert _one_line(capfd.readouterr().err).startswith(
        "locoprop: ranks 0 and 1 of 2 refused the run: hypergrad_lr > 0"
    )


def test_the_readme_torchrun_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    (example,) = [line for block in blocks for line in block.splitlines() if line.startswith("torchrun ")]
    argv = shlex.split(example)
    assert "--nproc" not in argv  # torchrun's own parser takes it for its --nproc-per-node
    # torchrun is python -m torch.distributed.run; a small run into this test's folder.
    command = [sys.executable, "-m", "torch.distributed.run", *argv[1:], *TINY[:6], "--steps", "4",
               "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, text=True, capture_output=True, timeout=HANG_GUARD_S, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert run_directory.read_json(_the_run(tmp_path) / "summary.json")["world_size"] == 2


# ------------------------------------------------------------------ Ray Tune
def test_an_interrupted_ray_trial_is_interrupted_and_the_rerun_finishes_it(tmp_path):
    """Ray Tune stops the trials of an interrupted experiment as its scheduler stops poor ones: the trial
    must not become "pruned", the command must say interrupted, and the same command must finish it."""
    argv = ["sweep", *TINY, "--backend", "ray", "--num-cpus", "2", "--optimizer", "adam", "--steps", "40",
            "--eval-every", "5", "--trials", "1", "--study", "r", "--out", str(tmp_path / "out")]  # fmt: skip
    marker = tmp_path / "paused"
    env = {**_pause_env(marker, 7), "RAY_TMPDIR": "/tmp"}
    driver = _start(argv, tmp_path, env)
    _paused_pid(driver, marker)  # the trial, in its Ray worker, after step 7
    driver.send_signal(signal.SIGINT)
    (tmp_path / "paused.go").write_text("")  # the trial trains on, until Tune stops it
    out, err = driver.communicate(timeout=HANG_GUARD_S)
    assert driver.returncode == 130, out + err
    assert "interrupted: the same command continues Ray Tune study" in out and "results table" not in out
    assert err.strip().splitlines()[-1].startswith("locoprop: interrupted; finished runs are kept")
    assert "Tuner.restore" not in out + err  # the CLI's line says what continues

    again = subprocess.run([sys.executable, "-m", "sweeps", *argv], cwd=tmp_path, text=True, capture_output=True,
                           timeout=HANG_GUARD_S, env={**ONE_THREAD, "RAY_TMPDIR": "/tmp"})  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    table = pd.read_csv(tmp_path / "out" / "r" / "sweep_results.csv")
    assert table["run_id"].nunique() == 1 and set(table["status"]) == {"ok"}
    assert table["step"].tolist() == list(range(0, 41, 5))  # one row per evaluation: none lost, none twice
