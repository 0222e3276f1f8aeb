"""The comparison report (SPEC §9) on hand-made run directories of the current format, with known numbers.

Every number the report states is checked against an independent
computation here: textbook formulas with the t quantiles written out, or
SciPy's Welch test, never the analysis code's own helpers.
"""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis.headline import equal_time_checks, headline_table, pair_table
from analysis.load import RunSkipped, RunsNotFound, label_precisions, load_results
from analysis.report import write_report
from analysis.stats import mean_interval, t_quantile, table_t_quantile, welch_interval
from analysis.tables import budget_targets, target_table

# t(0.975, n − 1) from a printed table, for the seed counts used below.
T975 = {1: 12.7062047, 2: 4.30265273}
SPLITS = {"train": 3600, "valid": 400, "test": 1000}
FRACTIONS = [0.0, 0.2, 0.45, 0.7, 0.95, 1.0]  # where each run evaluates, as a share of its training time
ENDS = {1: 29.8, 2: 30.1, 3: 30.0}  # training seconds of each seed's run (calibration is not exact)
STEPS = {"adam": 1000, "sgd": 1000, "shampoo": 600, "kfac": 400, "locoprop-m": 200, "locoprop-s": 250}
# optimizer -> seed -> validation loss at each evaluation; a NaN ends a diverged run.
VALID = {
    "adam": {1: [100, 80, 70, 62, 58.5, 58.0], 2: [100, 82, 71, 63, 59.6, 59.0], 3: [100, 81, 69, 61, 58.9, 58.5]},
    "sgd": {1: [100, 90, 85, 78, 72, 70], 2: [100, 91, 86, 80, 74, 72], 3: [100, 90, 85, 79, 73, 71]},
    "shampoo": {1: [100, 78, 66, 60, 57.5, 57.0], 2: [100, 79, 67, 61, 57.9, 57.4]},
    "kfac": {1: [100, math.nan], 2: [100, math.nan], 3: [100, math.nan]},
    "locoprop-m": {1: [100, 75, 65, 58, 55.5, 55], 2: [100, 77, 68, 60, 57.0, 56.5], 3: [100, 76, 66, 59, 56.2, 55.8]},
    "locoprop-s": {1: [100, 85, 72, 64, 58.4, 57.9], 2: [100, 90, math.nan], 3: [100, 90, math.nan]},
}
TEST_OFFSET = {1: 2.0, 2: 2.5, 3: 1.5}  # test loss = validation loss + this, per seed


def times(seed, count):
    return [ENDS[seed] * f for f in FRACTIONS[:count]]


def make_run(root, optimizer, seed, budget=("time", 30.0)):
    """A run directory as the runner writes it: config.json, metrics.csv, summary.json."""
    losses = VALID[optimizer][seed]
    diverged = any(math.isnan(v) for v in losses)
    run_dir = root / f"{optimizer}-seed{seed}"
    run_dir.mkdir(parents=True)
    kind, value = budget
    config = dict(optimizer=optimizer, workload="autoencoder", data="mnist5k", seed=seed, hparams={"lr": 0.001},
                  batch_size=64, valid_fraction=0.1, epochs=None, steps=None, time_budget=None)  # fmt: skip
    config[{"time": "time_budget", "steps": "steps", "epochs": "epochs"}[kind]] = value
    if kind == "time":
        config["calibration"] = {"step_time_s": 30.0 / STEPS[optimizer], "steps": STEPS[optimizer]}
    (run_dir / "config.json").write_text(json.dumps(config))
    steps = [round(STEPS[optimizer] * f) for f in FRACTIONS[: len(losses)]]
    rows = [
        dict(step=s, epoch=s / 56, wall_time_s=t, train_loss=v - 1, valid_loss=v, test_loss=v + TEST_OFFSET[seed],
             lr=0.001, step_time_s=0.03, forward_backward_time_s=0.02, skipped_steps=0)
        for s, t, v in zip(steps, times(seed, len(losses)), losses)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    summary = {"status": "diverged" if diverged else "ok", "final_valid_loss": None if diverged else losses[-1],
               "train_seconds": rows[-1]["wall_time_s"], "steps": steps[-1], "split_sizes": SPLITS,
               "budget": {"kind": kind, "value": value, "steps": STEPS[optimizer]}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def make_runs(root, budget=("time", 30.0)):
    return [make_run(root, opt, seed, budget) for opt, seeds in VALID.items() for seed in seeds]


@pytest.fixture
def runs(tmp_path):
    make_runs(tmp_path / "runs")
    return tmp_path / "runs"


def finals(optimizer):
    """Final validation losses of the optimizer's runs that finished."""
    return [v[-1] for v in VALID[optimizer].values() if not any(math.isnan(x) for x in v)]


def textbook_interval(values):
    """mean ± t(0.975, n−1) · s/√n with the printed t quantile."""
    values = np.asarray(values, dtype=float)
    half = T975[len(values) - 1] * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def welch(a, b):
    """Difference of means and its Welch interval: the textbook formula, its standard error checked
    against SciPy's Welch t statistic (``confidence_interval`` would need SciPy ≥ 1.11)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    difference, se = a.mean() - b.mean(), math.sqrt(va + vb)
    assert scipy_stats.ttest_ind(a, b, equal_var=False).statistic == pytest.approx(difference / se)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    half = scipy_stats.t.ppf(0.975, df) * se
    return difference, difference - half, difference + half


def test_t_quantiles_match_the_printed_table_and_the_fallback_table_is_close():
    for df, t in T975.items():
        assert t_quantile(df) == pytest.approx(t, rel=1e-6)
        assert table_t_quantile(df) == pytest.approx(t, rel=1e-4)
    for df in np.concatenate([np.linspace(1, 3, 41), np.linspace(3, 300, 300)]):
        assert table_t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=5e-3)


def test_intervals_are_the_textbook_ones():
    mean, low, high = textbook_interval([58.0, 59.0, 58.5])
    got = mean_interval([58.0, 59.0, 58.5])
    assert (got.estimate, got.low, got.high, got.n) == pytest.approx((mean, low, high, 3))
    one = mean_interval([57.9, math.nan])
    assert one.n == 1 and one.estimate == 57.9 and math.isnan(one.low) and not one.known
    a, b = [55.0, 56.5, 55.8], [57.0, 57.4]
    difference, low, high = welch(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 2
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)  # Welch–Satterthwaite
    got = welch_interval(a, b)
    assert (got.estimate, got.low, got.high, got.df) == pytest.approx((difference, low, high, df))
    assert math.isnan(welch_interval(a, [57.0]).low)


def test_headline_numbers(runs):
    table = headline_table(load_results([runs])).set_index("optimizer")
    for optimizer in ("adam", "sgd", "locoprop-m", "shampoo"):
        row = table.loc[optimizer]
        for column, offset in (("valid_loss", 0.0), ("test_loss", None)):
            values = finals(optimizer)
            if offset is None:  # the test loss of each finished seed
                seeds = [s for s, v in VALID[optimizer].items() if not any(math.isnan(x) for x in v)]
                values = [VALID[optimizer][s][-1] + TEST_OFFSET[s] for s in seeds]
            mean, low, high = textbook_interval(values)
            assert (row[f"{column}_mean"], row[f"{column}_low"], row[f"{column}_high"]) == pytest.approx(
                (mean, low, high)
            ), (optimizer, column)
        seeds = list(VALID[optimizer])
        assert row["train_seconds"] == pytest.approx(np.mean([ENDS[s] for s in seeds]))
        assert row["steps"] == STEPS[optimizer]
        assert (row["runs"], row["diverged"]) == (len(seeds), 0)
    # One finished run: a mean without an interval; the diverged ones counted.
    loco_s = table.loc["locoprop-s"]
    assert (loco_s["valid_loss_mean"], loco_s["valid_loss_n"], loco_s["runs"], loco_s["diverged"]) == (57.9, 1, 3, 2)
    assert math.isnan(loco_s["valid_loss_low"])
    # Every K-FAC run diverged: listed, as diverged.
    assert (table.loc["kfac", "runs"], table.loc["kfac", "diverged"], table.loc["kfac", "note"]) == (
        3, 3, "every run diverged"
    )  # fmt: skip


def test_pairs_are_welch_intervals_against_the_right_baselines(runs):
    pairs = pair_table(load_results([runs])).set_index(["optimizer", "baseline"])
    # adam is the best first-order baseline (58.5 < sgd's 71), shampoo the strongest (57.2), kfac is there.
    assert list(pairs.loc["locoprop-m"].index) == ["adam", "kfac", "shampoo"]
    assert pairs.loc[("locoprop-m", "adam"), "role"] == "best first-order baseline"
    assert pairs.loc[("locoprop-m", "shampoo"), "role"] == "strongest baseline"
    for baseline in ("adam", "shampoo"):
        difference, low, high = welch(finals("locoprop-m"), finals(baseline))
        row = pairs.loc[("locoprop-m", baseline)]
        assert (row["difference"], row["low"], row["high"]) == pytest.approx((difference, low, high))
    assert pairs.loc[("locoprop-s", "adam"), "n_optimizer"] == 1
    assert math.isnan(pairs.loc[("locoprop-s", "adam"), "low"])


def test_report_sentences_state_the_numbers_and_the_verdicts(runs, tmp_path):
    report = write_report([runs], tmp_path / "report")
    results = (report.parent / "results.md").read_text()
    difference, low, high = welch(finals("locoprop-m"), finals("adam"))
    verdict = "locoprop-m lower, beyond the seed noise" if high < 0 else "within the seed noise"
    assert (
        f"locoprop-m vs adam (best first-order baseline): validation loss {np.mean(finals('locoprop-m')):.4g} vs "
        f"{np.mean(finals('adam')):.4g}, difference {difference:+.4g} (95% CI {low:+.4g} to {high:+.4g}): {verdict}."
    ) in results
    difference, low, high = welch(finals("locoprop-m"), finals("shampoo"))
    assert low < 0 < high and f"(95% CI {low:+.4g} to {high:+.4g}): within the seed noise." in results
    assert "locoprop-m vs kfac (K-FAC): kfac: every run diverged (3 of 3)" in results
    assert "locoprop-s vs adam (best first-order baseline): validation loss 57.9 vs 58.5, difference -0.6: cannot" in (
        results
    )
    mean, low, high = textbook_interval(finals("adam"))
    train = np.mean([ENDS[s] for s in (1, 2, 3)])
    assert f"| adam | 3 | 0 | {mean:.4g} ({low:.4g} to {high:.4g}) |" in results
    assert f"| {train:.4g} of 30 | 1000 |" in results
    assert "| kfac | 3 | 3 | diverged (3 of 3) | diverged (3 of 3) |" in results
    assert "| locoprop-s | 3 | 2 | 57.9 (1 run: interval unknown) |" in results
    assert "## Headline: equal training time (30 s per run)" in results
    assert pd.read_csv(report.parent / "results.csv").shape[0] == len(VALID)


def loss_at(optimizer, seed, fraction):
    """Validation loss at the last evaluation within ``fraction`` of the run's training time."""
    seen = [v for t, v in zip(times(seed, 6), VALID[optimizer][seed]) if t <= fraction * ENDS[seed]]
    return seen[-1]


def first_reach(optimizer, seed, target):
    """(seconds, steps) of the first evaluation at or below ``target``; (inf, inf) if none."""
    for t, s, v in zip(times(seed, 6), [round(STEPS[optimizer] * f) for f in FRACTIONS], VALID[optimizer][seed]):
        if v <= target:
            return t, s
    return math.inf, math.inf


def test_time_to_target_at_a_quarter_half_and_all_of_the_budget(runs):
    frame = load_results([runs])
    targets = budget_targets(frame)
    expected = {}
    for fraction in (0.25, 0.5, 1.0):
        losses = sorted(loss_at("adam", seed, fraction) for seed in (1, 2, 3))
        expected[fraction] = losses[1]  # the median of three seeds
    assert dict(zip(targets["fraction"], targets["target"])) == expected
    assert set(targets["baseline"]) == {"adam"}
    assert targets.set_index("fraction").loc[0.5, "seconds"] == pytest.approx(0.5 * 30.0)  # median run length

    table = target_table(frame, targets).set_index(["optimizer", "fraction"])
    for optimizer in ("adam", "sgd", "shampoo", "locoprop-m", "locoprop-s", "kfac"):
        for fraction, target in expected.items():
            reached = [first_reach(optimizer, seed, target) for seed in VALID[optimizer]]
            seconds = np.median([r[0] for r in reached])  # unreached runs count as ∞
            steps = np.median([r[1] for r in reached])
            row = table.loc[(optimizer, fraction)]
            assert row["reached"] == sum(math.isfinite(r[0]) for r in reached), (optimizer, fraction)
            if math.isinf(seconds):
                assert math.isnan(row["seconds_to_target"]) and math.isnan(row["steps_to_target"])
            else:
                assert (row["seconds_to_target"], row["steps_to_target"]) == pytest.approx((seconds, steps))
    # The baseline reaches each of its own targets by the time that defined it.
    for fraction in expected:
        assert table.loc[("adam", fraction), "seconds_to_target"] <= fraction * np.median(list(ENDS.values()))


def test_an_even_number_of_baseline_runs_gives_a_target_most_of_them_reach(tmp_path):
    for seed in (1, 2):
        make_run(tmp_path, "adam", seed)
    targets = budget_targets(load_results([tmp_path]))
    assert targets.set_index("fraction").loc[1.0, "target"] == max(finals("adam")[:2])  # the upper of two


def test_a_target_the_baseline_met_before_training_is_skipped_with_its_reason(tmp_path):
    """Runs evaluated only at step 0 and at their end: at 25% and 50% of its time the baseline's last evaluation is
    step 0's, so those targets are the initial weights' loss, which every run "reaches" at 0 s. They are listed
    with the reason and left out of the time-to-target tables; the 100% target is kept."""
    from test_analysis import make_run as make_short_run

    for seed in (0, 1):  # losses at step 0 and step 10; the same initial loss for both optimizers of a seed
        make_short_run(tmp_path / "runs", "adam", seed, "ok", [10.0, 4.0 + seed], 1.0, 0.1)
        make_short_run(tmp_path / "runs", "locoprop-m", seed, "ok", [10.0, 3.0 + seed], 2.0, 0.2)
    report = write_report([tmp_path / "runs"], tmp_path / "report")
    targets = pd.read_csv(report.parent / "targets.csv").set_index("fraction")
    assert targets["target"].to_dict() == {0.25: 10.0, 0.5: 10.0, 1.0: 5.0}  # the upper of two finals
    assert targets["skipped"].notna().to_dict() == {0.25: True, 0.5: True, 1.0: False}
    assert targets.loc[0.25, "skipped"].startswith("not meaningful: 2 of adam's 2 runs were at or below it before "
                                                   "training (step 0)")  # fmt: skip
    for name in ("time_to_target.csv", "time_to_target_runs.csv"):
        assert set(pd.read_csv(report.parent / name)["fraction"]) == {1.0}
    text = report.read_text()
    assert "0 s, 0 steps" not in text
    assert "- target 10 (25% of adam's time, 0.25 s): skipped, not meaningful: 2 of adam's 2 runs" in text
    assert "| target 5 (100% of adam's time, 1 s) |" in text


def test_a_given_target_overrides_the_budget_targets(runs, tmp_path):
    report = write_report([runs], tmp_path / "report", target_loss=60.0)
    table = pd.read_csv(report.parent / "time_to_target.csv")
    assert set(table["target"]) == {60.0}
    adam = table.set_index("optimizer").loc["adam"]
    seconds = np.median([first_reach("adam", seed, 60.0)[0] for seed in (1, 2, 3)])
    assert adam["seconds_to_target"] == pytest.approx(seconds)
    assert "target 60 (given)" in report.read_text()


def test_an_epochs_budget_is_never_called_equal_time(tmp_path):
    make_runs(tmp_path / "runs", budget=("epochs", 20))
    report = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert "## Equal epochs (20 per run): not an equal-time comparison" in report
    assert "equal training time" not in report.lower() and "headline:" not in report.lower()
    assert "20 epochs per run" in report and "equal-epochs comparison, not an equal-time one" in report


def test_a_steps_budget_is_never_called_equal_time(tmp_path):
    make_runs(tmp_path / "runs", budget=("steps", 500))
    report = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert "Equal steps (500 per run): not an equal-time comparison" in report
    assert "equal training time" not in report.lower()


def test_without_a_protocol_the_report_derives_budget_seeds_and_splits(runs, tmp_path):
    report = write_report([runs], tmp_path / "report").read_text()
    protocol = report[report.index("## Protocol") : report.index("## Headline")]
    assert "No protocol.json was given" in protocol
    assert "Tuning: unknown" in protocol
    assert "30 s of training time per run, the clock paused during evaluation" in protocol
    assert "3600 training, 400 validation, 1000 test examples" in protocol
    assert "adam: 1, 2, 3; kfac: 1, 2, 3; locoprop-m: 1, 2, 3; locoprop-s: 1, 2, 3; sgd: 1, 2, 3; shampoo: 1, 2" in (
        protocol
    )
    assert "- adam: lr=0.001" in protocol
    assert report.index("## Protocol") < report.index("## Headline")  # the report opens with the protocol


TUNING = {
    "trials_per_optimizer": 8, "seed": 0, "backend": "optuna", "metric": "valid_loss",
    "optimizers": {
        "adam": {"trials": 8, "finished": 7, "pruned": 2, "diverged": 1, "failed": 0, "train_seconds": 231.5,
                 "best": {"hparams": {"lr": 0.001}, "valid_loss": 55.1}},
        "locoprop-m": {"trials": 8, "finished": 8, "pruned": 3, "diverged": 0, "failed": 0, "train_seconds": 240.25,
                       "best": {"hparams": {"lr": 0.01, "activation_lr": 10.0}, "valid_loss": 54.0}},
        "muon": {"trials": 8, "finished": 0, "pruned": 0, "diverged": 6, "failed": 2, "train_seconds": 12.0,
                 "best": None},
    },
}  # fmt: skip
PROTOCOL = {
    "command": "locoprop compare --time-budget 30 --tune 8",
    "workload": "autoencoder",
    "data": "mnist5k",
    "batch_size": 64,
    "budget": {"kind": "time", "value": 30.0},
    "seeds": [1, 2, 3],
    "split_sizes": SPLITS,
    "tuning": TUNING,
    "presets": None,
}


def test_the_protocol_section_shows_the_tuning_and_its_cost(tmp_path):
    run_dirs = [make_run(tmp_path / "runs", opt, seed) for opt in ("adam", "locoprop-m") for seed in (1, 2, 3)]
    report = write_report(run_dirs, tmp_path / "report", protocol=PROTOCOL).read_text()
    protocol = report[report.index("## Protocol") : report.index("## Headline")]
    assert "`locoprop compare --time-budget 30 --tune 8`" in protocol
    assert "8 trials per optimizer (optuna, training seed 0)" in protocol and "lowest validation loss" in protocol
    assert "| adam | 8 | 7 | 2 | 1 | 0 | 231.5 | lr=0.001 | 55.1 |" in protocol
    assert "| locoprop-m | 8 | 8 | 3 | 0 | 0 | 240.2 | lr=0.01, activation_lr=10 | 54 |" in protocol
    assert "| muon | 8 | 0 | 0 | 6 | 2 | 12 | none | – |" in protocol
    total = 231.5 + 240.25 + 12.0
    assert f"| **total** | 24 | 15 | 5 | 7 | 2 | {total:.4g} |" in protocol
    assert f"Tuning cost: {total:.4g} s of training in all" in protocol
    assert "seeds 1, 2, 3" in protocol and "fresh seeds, not the tuning seed 0" in protocol
    assert "3600 training, 400 validation, 1000 test examples" in protocol
    # An optimizer that got no final runs is listed in the headline, not dropped.
    assert "| muon | 0 | – | no final runs: no tuning trial finished its budget" in report


def _in_precision(run_dir, precision):
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "precision": precision}))
    return run_dir


def test_the_report_says_the_precision_of_its_runs(tmp_path):
    run_dirs = [_in_precision(make_run(tmp_path / "runs", opt, seed), "bf16") for opt in ("adam", "locoprop-m")
                for seed in (1, 2, 3)]  # fmt: skip
    report = write_report(run_dirs, tmp_path / "report", protocol={**PROTOCOL, "precision": "bf16"}).read_text()
    protocol = report[report.index("## Protocol") : report.index("## Headline")]
    assert "- Precision: bf16: the forward and backward under bfloat16 autocast" in protocol
    assert "| locoprop-m |" in report and "(bf16)" not in report  # one precision: the names as they are
    plain = write_report(run_dirs[:3], tmp_path / "plain").read_text()  # derived from the runs alone
    assert "- Precision: bf16" in plain


def test_runs_in_two_precisions_are_said_and_never_pooled(tmp_path):
    """adam and locoprop-m in fp32 and in bf16: four entries, each over its own three seeds, and the protocol says
    the runs are mixed."""
    run_dirs = []
    for precision in ("fp32", "bf16"):
        for optimizer in ("adam", "locoprop-m"):
            run_dirs += [
                _in_precision(make_run(tmp_path / precision, optimizer, seed), precision) for seed in (1, 2, 3)
            ]
    frame = label_precisions(load_results(run_dirs))
    table = headline_table(frame)
    assert sorted(table["optimizer"]) == ["adam (bf16)", "adam (fp32)", "locoprop-m (bf16)", "locoprop-m (fp32)"]
    assert set(table["ok"]) == {3}
    pairs = pair_table(frame)
    assert set(pairs["baseline"]) == {"adam (bf16)"}  # equal numbers: the first name of the two
    report = write_report(run_dirs, tmp_path / "report").read_text()
    protocol = report[report.index("## Protocol") : report.index("## Headline")]
    assert "- Precision: MIXED, the runs are not all in one precision (adam: bf16, fp32; locoprop-m: bf16, fp32)" in (
        protocol
    )
    assert "| adam (fp32) |" in report and "| locoprop-m (bf16) |" in report


def _cut_inside_the_last_row(text: str) -> str:
    """metrics.csv cut in the middle of the last row's validation loss, as a copy or a crash cuts it."""
    last = text.splitlines(keepends=True)[-1]
    return text[: len(text) - len(last)] + last[: last.index(",58.0,") + 2]


TRUNCATIONS = [
    pytest.param(_cut_inside_the_last_row, "its last row is cut short", id="no line end"),
    pytest.param(
        lambda text: _cut_inside_the_last_row(text) + "\n", "line 7 has 5 cells where the header has 10", id="cells"
    ),
    pytest.param(
        lambda text: "".join(text.splitlines(keepends=True)[:-1]),
        "its last row (step 950) has valid_loss 58.5 where summary.json has final_valid_loss 58.0",
        id="rows missing",
    ),
]


@pytest.mark.parametrize("truncate, message", TRUNCATIONS)
def test_a_truncated_metrics_file_never_reaches_the_headline(runs, tmp_path, truncate, message):
    metrics = runs / "adam-seed1" / "metrics.csv"
    metrics.write_text(truncate(metrics.read_text()))
    with pytest.warns(RunSkipped, match=re.escape(f"skipped: {metrics}: {message}")):
        report = write_report([runs], tmp_path / "report")
    adam = pd.read_csv(report.parent / "results.csv").set_index("optimizer").loc["adam"]
    assert adam["runs"] == 2 and adam["valid_loss_mean"] == pytest.approx(np.mean([59.0, 58.5]))
    with pytest.raises(RunsNotFound, match=re.escape(message)):  # named alone, it is an error
        load_results([metrics.parent])


def test_a_run_folder_without_config_json_is_named_not_left_out_silently(runs):
    (runs / "adam-seed1" / "config.json").unlink()
    with pytest.warns(RunSkipped, match=re.escape(f"skipped: Run directory {runs / 'adam-seed1'} has no config.json")):
        frame = load_results([runs])
    assert not frame["run_id"].str.endswith("adam-seed1").any()


def test_old_run_directories_still_load(tmp_path):
    run_dir = make_run(tmp_path, "adam", 1)
    pd.read_csv(run_dir / "metrics.csv").drop(columns=["valid_loss"]).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "config.json").write_text(json.dumps(dict(optimizer="adam", workload="a", data="d", seed=1)))
    (run_dir / "summary.json").write_text(json.dumps({"status": "ok"}))
    frame = load_results([tmp_path])
    assert frame["valid_loss"].isna().all() and frame["budget_kind"].isna().all() and frame["budget"].isna().all()
    assert frame["valid_size"].isna().all() and frame["train_seconds"].isna().all()
    assert (frame["precision"] == "fp32").all()  # before precision was recorded every run was float32


def test_the_frame_carries_budget_and_split_sizes(runs):
    frame = load_results([runs])
    assert set(frame["budget_kind"]) == {"time"} and set(frame["budget"]) == {30.0}
    assert set(zip(frame["train_size"], frame["valid_size"], frame["test_size"])) == {(3600, 400, 1000)}
    adam = frame[frame["optimizer"] == "adam"]
    assert set(adam["budget_steps"]) == {1000} and set(adam["train_seconds"]) == set(ENDS.values())
    assert frame["valid_error"].isna().all()  # an autoencoder has no error rates


def test_curves_against_time_steps_and_epochs(runs, tmp_path):
    report = write_report([runs], tmp_path / "report").read_text()
    for stem in ("valid_loss_vs_time", "valid_loss_vs_step", "valid_loss_vs_epoch", "train_loss_vs_time"):
        assert f"({stem}_autoencoder_mnist5k.png)" in report
        assert (tmp_path / "report" / f"{stem}_autoencoder_mnist5k.pdf").exists()
    assert "Validation loss against training time (the headline plot)" in report
    assert "## Performance profile" in report and "counting as infinitely slow" in report


def test_the_headline_plot_is_the_median_over_seeds_with_the_time_budget_marked(runs):
    from analysis import plots

    (figure,) = plots.loss_curves(load_results([runs]), x="wall_time_s", metric="valid_loss").values()
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    adam = lines["adam"]
    # Seeds end at 29.8, 30.0 and 30.1 s; each keeps its final loss to the end of the plot.
    assert adam.get_xdata()[-1] == max(ENDS.values())
    assert adam.get_ydata()[-1] == pytest.approx(np.median(finals("adam")))
    assert list(lines["time budget"].get_xdata()) == [30.0, 30.0]
    assert figure.axes[0].get_ylabel() == "validation loss"


def test_the_equal_time_rule_checks_the_budget_and_the_step_costs_against_the_calibrated_ones():
    """Budget 30 s. A run's pace is its measured seconds per step over its calibrated step counted in reference
    steps, relative to the median over the runs; a run more than 10% off in time or pace is not at equal time."""
    runs = pd.DataFrame(
        [  # optimizer, seed, training seconds, steps, calibrated step (s), reference step of that calibration (s)
            ("adam", 1, 30.0, 1000, 0.030, 0.030),  # on time, on pace: 0.03 s per reference step
            ("locoprop-m", 1, 30.0, 100, 0.300, 0.030),  # 10 reference steps a step, as calibrated
            ("locoprop-m", 2, 45.0, 100, 0.300, 0.030),  # its steps cost 1.5x the others': late and off pace
            ("kfac", 1, 30.0, 100, 0.200, 0.020),  # calibrated on a faster machine, but at the same ratio: fine
            ("kfac", 2, 28.0, 100, 0.250, 0.030),  # within 10% of the budget, but 1.12x its calibrated share
        ],
        columns=["optimizer", "seed", "run_seconds", "step", "calibrated_step_s", "reference_step_s"],
    )
    checked = equal_time_checks(runs, 30.0)
    # Independently: seconds per step over calibrated reference steps, over their median (0.03).
    implied = [30 / 1000 / 1, 30 / 100 / 10, 45 / 100 / 10, 30 / 100 / 10, 28 / 100 / (0.25 / 0.03)]
    assert list(checked["pace"]) == pytest.approx([v / 0.03 for v in implied])
    assert list(checked["time_ratio"]) == pytest.approx([1, 1, 1.5, 1, 28 / 30])
    assert list(checked["equal_time"]) == [True, True, False, True, False]
    # A machine slower throughout: every run is late, none off pace; all are flagged, by their time.
    slow = equal_time_checks(runs.iloc[:2].assign(run_seconds=lambda f: f["run_seconds"] * 1.5), 30.0)
    assert list(slow["pace"]) == pytest.approx([1, 1]) and not slow["equal_time"].any()
    # Runs that record no reference step (older ones) are compared in seconds; no calibration: time alone.
    older = equal_time_checks(runs.assign(reference_step_s=math.nan).iloc[:3], 30.0)
    assert list(older["pace"]) == pytest.approx([1, 1, 1.5])
    unknown = equal_time_checks(runs.assign(calibrated_step_s=math.nan).iloc[[0, 4]], 30.0)
    assert unknown["pace"].isna().all() and list(unknown["equal_time"]) == [True, True]


def test_runs_not_at_equal_time_are_named_and_give_no_verdict(runs, tmp_path):
    before = write_report([runs], tmp_path / "in").read_text()
    assert "not at equal time" not in before  # 29.8 to 30.1 s, on pace
    # locoprop-m seed 2 ran 1.5x slower than its calibration: 45.0 s of 30.
    run_dir = runs / "locoprop-m-seed2"
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "train_seconds": 45.0}))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    metrics.assign(wall_time_s=metrics["wall_time_s"] * 1.5).to_csv(run_dir / "metrics.csv", index=False)
    report = write_report([runs], tmp_path / "report").read_text()
    # Every run's steps were calibrated at 30 s / its steps: its pace is its seconds over the median seconds of
    # the finished runs (adam, sgd: seeds 1-3; shampoo: 1, 2; locoprop-m: 1, 2, 3; locoprop-s: 1).
    seconds = [*ENDS.values(), *ENDS.values(), ENDS[1], ENDS[2], ENDS[1], 45.0, ENDS[3], ENDS[1]]
    pace = 45.0 / np.median(seconds)
    assert f"Warning: not at equal time: locoprop-m seed 2 (45 s of 30 s; steps {pace:.2f}× their" in report
    pairs = lambda text: [line for line in text.splitlines() if line.startswith("- locoprop") and " vs " in line]  # noqa: E731
    verdicts = [line for line in pairs(report) if line.startswith("- locoprop-m") and "95% CI" in line]
    assert len(verdicts) == 2  # against adam (best first-order) and shampoo (strongest); every K-FAC run diverged
    for line in verdicts:
        assert line.endswith("no verdict on the seed noise, as 1 of locoprop-m's runs were not at equal time (above).")
    assert any("beyond the seed noise" in line for line in pairs(before) if line.startswith("- locoprop-m"))
    others = lambda text: [line for line in pairs(text) if not line.startswith("- locoprop-m")]  # noqa: E731
    assert others(report) == others(before)  # pairs without that run keep their sentences


def test_runs_that_count_cpu_time_are_judged_on_it(runs, tmp_path):
    """On the CPU clock a run whose wall time a busy machine stretched to 45 s still trained its 30 s."""
    for run_dir in runs.iterdir():
        config, summary = (json.loads((run_dir / name).read_text()) for name in ("config.json", "summary.json"))
        config["calibration"]["clock"] = "cpu"
        cpu_seconds = summary["train_seconds"]
        if run_dir.name == "locoprop-m-seed2":
            summary["train_seconds"] = 45.0
        (run_dir / "config.json").write_text(json.dumps(config))
        (run_dir / "summary.json").write_text(json.dumps({**summary, "train_cpu_seconds": cpu_seconds}))
    report = write_report([runs], tmp_path / "report").read_text()
    assert "not at equal time" not in report
    assert "Training time here is the CPU time of each run's one training thread" in report
    table = headline_table(load_results([runs]))
    assert table.set_index("optimizer").loc["locoprop-m", "train_seconds"] == pytest.approx(
        np.mean(list(ENDS.values()))
    )


def test_runs_of_several_configurations_are_not_passed_off_as_seeds(runs, tmp_path):
    assert "several hyperparameter configurations" not in write_report([runs], tmp_path / "one").read_text()
    config = json.loads((runs / "adam-seed2" / "config.json").read_text())
    (runs / "adam-seed2" / "config.json").write_text(json.dumps({**config, "hparams": {"lr": 0.01}}))
    report = write_report([runs], tmp_path / "two").read_text()
    assert "Warning: the runs of adam have several hyperparameter configurations" in report


def test_adapted_gammas_are_plotted_per_unit_as_the_median_over_seeds(runs, tmp_path):
    from analysis import plots

    # Give locoprop-m's runs γ columns, as a run with hypergrad_lr > 0 writes them; γ of unit "0" per seed.
    gammas = {1: [1.0, 2.0, 4.0, 4.0, 4.0, 4.0], 2: [1.0, 1.0, 2.0, 2.0, 2.0, 2.0], 3: [1.0, 2.0, 2.0, 8.0, 8.0, 8.0]}
    for seed, values in gammas.items():
        path = runs / f"locoprop-m-seed{seed}" / "metrics.csv"
        frame = pd.read_csv(path)
        frame["gamma/0"], frame["gamma/2"] = values, 10.0
        frame.to_csv(path, index=False)
    figures = plots.adapted_gammas(load_results([runs]))
    assert list(figures) == [("autoencoder", "mnist5k", "locoprop-m")]  # the other optimizers adapt nothing
    axes = figures[("autoencoder", "mnist5k", "locoprop-m")].axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"0", "2"} and axes.get_yscale() == "log"
    assert lines["0"].get_ydata()[-1] == pytest.approx(4.0)  # median of 4, 2, 8 at the last step
    report = write_report([runs], tmp_path / "report").read_text()
    assert "## Activation learning rates adapted by hypergradients" in report
    assert (tmp_path / "report" / "gamma_vs_step_locoprop-m_autoencoder_mnist5k.png").exists()


def test_no_gamma_section_without_adapted_gammas(runs, tmp_path):
    report = write_report([runs], tmp_path / "report").read_text()
    assert "Activation learning rates adapted" not in report
