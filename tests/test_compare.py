"""``locoprop compare``: the protocol of SPEC §7/§9 end to end (tuning on validation, fresh seeds, resume)."""

import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest
from helpers import HANG_GUARD_S

from analysis.load import CompareFolderRead
from analysis.report import write_report
from baselines import registry
from sweeps.commands import compare as compare_module
from sweeps.commands import presets
from sweeps.commands.cli import main
from sweeps.commands.compare import Tuning, compare
from sweeps.commands.suite import SUITE
from sweeps.runner import RunConfig, budget, calibration
from sweeps.runner.train import _Run
from sweeps.search import optuna_backend
from sweeps.search.results import best_trial
from sweeps.search.search_space import load_space

BASE = RunConfig(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, steps=6, eval_every=3)


def _trial_summaries(study_dir: pathlib.Path) -> dict[str, dict]:
    return {
        path.parent.name: {
            "summary": json.loads(path.read_text()),
            "hparams": json.loads((path.parent / "config.json").read_text())["hparams"],
        }
        for path in sorted(study_dir.glob("*/trials/*/summary.json"))
    }


def test_tuned_compare_selects_on_validation_reruns_fresh_seeds_and_resumes_without_repeats(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    tuning = Tuning(trials=3, seed=0)
    real_final_run = compare_module._final_run
    calls = []

    def crash_in_the_second_final_run(*args, **kwargs):
        calls.append(args[1:4])
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash after tuning, during the final runs
        return real_final_run(*args, **kwargs)

    monkeypatch.setattr(compare_module, "_final_run", crash_in_the_second_final_run)
    with pytest.raises(KeyboardInterrupt):
        compare(BASE, ["adam", "sgd"], [1, 2], out, tuning=tuning, progress=False)
    studies = {name: _trial_summaries(out / "tuning" / name) for name in ("adam", "sgd")}
    assert [len(trials) for trials in studies.values()] == [3, 3]
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("tuning/*/*/trials/*/summary.json")}

    # The same command again: no trial runs again, the final runs finish.
    monkeypatch.setattr(optuna_backend, "train", lambda *a, **k: pytest.fail("a tuning trial ran again"))
    monkeypatch.setattr(compare_module, "_final_run", real_final_run)
    report = compare(BASE, ["adam", "sgd"], [1, 2], out, tuning=tuning, progress=False)
    assert {path: path.stat().st_mtime_ns for path in out.glob("tuning/*/*/trials/*/summary.json")} == stamps
    finals = sorted(out.glob("runs/*/summary.json"))
    assert len(finals) == 4 and report.exists()

    protocol = json.loads((out / "protocol.json").read_text())
    for name, trials in studies.items():
        # Selection: the finished trial with the lowest final validation loss (computed here from its files).
        finished = {t: v for t, v in trials.items() if v["summary"]["status"] == "ok"}
        chosen = min(finished.values(), key=lambda v: v["summary"]["final_valid_loss"])
        tuned = protocol["tuning"]["optimizers"][name]
        assert tuned["best"]["valid_loss"] == pytest.approx(chosen["summary"]["final_valid_loss"])
        assert tuned["best"]["hparams"] == chosen["hparams"]
        assert tuned["trials"] == 3 and tuned["finished"] == len(finished)
        assert tuned["train_seconds"] == pytest.approx(sum(v["summary"]["train_seconds"] for v in trials.values()))
        # The final runs use the selection, with the fresh seeds only.
        runs = [json.loads(p.parent.joinpath("config.json").read_text()) for p in finals]
        mine = [run for run in runs if run["optimizer"] == name]
        assert sorted(run["seed"] for run in mine) == [1, 2]
        assert all(run["hparams"] == chosen["hparams"] for run in mine)
    assert protocol["budget"] == {"kind": "steps", "value": 6} and protocol["seeds"] == [1, 2]
    assert protocol["split_sizes"] == {"train": 461, "valid": 51, "test": 128}
    assert "Tuning" in report.read_text() or "tuning" in report.read_text()


def test_report_on_a_compare_folder_is_the_report_compare_wrote(tmp_path, capsys):
    """`locoprop report OUT` reads a compare folder as compare did: its final runs, not the tuning trials
    beside them, with its protocol.json; so it writes the same report."""
    out = tmp_path / "cmp"
    compare(BASE, ["adam", "sgd"], [1, 2], out, tuning=Tuning(trials=2, seed=0), progress=False)
    read_as = f"{out} is a locoprop compare folder: read as its 4 final runs listed in protocol.json, without its"
    with pytest.warns(CompareFolderRead, match=re.escape(read_as)):
        report = write_report([out], tmp_path / "again")
    for name in ("report.md", "results.md", "results.csv", "pairs.csv", "all_runs.csv"):
        assert (report.parent / name).read_text() == (out / "report" / name).read_text(), name

    # With other inputs the runs are still the final ones, and the report says that the protocol is not used.
    with pytest.warns(CompareFolderRead, match="its protocol.json is not used, since other inputs are reported"):
        mixed = write_report([out, out / "runs"], tmp_path / "mixed").read_text()
    assert "No protocol.json was given" in mixed

    # A protocol.json of an older locoprop lists no runs: every run in runs/ is read, and the notice says so.
    protocol = json.loads((out / "protocol.json").read_text())
    del protocol["runs"]
    (out / "protocol.json").write_text(json.dumps(protocol))
    status = main(["report", str(out), "--out", str(tmp_path / "older")])
    err = capsys.readouterr().err
    assert status == 0 and err.splitlines() == [
        f"locoprop: {out} is a locoprop compare folder: read as every run in {out / 'runs'} (protocol.json lists no "
        "runs, as an older locoprop wrote it), without its tuning trials"
    ]
    assert (tmp_path / "older" / "results.md").read_text() == (out / "report" / "results.md").read_text()


def test_the_tuning_seed_is_not_a_final_seed():
    with pytest.raises(ValueError, match=r"final seeds \[0, 1\] include the tuning seed 0"):
        compare(BASE, ["adam"], [0, 1], pathlib.Path("unused"), tuning=Tuning(trials=2, seed=0))


def test_best_trial_reads_validation_and_only_finished_trials(tmp_path):
    """Trial 1 has the best test loss and trial 2 the best validation loss of a pruned run: trial 0 wins."""
    rows = []
    for trial, status, valid, test in [(0, "ok", 5.0, 9.0), (1, "ok", 6.0, 1.0), (2, "pruned", 2.0, 2.0)]:
        run_dir = tmp_path / f"trial-{trial}"
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps({"hparams": {"lr": 10.0**-trial}}))
        for step, scale in ((0, 3.0), (5, 1.0)):
            rows.append(dict(run_id=trial, trial=trial, step=step, status=status, run_dir=str(run_dir),
                             valid_loss=valid * scale, test_loss=test * scale))  # fmt: skip
    table = tmp_path / "sweep_results.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    assert best_trial(table) == {"trial": 0, "run_dir": str(tmp_path / "trial-0"), "hparams": {"lr": 1.0},
                                 "valid_loss": 5.0}  # fmt: skip
    pd.DataFrame([{**r, "status": "diverged"} for r in rows]).to_csv(table, index=False)
    assert best_trial(table) is None


@pytest.mark.parametrize("workload", sorted({workload for workload, _ in SUITE}))
def test_every_suite_workload_has_tuned_presets_for_the_default_optimizers(workload):
    """Issue 26: the suite compares tuned optimizers on every workload, not registry defaults off the autoencoder;
    each preset is a valid configuration inside its search space and says where it came from."""
    for name in presets.COMPARE_OPTIMIZERS:
        tuned = presets.preset(workload, name)
        assert tuned, f"no preset for {name} on {workload}"
        registry.check_hparams(name, tuned)
        space = load_space(name)
        for key, value in tuned.items():
            searched = "one_minus_" + key if "one_minus_" + key in space.distributions else key
            distribution = space.distributions.get(searched)
            if distribution is not None:
                value = 1 - value if searched != key else value
                inside = (value in distribution.choices if hasattr(distribution, "choices")
                          else distribution.low <= value <= distribution.high)  # fmt: skip
                assert inside, f"{workload} {name}: {key}={value} outside its search space"
    assert f"--workload {workload} " in presets.provenance(workload) or workload == "autoencoder"
    assert "registry defaults" in presets.provenance("mlp") and "none tuned" in presets.provenance("mlp")


def test_cli_compare_with_presets_writes_runs_protocol_and_report(tmp_path):
    args = [
        "compare", "--data", "synthetic", "--steps", "4", "--batch-size", "64", "--width-mult", "0.05",
        "--seeds", "1,2", "--optimizers", "adam,locoprop-m", "--out", str(tmp_path), "--no-progress",
        "--precision", "bf16",
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "sweeps.commands.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=HANG_GUARD_S)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for optimizer in ("adam", "locoprop-m"):
        for seed in (1, 2):
            (run_dir,) = tmp_path.glob(f"runs/{optimizer}-autoencoder-synthetic-seed{seed}-*")
            assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    assert protocol["tuning"] is None and protocol["presets"]["source"] == "sweeps.commands.presets"
    assert "`locoprop compare --tune 8 --time-budget 30 --seeds 1,2`" in protocol["presets"]["note"]
    assert protocol["command"] == "locoprop " + " ".join(args)
    assert protocol["precision"] == "bf16"
    assert {json.loads(p.read_text())["precision"] for p in tmp_path.glob("runs/*/config.json")} == {"bf16"}
    report = (tmp_path / "report" / "report.md").read_text()
    assert "not an equal-time comparison" in report  # a steps budget never headlines as equal time
    assert "- Precision: bf16: the forward and backward under bfloat16 autocast" in report
    assert (tmp_path / "report" / "results.md").read_text() in result.stdout


def test_tuning_a_cost_knob_prices_each_of_its_values_and_each_run_takes_its_own(tmp_path, monkeypatch):
    """LocoProp-M's space searches K: the table prices every K of the space side by side, and each trial and
    final run gets the step count of its own K (not the preset's), so a cheaper step buys more steps."""
    monkeypatch.setattr(budget, "CALIBRATION_ROUNDS", 3)
    monkeypatch.setattr(budget, "CALIBRATION_ROUND_STEPS", 2)
    monkeypatch.setattr(_Run, "_calibrate", lambda self: pytest.fail("a run timed its own steps"))
    real_price_steps = calibration.price_steps
    priced = []

    def spy(base, hparams, data, optimizers=None):
        priced.append({label: (optimizers or {}).get(label, label) for label in hparams})
        return real_price_steps(base, hparams, data, optimizers)

    monkeypatch.setattr(calibration, "price_steps", spy)
    out = tmp_path / "cmp"
    base = dataclasses.replace(BASE, steps=None, time_budget=0.5)
    compare(base, ["locoprop-m"], [1], out, tuning=Tuning(trials=3, seed=0), progress=False)
    choices, own = [1, 2, 3, 5, 10], presets.preset(base.workload, "locoprop-m")["local_iters"]  # the preset's K
    assert len(priced) == 1 and sorted(priced[0]) == sorted(["locoprop-m"] + [f"locoprop-m (local_iters={k})" for k
                                                                              in choices if k != own])  # fmt: skip
    assert set(priced[0].values()) == {"locoprop-m"}
    table = json.loads((out / "protocol.json").read_text())["step_costs"]
    entry = table["optimizers"]["locoprop-m"]
    assert set(entry["variants"]) == {f"local_iters={k}" for k in choices}
    assert entry["variants"][f"local_iters={own}"]["ratio"] == entry["ratio"]  # the preset's K
    configs = [json.loads(p.read_text()) for p in out.glob("**/config.json")]
    assert len(configs) == 4  # three trials and the final run
    for config in configs:
        variant = entry["variants"][f"local_iters={config['hparams'].get('local_iters', own)}"]
        assert config["calibration"]["step_time_s"] == pytest.approx(variant["ratio"] * table["reference_step_time_s"])
        assert config["calibration"]["steps"] == variant["steps"] == max(1, math.floor(0.5 / variant["step_time_s"]))
        assert json.loads((pathlib.Path(config["out"]) / "summary.json").read_text())["steps"] == variant["steps"]
    report = (out / "report" / "report.md").read_text()
    assert all(f"| locoprop-m (local_iters={k}) |" in report for k in choices)  # the protocol's cost table


def test_a_run_without_its_knobs_priced_is_refused_naming_them():
    cost = budget.StepCost(0.2, 0.1, "cpu", {"local_iters=1": 0.05, "local_iters=10": 0.2})
    assert cost.for_knobs({"local_iters": 1}) == budget.StepCost(0.05, 0.1, "cpu")
    assert budget.StepCost(0.2, 0.1).for_knobs({"local_iters": 3}) == budget.StepCost(0.2, 0.1)  # no variants
    with pytest.raises(ValueError, match="No step cost priced for local_iters=3: the comparison priced local_iters=1"):
        cost.for_knobs({"local_iters": 3})
    with pytest.raises(ValueError, match=r"Invalid step_cost variants\['local_iters=1'\]: -1"):
        budget.StepCost(0.2, 0.1, "cpu", {"local_iters=1": -1}).check()


def test_cli_compare_refuses_tuning_flags_without_tune(tmp_path, capsys):
    from sweeps.commands.cli import main

    assert main(["compare", "--storage", "sqlite:///x.db", "--out", str(tmp_path)]) == 2
    assert "pass --tune N too" in capsys.readouterr().err


def test_a_time_budget_comparison_prices_every_optimizer_side_by_side_once_for_all_its_runs(tmp_path, monkeypatch):
    """One table of step costs, measured before any run, gives every tuning trial and final run its steps; a
    rerun reuses it, and an optimizer added later is priced against the table's reference step."""
    monkeypatch.setattr(budget, "CALIBRATION_ROUNDS", 3)
    monkeypatch.setattr(budget, "CALIBRATION_ROUND_STEPS", 2)
    real_price_steps = calibration.price_steps
    priced = []

    def spy(base, hparams, data, optimizers=None):
        priced.append(sorted(hparams))
        return real_price_steps(base, hparams, data, optimizers)

    monkeypatch.setattr(calibration, "price_steps", spy)
    monkeypatch.setattr(_Run, "_calibrate", lambda self: pytest.fail("a run timed its own steps"))
    base = dataclasses.replace(BASE, steps=None, time_budget=0.2)
    out = tmp_path / "cmp"
    compare(base, ["adam", "sgd"], [1], out, tuning=Tuning(trials=1, seed=0), progress=False)
    assert priced == [["adam", "sgd"]]
    table = json.loads((out / "protocol.json").read_text())["step_costs"]
    assert table["reference"] == "adam" and table["optimizers"]["adam"]["ratio"] == 1.0
    assert table["setup"]["threads"] == budget.default_threads() and table["timed_steps"] == 6
    for name, entry in table["optimizers"].items():
        cost = {"step_time_s": entry["ratio"] * table["reference_step_time_s"],
                "reference_step_time_s": table["reference_step_time_s"]}  # fmt: skip
        assert entry["step_time_s"] == pytest.approx(cost["step_time_s"])
        assert entry["steps"] == max(1, math.floor(0.2 / entry["step_time_s"]))
        configs = [c for c in map(json.loads, (p.read_text() for p in out.glob("**/config.json")))
                   if c["optimizer"] == name]  # fmt: skip
        assert len(configs) == 2  # its tuning trial and its final run
        for config in configs:
            assert config["step_cost"].pop("clock") == table["clock"] == config["calibration"]["clock"]
            assert config["step_cost"].pop("variants") is None  # no cost knobs
            assert config["step_cost"] == pytest.approx(cost) and config["calibration"]["steps"] == entry["steps"]
            summary = json.loads((out / pathlib.Path(config["out"]).relative_to(out) / "summary.json").read_text())
            assert summary["steps"] == entry["steps"]

    # Again, with one optimizer more: only it is measured, beside the reference; the others keep their runs.
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/summary.json")}
    compare(base, ["adam", "sgd", "momentum"], [1], out, tuning=Tuning(trials=1, seed=0), progress=False)
    assert priced == [["adam", "sgd"], ["momentum"]]
    again = json.loads((out / "protocol.json").read_text())["step_costs"]
    assert again["reference_step_time_s"] == table["reference_step_time_s"]
    assert {name: again["optimizers"][name] for name in ("adam", "sgd")} == table["optimizers"]
    momentum = again["optimizers"]["momentum"]
    assert momentum["step_time_s"] == pytest.approx(momentum["ratio"] * table["reference_step_time_s"])
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps

    # In bf16 a step costs something else: the fp32 table is not reused, and the new one says its precision.
    compare(dataclasses.replace(base, precision="bf16"), ["adam", "sgd"], [1], out, progress=False)
    assert priced[-1] == ["adam", "sgd"]
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["precision"] == "bf16" and protocol["step_costs"]["setup"]["precision"] == "bf16"
    assert "precision" not in table["setup"]  # fp32: as a table of an older locoprop, which was measured in fp32
