"""The training loop, run records and the CLI (SPEC §5–§7)."""

import csv
import dataclasses
import gzip
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import HANG_GUARD_S, missing_system_dependency

from sweeps.runner import RunConfig, run_directory, train
from sweeps.runner import data as data_module
from sweeps.runner.data import DataUnavailable, load_dataset, read_idx
from sweeps.runner.train import lr_factor

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, epochs=3)
METRIC_COLUMNS = ["step", "epoch", "wall_time_s", "train_loss", "valid_loss", "test_loss", "lr"]


def _losses(run_dir):
    return [
        (r["step"], r["epoch"], r["train_loss"], r["valid_loss"], r["test_loss"], r["lr"])
        for r in run_directory.read_history(run_dir / "metrics.csv")
    ]


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "sweeps.commands.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=HANG_GUARD_S,
    )


# ---------------------------------------------------------------- schedules
def test_official_schedule_warms_up_then_decays_linearly():
    factors = [lr_factor("official", s, total_steps=10, warmup_steps=2) for s in range(10)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    cosine = [lr_factor("cosine", s, total_steps=10, warmup_steps=0) for s in (0, 5)]
    assert cosine == pytest.approx([1.0, 0.5])
    assert lr_factor("constant", 7, 10, 2) == 1.0


# ---------------------------------------------------------- runs and resume
@pytest.mark.parametrize(
    "optimizer, hparams",
    [("locoprop-m", dict(lr=1e-3, activation_lr=1.0, inner_momentum=0.9)), ("kfac", dict(fisher="sampled"))],
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, optimizer, hparams):
    straight = train(RunConfig(optimizer=optimizer, hparams=hparams, out=str(tmp_path / "a"), **TINY), progress=False)
    assert straight.status == "ok"

    # Crash after the metrics row of epoch 2 is written but before its checkpoint.
    real_save = run_directory.save_checkpoint

    def crash_at_epoch_2(path, state):
        if state["step"] == 2 * state["horizon"]["steps_per_epoch"]:
            raise KeyboardInterrupt
        real_save(path, state)

    config = RunConfig(optimizer=optimizer, hparams=hparams, out=str(tmp_path / "b"), **TINY)
    monkeypatch.setattr(run_directory, "save_checkpoint", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    assert run_directory.read_json(tmp_path / "b" / "summary.json")["status"] == "interrupted"
    monkeypatch.setattr(run_directory, "save_checkpoint", real_save)

    resumed = train(config, resume=True, progress=False)
    assert resumed.status == "ok"
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # no row lost, none twice, same numbers
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run is returned as it is, but only for the config it was made with.
    again = train(config, resume=True, progress=False)
    assert again.summary == resumed.summary
    with pytest.raises(ValueError, match=r"finished run in .* another config \(epochs: 3 there, 1 asked\)"):
        train(dataclasses.replace(config, epochs=1), resume=True, progress=False)


def test_fixed_seed_gives_identical_runs_and_another_seed_does_not(tmp_path):
    runs = [
        train(RunConfig(optimizer="adam", seed=seed, out=str(tmp_path / name), **TINY), progress=False)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    assert _losses(runs[0].run_dir) == _losses(runs[1].run_dir)
    assert _losses(runs[0].run_dir) != _losses(runs[2].run_dir)


def test_huge_learning_rate_ends_as_diverged(tmp_path):
    result = train(
        RunConfig(optimizer="sgd", hparams=dict(lr=1e4), schedule="constant", out=str(tmp_path), **TINY),
        progress=False,
    )
    assert result.status == "diverged"
    assert result.summary["steps"] == 1 and result.history[-1]["step"] == 1  # the first step's loss is not finite


def test_on_evaluation_can_stop_a_run(tmp_path):
    seen = []
    result = train(
        RunConfig(optimizer="adam", out=str(tmp_path), **TINY),
        on_evaluation=lambda row: seen.append(row) or True,
        progress=False,
    )
    assert result.status == "stopped"
    assert [row["epoch"] for row in seen] == [1]


def test_a_batch_larger_than_the_training_set_is_refused_and_a_full_batch_runs(tmp_path):
    with pytest.raises(
        ValueError,
        match="Invalid batch_size: 100000; the training split of 'synthetic' has 461 examples once the validation "
        "split is held out",
    ):
        train(RunConfig(optimizer="adam", out=str(tmp_path / "big"), **{**TINY, "batch_size": 100000}))
    assert not (tmp_path / "big").exists()
    full = train(RunConfig(optimizer="adam", out=str(tmp_path / "full"), **{**TINY, "batch_size": 461}), progress=False)
    assert full.summary["steps"] == TINY["epochs"]  # one full-batch step per epoch, as config.json says


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        train(RunConfig(batch_size=0))
    with pytest.raises(ValueError, match="Unknown optimizer: 'lion'"):
        train(RunConfig(optimizer="lion"))
    with pytest.raises(ValueError, match="Invalid schedule: 'step'"):
        train(RunConfig(schedule="step"))
    with pytest.raises(ValueError, match="Invalid width_mult: inf; expected a finite number > 0"):
        train(RunConfig(width_mult=float("inf")))
    with pytest.raises(ValueError, match="Invalid divergence_factor: nan"):
        train(RunConfig(divergence_factor=float("nan")))
    with pytest.raises(ValueError, match="Invalid seed: 1.5; expected an integer"):
        train(RunConfig(seed=1.5))
    with pytest.raises(ValueError, match="Invalid hyperparameter compile='yes' for 'locoprop-m'"):
        train(RunConfig(hparams={"compile": "yes"}))


# --------------------------------------------------------------------- data
def test_mnist5k_is_real_mnist_split_by_class():
    data = load_dataset("mnist5k")
    assert (len(data.train_x), len(data.test_x)) == (4000, 1000)
    assert data.train_x.shape[1] == 784 and data.train_x.dtype == torch.float32
    assert 0.0 == data.train_x.min() and data.train_x.max() == 1.0
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    # Real digits: about 19% of MNIST pixels are ink (> 0.5).
    assert 0.1 < (data.train_x > 0.5).float().mean() < 0.3


def test_fashion_mnist_reads_the_real_debian_files():
    try:
        data = load_dataset("fashion-mnist")
    except DataUnavailable as err:
        missing_system_dependency(f"Fashion-MNIST is not installed ({err})")
    assert (len(data.train_x), len(data.test_x)) == (60000, 10000)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    assert data.train_x.max() == 1.0


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def _write_idx(path, array, gz):
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


@pytest.mark.parametrize("layout, gz", [("", False), ("MNIST/raw", True)])
def test_mnist_from_a_directory_of_idx_files(tmp_path, monkeypatch, layout, gz):
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for stem, shape in [("train-images-idx3-ubyte", (6, 28, 28)), ("t10k-images-idx3-ubyte", (3, 28, 28))]:
        _write_idx(folder / f"{stem}{suffix}", rng.integers(0, 256, shape), gz)
    _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(6), gz)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(3), gz)
    monkeypatch.setenv("LOCOPROP_DATA_DIR", str(tmp_path))
    data = load_dataset("mnist")
    assert data.train_x.shape == (6, 784) and data.test_y.tolist() == [0, 1, 2]
    raw = read_idx(folder / f"train-images-idx3-ubyte{suffix}")
    assert torch.equal(data.train_x, torch.from_numpy(raw.reshape(6, -1).astype(np.float32) / 255))


def test_missing_mnist_gives_one_message_without_traceback(tmp_path):
    result = _cli("train", "--data", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr and str(tmp_path) in result.stderr


# ---------------------------------------------------------------------- CLI
def test_cli_train_writes_the_run_directory(tmp_path):
    result = _cli(
        "train", "--workload", "mlp", "--data", "synthetic", "--optimizer", "locoprop-m", "--epochs", "2",
        "--batch-size", "64", "--width-mult", "0.1", "--lr", "1e-3", "--activation-lr", "1.0",
        "--hparam", "inner_momentum=0.9", "--seed", "3", "--out", str(tmp_path), "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.glob("locoprop-m-mlp-synthetic-seed3-*")
    assert f"run directory: {run_dir}" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["hparams"] == {"lr": 1e-3, "activation_lr": 1.0, "inner_momentum": 0.9}
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["epoch"]) for r in rows] == [0, 1, 2]
    phases = ["forward_backward_time_s", "targets_time_s", "local_solve_time_s"]
    for column in [*METRIC_COLUMNS, "train_error", "valid_error", "test_error", *phases, "skipped_steps"]:
        assert column in rows[0], column
    assert float(rows[2]["local_solve_time_s"]) > 0
    # The phases are parts of the step: their sum is at most the step's time.
    assert sum(float(rows[2][column]) for column in phases) <= float(rows[2]["step_time_s"]) * (1 + 1e-9)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in [
        "final_train_loss",
        "best_test_loss",
        "status",
        "train_seconds",
        "peak_memory_bytes",
        "versions",
        "seed",
    ]:
        assert key in summary, key
    assert summary["status"] == "ok" and summary["seed"] == 3
    assert summary["final_train_loss"] < float(rows[0]["train_loss"])


def test_cli_train_diverges_cleanly(tmp_path):
    result = _cli(
        "train", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64", "--epochs", "2",
        "--optimizer", "sgd", "--lr", "1e4", "--schedule", "constant", "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("diverged")
