"""``--precision fp32|bf16`` (sweeps.runner.precision): bfloat16 autocast of forward and backward, float32 weights
and optimizer state, for every optimizer; recorded with the run and part of what it is."""

import dataclasses
import json

import pytest
import torch
from helpers import run_cli
from torch import nn

from baselines.registry import OPTIMIZERS, make_optimizer
from locoprop import LocoPropOptimizer
from sweeps.commands.bench import BenchConfig, add_roofline, matmul_peaks, measure
from sweeps.runner import precision
from sweeps.runner.config import RunConfig, config_digest, run_identity
from sweeps.runner.train import train
from sweeps.search.results import sweep_setup
from sweeps.search.search_space import load_space

TINY = dict(workload="autoencoder", data="synthetic", width_mult=0.05, batch_size=64, steps=14, threads=1)
TRAIN = ["train", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64", "--steps", "2", "--no-progress",
         "--optimizer", "adam"]  # fmt: skip


@pytest.mark.parametrize("optimizer", ["adam", "locoprop-m", "locoprop-s"])
def test_a_bf16_run_trains_as_the_fp32_run_does(tmp_path, optimizer):
    """Both lower the loss by more than 1 in 14 steps; they end within a tenth of that drop of each other (bf16
    rounding moves the final loss by about 1e-2 here: garbage, or no training, moves it by the whole drop)."""
    results = {
        name: train(RunConfig(optimizer=optimizer, precision=name, out=str(tmp_path / name), **TINY), progress=False)
        for name in precision.PRECISIONS
    }
    drops = {}
    for name, result in results.items():
        assert result.status == "ok"
        assert json.loads((result.run_dir / "config.json").read_text())["precision"] == name
        first, last = result.history[0]["train_loss"], result.summary["final_valid_loss"]
        assert torch.isfinite(torch.tensor([first, last])).all()
        drops[name] = result.history[0]["valid_loss"] - last
        assert drops[name] > 1.0
    fp32, bf16 = results["fp32"].summary, results["bf16"].summary
    assert abs(bf16["final_valid_loss"] - fp32["final_valid_loss"]) < 0.1 * drops["fp32"]
    assert abs(bf16["final_train_loss"] - fp32["final_train_loss"]) < 0.1 * drops["fp32"]


def test_a_bf16_run_records_bf16_pre_activations_and_solves_in_bfloat16(tmp_path, monkeypatch):
    """The forward of a bf16 run really runs in bfloat16: the units' recorded pre-activations are bfloat16; and
    LocoProp's inner matmuls take local_dtype="bfloat16" from the precision."""
    seen = []
    original = LocoPropOptimizer.step

    def step(self, closure=None):
        seen.append(({r.a.dtype for unit in self.units for r in unit.records}, self.local_dtype))
        return original(self, closure)

    monkeypatch.setattr(LocoPropOptimizer, "step", step)
    for name, dtype, local in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, "bfloat16")):
        seen.clear()
        config = RunConfig(optimizer="locoprop-m", precision=name, out=str(tmp_path / name), **{**TINY, "steps": 2})
        train(config, progress=False)
        assert seen == [({dtype}, local)] * 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_under_bf16_every_optimizer_keeps_float32_parameters_and_state(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 12))
    hparams = precision.optimizer_hparams(name, {"fisher": "empirical"} if name == "kfac" else {}, "bf16")
    optimizer = make_optimizer(name, model, loss="bce", **hparams)
    x = torch.rand(32, 12)
    for _ in range(2):
        optimizer.zero_grad()
        output = precision.forward(model, x, "bf16", "cpu")
        assert output.dtype == torch.float32  # cast up for the loss
        nn.functional.binary_cross_entropy_with_logits(output, x).backward()
        optimizer.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    tensors = list(_tensors(optimizer.state_dict()))  # LocoProp's inner states and Muon's parts included
    # Plain SGD (no momentum) and the exact solve refreshed every step (T = 1) keep none.
    assert tensors or name in ("sgd", "locoprop-s-exact"), "no optimizer state to check"
    assert {t.dtype for t in tensors if t.is_floating_point()} <= {torch.float32, torch.float64}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def test_bf16_sets_locoprop_s_local_dtype_unless_the_run_sets_it():
    assert precision.optimizer_hparams("locoprop-m", {"lr": 1.0}, "bf16") == {"lr": 1.0, "local_dtype": "bfloat16"}
    assert precision.optimizer_hparams("locoprop-s", {}, "bf16") == {"local_dtype": "bfloat16"}
    assert precision.optimizer_hparams("locoprop-s", {"local_dtype": None}, "bf16") == {"local_dtype": None}
    # The exact solve has no inner matmuls (it refuses local_dtype); other optimizers have no such option.
    assert precision.optimizer_hparams("locoprop-s-exact", {}, "bf16") == {}
    assert precision.optimizer_hparams("adam", {}, "bf16") == {}
    assert precision.optimizer_hparams("locoprop-m", {}, "fp32") == {}
    with pytest.raises(ValueError, match="Invalid precision: 'fp16'; expected one of fp32, bf16"):
        precision.optimizer_hparams("adam", {}, "fp16")


def test_a_bad_precision_is_refused_naming_it(capsys):
    status, _, err = run_cli([*TRAIN, "--precision", "fp16"], capsys)
    assert status == 2 and "argument --precision: invalid choice: 'fp16'" in err
    for command in (["compare"], ["sweep"], ["bench"]):
        assert run_cli([*command, "--precision", "half"], capsys)[0] == 2
    with pytest.raises(ValueError, match="Invalid precision: 'half'"):
        RunConfig(precision="half").validate()


def test_fp32_is_what_a_config_without_precision_was():
    """config.json of a run made before the field existed lacks it: it loads as fp32 and keeps its identity (its
    directory name, its resume); bf16 is another run."""
    config = RunConfig(optimizer="adam", **TINY)
    stored = dataclasses.asdict(config)
    del stored["precision"]
    assert RunConfig.from_dict(stored).precision == "fp32"
    assert run_identity(stored) == run_identity(dataclasses.asdict(config))
    assert "precision" not in run_identity(dataclasses.asdict(config))
    assert config_digest(dataclasses.replace(config, precision="bf16")) != config_digest(config)
    # A study stored before the field existed continues at fp32; bf16 is another setup.
    space = load_space("adam")
    assert "precision" not in sweep_setup(config, space)
    assert sweep_setup(dataclasses.replace(config, precision="bf16"), space)["precision"] == "bf16"


def test_resume_in_another_precision_names_the_flag(tmp_path, capsys):
    train_ = [*TRAIN, "--out", str(tmp_path)]
    assert run_cli(train_, capsys)[0] == 0
    (first,) = tmp_path.iterdir()
    status, _, err = run_cli([*train_, "--precision", "bf16", "--resume"], capsys)
    assert status == 0
    (second,) = set(tmp_path.iterdir()) - {first}
    assert err.splitlines()[0] == (
        f"locoprop: --resume: no run with these settings in {tmp_path}, so a new one starts in {second.name}; "
        f"the run {first.name} there differs in --precision fp32 there, bf16 now (to continue it, give its values)"
    )
    # Asked in its own directory, a run of the other precision is refused, naming the field.
    config = RunConfig.from_dict(json.loads((first / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"another config \(precision: 'fp32' there, 'bf16' asked\)"):
        train(dataclasses.replace(config, precision="bf16"), resume=True, progress=False)


# ------------------------------------------------------------------ bench
def test_bench_in_bf16_counts_each_dtype_s_flops_and_reads_them_against_its_peak():
    """Under bf16 the backprop step's 3 forwards are bfloat16 matmuls, and LocoProp's 2K local ones too (its
    local_dtype from the precision); with local_dtype=None they stay float32, and the roofline blends two peaks."""
    config = BenchConfig(optimizer="locoprop-m", workload="mlp", batch_size=8, width_mult=0.05, local_iters=2,
                         steps=1, warmup=0, precision="bf16")  # fmt: skip
    record = measure(config)
    forward = record["step_flops"] / (3 + 2 * 2)
    assert record["precision"] == "bf16" and record["local_dtype"] == "bfloat16"
    assert record["step_flops_by_dtype"] == {"bfloat16": pytest.approx(7 * forward)}
    kept = measure(dataclasses.replace(config, hparams={"local_dtype": None}))
    assert "local_dtype" not in kept
    assert kept["step_flops_by_dtype"] == {
        "bfloat16": pytest.approx(3 * forward),
        "float32": pytest.approx(4 * forward),
    }
    add_roofline(kept, {"float32": 1e11, "bfloat16": 4e11})
    assert kept["matmul_peak_gflops"] == {"float32": 100.0, "bfloat16": 400.0}
    assert kept["roofline_s"] == pytest.approx(3 * forward / 4e11 + 4 * forward / 1e11)
    assert kept["peak_gflops"] == pytest.approx(7 * forward / kept["roofline_s"] / 1e9)
    assert kept["peak_fraction"] == pytest.approx(kept["roofline_s"] / kept["step_time_s"])
    adam = measure(dataclasses.replace(config, optimizer="adam"))
    assert adam["step_flops_by_dtype"] == {"bfloat16": pytest.approx(3 * forward)}


def test_matmul_peaks_are_measured_per_dtype():
    peaks = matmul_peaks(torch.device("cpu"), repeats=1)
    assert set(peaks) == {"float32", "bfloat16"} and all(peak > 0 for peak in peaks.values())


def test_bench_hparam_goes_to_every_optimizer_that_takes_it(monkeypatch, capsys):
    benchmarked = []
    monkeypatch.setattr("sweeps.commands.bench.bench", lambda configs: benchmarked.extend(configs) or [])
    argv = ["bench", "--optimizers", "adam,locoprop-m,locoprop-s-exact", "--precision", "bf16", "--json",
            "--hparam", "local_dtype=bfloat16", "--hparam", "covariance_refresh=10", "--hparam", "lr=0.01"]  # fmt: skip
    assert run_cli(argv, capsys)[0] == 0
    assert {c.optimizer: c.hparams for c in benchmarked} == {
        "adam": {"lr": 0.01},
        "locoprop-m": {"local_dtype": "bfloat16", "lr": 0.01},
        "locoprop-s-exact": {"covariance_refresh": 10, "lr": 0.01},  # the exact solve has no inner matmuls
    }
    assert {c.precision for c in benchmarked} == {"bf16"}
    status, _, err = run_cli(
        ["bench", "--optimizers", "adam,locoprop-m", "--hparam", "covariance_refresh=10", "--json"], capsys
    )
    assert status == 2 and err == (
        "locoprop: --hparam covariance_refresh: none of the benchmarked optimizers (adam, locoprop-m) takes it; see "
        "their registry defaults (baselines/registry.py)\n"
    )
    argv = ["bench", "--optimizers", "adam", "--hparam", "lr=0.01", "--hparam", "lr=0.1", "--json"]
    assert run_cli(argv, capsys)[2] == "locoprop: --hparam lr is given twice (0.01 and 0.1); give it once\n"
    # The value's type is checked with every config, before the first benchmark runs.
    with pytest.raises(ValueError, match="Invalid hyperparameter covariance_refresh='x' for 'locoprop-s-exact'"):
        BenchConfig(optimizer="locoprop-s-exact", hparams={"covariance_refresh": "x"}).validate()
