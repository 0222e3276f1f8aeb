"""Ray Tune trials on several Ray Train workers: `locoprop sweep --backend ray --workers-per-trial N` (SPEC §8, §11)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest
from helpers import HANG_GUARD_S

from sweeps.commands.cli import main
from sweeps.runner import RunConfig, run_directory
from sweeps.runner.train import train
from sweeps.search.ray_backend import run_ray_sweep
from sweeps.search.results import sweep_setup
from sweeps.search.search_space import load_space

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = RunConfig(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, epochs=3)
SWEEP = ["sweep", "--optimizer", "adam", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64",
         "--epochs", "3", "--trials", "2", "--study", "s", "--no-progress"]  # fmt: skip


def _losses(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["train_loss"], r["valid_loss"], r["test_loss"]) for r in rows]


def test_trials_on_two_workers_follow_the_one_process_runs(tmp_path):
    """Two trials of 2 gloo workers each: every trial's run is data-parallel on 2 ranks and its losses are
    those of the same config trained in one process on the whole batch (float32 sums in another order: 1e-5)."""
    out = tmp_path / "out"
    # The workers must import this checkout's code, as the CLI does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "sweeps", *SWEEP, "--backend", "ray", "--num-cpus", "2", "--workers-per-trial",
               "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert json.loads((out / "s" / "sweep.json").read_text())["setup"]["workers_per_trial"] == 2
    frame = pd.read_csv(out / "s" / "sweep_results.csv")
    finals = frame.sort_values("step").groupby("run_id").tail(1)
    assert len(finals) == 2 and set(finals["status"]) <= {"ok", "pruned"} and "ok" in set(finals["status"])
    for _, final in finals.iterrows():
        run_dir = pathlib.Path(final["run_dir"])
        summary = run_directory.read_json(run_dir / "summary.json")
        assert summary["world_size"] == 2
        # A trial that ASHA stopped ended its run itself, as "stopped"; the others ran their budget.
        assert summary["status"] == {"ok": "ok", "pruned": "stopped"}[final["status"]]
        got = _losses(run_directory.read_history(run_dir / "metrics.csv"))
        assert [row[0] for row in got] == list(range(0, 7 * len(got), 7))  # an evaluation per epoch, none twice

        one = tmp_path / "one" / run_dir.name
        config = RunConfig.from_dict({**run_directory.read_json(run_dir / "config.json"), "out": str(one)})
        expected = _losses(train(config, progress=False).history)
        assert expected[-1][1] < expected[0][1]  # it trained
        for g, e in zip(got, expected):  # a stopped trial: up to where it stopped
            assert g == pytest.approx(e, rel=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "optuna", "--workers-per-trial", "2"], "--workers-per-trial runs each trial on Ray Train "
                                                                "workers: use it with --backend ray"),
        (["--backend", "ray", "--workers-per-trial", "0"], "Invalid --workers-per-trial: 0; expected an integer ≥ 1"),
        (["--backend", "ray", "--workers-per-trial", "2", "--batch-size", "63"],
         "Invalid batch_size: 63 does not split into 2 equal shards; use a multiple of 2"),
        (["--backend", "ray", "--workers-per-trial", "2", "--optimizer", "kfac"], "K-FAC is not data-parallel here"),
        (["--backend", "ray", "--workers-per-trial", "2", "--gpus-per-trial", "1"],
         "Invalid --gpus-per-trial: 1 for --workers-per-trial 2; each worker needs whole GPUs of its own"),
    ],
)  # fmt: skip
def test_a_sweep_its_workers_cannot_run_is_refused_in_one_line(argv, message, tmp_path, capsys):
    status = main([*SWEEP, *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("locoprop: ")
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_study_is_continued_only_with_its_number_of_workers(tmp_path):
    space = load_space("adam")
    (tmp_path / "s").mkdir()
    state = tmp_path / "s" / "sweep.json"
    state.write_text(json.dumps({"setup": {**sweep_setup(TINY, space), "workers_per_trial": 2}, "parts": []}))
    with pytest.raises(ValueError, match=re.escape("workers_per_trial: 2 in the study, 1 now")):
        run_ray_sweep(TINY, space, study_name="s", out=tmp_path, trials=1)
    # A study made before the count was recorded had one worker per trial.
    state.write_text(json.dumps({"setup": sweep_setup(TINY, space), "parts": []}))
    with pytest.raises(ValueError, match=re.escape("workers_per_trial: 1 in the study, 2 now")):
        run_ray_sweep(TINY, space, study_name="s", out=tmp_path, trials=1, workers_per_trial=2)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.json"]
