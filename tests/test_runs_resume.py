"""Resuming a run: every optimizer continues exactly; damaged records are rebuilt or refused (SPEC §6)."""

import json
import math
import pathlib

import pytest
import torch

from baselines import optimizer_names
from sweeps.commands.cli import main
from sweeps.runner import RunConfig, run_directory, train
from sweeps.runner.data import synthetic

TINY = dict(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=128, epochs=3)
DATA = synthetic()
TIMING_COLUMNS = {"wall_time_s", "step_time_s", "forward_backward_time_s", "targets_time_s", "local_solve_time_s"}
# Small enough that every optimizer's periodic work (preconditioners,
# inverses) happens both before the interruption and after it.
RESUME_HPARAMS = {
    "shampoo": dict(start_preconditioning_step=2, preconditioning_compute_steps=3),
    "soap": dict(precondition_frequency=3),
    "kfac": dict(inv_update_freq=3),
    "locoprop-m": dict(local_iters=2),
    "locoprop-s": dict(local_iters=2),
}


def _interrupt_after_epoch(epoch):
    def on_evaluation(row):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return on_evaluation


def _numbers(rows):
    """The rows without their timings, which differ from run to run; every number a float."""
    return [{k: v if v is None else float(v) for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def _same(a, b) -> bool:
    """Equal rows, NaN equal to NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _model_state(run_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight_adam(tmp_path_factory):
    """An uninterrupted run to compare resumed ones with."""
    out = tmp_path_factory.mktemp("straight") / "adam"
    return train(RunConfig(optimizer="adam", out=str(out), **TINY), progress=False, data=DATA)


def _interrupted_adam(out: pathlib.Path, epoch: int = 2) -> RunConfig:
    config = RunConfig(optimizer="adam", out=str(out), **TINY)
    with pytest.raises(KeyboardInterrupt):
        train(config, on_evaluation=_interrupt_after_epoch(epoch), progress=False, data=DATA)
    return config


@pytest.mark.parametrize("name", optimizer_names())
def test_every_optimizer_resumes_exactly_after_an_interrupt(tmp_path, name):
    config = dict(optimizer=name, hparams=RESUME_HPARAMS.get(name, {}), **{**TINY, "epochs": 2})
    straight = train(RunConfig(out=str(tmp_path / "straight"), **config), progress=False, data=DATA)
    interrupted = RunConfig(out=str(tmp_path / "interrupted"), **config)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, on_evaluation=_interrupt_after_epoch(1), progress=False, data=DATA)
    resumed = train(interrupted, resume=True, progress=False, data=DATA)
    assert resumed.status == straight.status == "ok"
    assert _same(_numbers(resumed.history), _numbers(straight.history))
    assert _same(
        _numbers(run_directory.read_history(tmp_path / "interrupted" / "metrics.csv")), _numbers(straight.history)
    )
    a, b = _model_state(tmp_path / "straight"), _model_state(tmp_path / "interrupted")
    assert all(torch.equal(a[key], b[key]) for key in a)


def _truncate(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))  # header and epoch 0


def _corrupt_lr(path):
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[2].split(",")
    cells[5] = "0.5"  # epoch 1's lr, still a number
    lines[2] = ",".join(cells)
    path.write_text("".join(lines))


DAMAGED_METRICS = {
    "truncated": _truncate,
    "corrupted lr": _corrupt_lr,
    "missing": lambda path: path.unlink(),
    "empty": lambda path: path.write_text(""),
    "garbage": lambda path: path.write_text("not,a\nmetrics,file,at all\n"),
    "half a row": lambda path: path.write_text(path.read_text()[:-45]),  # a crash while appending
}


@pytest.mark.parametrize("damage", DAMAGED_METRICS.values(), ids=DAMAGED_METRICS.keys())
def test_resume_rebuilds_a_damaged_metrics_csv_from_the_checkpoint(tmp_path, straight_adam, damage):
    config = _interrupted_adam(tmp_path / "run")
    damage(tmp_path / "run" / "metrics.csv")
    with pytest.warns(
        run_directory.RecordRebuilt, match=r"metrics.csv .*; rebuilt it from the checkpoint's rows"
    ) as caught:
        resumed = train(config, resume=True, progress=False, data=DATA)
    assert len(caught) == 1
    assert resumed.status == "ok"
    expected = _numbers(straight_adam.history)
    assert _same(_numbers(resumed.history), expected)
    assert _same(_numbers(run_directory.read_history(tmp_path / "run" / "metrics.csv")), expected)


def test_resume_of_intact_records_says_nothing(tmp_path, recwarn):
    config = _interrupted_adam(tmp_path / "run")
    assert train(config, resume=True, progress=False, data=DATA).status == "ok"
    assert not [w for w in recwarn if issubclass(w.category, run_directory.RecordRebuilt)]


def test_cli_says_in_one_line_that_it_rebuilt_metrics(tmp_path, capsys):
    args = ["train", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "128", "--epochs", "2",
            "--optimizer", "adam", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    (run_dir / "summary.json").unlink()  # as after a kill -9 …
    (run_dir / "metrics.csv").write_text("")  # … that emptied metrics.csv
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().err == (
        f"locoprop: {run_dir / 'metrics.csv'} lacks the column(s) step, epoch, wall_time_s, train_loss, valid_loss, "
        "test_loss, lr; rebuilt it from the checkpoint's rows\n"
    )


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _save_without_metrics(path):
    state = torch.load(path, weights_only=True)
    del state["metrics"]
    torch.save(state, path)


def _drop_a_row(path):
    state = torch.load(path, weights_only=True)
    del state["metrics"][1]
    torch.save(state, path)


DAMAGED_CHECKPOINTS = {
    "empty": (lambda path: path.write_bytes(b""), "cannot be read"),
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:1000]), "cannot be read"),
    "garbage": (lambda path: path.write_bytes(b"\x80\x02}q\x00(K\x65" * 50), "cannot be read"),
    "not a dict": (lambda path: torch.save([1, 2], path), "holds a list, not a locoprop checkpoint"),
    "no metrics": (_save_without_metrics, "lacks metrics"),
    "a row missing": (_drop_a_row, r"holds rows for steps 0, 6, expected 0-6 every 3"),
}


@pytest.mark.parametrize("damage, message", DAMAGED_CHECKPOINTS.values(), ids=DAMAGED_CHECKPOINTS.keys())
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_changing_nothing(tmp_path, damage, message):
    config = _interrupted_adam(tmp_path / "run")
    damage(tmp_path / "run" / "checkpoint.pt")
    before = _tree(tmp_path / "run")
    with pytest.raises(
        run_directory.DamagedRecord, match=rf"{tmp_path / 'run' / 'checkpoint.pt'}.*{message}.*--resume"
    ):
        train(config, resume=True, progress=False, data=DATA)
    assert _tree(tmp_path / "run") == before


@pytest.mark.parametrize(
    "content",
    [b"PK\x03\x04 not really a zip file", bytes(range(256)) * 20],  # torch's error for the second is 6 lines long
    ids=["zip header", "random bytes"],
)
def test_cli_damaged_checkpoint_gives_one_line_and_exit_code_2(tmp_path, capsys, content):
    args = ["train", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "128", "--epochs", "1",
            "--optimizer", "adam", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    (run_dir / "summary.json").unlink()  # as after a kill -9
    (run_dir / "checkpoint.pt").write_bytes(content)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{run_dir / 'checkpoint.pt'} cannot be read" in err


DAMAGED_FINISHED = {
    "truncated": (_truncate, r"holds rows for steps 0, expected 0-9 every 3"),
    "garbage": (lambda path: path.write_text("not,a\nmetrics,file\n"), "lacks the column"),
    "a bad cell": (lambda path: path.write_text(path.read_text().replace(".", "x", 3)), "line 2: a cell is not"),
    "missing": (lambda path: path.unlink(), "is missing"),
}


@pytest.mark.parametrize("damage, message", DAMAGED_FINISHED.values(), ids=DAMAGED_FINISHED.keys())
def test_a_finished_run_with_damaged_metrics_is_refused_naming_the_file(straight_adam, tmp_path, damage, message):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for path in straight_adam.run_dir.iterdir():
        (run_dir / path.name).write_bytes(path.read_bytes())
    damage(run_dir / "metrics.csv")
    config = RunConfig(optimizer="adam", out=str(run_dir), **TINY)
    with pytest.raises(
        run_directory.DamagedRecord, match=rf"{run_dir / 'metrics.csv'}.*{message}.*remove the run directory"
    ):
        train(config, resume=True, progress=False, data=DATA)


def test_a_bad_summary_json_is_refused_naming_the_file(tmp_path):
    config = _interrupted_adam(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text('{"status": "ok", ')
    with pytest.raises(run_directory.DamagedRecord, match=rf"{tmp_path / 'run' / 'summary.json'} is not valid JSON"):
        train(config, resume=True, progress=False, data=DATA)


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds a bare {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_summary_json_is_strict_json_with_null_for_a_non_finite_loss(tmp_path):
    data = synthetic()
    data.test_x[0, 0] = float("nan")  # one bad test example: the test loss is NaN, training goes on
    result = train(RunConfig(optimizer="adam", out=str(tmp_path), **TINY), progress=False, data=data)
    assert result.status == "ok"
    summary = _strict_json(tmp_path / "summary.json")
    assert summary == result.summary
    assert summary["final_test_loss"] is None and summary["best_test_loss"] is None
    assert math.isfinite(summary["final_train_loss"])
    # metrics.csv keeps the exact value.
    assert all(math.isnan(row["test_loss"]) for row in run_directory.read_history(tmp_path / "metrics.csv"))
