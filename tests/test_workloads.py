"""The workloads of the suite beyond the reference autoencoder (SPEC §5): ``curves``, ``resnet`` and
``transformer``, their data sets (``curves``, ``fortunes``, ``synthetic-text``), and every optimizer on each."""

import dataclasses
import math
import re

import pytest
import torch
from helpers import missing_system_dependency
from torch import nn

from baselines.registry import OPTIMIZERS, make_optimizer
from locoprop import LocoPropOptimizer
from sweeps.commands.bench import BenchConfig, measure
from sweeps.commands.cli import main
from sweeps.runner import RunConfig, run_directory, text, train
from sweeps.runner import data as data_module
from sweeps.runner import workloads as workloads_module
from sweeps.runner.curves import curve_images
from sweeps.runner.data import DataUnavailable, data_shape, load_dataset
from sweeps.runner.workloads import get_workload

# Each new workload and a data set its tests run on anywhere.
NEW_WORKLOADS = {"curves": "curves", "resnet": "synthetic", "transformer": "synthetic-text"}


# ------------------------------------------------------------------ CURVES
def test_curve_images_are_fixed_by_their_seed_and_look_like_strokes():
    images = curve_images(64, seed=3)
    assert images.shape == (64, 784) and images.dtype == torch.float32
    assert torch.equal(images, curve_images(64, seed=3))
    assert torch.equal(images[:10], curve_images(10, seed=3))  # more images extend the set, never change it
    assert not torch.equal(images, curve_images(64, seed=4))
    assert images.min() == 0.0 and images.max() <= 1.0
    assert (images.amax(dim=1) > 0.9).all()  # every image has a stroke...
    ink = (images > 0.5).float().mean(dim=1)
    assert (ink > 0.01).all() and (ink < 0.25).all()  # ...a thin one: a curve, not a blot


def test_the_curves_data_set_is_the_generator_s_images_split_in_order(monkeypatch):
    assert (data_module.CURVES_TRAIN, data_module.CURVES_TEST) == (20_000, 10_000)  # Martens (2010)'s sizes
    monkeypatch.setattr(data_module, "CURVES_TRAIN", 60)
    monkeypatch.setattr(data_module, "CURVES_TEST", 40)
    data_module._curve_images.cache_clear()
    try:
        data = load_dataset("curves")
    finally:
        data_module._curve_images.cache_clear()
    images = curve_images(100, data_module.CURVES_SEED)
    assert torch.equal(data.train_x, images[:60]) and torch.equal(data.test_x, images[60:])
    assert data.split_sizes() == {"train": 60, "valid": 0, "test": 40}
    assert data.shape.num_classes == 0 and not data.train_y.any()  # no labels


def test_the_curves_autoencoder_is_784_400_200_100_50_25_6_mirrored_with_logistic_units_and_sparse_init():
    model = get_workload("curves").build_model(data_shape("curves"))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    assert widths == [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
    following = [type(model[i + 1]).__name__ if i + 1 < len(model) else None for i, m in enumerate(model)
                 if isinstance(m, nn.Linear)]  # fmt: skip
    assert following == ["Sigmoid"] * 5 + ["Linear"] + ["Sigmoid"] * 5 + [None]  # linear code, logits into BCE
    for layer in linears:  # Martens' sparse initialisation: 15 non-zero incoming weights per unit, zero biases
        assert (layer.weight != 0).sum(dim=1).tolist() == [min(15, layer.in_features)] * layer.out_features
        assert not layer.bias.any()


# --------------------------------------------------------------- fortunes
def _fake_fortunes(folder, change=b""):
    """Files named as the package's, each holding two fortunes (the first file ``change`` too)."""
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(text.FORTUNES_FILES):
        extra = change if i == 0 else b""
        (folder / name).write_bytes(b"fortune %d of %s\n%%\nanother %d%s\n%%\n" % (i, name.encode(), i, extra))
    return folder


def test_fortunes_reads_the_debian_package_checks_its_text_and_splits_it_by_fortune():
    try:
        data = load_dataset("fortunes")
    except DataUnavailable as err:
        missing_system_dependency(f"The Debian package fortunes is not installed ({err})")
    length = text.SEQUENCE_LENGTH
    assert data.train_x.shape[1] == length and data.train_x.dtype == torch.int64
    assert data.split_sizes() == {"train": 18182, "valid": 0, "test": 1947}  # about 2.3 and 0.25 million bytes
    assert torch.equal(data.train_x[1:, 0], data.train_y[:-1, -1])  # windows follow each other in the stream
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])  # the label of a token is the next one
    train_text = bytes(data.train_x.flatten().tolist())
    test_text = bytes(data.test_x.flatten().tolist())
    assert "Bionic Dog" in train_text.decode("utf-8", errors="replace")  # English text of the package
    # A fortune is in one split only: every test fortune long enough to be unique is absent from the training text.
    test_fortunes = [f for f in re.split(rb"(?m)^%\n", test_text)[1:-1] if len(f) > 200]
    assert len(test_fortunes) > 100 and not any(f in train_text for f in test_fortunes)


def test_missing_fortunes_says_which_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FORTUNES_DIR", tmp_path)
    with pytest.raises(DataUnavailable, match=r"art, ascii-art, computers and 40 more not found in .*apt-get install"
                                              r" fortunes"):  # fmt: skip
        load_dataset("fortunes")


def test_fortunes_of_another_version_are_refused_naming_the_version(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FORTUNES_DIR", _fake_fortunes(tmp_path / "fortunes"))
    with pytest.raises(DataUnavailable, match=f"not the text it is fixed to .*fortunes {text.FORTUNES_VERSION}"):
        load_dataset("fortunes")


def test_the_fortunes_split_keeps_whole_fortunes_each_followed_by_its_separator(tmp_path):
    files = text.read_fortunes(_fake_fortunes(tmp_path / "fortunes"))
    train, test = (bytes(t.tolist()) for t in text.fortunes_split(files))
    fortunes = [f + b"%\n" for name in text.FORTUNES_FILES for f in re.split(rb"(?m)^%\n", files[name]) if f.strip()]
    assert len(fortunes) == 2 * len(text.FORTUNES_FILES)
    in_test = [f for f in fortunes if f in test]
    assert len(in_test) == round(text.TEST_FRACTION * len(fortunes))
    assert all((f in train) != (f in test) for f in fortunes)  # each fortune in exactly one split
    assert len(train) + len(test) == sum(len(f) for f in fortunes)  # nothing added, nothing lost
    assert text.fortunes_split(files)[1].tolist() == list(test)  # the same split every time


def test_windows_pair_each_token_with_the_next():
    x, y = text.windows(torch.arange(10), length=3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_synthetic_text_is_a_fixed_token_stream_of_the_fortunes_shape():
    data = load_dataset("synthetic-text", n_train=8, n_test=4)
    assert data.train_x.shape == (8, text.SEQUENCE_LENGTH) and data.test_x.shape == (4, text.SEQUENCE_LENGTH)
    assert data.shape == data_shape("fortunes")
    assert torch.equal(data.train_x, load_dataset("synthetic-text", n_train=8, n_test=4).train_x)
    assert 0 <= data.train_x.min() and data.train_x.max() < data.shape.num_classes
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])
    # Each symbol has three followers only: a model can learn the stream.
    pairs = torch.stack([data.train_x.flatten()[:-1], data.train_x.flatten()[1:]], dim=1).unique(dim=0)
    assert torch.bincount(pairs[:, 0]).max() <= 3


# ------------------------------------------------------ workloads and data
@pytest.mark.parametrize(
    "workload, data, message",
    [
        ("transformer", "mnist5k", "Workload 'transformer' cannot train on 'mnist5k' (images); its data sets are "
                                   "fortunes, synthetic-text"),
        ("resnet", "fortunes", "Workload 'resnet' cannot train on 'fortunes' (token sequences); its data sets are "
                               "mnist5k, fashion-mnist, mnist, synthetic"),
        ("mlp", "curves", "Workload 'mlp' cannot train on 'curves' (unlabelled images)"),
    ],
)  # fmt: skip
def test_a_workload_refuses_data_it_cannot_train_on(workload, data, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(workload=workload, data=data).validate()
    status = main(["train", "--workload", workload, "--data", data, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_each_workload_has_a_default_data_set_and_batch_size():
    defaults = {name: (RunConfig(workload=name).data, RunConfig(workload=name).batch_size) for name in NEW_WORKLOADS}
    assert defaults == {"curves": ("curves", 250), "resnet": ("fashion-mnist", 128), "transformer": ("fortunes", 16)}
    assert (RunConfig().data, RunConfig().batch_size) == ("mnist5k", 1000)  # the reference, as before
    assert RunConfig(workload="curves", data="mnist5k", batch_size=7).data == "mnist5k"  # given values win
    for name in NEW_WORKLOADS:
        RunConfig(workload=name).validate()


def test_evaluations_read_a_fixed_subset_of_a_large_split():
    data = load_dataset("synthetic", n_train=50, n_test=8).with_validation(0.2)
    subsets = data.evaluated(10)
    assert {split: len(x) for split, (x, _) in subsets.items()} == {"train": 10, "valid": 10, "test": 8}
    again = data.evaluated(10)
    assert all(torch.equal(subsets[s][0], again[s][0]) for s in subsets)  # the same examples every time
    x, y = subsets["train"]
    rows = [int((data.train_x == row).all(dim=1).nonzero()) for row in x]
    assert rows == sorted(rows) and torch.equal(y, data.train_y[rows])  # examples of the split, in its order
    assert all(torch.equal(data.evaluated(None)[s][0], getattr(data, f"{s}_x")) for s in subsets)


def test_the_resnet_is_a_small_resnet_with_batchnorm():
    model = get_workload("resnet").build_model(data_shape("fashion-mnist"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 1 + 2 * 3 + 2  # stem, two per block, two 1×1 shortcuts
    assert all(c.bias is None for c in convs)
    assert [c.out_channels for c in convs if c.kernel_size == (3, 3)] == [8, 8, 8, 16, 16, 32, 32]
    assert convs[0].stride == (2, 2)  # the stem: the stages work at 14, 7 and 4 pixels a side
    assert model(torch.rand(5, 784)).shape == (5, 10)
    deeper = get_workload("resnet").build_model(data_shape("fashion-mnist"), depth_mult=2)
    assert sum(isinstance(m, nn.Conv2d) for m in deeper.modules()) == 1 + 2 * 6 + 2


def test_the_transformer_is_causal_with_ordinary_attention_and_a_relu_mlp():
    model = get_workload("transformer").build_model(data_shape("fortunes")).eval()
    assert {type(m).__name__ for m in model.modules()} >= {"Embedding", "LayerNorm", "Linear", "ReLU"}
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.GELU)) for m in model.modules())
    tokens = torch.randint(0, 256, (2, text.SEQUENCE_LENGTH))
    changed = tokens.clone()
    changed[:, 40:] = torch.randint(0, 256, (2, text.SEQUENCE_LENGTH - 40))
    with torch.no_grad():
        logits, other = model(tokens), model(changed)
    assert logits.shape == (2, text.SEQUENCE_LENGTH, 256)
    assert torch.equal(logits[:, :40], other[:, :40])  # a position sees only the tokens up to it
    assert not torch.allclose(logits[:, 40:], other[:, 40:])


def test_locoprop_sees_the_units_of_each_new_workload():
    """Every Linear, Conv2d and Embedding is a unit; the MLP's first layer has its ReLU, a convolution
    (followed by BatchNorm) and an embedding the identity, the head the softmax of the cross-entropy."""
    transfers = {}
    for name, data in NEW_WORKLOADS.items():
        model = get_workload(name).build_model(data_shape(data), width_mult=0.25)
        optimizer = make_optimizer("locoprop-m", model, loss=get_workload(name).loss_kind)
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
        assert [u.module for u in optimizer.units] == layers
        transfers[name] = {u.name: u.transfer.name for u in optimizer.units}
    assert transfers["transformer"]["blocks.0.mlp.0"] == "relu"
    assert transfers["transformer"]["blocks.0.attention.query"] == "identity"
    assert transfers["transformer"]["head"] == "softmax"
    assert transfers["transformer"]["token_embedding"] == "identity"
    assert transfers["resnet"]["stages.1.first.0"] == "identity" and transfers["resnet"]["classifier"] == "softmax"
    assert list(transfers["curves"].values()) == ["sigmoid"] * 5 + ["identity"] + ["sigmoid"] * 6


# ------------------------------------------------------ every optimizer
# What cannot work, and the message that says so; every other optimizer steps on every new workload.
REFUSED = {
    ("resnet", "locoprop-s-exact"): "solve='exact' supports nn.Linear units only; unit 'stem.0' is a Conv2d",
    ("transformer", "locoprop-s-exact"): "unit 'token_embedding' is a Embedding: use solve='iterative'",
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("workload", list(NEW_WORKLOADS))
def test_every_optimizer_steps_on_every_new_workload_or_says_why_not(workload, optimizer):
    chosen, shape = get_workload(workload), data_shape(NEW_WORKLOADS[workload])
    model = chosen.build_model(shape, width_mult=0.25)
    if (workload, optimizer) in REFUSED:
        with pytest.raises(ValueError, match=re.escape(REFUSED[workload, optimizer])):
            make_optimizer(optimizer, model, loss=chosen.loss_kind)
        return
    opt = make_optimizer(optimizer, model, loss=chosen.loss_kind)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = shape.random_batch(8, torch.Generator().manual_seed(0))
    for _ in range(2):  # the second step uses the state of the first
        opt.zero_grad()
        loss = chosen.loss(model(x), chosen.target(x, y))
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    assert getattr(opt, "skipped_steps", 0) == 0
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
    assert sum(moved) >= len(moved) // 2, f"{sum(moved)} of {len(moved)} parameter tensors moved"
    if isinstance(opt, LocoPropOptimizer):
        opt.remove_hooks()


# ------------------------------------------------------------------ runs
def test_a_transformer_run_records_loss_error_and_perplexity_of_each_split(tmp_path, monkeypatch):
    small = dataclasses.replace(get_workload("transformer"), eval_examples=20)
    monkeypatch.setitem(workloads_module.WORKLOADS, "transformer", small)
    config = RunConfig(workload="transformer", data="synthetic-text", optimizer="adam", hparams={"lr": 3e-3},
                       width_mult=0.25, steps=6, eval_every=3, out=str(tmp_path))  # fmt: skip
    result = train(config, progress=False)
    assert result.status == "ok"
    header = (tmp_path / run_directory.METRICS).read_text().splitlines()[0].split(",")
    assert {"valid_error", "valid_perplexity", "test_perplexity", "train_perplexity"} <= set(header)
    first, last = result.history[0], result.history[-1]
    for split in ("train", "valid", "test"):
        assert last[f"{split}_perplexity"] == pytest.approx(math.exp(last[f"{split}_loss"]))
        assert 0 <= last[f"{split}_error"] <= 1
    assert first["train_loss"] == pytest.approx(math.log(256), abs=0.1)  # uniform over the bytes at the start
    assert last["train_loss"] < first["train_loss"] - 0.2
    s = result.summary
    assert s["final_test_perplexity"] == pytest.approx(last["test_perplexity"])
    assert s["split_sizes"] == {"train": 230, "valid": 26, "test": 64}
    assert s["evaluated_sizes"] == {"train": 20, "valid": 20, "test": 20}  # the workload's eval_examples


def test_locoprop_bench_measures_the_transformer():
    record = measure(BenchConfig(optimizer="locoprop-m", workload="transformer", batch_size=2, width_mult=0.25,
                                 local_iters=2, steps=1, warmup=0))  # fmt: skip
    assert BenchConfig(workload="transformer").data == "fortunes"  # its shape only: no file is read
    assert record["workload"] == "transformer" and record["step_time_s"] > 0
    assert record["ratio_to_adam"] == pytest.approx(record["step_time_s"] / record["adam_step_time_s"])
    assert record["flop_bound_ratio"] > 0


def test_bench_measures_the_free_gradient_sensitivity_with_the_rule_it_needs():
    """--hypergrad gradient, listed by bench's help, always crashed after the other configs' timings: LocoProp
    refuses it with the default plain rule. Bench takes the normalized rule for it, unless one is given."""
    config = BenchConfig(optimizer="locoprop-m", workload="mlp", batch_size=2, width_mult=0.05, local_iters=1,
                         steps=1, warmup=0, hypergrad="gradient")  # fmt: skip
    record = measure(config)
    assert record["hypergrad"] == "gradient" and record["hypergrad_overhead"] is not None
    with pytest.raises(ValueError, match="hypergrad='gradient' with hypergrad_rule='plain'"):
        measure(dataclasses.replace(config, hparams={"hypergrad_rule": "plain"}))


def test_bench_reports_means_beside_medians_so_that_work_done_every_few_steps_counts(monkeypatch):
    """A refresh in one step of four (an amortised exact solve, K-FAC's inverses) leaves the median alone; the
    mean prices it in."""
    from sweeps.runner.budget import RoundTimes

    times = {"optimizer": [1.0, 1.0, 1.0, 5.0], "reference": [0.5, 0.5, 0.5, 0.5]}
    monkeypatch.setattr("sweeps.commands.bench.interleaved_step_times",
                        lambda timed, **_: RoundTimes(wall=times, cpu=times))  # fmt: skip
    record = measure(BenchConfig(optimizer="sgd", workload="mlp", batch_size=2, width_mult=0.05, steps=4, warmup=0))
    assert record["step_time_s"] == 1.0 and record["ratio_to_adam"] == 2.0
    assert record["step_time_mean_s"] == 2.0 and record["mean_ratio_to_adam"] == 4.0


def test_bench_times_whole_periods_of_an_optimizer_s_periodic_work(monkeypatch):
    """Asked for 4 steps of an exact S solve refreshing every 3, it times 6: each refresh as often as a run."""
    import sweeps.commands.bench as bench_module

    rounds, real = [], bench_module.interleaved_step_times
    monkeypatch.setattr(
        bench_module, "interleaved_step_times", lambda timed, **kw: rounds.append(kw["rounds"]) or real(timed, **kw)
    )
    config = dict(workload="mlp", batch_size=8, width_mult=0.05, steps=4, warmup=0)
    record = measure(BenchConfig(optimizer="locoprop-s-exact", hparams={"covariance_refresh": 3}, **config))
    assert rounds == [6] and record["steps"] == 6
    assert measure(BenchConfig(optimizer="locoprop-s-exact", hparams={"covariance_refresh": 1}, **config))["steps"] == 4


def test_bench_prices_bfloat16_inner_matmuls_at_their_own_throughput():
    config = BenchConfig(optimizer="locoprop-m", workload="mlp", batch_size=8, width_mult=0.05, local_iters=2,
                         steps=1, warmup=0, hparams={"local_dtype": "bfloat16"})  # fmt: skip
    record = measure(config)
    assert record["local_dtype"] == "bfloat16" and record["local_matmul_gflops"] > 0
    assert record["flop_bound_ratio"] > 0
    assert "local_dtype" not in measure(dataclasses.replace(config, hparams={}))


def test_bench_takes_the_workload_s_data_shape_and_batch_size_unless_given(monkeypatch, capsys):
    status = main(["bench", "--workload", "transformer", "--data", "mnist5k"])  # refused before any benchmark runs
    err = capsys.readouterr().err
    assert status == 2 and "Workload 'transformer' cannot train on 'mnist5k' (images)" in err
    benchmarked = []
    monkeypatch.setattr("sweeps.commands.bench.bench", lambda configs: benchmarked.extend(configs) or [])
    assert main(["bench", "--workload", "transformer", "--optimizers", "adam", "--json"]) == 0
    assert main(["bench", "--workload", "resnet", "--data", "mnist5k", "--batch-size", "32", "--json"]) == 0
    assert [(c.workload, c.data, c.batch_size) for c in benchmarked][:2] == [("transformer", "fortunes", 16),
                                                                             ("resnet", "mnist5k", 32)]  # fmt: skip


def test_bench_times_the_weight_gradient_products_of_the_units_own_shapes_and_dtype(monkeypatch):
    """rᵀx per recorded use: the d_out × rows by rows × d_in product in the local dtype, the half of a local
    iteration's FLOPs whose transposed operands run slower than the forward's."""
    from sweeps.commands.bench import _weight_gradient_throughput

    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = LocoPropOptimizer(model, variant="M")
    model(torch.randn(4, 6)).pow(2).sum().backward()
    products, matmul = [], torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: products.append((a.shape, b.shape, a.dtype)) or matmul(a, b))
    assert _weight_gradient_throughput(opt.units, torch.device("cpu"), repeats=1, dtype=torch.bfloat16) > 0
    assert products == [((5, 4), (4, 6), torch.bfloat16), ((3, 4), (4, 5), torch.bfloat16)]


def test_bench_flop_bound_prices_each_half_of_a_local_iteration_at_its_own_throughput():
    config = BenchConfig(optimizer="locoprop-m", workload="mlp", batch_size=8, width_mult=0.05, local_iters=2,
                         steps=1, warmup=0, hparams={"local_dtype": "bfloat16"})  # fmt: skip
    record = measure(config)
    k, flops = record["local_iters"], record["step_flops_by_dtype"]["bfloat16"] / (2 * record["local_iters"])
    forward, local, gradient = (record[key] * 1e9 for key in ("matmul_gflops", "local_matmul_gflops",
                                                               "local_gradient_matmul_gflops"))  # fmt: skip
    assert record["flop_bound_s"] == pytest.approx(3 * flops / forward + k * flops / local + k * flops / gradient)
