"""``locoprop compare --workloads … | --suite``: the cross-workload scoring (AlgoPerf's rule), the suite folder,
its resume, its refusals and the README's account of it."""

import json
import math
import pathlib

import numpy as np
import pandas as pd
import pytest

from analysis import suite as scoring
from analysis.load import COLUMNS
from analysis.tables import FIRST_ORDER
from sweeps.commands import compare as compare_module
from sweeps.commands import presets
from sweeps.commands.cli import main
from sweeps.commands.suite import SUITE

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ scoring, against values computed by hand
def _runs(workload: str, optimizer: str, curves: list[list[tuple[float, float]]]) -> list[dict]:
    """Tidy rows of one optimizer's runs on ``workload``/d: each curve a list of (training seconds, valid loss)."""
    rows = []
    for seed, curve in enumerate(curves, start=1):
        for step, (seconds, loss) in enumerate(curve):
            row = dict.fromkeys(COLUMNS, math.nan)
            row.update(run_id=f"{optimizer}-{workload}-{seed}", workload=workload, data="d", optimizer=optimizer,
                       seed=seed, step=step, epoch=step, wall_time_s=seconds, valid_loss=loss, train_loss=loss,
                       status="ok", budget_kind="steps", budget=len(curve) - 1)  # fmt: skip
            rows.append(row)
    return rows


@pytest.fixture
def frame() -> pd.DataFrame:
    """Two workloads. On wa: adam ends at 10, 12, 11 (median 11: the target; sgd's median 14 is worse) and
    reaches 11 at 2 s, never and 1 s (median 2 s); locoprop-m at 4, 6, 5 s (median 5 s, r = 2.5); sgd and
    locoprop-s never. On wb (two seeds: the upper middle value is the median): adam ends at 4 and 6 (target 6;
    rmsprop's 5 and 7 give 7), reaching 6 at 3 and 6 s (median 4.5 s); locoprop-m at 4.5 s twice (a tie,
    r = 1); rmsprop at 2 s and never (not reached: only half of its runs)."""
    rows = []
    rows += _runs("wa", "adam", [[(0, 20), (1, 15), (2, 10)], [(0, 20), (1, 14), (2, 12)], [(0, 20), (1, 11), (2, 11)]])
    rows += _runs("wa", "sgd", [[(0, 20), (2, 13)], [(0, 20), (2, 14)], [(0, 20), (2, 15)]])
    rows += _runs("wa", "locoprop-m", [[(0, 20), (4, 11), (8, 5)], [(0, 20), (6, 10.5), (8, 5.1)],
                                       [(0, 20), (5, 10), (8, 4.9)]])  # fmt: skip
    rows += _runs("wa", "locoprop-s", [[(0, 20), (8, 30)], [(0, 20), (8, 31)], [(0, 20), (8, 29)]])
    rows += _runs("wb", "adam", [[(0, 9), (3, 4)], [(0, 9), (3, 7), (6, 6)]])
    rows += _runs("wb", "rmsprop", [[(0, 9), (2, 5)], [(0, 9), (3, 7), (6, 7)]])
    rows += _runs("wb", "locoprop-m", [[(0, 9), (4.5, 6)], [(0, 9), (4.5, 5.5)]])
    return pd.DataFrame(rows)


def test_targets_are_the_best_first_order_baselines_median_at_the_budget(frame):
    targets = scoring.suite_targets(frame).set_index("workload")
    assert targets.loc["wa", "baseline"] == "adam" and targets.loc["wa", "target"] == 11
    assert targets.loc["wb", "baseline"] == "adam" and targets.loc["wb", "target"] == 6  # upper middle of 4, 6


def test_time_to_target_is_the_median_over_runs_with_not_reached_as_infinite(frame):
    times = scoring.time_to_target(frame, scoring.suite_targets(frame)).set_index(["workload", "optimizer"])
    seconds = times["seconds_to_target"].to_dict()
    assert seconds[("wa", "adam")] == 2 and seconds[("wa", "locoprop-m")] == 5
    assert seconds[("wa", "sgd")] == math.inf and seconds[("wa", "locoprop-s")] == math.inf
    assert seconds[("wb", "adam")] == 4.5 and seconds[("wb", "locoprop-m")] == 4.5
    assert seconds[("wb", "rmsprop")] == math.inf  # 1 of 2 runs reached it: not more than half
    assert times.loc[("wb", "rmsprop"), "reached"] == 1 and times.loc[("wa", "adam"), "reached"] == 2


def test_under_a_time_budget_time_to_target_is_on_the_budgets_clock(frame):
    # adam's runs on wa were priced at 0.5 s a step: its evaluations at steps 2, –, 1 give 1 s, ∞, 0.5 s (median
    # 1 s), whatever wall time a busy machine made of them.
    priced = frame.assign(calibrated_step_s=np.where((frame["optimizer"] == "adam") & (frame["workload"] == "wa"),
                                                     0.5, np.nan))  # fmt: skip
    times = scoring.time_to_target(priced, scoring.suite_targets(priced)).set_index(["workload", "optimizer"])
    assert times.loc[("wa", "adam"), "seconds_to_target"] == 1
    assert times.loc[("wa", "locoprop-m"), "seconds_to_target"] == 5  # no calibration: wall_time_s


def test_ratios_profile_and_integrated_score_with_r_max_4(frame):
    ratios = scoring.performance_ratios(scoring.time_to_target(frame, scoring.suite_targets(frame)))
    ratios.index = [workload for workload, _ in ratios.index]
    assert ratios.loc["wa"].to_dict() == {"adam": 1, "locoprop-m": 2.5, "locoprop-s": math.inf, "rmsprop": math.inf,
                                          "sgd": math.inf}  # fmt: skip
    assert ratios.loc["wb"].to_dict() == {"adam": 1, "locoprop-m": 1, "locoprop-s": math.inf, "rmsprop": math.inf,
                                          "sgd": math.inf}  # fmt: skip
    rho = scoring.profile(ratios, [1.0, 2.49, 2.5, 4.0])
    assert rho["adam"].tolist() == [1, 1, 1, 1]
    assert rho["locoprop-m"].tolist() == [0.5, 0.5, 1, 1]
    assert rho["sgd"].tolist() == [0, 0, 0, 0]
    # (1/3)∫₁⁴ρ: adam 1; locoprop-m ((4 − 2.5)/3 + (4 − 1)/3)/2 = 0.75; never reached: 0.
    scores = scoring.integrated_scores(ratios, r_max=4)
    assert scores.to_dict() == pytest.approx({"adam": 1, "locoprop-m": 0.75, "locoprop-s": 0, "rmsprop": 0, "sgd": 0})
    taus = np.linspace(1, 4, 30001)  # the same integral by the trapezoid rule
    numeric = np.trapezoid(scoring.profile(ratios, taus)["locoprop-m"], taus) / 3
    assert numeric == pytest.approx(0.75, abs=1e-3)


def test_ties_at_zero_seconds_have_ratio_one():
    times = pd.DataFrame({"workload": ["w", "w", "w"], "data": "d", "optimizer": ["a", "b", "c"],
                          "seconds_to_target": [0.0, 0.0, 3.0]})  # fmt: skip
    ratios = scoring.performance_ratios(times)
    assert ratios.iloc[0].to_dict() == {"a": 1, "b": 1, "c": math.inf}
    assert scoring.integrated_scores(ratios).to_dict() == {"a": 1, "b": 1, "c": 0}


def test_verdicts_against_the_strongest_baseline(frame):
    verdicts = scoring.verdicts(frame).set_index(["workload", "optimizer"])
    assert verdicts.loc[("wa", "locoprop-m"), "baseline"] == "adam"  # lowest mean of the non-LocoProp: 11
    assert verdicts.loc[("wa", "locoprop-m"), "verdict"] == "win"  # 5.0 vs 11, far beyond the seed noise
    assert verdicts.loc[("wa", "locoprop-s"), "verdict"] == "loss"  # 30 vs 11
    assert verdicts.loc[("wb", "locoprop-m"), "verdict"] == "tie"  # 5.75 vs 5, two seeds a side
    assert verdicts.loc[("wb", "locoprop-m"), "difference"] == pytest.approx(0.75)


def test_the_report_states_the_rule_and_the_first_order_baselines():
    rule = scoring.SCORING_RULE.format(r_max=4)
    assert "r_max = 4" in rule and all(name in rule for name in FIRST_ORDER)


# ------------------------------------------------------------------ the command: layout, resume, report, refusals
TINY = ["--steps", "3", "--width-mult", "0.05", "--batch-size", "64", "--seeds", "1,2", "--optimizers",
        "adam,locoprop-m", "--no-progress"]  # fmt: skip


def test_suite_folder_resumes_per_workload_and_report_rebuilds_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "suite"
    argv = ["compare", "--workloads", "autoencoder/synthetic,mlp/synthetic", *TINY, "--out", str(out)]
    real_train, trained = compare_module.train, []

    def crash_in_the_second_workload(config, **kwargs):
        trained.append(config.workload)
        if config.workload == "mlp":
            raise KeyboardInterrupt  # a crash in the second workload
        return real_train(config, **kwargs)

    monkeypatch.setattr(compare_module, "train", crash_in_the_second_workload)
    assert main(argv) == 130
    assert trained == ["autoencoder"] * 4 + ["mlp"]
    first = capsys.readouterr().out
    assert "workload 1 of 2: autoencoder/synthetic" in first and "workload 2 of 2: mlp/synthetic" in first

    # Again: the finished workload is reused without a look, the other one finishes, the report is written.
    trained.clear()
    monkeypatch.setattr(compare_module, "train", lambda config, **kwargs: (trained.append(config.workload),
                                                                          real_train(config, **kwargs))[1])  # fmt: skip
    assert main(argv) == 0
    assert trained == ["mlp"] * 4
    assert "workload 1 of 2: autoencoder/synthetic finished earlier" in capsys.readouterr().out
    suite = json.loads((out / "suite.json").read_text())
    assert [p["folder"] for p in suite["pairs"]] == ["autoencoder-synthetic", "mlp-synthetic"]
    for folder in ("autoencoder-synthetic", "mlp-synthetic"):
        protocol = json.loads((out / folder / "protocol.json").read_text())
        assert protocol["budget"] == {"kind": "steps", "value": 3} and len(protocol["runs"]) == 4
        assert (out / folder / "report" / "report.md").is_file()
    for name in ("report.md", "targets.csv", "time_to_target.csv", "scores.csv", "verdicts.csv",
                 "performance_profile.png"):  # fmt: skip
        assert (out / "report" / name).is_file(), name
    report = (out / "report" / "report.md").read_text()
    assert "r_max = 4" in report and "autoencoder/synthetic" in report and "mlp/synthetic" in report

    # A third time: nothing runs at all; the cross-workload report is written again.
    (out / "report" / "report.md").unlink()
    monkeypatch.setattr(compare_module, "train", lambda *a, **k: pytest.fail("a run ran again"))
    assert main(argv) == 0 and (out / "report" / "report.md").read_text() == report

    # New presets for one optimizer: its pair is no longer finished; its comparison trains that optimizer's
    # runs again and reuses the other's finished runs.
    runs = out / "mlp-synthetic" / "runs"
    before = {path.name: (path / "metrics.csv").stat().st_mtime_ns for path in runs.iterdir()}
    changed = {**presets.PRESETS, ("mlp", "adam"): {"lr": 3e-3}}
    monkeypatch.setattr(presets, "PRESETS", changed)
    monkeypatch.setattr(compare_module, "train", real_train)
    assert main(argv) == 0
    after = {path.name: (path / "metrics.csv").stat().st_mtime_ns for path in runs.iterdir()}
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and all(name.startswith("adam-mlp-synthetic-seed") for name in new), new
    assert {name: after[name] for name in before} == before  # nothing finished was trained again
    assert "workload 1 of 2: autoencoder/synthetic finished earlier" in capsys.readouterr().out
    monkeypatch.setattr(presets, "PRESETS", {k: v for k, v in changed.items() if k != ("mlp", "adam")})
    report = (out / "report" / "report.md").read_text()

    # `locoprop report` on the suite folder writes the same cross-workload report.
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == report


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--workloads", "autoencoder,nope"], "'nope'"),
        (["--workloads", "mlp/synthetic-text"], "'synthetic-text'"),
        (["--workloads", "autoencoder/nodata"], "'nodata'"),
        (["--workloads", "autoencoder/synthetic,autoencoder/synthetic"], "autoencoder/synthetic twice"),
        (["--suite", "--workloads", "autoencoder"], "--suite"),
        (["--workloads", "autoencoder", "--workload", "mlp"], "--workload mlp"),
        (["--suite", "--workload", "mlp"], "--workload mlp"),
        (["--workloads", "autoencoder/mnist5k", "--data", "synthetic"], "--data is 'synthetic'"),
        (["--suite", "--data", "synthetic"], "--data synthetic"),
        (["--workloads", "autoencoder/synthetic", "--batch-size", "5000"], "Invalid batch_size: 5000"),
    ],
)
def test_bad_suite_input_is_refused_in_one_line_before_anything_runs(tmp_path, capsys, flags, named):
    out = tmp_path / "suite"
    assert main(["compare", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("locoprop: ") and "\n" not in err and named in err, err
    assert not out.exists()


def test_suite_json_never_holds_a_storage_password():
    from sweeps.commands.compare import Tuning
    from sweeps.commands.suite import _settings
    from sweeps.runner import RunConfig

    tuning = Tuning(2, storage="postgresql://user:hunter2@db/optuna")
    settings = _settings(RunConfig(workload="autoencoder", data="synthetic"), ["adam"], [1], tuning)
    assert "hunter2" not in json.dumps(settings) and settings["tuning"]["storage"] == "postgresql://user:***@db/optuna"


def test_report_refuses_a_suite_folder_among_other_inputs(tmp_path, capsys):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.json").write_text(json.dumps({"pairs": []}))
    assert main(["report", str(tmp_path / "suite"), str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "suite folder" in capsys.readouterr().err


def test_readme_documents_the_suite_and_its_scoring():
    readme = (ROOT / "README.md").read_text()
    commands = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    assert "locoprop compare --workloads" in commands and "--suite" in commands
    section = readme.split("## Workload suite", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{workload}/{data}`" in section for workload, data in SUITE)
    assert "r_max = 4" in section and all(f"`{name}`" in section for name in FIRST_ORDER)
