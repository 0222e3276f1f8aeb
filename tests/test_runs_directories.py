"""Run directories are never damaged or replaced by a refused or repeated command (SPEC §6, §7)."""

import dataclasses
import json
import pathlib
import re

import pytest

from sweeps.commands.cli import main
from sweeps.runner import RunConfig, RunExists, config_digest, run_directory, train
from sweeps.runner.data import synthetic

TINY = dict(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=128, epochs=2)
T = ["train", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "128", "--no-progress"]
DATA = synthetic()


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupt_after_epoch_1(row):
    if row["epoch"] == 1:
        raise KeyboardInterrupt


def _interrupted_run(out: pathlib.Path) -> RunConfig:
    config = RunConfig(optimizer="adam", out=str(out), **TINY)
    with pytest.raises(KeyboardInterrupt):
        train(config, on_evaluation=_interrupt_after_epoch_1, progress=False, data=DATA)
    assert run_directory.read_json(out / "summary.json")["status"] == "interrupted"
    return config


# Each is refused by a different layer: the optimizer's constructor, the
# registry's type checks, the run config, the data set's size.
REFUSED = {
    "negative lr": dict(hparams={"lr": -1.0}),
    "infinite lr": dict(hparams={"lr": float("inf")}),
    "bool lr": dict(hparams={"lr": True}),
    "unknown hparam": dict(hparams={"bogus": 1}),
    "batch above the training set": dict(batch_size=100_000),
    "infinite width": dict(width_mult=float("inf")),
}


@pytest.mark.parametrize("change", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_run_leaves_an_interrupted_run_byte_for_byte(tmp_path, change):
    """A valid fresh run would replace the interrupted one; a refused one must not touch it."""
    config = _interrupted_run(tmp_path / "run")
    before = _tree(tmp_path / "run")
    for resume in (False, True):
        with pytest.raises(ValueError):
            train(dataclasses.replace(config, **change), resume=resume, progress=False, data=DATA)
        assert _tree(tmp_path / "run") == before


@pytest.mark.parametrize("change", REFUSED.values(), ids=REFUSED.keys())
def test_a_refused_run_creates_nothing(tmp_path, change):
    config = RunConfig(optimizer="adam", out=str(tmp_path / "new" / "run"), **TINY)
    with pytest.raises(ValueError):
        train(dataclasses.replace(config, **change), progress=False, data=DATA)
    assert not (tmp_path / "new").exists()


def test_a_finished_run_is_returned_with_resume_and_never_replaced(tmp_path):
    config = RunConfig(optimizer="adam", out=str(tmp_path / "run"), **TINY)
    first = train(config, progress=False, data=DATA)
    before = _tree(tmp_path / "run")
    message = r"run holds a finished run \(status ok\), which a new run would replace; use --resume .* remove that"
    with pytest.raises(RunExists, match=message):
        train(config, progress=False, data=DATA)
    with pytest.raises(RunExists):  # another config, the same folder: refused too
        train(dataclasses.replace(config, hparams={"lr": 1e-4}), progress=False, data=DATA)
    assert _tree(tmp_path / "run") == before
    again = train(config, resume=True, progress=False, data=DATA)
    assert again.summary == first.summary and again.history == first.history
    assert _tree(tmp_path / "run") == before


def test_an_interrupted_run_is_never_restarted_from_zero_without_resume(tmp_path):
    """Its finished epochs are work: the same command without --resume is refused, unchanged."""
    straight = train(RunConfig(optimizer="adam", out=str(tmp_path / "straight"), **TINY), progress=False, data=DATA)
    config = _interrupted_run(tmp_path / "run")
    before = _tree(tmp_path / "run")
    with pytest.raises(RunExists, match="holds an unfinished run with a checkpoint .* use --resume"):
        train(config, progress=False, data=DATA)
    assert _tree(tmp_path / "run") == before
    resumed = train(config, resume=True, progress=False, data=DATA)
    losses = lambda rows: [(r["epoch"], r["train_loss"], r["test_loss"]) for r in rows]  # noqa: E731
    assert losses(resumed.history) == losses(straight.history)
    assert losses(run_directory.read_history(tmp_path / "run" / "metrics.csv")) == losses(straight.history)


def test_a_run_that_failed_before_its_first_checkpoint_starts_afresh(tmp_path):
    config = RunConfig(optimizer="adam", out=str(tmp_path / "run"), **TINY)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"status": "failed"}')
    assert train(config, progress=False, data=DATA).status == "ok"


def test_config_digest_names_everything_but_the_folder():
    config = RunConfig(optimizer="adam", hparams={"lr": 1e-3}, out="a", **TINY)
    digest = config_digest(config)
    assert re.fullmatch(r"[0-9a-f]{8}", digest)
    assert config_digest(dataclasses.replace(config, out="elsewhere")) == digest
    changed = [
        dict(hparams={"lr": 1e-4}), dict(hparams={}), dict(seed=1), dict(epochs=3), dict(batch_size=64),
        dict(schedule="constant"), dict(warmup_epochs=0.0), dict(width_mult=0.1), dict(data_dir="x"),
    ]  # fmt: skip
    digests = {config_digest(dataclasses.replace(config, **change)) for change in changed}
    assert digest not in digests and len(digests) == len(changed)


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_runs_with_different_settings_get_different_directories(tmp_path, capsys):
    """The issue's loop: two learning rates, one --out, both runs kept; the same command finds its run again."""
    folder = tmp_path / "loop"
    for lr in ("1e-3", "1e-4"):
        code, out, err = _cli(capsys, *T, "--optimizer", "adam", "--epochs", "1", "--lr", lr, "--out", str(folder))
        assert code == 0, err
    runs = sorted(folder.iterdir())
    assert [re.fullmatch(r"adam-autoencoder-synthetic-seed0-[0-9a-f]{8}", p.name) is not None for p in runs] == [1, 1]
    assert sorted(json.loads((p / "config.json").read_text())["hparams"]["lr"] for p in runs) == [1e-4, 1e-3]
    assert all(json.loads((p / "summary.json").read_text())["status"] == "ok" for p in runs)
    before = _tree(folder)

    command = [*T, "--optimizer", "adam", "--epochs", "1", "--lr", "1e-3", "--out", str(folder)]
    code, out, err = _cli(capsys, *command)
    assert code == 2 and "holds a finished run (status ok), which a new run would replace; use --resume" in err
    code, out, err = _cli(capsys, *command, "--resume")
    assert code == 0 and out.startswith("ok: adam")
    (run_dir,) = [p for p in runs if json.loads((p / "config.json").read_text())["hparams"]["lr"] == 1e-3]
    assert f"run directory: {run_dir}" in out
    assert _tree(folder) == before


def test_cli_refused_command_changes_nothing(tmp_path, capsys):
    """The issue's commands: a run, then the same with --lr -1; and --lr -1 in a fresh folder."""
    code, _, err = _cli(capsys, *T, "--epochs", "1", "--out", str(tmp_path / "dl"))
    assert code == 0, err
    before = _tree(tmp_path / "dl")
    code, _, err = _cli(capsys, *T, "--epochs", "1", "--out", str(tmp_path / "dl"), "--lr", "-1")
    assert code == 2 and "Invalid learning rate: -1.0" in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path / "dl") == before
    code, _, err = _cli(capsys, *T, "--optimizer", "adam", "--lr", "-1", "--out", str(tmp_path / "mix"))
    assert code == 2 and "Invalid learning rate: -1.0" in err
    assert not (tmp_path / "mix").exists()


def test_settings_that_change_nothing_name_one_run_directory(tmp_path, capsys):
    """The hypergradient mode at β = 0 (the default) computes nothing: no flag, implicit and unrolled train
    the same run, in one directory, and the second command finds the first's run; at β > 0 they differ."""
    base = RunConfig(optimizer="locoprop-m", out="a", **TINY)
    same = {config_digest(dataclasses.replace(base, hparams=h)) for h in
            ({}, {"hypergrad": "implicit"}, {"hypergrad": "unrolled", "hypergrad_iters": 3})}  # fmt: skip
    assert len(same) == 1
    adapting = {config_digest(dataclasses.replace(base, hparams={"hypergrad_lr": 0.1, "hypergrad": mode}))
                for mode in ("implicit", "unrolled")}  # fmt: skip
    assert len(adapting) == 2
    exact = RunConfig(optimizer="locoprop-s-exact", out="a", hparams={"hypergrad_lr": 0.1}, **TINY)
    unrolled = dataclasses.replace(exact, hparams={**exact.hparams, "hypergrad": "unrolled"})
    assert config_digest(exact) == config_digest(unrolled)  # the exact solve's sensitivity has a closed form
    args = [*T, "--optimizer", "locoprop-m", "--steps", "2", "--out", str(tmp_path)]
    assert _cli(capsys, *args, "--hypergrad", "implicit")[0] == 0
    code, out, _ = _cli(capsys, *args, "--hypergrad", "unrolled", "--resume")
    assert code == 0 and out.startswith("ok: locoprop-m")
    assert len(list(tmp_path.iterdir())) == 1  # returned, not trained again in another directory


def test_hypergrad_lr_0_is_accepted_by_any_optimizer(tmp_path, capsys):
    """β = 0 means no hypergradients, which is true of Adam: the default of LocoProp is no error elsewhere."""
    args = [*T, "--optimizer", "adam", "--steps", "2", "--out", str(tmp_path)]
    code, _, err = _cli(capsys, *args, "--hypergrad-lr", "0")
    assert code == 0, err
    assert _cli(capsys, *args, "--resume")[0] == 0 and len(list(tmp_path.iterdir())) == 1  # the same run
    code, _, err = _cli(capsys, *args, "--hypergrad-lr", "0.1")
    assert code == 2 and "Unknown hyperparameter(s) for 'adam': hypergrad_lr" in err
