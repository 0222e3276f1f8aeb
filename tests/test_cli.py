"""The command line's contract (SPEC §7): every flag explained, and bad input
ending in one line that names it, never in a traceback.

Most cases call ``sweeps.commands.cli.main`` in-process (fast); Ctrl-C needs a real
process to interrupt.
"""

import argparse
import ast
import importlib
import json
import math
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch
from helpers import HANG_GUARD_S, run_cli
from test_analysis import RUNS, make_run

from baselines.registry import OPTIMIZERS
from sweeps.commands.bench import BenchConfig, bench
from sweeps.commands.cli import EXAMPLES, locoprop_parser
from sweeps.commands.flags import HPARAM_FLAGS
from sweeps.runner.data import DataShape
from sweeps.runner.workloads import get_workload

FLAGS_SOURCE = pathlib.Path(__file__).resolve().parents[1] / "sweeps" / "commands" / "flags.py"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = locoprop_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# ------------------------------------------------------------------ --help


def test_every_command_has_an_example():
    assert set(subcommands()) == set(EXAMPLES)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_flag_says_what_it_is_and_its_default(command):
    parser = subcommands()[command]
    for action in parser._actions:
        assert action.help, f"locoprop {command} {'/'.join(action.option_strings) or action.dest} has no help"
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            assert "default" in action.help or "required" in action.help, f"{action.option_strings}: {action.help}"
    assert "%(default)" not in parser.format_help()  # every placeholder was filled


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_help_ends_with_an_example_that_parses(command):
    parser = subcommands()[command]
    assert parser.format_help().rstrip().endswith(EXAMPLES[command])
    words = shlex.split(EXAMPLES[command])
    assert words[:2] == ["locoprop", command]
    assert locoprop_parser().parse_args(words[1:]).command == command


def test_locoprop_flags_name_their_symbols():
    """γ, η, K and λ as SPEC §2 writes them, next to the flags that set them."""
    flags = {a.dest: a.help for a in subcommands()["train"]._actions}
    assert "γ" in flags["activation_lr"] and "η" in flags["lr"] and "K" in flags["local_iters"]
    assert "λ" in flags["prox"] and "η" in flags["inner_schedule"]
    # Defaults come from the optimizer registry, per optimizer where they differ.
    assert "10 locoprop-m, locoprop-s; 1 locoprop-s-exact" in flags["activation_lr"]
    assert "default: 10)" in flags["local_iters"]


def test_every_flag_is_written_out_where_it_is_declared():
    """A grep for a flag (``--activation-lr``) finds its declaration: every flag of every command is a string
    literal of sweeps/commands/flags.py, none made from a name."""
    tree = ast.parse(FLAGS_SOURCE.read_text())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    parsers = [locoprop_parser(), *subcommands().values()]
    declared = {flag for parser in parsers for action in parser._actions for flag in action.option_strings}
    assert declared - {"-h", "--help"} - literals == set()
    assert {"--activation-lr", "--backend", "--storage", "--address"} <= declared


def test_each_hyperparameter_flag_sets_the_registry_hyperparameter_it_names():
    """The table of train's hyperparameter flags against the registry: each flag is its hyperparameter's name
    with dashes, some optimizer takes it, with the flag's type (and a default among its choices), and train
    declares exactly the table's, none missing and none extra."""
    registry = {name for spec in OPTIMIZERS.values() for name in spec.defaults}
    for name, flag in HPARAM_FLAGS.items():
        assert flag.flag == "--" + name.replace("_", "-")
        takers = [spec for spec in OPTIMIZERS.values() if name in spec.defaults]
        assert takers, f"{flag.flag}: no registered optimizer takes {name}"
        for spec in takers:
            assert spec.expected_type(name) is flag.type, (spec.name, flag.flag)
            assert flag.choices is None or spec.defaults[name] in flag.choices, (spec.name, flag.flag)
    declared = {a.dest: a.option_strings for a in subcommands()["train"]._actions if a.dest in registry}
    assert declared == {name: [flag.flag] for name, flag in HPARAM_FLAGS.items()}


# ------------------------------------------------------------ bad input

# argv (with {out}: a fresh folder, {file}: an existing file, {runs}: run
# directories, {bad_config}/{bad_summary}: a run with that file broken) →
# exit status and a fragment of the last line of stderr.
BAD_INPUT = [
    ("train --out {file}", "--out {file}: {file} is a file, not a directory"),
    ("train --out {file}/sub", "{file} is a file, not a directory"),
    ("train --optimizer adam --data synthetic --batch-size 64 --out /proc/locoprop-test", "cannot write /proc/"),
    ("train --optimizer adam --data synthetic --batch-size 64 --out /sys/locoprop-test", "cannot write /sys/"),
    (
        "train --width-mult inf --out {out}",
        "--width-mult: expected a finite number > 0 and at most 100, got 'inf'",
    ),
    (
        "train --width-mult 0 --out {out}",
        "--width-mult: expected a finite number > 0 and at most 100, got '0'",
    ),
    (
        "train --width-mult 1e308 --out {out}",
        "--width-mult: expected a finite number > 0 and at most 100, got '1e308'",
    ),
    ("train --epochs 0 --out {out}", "Invalid epochs: 0"),
    ("train --threads 0 --out {out}", "Invalid threads: 0; expected an integer ≥ 1"),
    ("compare --threads 0 --out {out}", "Invalid threads: 0; expected an integer ≥ 1"),
    ("train --data mnist --out {out}", "pass --data-dir DIR"),
    ("train --hparam inner_kwargs=notjson --out {out}", "inner_kwargs takes a JSON object"),
    ("train --optimizer adam --adaptive-gamma --out {out}", "--adaptive-gamma adapts LocoProp's γ; optimizer 'adam'"),
    ("train --hparam =1 --out {out}", "expected KEY=VALUE with a hyperparameter name as KEY, got '=1'"),
    ("train --lr 1e-3 --hparam lr=1e-2 --out {out}", "Hyperparameter lr is given twice (0.001 and 0.01); give it once"),
    ("train --hparam lr=1e-3 --hparam lr=1e-2 --out {out}", "Hyperparameter lr is given twice (0.001 and 0.01)"),
    ("report {runs} --out {file}", "--out {file}: {file} is a file, not a directory"),
    ("compare --address localhost:6379 --out {out}", "--backend, --storage and --address are for the tuning studies"),
    # --tune-seed without --tune, even at its default value 0, and on the suite's path too: nothing is tuned (a tiny
    # comparison, so that one that is not refused ends at once).
    (
        "compare --tune-seed 5 --data synthetic --optimizers adam --seeds 1 --steps 1 --batch-size 64 "
        "--width-mult 0.05 --no-progress --out {out}",
        "--tune-seed 5 is the training seed of the tuning trials, and nothing is tuned without --tune N: pass "
        "--tune N too, or drop --tune-seed",
    ),
    (
        "compare --tune-seed 0 --data synthetic --optimizers adam --seeds 1 --steps 1 --batch-size 64 "
        "--width-mult 0.05 --no-progress --out {out}",
        "--tune-seed 0 is the training seed of the tuning trials",
    ),
    (
        "compare --workloads autoencoder/synthetic --tune-seed 5 --optimizers adam --seeds 1 --steps 1 "
        "--batch-size 64 --width-mult 0.05 --no-progress --out {out}",
        "nothing is tuned without --tune N",
    ),
    (
        "compare --workloads autoencoder/synthetic --backend ray --out {out}",
        "--backend, --storage and --address are for the tuning studies: pass --tune N too",
    ),
    (
        "sweep --backend ray --storage postgresql://u:pw@host/db --optimizer adam --trials 1 --study s --out {out}",
        "--storage is an Optuna storage; --backend ray keeps its state under --out",
    ),
    (
        "sweep --address localhost:6379 --optimizer adam --trials 1 --study s --out {out}",
        "--address is a Ray cluster's; with --backend optuna share a --storage URL",
    ),
    ("report {bad_config} --out {out}", "config.json cannot be read (JSONDecodeError"),
    ("report {bad_summary} --out {out}", "summary.json holds a JSON list, not an object"),
    ("report {runs} --out {out} --target-loss nan", "argument --target-loss: expected a finite number, got 'nan'"),
    ("report {runs} --out {out} --target-loss inf", "argument --target-loss: expected a finite number, got 'inf'"),
    ("report {runs} --out {out} --target-loss 1e309", "argument --target-loss: expected a finite number, got '1e309'"),
    (
        "train --data synthetic --batch-size 64 --seed 99999999999999999999 --out {out}",
        "Invalid seed: 99999999999999999999; expected an integer from 0 to 4294967295",
    ),
    (
        "train --data synthetic --batch-size 64 --steps 10 --warmup-epochs 1e9 --out {out}",
        "Invalid warmup_epochs: 1000000000.0 is 7000000000 steps, longer than the run (10 steps, 1.429 epochs of 7",
    ),
    (
        "sweep --backend ray --optimizer adam --data synthetic --trials 1 --study a/../../b --out {out}",
        "Invalid --study 'a/../../b': a study keeps its files in --out/STUDY",
    ),
    (
        "sweep --optimizer adam --data synthetic --trials 1 --study a/../../b --out {out}",
        "Invalid --study 'a/../../b': a study keeps its files in --out/STUDY",
    ),
    (
        "sweep --optimizer adam --data synthetic --trials 1 --study s --grace-period 0 --out {out}",
        "Invalid --grace-period: 0; expected whole seconds ≥ 1",
    ),
    (
        "sweep --optimizer adam --data synthetic --trials 1 --study s --sampler-seed 99999999999 --out {out}",
        "Invalid sampler seed: 99999999999; expected an integer from 0 to 4294967295",
    ),
    (
        "train --optimizer adam --schedule constant --warmup-epochs 0.5 --epochs 1 --out {out}",
        "warmup_epochs=0.5 has no effect with schedule 'constant'",
    ),
    ("bench --steps 0", "Invalid steps: 0; expected an integer ≥ 1"),
    ("bench --warmup -1", "Invalid warmup: -1; expected an integer ≥ 0"),
    ("bench --batch-size 64,0", "Invalid batch_size: 0; expected an integer ≥ 1"),
    ("bench --local-iters 0", "Invalid local_iters: 0; expected an integer ≥ 1"),
    ("bench --threads 0", "Invalid threads: 0; expected an integer ≥ 1"),
    # An optimizer a workload's model refuses: before anything runs (Adam, and a whole first pair, ran first).
    (
        "compare --workloads autoencoder,cnn --optimizers adam,locoprop-s-exact --steps 2 --seeds 1 --batch-size 20 "
        "--out {out}",
        "solve='exact' supports nn.Linear units only; unit '1' is a Conv2d",
    ),
    (
        "compare --workload cnn --optimizers adam,locoprop-s-exact --steps 2 --seeds 1 --batch-size 20 --out {out}",
        "solve='exact' supports nn.Linear units only",
    ),
    (
        "sweep --workload cnn --optimizer locoprop-s-exact --trials 1 --steps 2 --batch-size 20 --study s --out {out}",
        "solve='exact' supports nn.Linear units only",
    ),
    ("bench --workload cnn --optimizers adam,locoprop-s-exact", "solve='exact' supports nn.Linear units only"),
    ("bench --optimizers ,", "argument --optimizers: expected one or more comma-separated values, got ','"),
    ("bench --width-mult 1,inf", "--width-mult: expected a finite number > 0 and at most 100, got 'inf'"),
    pytest.param(
        "bench --device cuda",
        "Invalid device: 'cuda'; no CUDA device is available",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
    ),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_ends_in_one_line_with_status_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCOPROP_DATA_DIR", raising=False)
    places = {"out": tmp_path / "out", "file": tmp_path / "a-file", "runs": tmp_path / "runs"}
    places["file"].write_text("not a folder\n")
    make_run(places["runs"], *RUNS[0])
    for name, broken, content in [("bad_config", "config.json", "{not json"), ("bad_summary", "summary.json", "[]")]:
        places[name] = tmp_path / name
        (make_run(places[name], *RUNS[0]) / broken).write_text(content)
    words = [word.format(**places) for word in argv.split()]
    status, _, err = run_cli(words, capsys)
    assert status == 2, err
    assert "Traceback" not in err
    assert message.format(**places) in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].startswith("locoprop")
    assert not places["out"].exists()  # refused before anything was written


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "Invalid steps: 0"),
        ("width_mult", math.inf, "Invalid width_mult: inf; expected a finite number > 0"),
        ("optimizer", "adamm", "Unknown optimizer: 'adamm'"),
        ("device", "tpu", "Invalid device: 'tpu'; expected cpu or cuda"),
    ],
)
def test_bench_refuses_a_bad_config_before_running_any(field, value, message, monkeypatch):
    """The Python API checks what the flags check, for every config before the first subprocess."""
    monkeypatch.setattr("sweeps.commands.bench._run_worker", lambda *a, **k: pytest.fail("a benchmark ran"))
    with pytest.raises(ValueError, match=re.escape(message)):
        bench([BenchConfig(), BenchConfig(**{field: value})])


def test_a_workload_refuses_a_width_mult_that_is_not_finite():
    with pytest.raises(ValueError, match="Invalid width_mult: inf; expected a finite number > 0"):
        get_workload("mlp").build_model(DataShape(), width_mult=math.inf)


def test_an_exact_solve_that_fails_is_one_line_and_a_failed_run(tmp_path, capsys):
    """C + λI singular in float32 (8 latent factors, tiny λ): the run fails, and says to raise --prox."""
    argv = ["train", "--workload", "mlp", "--data", "synthetic", "--optimizer", "locoprop-s-exact", "--prox", "1e-30",
            "--batch-size", "100", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    status, _, err = run_cli(argv, capsys)
    assert status == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not positive definite" in err and "(with --prox, now 1e-30)" in err
    (summary,) = tmp_path.glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "failed"


# --------------------------------------------------------------- Ctrl-C


# `locoprop ARGV` in a process that presses Ctrl-C itself just before the step CTRL_C_STEP (0-based): the
# interrupt lands at a known step, so the run cannot finish before it, whatever the machine's speed.
CTRL_C_STEP = 5
CTRL_C_AT_A_STEP = f"""
import os, signal, sys
from sweeps.runner.train import _Run
from sweeps.commands.cli import main

real_train_step = _Run.train_step

def train_step(self, x, y):
    if self.step == {CTRL_C_STEP}:
        os.kill(os.getpid(), signal.SIGINT)  # delivered before this step runs
    return real_train_step(self, x, y)

_Run.train_step = train_step
sys.exit(main())
"""


def test_ctrl_c_during_train_prints_the_command_that_resumes(tmp_path):
    # 128 steps per epoch: the interrupt comes in epoch 1, after the checkpoint of the evaluation at step 0.
    argv = ["train", "--workload", "mlp", "--data", "synthetic", "--optimizer", "adam", "--batch-size", "4",
            "--epochs", "3", "--out", str(tmp_path / "runs"), "--no-progress"]  # fmt: skip
    cli = [sys.executable, "-m", "sweeps.commands.cli"]
    process = subprocess.run(
        [sys.executable, "-c", CTRL_C_AT_A_STEP, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=HANG_GUARD_S,
    )
    err = process.stderr
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    resume = shlex.join(["locoprop", *argv, "--resume"])
    assert err.strip() == (
        f"locoprop: interrupted; the run is checkpointed at its last finished step and continues with: {resume}"
    )

    resumed = subprocess.run([*cli, *shlex.split(resume)[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"]) == ("ok", 3)
    epochs = [float(line.split(",")[1]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == [0, 1, 2, 3]  # the interrupted epoch was redone, not duplicated


def test_an_interrupted_compare_says_the_same_command_continues(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    argv = ["compare", "--seeds", "0", "--out", "runs/x y"]
    monkeypatch.setattr("sweeps.commands.compare.compare", interrupt)
    status, _, err = run_cli(argv, capsys)
    assert status == 130
    command = shlex.join(["locoprop", *argv])
    assert err == f"locoprop: interrupted; finished runs are kept, and the same command continues: {command}\n"


def test_an_interrupted_sweep_prints_its_command_without_the_storage_password(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sweeps.search.optuna_backend.run_optuna_sweep", interrupt)
    url = "postgresql://user:secretpw@db.example/sweeps"
    argv = ["sweep", "--optimizer", "adam", "--trials", "2", "--study", "s", "--out", "x", "--storage", url]
    status, out, err = run_cli(argv, capsys)
    assert status == 130
    assert "secretpw" not in out + err
    assert "--storage 'postgresql://user:***@db.example/sweeps'" in err


def test_main_keeps_os_errors_to_one_line(monkeypatch, tmp_path, capsys):
    def unreadable(inputs, out, target_loss=None):
        raise PermissionError(13, "Permission denied", str(tmp_path / "runs" / "metrics.csv"))

    monkeypatch.setattr("analysis.report.write_report", unreadable)
    status, _, err = run_cli(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")], capsys)
    assert status == 2
    assert (
        err == f"locoprop: cannot use {tmp_path / 'runs' / 'metrics.csv'} (Permission denied); check that path "
        "and its permissions\n"
    )


def test_report_over_a_folder_with_one_damaged_run_reports_the_others(tmp_path, capsys):
    make_run(tmp_path / "runs", *RUNS[0])
    broken = make_run(tmp_path / "runs", *RUNS[1])
    (broken / "config.json").write_text("{not json")
    status, _, err = run_cli(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")], capsys)
    assert status == 0, err
    assert err.startswith(f"locoprop: skipped: {broken / 'config.json'} cannot be read (JSONDecodeError")
    assert len(err.splitlines()) == 1
    assert (tmp_path / "report" / "report.md").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--optimizers", "adam,locoprop-m,adam", "argument --optimizers: optimizer adam given twice in "
         "'adam,locoprop-m,adam'; give each once"),
        ("--hypergrad", "implicit,implicit", "argument --hypergrad: hypergrad mode implicit given twice"),
        ("--batch-size", "1000,1000", "argument --batch-size: batch size 1000 given twice in '1000,1000'"),
        ("--width-mult", "1,1.0", "argument --width-mult: width multiplier 1.0 given twice in '1,1.0'"),
    ],
)  # fmt: skip
def test_bench_refuses_a_value_given_twice_naming_the_flag_and_the_value(flag, value, message, monkeypatch, capsys):
    """Each list flag of bench gives one row per value: a value given twice would time one configuration twice
    (or, deduplicated, silently drop what was typed), so it is refused as compare refuses one."""
    monkeypatch.setattr("sweeps.commands.bench.bench", lambda configs: pytest.fail("a benchmark ran"))
    status, out, err = run_cli(["bench", flag, value, "--json"], capsys)
    assert (status, out) == (2, "")
    assert message in err.strip().splitlines()[-1]


@pytest.mark.parametrize("given, seed", [([], 0), (["--tune-seed", "7"], 7), (["--tune-seed", "0"], 0)])
def test_compare_tunes_on_the_tune_seed_given_else_on_seed_0(given, seed, monkeypatch, capsys):
    tunings = []
    monkeypatch.setattr("sweeps.commands.compare.compare", lambda *args, tuning, **kwargs: tunings.append(tuning))
    status, _, err = run_cli(["compare", "--tune", "2", *given, "--seeds", "1", "--out", "x"], capsys)
    assert status == 0, err
    assert [(t.trials, t.seed) for t in tunings] == [(2, seed)]


def test_compare_refuses_a_bad_seed_before_it_prints_anything(tmp_path, capsys):
    argv = ["compare", "--seeds", "1,4294967296", "--optimizers", "adam", "--steps", "2", "--data", "synthetic",
            "--out", str(tmp_path / "c")]  # fmt: skip
    status, out, err = run_cli(argv, capsys)
    assert (status, out) == (2, "")
    assert err.strip() == "locoprop: Invalid seed: 4294967296; expected an integer from 0 to 4294967295"


def test_no_command_prints_the_help_to_stderr_with_status_2(capsys):
    status, out, err = run_cli([], capsys)
    assert status == 2 and out == "" and "train" in err and "compare" in err


def test_ctrl_c_before_a_run_s_first_checkpoint_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    """Interrupted in a time budget's calibration, train said the run was checkpointed at its last step: there
    was no run directory, and the rerun measured the calibration again."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("sweeps.runner.train"), "calibrate_run", interrupt)
    argv = ["train", "--optimizer", "adam", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64",
            "--time-budget", "5", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    status, _, err = run_cli(argv, capsys)
    assert status == 130 and not any(tmp_path.iterdir())
    again = shlex.join(["locoprop", *argv, "--resume"])
    assert err.strip() == (
        f"locoprop: interrupted before the run's first checkpoint; nothing was kept, and the same command starts it: "
        f"{again}"
    )


def test_resume_with_a_changed_flag_names_the_flag(tmp_path, capsys):
    train = ["train", "--optimizer", "adam", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64",
             "--steps", "2", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert run_cli([*train, "--lr", "0.01"], capsys)[0] == 0
    (first,) = tmp_path.iterdir()
    status, _, err = run_cli([*train, "--lr", "0.02", "--resume"], capsys)
    assert status == 0
    (second,) = set(tmp_path.iterdir()) - {first}
    assert err.splitlines()[0] == (
        f"locoprop: --resume: no run with these settings in {tmp_path}, so a new one starts in {second.name}; "
        f"the run {first.name} there differs in --lr 0.01 there, 0.02 now (to continue it, give its values)"
    )
    # The same flags again resume their own run, without a word.
    assert run_cli([*train, "--lr", "0.02", "--resume"], capsys)[2] == ""
    # Nothing at all to resume is said too (it started afresh without a word).
    status, _, err = run_cli([*train[:-1], str(tmp_path / "empty"), "--resume"], capsys)
    assert status == 0 and err.splitlines()[0].startswith(f"locoprop: --resume: no run to continue in {tmp_path}")


def test_adaptive_gamma_trains_with_the_recipe_and_a_flag_given_as_well_wins(tmp_path, capsys):
    from locoprop import ADAPTIVE_GAMMA

    train = ["train", "--optimizer", "locoprop-m", "--data", "synthetic", "--width-mult", "0.05", "--batch-size",
             "64", "--steps", "2", "--no-progress", "--adaptive-gamma"]  # fmt: skip
    assert run_cli([*train, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run_cli([*train, "--relative-activation-lr-ceiling", "0.5", "--out", str(tmp_path / "b")], capsys)[0] == 0
    (recipe,), (overridden,) = (
        [json.loads(path.read_text())["hparams"] for path in (tmp_path / name).glob("*/config.json")] for name in "ab"
    )
    assert {key: recipe[key] for key in ADAPTIVE_GAMMA} == ADAPTIVE_GAMMA
    assert overridden["relative_activation_lr_ceiling"] == 0.5
    assert overridden["relative_activation_lr"] == ADAPTIVE_GAMMA["relative_activation_lr"]


def test_bench_command_prints_one_json_object_per_optimizer(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.commands.cli", "bench", "--batch-size", "64", "--width-mult", "0.05",
         "--optimizers", "adam,locoprop-m,locoprop-s-exact", "--steps", "2", "--warmup", "1", "--json",
         "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["optimizer"] for r in records] == ["adam", "locoprop-m", "locoprop-s-exact"]
    for record in records:
        assert {"optimizer", "step_time_s", "ratio_to_adam", "flop_bound_ratio", "peak_mem_bytes"} <= set(record)
        assert record["step_time_s"] > 0 and record["peak_mem_bytes"] > 0
    adam, loco, exact = records
    assert adam["ratio_to_adam"] == 1.0 and adam["flop_bound_ratio"] is None
    # Each ratio uses the Adam steps taken side by side in the same process.
    assert loco["ratio_to_adam"] == pytest.approx(loco["step_time_s"] / loco["adam_step_time_s"])
    assert loco["flop_bound_ratio"] == pytest.approx(loco["step_time_s"] / loco["flop_bound_s"])
    assert exact["flop_bound_ratio"] is None  # no K local iterations to price
    # The roofline: one backprop step is 3 forwards (2·N·d_in·d_out per linear map), a LocoProp step adds K = 10
    # local iterations of 2 forwards each; every record reads the same peaks, measured once.
    model = get_workload("autoencoder").build_model(DataShape(), width_mult=0.05)
    forward = sum(2 * 64 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert adam["step_flops_by_dtype"] == exact["step_flops_by_dtype"] == {"float32": 3 * forward}
    assert loco["step_flops_by_dtype"] == {"float32": (3 + 2 * 10) * forward}
    peaks = adam["matmul_peak_gflops"]
    assert set(peaks) == {"float32", "bfloat16"} and all(peak > 0 for peak in peaks.values())
    for record in records:
        assert record["precision"] == "fp32" and record["matmul_peak_gflops"] == peaks
        assert record["step_flops"] == sum(record["step_flops_by_dtype"].values())
        assert record["achieved_gflops"] == pytest.approx(record["step_flops"] / record["step_time_s"] / 1e9)
        assert record["peak_gflops"] == pytest.approx(peaks["float32"])
        assert record["peak_fraction"] == pytest.approx(record["achieved_gflops"] / record["peak_gflops"])
        assert record["roofline_s"] == pytest.approx(record["step_flops"] / (peaks["float32"] * 1e9))


def test_bench_runs_on_the_threads_given_and_says_how_many(monkeypatch, capsys):
    """--threads as train's: every optimizer and the matmul peaks it is read against run on that many intra-op
    threads, and the record and the printed table say so (in this process: a worker process runs the same
    ``measure`` on the config it is handed)."""
    from sweeps.commands import bench as bench_module

    peak_threads, records = [], []
    real_bench = bench_module.bench

    def fake_peaks(device, repeats=5):  # the real ones take seconds; only their threads matter here
        peak_threads.append(torch.get_num_threads())
        return {"float32": 1e11, "bfloat16": 1e11}

    def kept(configs):
        records.extend(real_bench(configs))
        return records

    monkeypatch.setattr(bench_module, "matmul_peaks", fake_peaks)
    monkeypatch.setattr(bench_module, "_run_worker", lambda config, env=None: bench_module.measure(config))
    monkeypatch.setattr(bench_module, "bench", kept)
    argv = ["bench", "--optimizers", "adam", "--batch-size", "64", "--width-mult", "0.05", "--steps", "1",
            "--warmup", "0", "--device", "cpu", "--threads", "3"]  # fmt: skip
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    # 3: neither this process's count nor the default's (one fewer than the cores), on any machine of ≤ 3 cores
    assert peak_threads == [3] and [r["threads"] for r in records] == [3]
    assert "device: cpu, 3 threads" in out


def test_bench_on_two_processes_counts_the_bytes_each_sends(tmp_path):
    """Adam under DDP sends its gradient once per step (ring all-reduce on 2 ranks: 2n(W−1)/W = n bytes);
    LocoProp-M sends every unit's local gradient in each of its K = 3 iterations."""
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.commands.cli", "bench", "--batch-size", "64", "--width-mult", "0.05",
         "--optimizers", "adam,locoprop-m,locoprop-s", "--local-iters", "3", "--steps", "2", "--warmup", "1",
         "--nproc", "2", "--json", "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    adam, loco_m, loco_s = [json.loads(line) for line in result.stdout.splitlines()]
    model = get_workload("autoencoder").build_model(DataShape(), width_mult=0.05)
    gradient_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert adam["nproc"] == 2 and adam["comm_bytes_per_step"] == gradient_bytes
    assert loco_m["comm_bytes_per_step"] == 3 * gradient_bytes
    # S on 2 ranks in its Gram form where that sends less: C's lower triangle and Gᵀx̃ once per step.
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    gram = [(m.in_features + 1) * (m.in_features + 2) // 2 + m.out_features * (m.in_features + 1) for m in layers]
    batch = [3 * m.out_features * (m.in_features + 1) for m in layers]
    assert loco_s["comm_bytes_per_step"] == 4 * sum(min(g, b) for g, b in zip(gram, batch))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--optimizers", "adam,adam", "optimizer adam given twice in 'adam,adam'; give each once"),
        ("--seeds", "1,2,1", "seed 1 given twice in '1,2,1'; give each once"),
        ("--optimizers", "adam,,locoprop-m", "expected comma-separated values, none empty, got 'adam,,locoprop-m'"),
        ("--seeds", "-1", "expected seeds ≥ 0, got -1 in '-1'"),
    ],
)
def test_compare_refuses_a_list_that_would_count_a_run_twice_or_holds_a_slip(tmp_path, capsys, flag, value, message):
    small = ["--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64", "--steps", "1", "--no-progress"]
    other = ["--seeds", "1"] if flag == "--optimizers" else ["--optimizers", "adam"]
    status, _, err = run_cli(["compare", *small, *other, flag, value, "--out", str(tmp_path)], capsys)
    assert status == 2 and message in err
    assert not list(tmp_path.iterdir())
