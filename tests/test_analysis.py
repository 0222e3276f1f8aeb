"""Analysis on hand-made run directories with known numbers (SPEC §9)."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.load import RunsNotFound, label_precisions, load_results
from analysis.report import write_report
from analysis.tables import TIME_TO_TARGET_RULE, default_target, performance_ratios, summary_table, time_to_target

# optimizer, seed, status, train losses per epoch, seconds per epoch, step time
RUNS = [
    ("adam", 0, "ok", [10, 6, 4, 3], 1.0, 0.1),
    ("adam", 1, "ok", [10, 7, 5, 3.5], 1.0, 0.1),
    ("locoprop-m", 0, "ok", [10, 4, 2.5, 2], 2.0, 0.2),
    ("locoprop-m", 1, "ok", [10, 5, 3, 2.2], 2.0, 0.2),
    ("sgd", 0, "diverged", [10, math.nan], 1.0, 0.1),
]


def make_run(root: pathlib.Path, optimizer, seed, status, losses, seconds, step_time, workload="autoencoder",
             data="mnist5k", hparams=None, precision=None) -> pathlib.Path:  # fmt: skip
    run_dir = root / f"{optimizer}-{workload}-{data}-seed{seed}{'-' + precision if precision else ''}"
    run_dir.mkdir(parents=True)
    config = dict(optimizer=optimizer, workload=workload, data=data, seed=seed, hparams=hparams or {"lr": 0.1})
    if precision:
        config["precision"] = precision
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [
        dict(step=10 * e, epoch=e, wall_time_s=seconds * e, train_loss=loss, test_loss=loss + 1, lr=0.1,
             step_time_s=step_time if e else None)
        for e, loss in enumerate(losses)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "summary.json").write_text(json.dumps({"status": status}))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    for run in RUNS:
        make_run(tmp_path / "runs", *run)
    return tmp_path / "runs"


def test_loader_gives_one_tidy_row_per_evaluation(runs):
    frame = load_results([runs])
    assert len(frame) == 4 + 4 + 4 + 4 + 2
    assert frame["run_id"].nunique() == 5
    assert set(frame["status"]) == {"ok", "diverged"}
    assert frame.loc[frame["optimizer"] == "sgd", "hp_lr"].tolist() == [0.1, 0.1]
    for column in ["optimizer", "workload", "data", "seed", "step", "epoch", "wall_time_s", "train_loss", "test_loss"]:
        assert column in frame.columns


def test_table_values(runs):
    frame = load_results([runs])
    # No validation loss in these runs: the training loss is compared. The default target is the final loss
    # that more than half of adam's runs reached: of two runs (3, 3.5), the upper one.
    assert default_target(frame) == {("autoencoder", "mnist5k"): pytest.approx(3.5)}
    table = summary_table(frame, 3.25).set_index("optimizer")  # adam's mean final loss, reached by one run of two

    adam, loco, sgd = table.loc["adam"], table.loc["locoprop-m"], table.loc["sgd"]
    assert adam["final_train_loss_mean"] == pytest.approx(3.25)
    assert adam["final_train_loss_std"] == pytest.approx(np.std([3, 3.5], ddof=1))
    assert loco["final_train_loss_mean"] == pytest.approx(2.1)
    assert loco["final_test_loss_mean"] == pytest.approx(3.1)
    assert loco["final_train_loss_std"] == pytest.approx(np.std([2, 2.2], ddof=1))
    # Time to target 3.25: adam seed 0 at epoch 3 (step 30, 3 s), seed 1 never: the median of (3 s, ∞) is ∞.
    assert adam["reached_target"] == "1/2"
    assert math.isnan(adam["steps_to_target"]) and math.isnan(adam["seconds_to_target"])
    # LocoProp: both seeds at epoch 2 (step 20, 4 s).
    assert (loco["reached_target"], loco["steps_to_target"], loco["seconds_to_target"]) == ("2/2", 20, 4.0)
    assert loco["step_time_ratio_to_adam"] == pytest.approx(2.0)
    # The diverged run is counted, not dropped.
    assert (sgd["runs"], sgd["diverged"], sgd["reached_target"]) == (1, 1, "0/1")
    assert math.isnan(sgd["final_train_loss_mean"])
    # With the default target both adam runs reach 3.5 at epoch 3 (3 s).
    default = summary_table(frame).set_index("optimizer").loc["adam"]
    assert (default["reached_target"], default["seconds_to_target"]) == ("2/2", 3.0)


def test_with_both_precisions_each_step_time_is_set_against_the_adam_of_its_own(tmp_path):
    """Runs of fp32 and bf16 reported together are labelled "adam (fp32)", "adam (bf16)", …: each row's ratio
    to Adam is over the Adam runs of its precision, not NaN for want of a row named plain "adam"."""
    for precision, adam_step, loco_step in (("fp32", 0.1, 0.8), ("bf16", 0.05, 0.6)):
        make_run(tmp_path, "adam", 0, "ok", [10, 6], 1.0, adam_step, precision=precision)
        make_run(tmp_path, "locoprop-m", 0, "ok", [10, 5], 1.0, loco_step, precision=precision)
    table = summary_table(label_precisions(load_results([tmp_path]))).set_index("optimizer")["step_time_ratio_to_adam"]
    assert table.to_dict() == pytest.approx(
        {"adam (fp32)": 1.0, "locoprop-m (fp32)": 8.0, "adam (bf16)": 1.0, "locoprop-m (bf16)": 12.0}
    )


def test_given_target_overrides_the_default(runs):
    reach = time_to_target(load_results([runs]), 5.0).set_index("run_id")
    steps = {pathlib.Path(k).name: v for k, v in reach["steps_to_target"].items()}
    assert steps["adam-autoencoder-mnist5k-seed1"] == 20  # losses 10, 7, 5: 5 at epoch 2
    assert steps["locoprop-m-autoencoder-mnist5k-seed0"] == 10


def test_loss_curves_have_a_median_line_and_spread_per_optimizer(runs):
    frame = load_results([runs])
    (figure,) = plots.loss_curves(frame, x="epoch").values()
    ax = figure.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["adam", "locoprop-m", "sgd (1 diverged)"]
    adam_line = ax.get_lines()[0]
    np.testing.assert_allclose(adam_line.get_ydata(), [10, 6.5, 4.5, 3.25])
    assert len(ax.collections) == 2  # shaded spread for the two optimizers with two seeds
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "training loss"
    assert ax.get_yscale() == "linear"  # 10 → 2 is less than a decade

    (timed,) = plots.loss_curves(frame, x="wall_time_s").values()
    np.testing.assert_allclose(timed.axes[0].get_lines()[1].get_xdata(), [0, 2, 4, 6])
    assert timed.axes[0].get_xlabel() == "training time (s)"


def test_log_scale_when_losses_span_decades(tmp_path):
    make_run(tmp_path, "adam", 0, "ok", [100, 10, 1, 0.5], 1.0, 0.1)
    (figure,) = plots.loss_curves(load_results([tmp_path])).values()
    assert figure.axes[0].get_yscale() == "log"


def test_a_run_reached_twice_counts_once(runs, tmp_path, monkeypatch):
    """A sweep writes its table as .csv and .parquet side by side; given both (or the folder and one of them),
    every trial counted twice and the intervals narrowed. A run directory given twice, or by another path,
    counts once too."""
    rows = [dict(run_id=trial, optimizer="adam", workload="mlp", data="synthetic", seed=trial, status="ok", step=0,
                 epoch=0, wall_time_s=0.0, train_loss=1.0, test_loss=1.0) for trial in range(4)]  # fmt: skip
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pd.DataFrame(rows).to_csv(sweep / "sweep_results.csv", index=False)
    pd.DataFrame(rows).to_parquet(sweep / "sweep_results.parquet", index=False)
    for inputs in (
        [sweep / "sweep_results.csv", sweep / "sweep_results.parquet"],
        [sweep, sweep / "sweep_results.parquet"],
    ):
        assert load_results(inputs)["run_id"].nunique() == 4
    monkeypatch.chdir(tmp_path)
    one = runs / "adam-autoencoder-mnist5k-seed0"
    frame = load_results([one, pathlib.Path("runs") / one.name, runs])
    assert frame["run_id"].nunique() == 5 and len(frame) == 18


def test_sensitivity_from_a_sweep_table(tmp_path):
    rows = []
    for trial, (lr, final, status) in enumerate([(1e-4, 5.0, "ok"), (1e-3, 3.0, "ok"), (1e-1, math.nan, "diverged")]):
        for epoch, loss in enumerate([10.0, final]):
            rows.append(
                dict(run_id=trial, optimizer="adam", workload="mlp", data="synthetic", seed=0, status=status,
                     step=epoch, epoch=epoch, wall_time_s=epoch, train_loss=loss, test_loss=loss, hp_lr=lr)
            )  # fmt: skip
    table = tmp_path / "sweep_results.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    frame = load_results([table])
    figures = plots.sensitivity(frame)
    (ax,) = figures["adam"].axes
    assert ax.get_xlabel() == "lr" and ax.get_xscale() == "log"
    ok_points, diverged_points = ax.collections
    np.testing.assert_allclose(ok_points.get_offsets(), [[1e-4, 5.0], [1e-3, 3.0]])
    assert diverged_points.get_label() == "diverged" and len(diverged_points.get_offsets()) == 1


def test_performance_profile_fractions(tmp_path):
    # Two workloads: A is first on one (ratio 1) and 2x slower on the other.
    make_run(tmp_path, "a", 0, "ok", [10, 5, 1], 1.0, 0.1, workload="mlp")  # target 1 at 2 s
    make_run(tmp_path, "b", 0, "ok", [10, 1, 1], 1.0, 0.1, workload="mlp")  # at 1 s
    make_run(tmp_path, "a", 0, "ok", [10, 1, 1], 1.0, 0.1, workload="cnn")  # at 1 s
    make_run(tmp_path, "b", 0, "ok", [10, 5, 5], 1.0, 0.1, workload="cnn")  # never
    figure = plots.performance_profile(load_results([tmp_path]), targets=1.0, tau_max=4.0)
    ax = figure.axes[0]
    curves = {line.get_label(): line for line in ax.get_lines()}
    tau = curves["a"].get_xdata()
    at = lambda name, t: curves[name].get_ydata()[np.searchsorted(tau, t)]  # noqa: E731
    assert (at("a", 1.0), at("a", 2.5)) == (0.5, 1.0)
    assert (at("b", 1.0), at("b", 3.9)) == (0.5, 0.5)
    assert ax.get_xscale() == "log"


def _table_rows(run_id, optimizer, seed, losses, seconds_per_epoch, workload="mlp"):
    return [
        dict(run_id=run_id, optimizer=optimizer, workload=workload, data="synthetic", seed=seed, status="ok",
             step=10 * epoch, epoch=epoch, wall_time_s=seconds_per_epoch * epoch, train_loss=loss, test_loss=loss)
        for epoch, loss in enumerate(losses)
    ]  # fmt: skip


@pytest.fixture
def partly_reached(tmp_path):
    """A sweep-style run table where some optimizers reach the target 1.0 in only some runs."""
    runs = [
        ("locoprop-s", 0, [10, 1], 2.0),  # reaches at 2 s
        ("locoprop-s", 1, [10, 5, 1], 1.5),  # at 3 s: median 2.5 s
        ("adam", 0, [10, 1], 2.0),  # at 2 s
        ("adam", 1, [10, 5, 1], 2.0),  # at 4 s
        ("adam", 2, [10, 5, 5], 2.0),  # never: median of (2, 4, ∞) = 4 s
        ("rmsprop", 0, [10, 5, 1], 2.75),  # at 5.5 s
        ("rmsprop", 1, [10, 5, 5], 2.75),  # never: median of (5.5, ∞) = ∞
    ]
    rows = [row for i, run in enumerate(runs) for row in _table_rows(i, *run)]
    path = tmp_path / "sweep_results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return load_results([path])


def test_table_and_performance_profile_agree_on_partly_reached_targets(partly_reached):
    table = summary_table(partly_reached, 1.0).set_index("optimizer")
    assert table["reached_target"].to_dict() == {"adam": "2/3", "locoprop-s": "2/2", "rmsprop": "1/2"}
    assert table.loc["locoprop-s", "seconds_to_target"] == 2.5
    assert table.loc["adam", "seconds_to_target"] == 4.0
    assert table.loc["adam", "steps_to_target"] == 20  # the same rule for steps
    assert math.isnan(table.loc["rmsprop", "seconds_to_target"])  # one of two runs is not a median

    ratios = performance_ratios(partly_reached, 1.0).loc[("mlp", "synthetic")]
    assert ratios.to_dict() == {"adam": 1.6, "locoprop-s": 1.0, "rmsprop": math.inf}
    # The profile's times are the table's, 'not reached' counting as never.
    table_seconds = table["seconds_to_target"].fillna(math.inf)
    assert (table_seconds / table_seconds.min()).to_dict() == ratios.to_dict()

    figure = plots.performance_profile(partly_reached, targets=1.0, tau_max=4.0)
    curves = {line.get_label(): line for line in figure.axes[0].get_lines()}
    tau = curves["adam"].get_xdata()
    at = lambda name, t: curves[name].get_ydata()[np.searchsorted(tau, t)]  # noqa: E731
    assert (at("locoprop-s", 1.0), at("adam", 1.5), at("adam", 1.7)) == (1.0, 0.0, 1.0)
    assert not curves["rmsprop"].get_ydata().any()


def test_report_command_writes_tables_plots_and_index(runs, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.commands.cli", "report", str(runs), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    index = (out / "report.md").read_text()
    for name in ["train_loss_vs_epoch_autoencoder_mnist5k", "train_loss_vs_time_autoencoder_mnist5k",
                 "performance_profile"]:  # fmt: skip
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").exists()
        assert f"({name}.png)" in index
    results = (out / "results.md").read_text()
    assert "| locoprop-m | 2 | 0 | – |" in results  # no validation loss recorded by these runs
    assert "| sgd | 1 | 1 | diverged (1 of 1) |" in results
    assert "no budget recorded, so this is not an equal-budget comparison" in results
    assert "| autoencoder | mnist5k | locoprop-m | 2 | 0 | 2.1 ± 0.14 |" in index  # the details table
    assert TIME_TO_TARGET_RULE in index  # the report states how partly reached targets count
    assert pd.read_csv(out / "results.csv").shape[0] == 3
    assert "## Sweeps" not in index and not (out / "sweeps.csv").exists()  # no sweep table among the inputs


def test_bad_inputs_give_clear_messages(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunsNotFound, match="No run directories .* found in .*empty"):
        load_results([empty])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(RunsNotFound, match="broken has no metrics.csv"):
        load_results([broken])
    with pytest.raises(RunsNotFound, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.commands.cli", "report", str(empty), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and "No run directories" in result.stderr


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("config.json", "{not json", r"config.json cannot be read \(JSONDecodeError"),
        ("config.json", '{"optimizer": "adam"}', "config.json lacks the key.s. workload, data, seed"),
        ("summary.json", "", r"summary.json cannot be read \(JSONDecodeError"),
        ("summary.json", "[1, 2]", "summary.json holds a JSON list, not an object"),
        ("metrics.csv", "step,epoch,train_loss,test_loss\n0,0,abc,1\n", "line 2: column train_loss holds 'abc'"),
        ("metrics.csv", "\x00\xff\xfe", "metrics.csv cannot be read"),
    ],
)
def test_a_bad_run_file_is_named(tmp_path, name, content, message):
    run_dir = make_run(tmp_path, *RUNS[0])
    (run_dir / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(RunsNotFound, match=message) as raised:
        load_results([tmp_path])
    assert str(run_dir / name) in str(raised.value)


def test_a_damaged_run_in_a_folder_is_skipped_with_a_warning_naming_it(tmp_path):
    from analysis.load import RunSkipped

    make_run(tmp_path, *RUNS[0])
    broken = make_run(tmp_path, *RUNS[1])
    (broken / "summary.json").write_text("[]")
    with pytest.warns(RunSkipped, match=f"skipped: {broken / 'summary.json'} holds a JSON list"):
        frame = load_results([tmp_path])
    assert frame["run_id"].nunique() == 1 and str(broken) not in set(frame["run_id"])
    # Named directly, the damaged run is still an error.
    with pytest.raises(RunsNotFound, match="holds a JSON list"):
        load_results([broken])
