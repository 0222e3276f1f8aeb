"""LocoProp on W gloo ranks in spawned CPU processes equals one process on the concatenated batch (SPEC §11)."""

import gc
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import HANG_GUARD_S, bce_sum_mean, snapshot
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.distributed import greedy_owners
from sweeps.runner import run_directory

GLOBAL_BATCH = 24  # 12 per rank on 2 ranks, 8 on 3
STEPS = 3

IDENTITY = dict(local_iters=1, inner="sgd", inner_schedule="constant")
# name -> (optimizer keyword arguments, wrap the model in DDP)
CASES = {
    "M": (dict(variant="M", inner="rmsprop-tf", output_activation="sigmoid"), False),
    "M-adam-ddp": (dict(variant="M", inner="adam", output_activation="sigmoid"), True),
    # DDP wraps the model after the optimizer was given it (Lightning's DDP strategy): DDP's average is used
    "M-adam-ddp-later": (dict(variant="M", inner="adam", output_activation="sigmoid"), "later"),
    # per-unit asynchronous all-reduces, overlapping computation (the CUDA default), forced on gloo
    "M-overlap": (dict(variant="M", inner="rmsprop-tf", output_activation="sigmoid"), False),
    "S-gram": (dict(variant="S", inner="rmsprop-tf"), False),
    "S-reference": (dict(variant="S", inner="momentum", parallel="none", prox=0.1), False),
    "S-exact": (dict(variant="S", solve="exact", prox=0.5), False),
    "S-exact-ddp": (dict(variant="S", solve="exact", prox=0.5), True),
    # the user clips DDP's averaged gradient between backward() and step(): every rank solves with it
    "M-clip-ddp": (dict(variant="M", inner="rmsprop-tf", output_activation="sigmoid"), True),
    "S-exact-clip-ddp": (dict(variant="S", solve="exact", prox=0.5), True),
    # the amortised exact solve: C̄ refreshed at steps 0 and 2 (a moving average), reused at step 1
    "S-exact-amortised": (
        dict(variant="S", solve="exact", prox=0.5, covariance_refresh=2, covariance_decay=0.5),
        False,
    ),
    "S-exact-amortised-ddp": (dict(variant="S", solve="exact", prox=0.5, covariance_refresh=2), True),
    "S-identity-clip-ddp": (dict(variant="S", **IDENTITY), True),
    # weights tied between two units (and a LayerNorm): G is averaged over ranks once, for both uses
    "M-tied": (dict(variant="M", inner="adam", output_activation="sigmoid"), False),
    # γ from ρ at the first step: the ranks measure ‖a‖ and ‖g‖ of the global batch, as one process does
    "M-relative-gamma": (
        dict(variant="M", inner="rmsprop-tf", output_activation="sigmoid", relative_activation_lr=0.05),
        False,
    ),
}
# Inner matmuls in bfloat16: each rank rounds its own shard's products, so W ranks take the one-process step
# to bfloat16's accuracy, not bit for bit; the ranks still agree exactly.
LOW_PRECISION_CASES = {
    "M-bf16": (dict(variant="M", inner="rmsprop-tf", output_activation="sigmoid", local_dtype="bfloat16"), False),
    "S-bf16-ddp": (dict(variant="S", inner="rmsprop-tf", local_dtype="bfloat16"), True),
}


def _model(case: str = "") -> nn.Module:
    torch.manual_seed(0)
    if case.endswith("tied"):
        tied = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 12)).double()
        tied[3].weight = tied[0].weight
        return tied
    # A LayerNorm: parameters outside every unit, whose gradients must be averaged over ranks.
    return nn.Sequential(
        nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3), nn.LayerNorm(3), nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 12)
    ).double()


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(4, 12, generator=generator, dtype=torch.float64)
    return [torch.sigmoid(torch.randn(GLOBAL_BATCH, 4, generator=generator, dtype=torch.float64) @ mixing)
            for _ in range(STEPS + 1)]  # fmt: skip


def _optimizer(model, kwargs) -> LocoPropOptimizer:
    return LocoPropOptimizer(model, **{"lr": 1e-3, "activation_lr": 2.0, "local_iters": 4, **kwargs})


def _step(model, opt, x, clip: bool = False) -> None:
    opt.zero_grad()
    bce_sum_mean(model(x), x).backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()


def _worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        shard = GLOBAL_BATCH // world_size
        for name, (kwargs, ddp) in {**CASES, **LOW_PRECISION_CASES}.items():
            model = _model(name)
            net = nn.parallel.DistributedDataParallel(model) if ddp else model
            opt = _optimizer(model if ddp == "later" else net, kwargs)
            opt.comm.overlap = name.endswith("overlap")
            for x in _batches()[:STEPS]:
                _step(net, opt, x[rank * shard : (rank + 1) * shard], clip="clip" in name)
            torch.save({"params": snapshot(model), "state": opt.state_dict(), "skipped": opt.skipped_steps,
                        "bytes": opt.comm.bytes_sent}, f"{folder}/{name}-rank{rank}.pt")  # fmt: skip
        # DDP wraps a part of the model only: it averages that part's gradients, LocoProp the others'.
        model = _model()
        opt = _optimizer(model, CASES["M"][0])
        body, rest = nn.parallel.DistributedDataParallel(model[:3]), model[3:]
        for x in _batches()[:STEPS]:
            x = x[rank * shard : (rank + 1) * shard]
            opt.zero_grad()
            bce_sum_mean(rest(body(x)), x).backward()
            opt.step()
        torch.save({"params": snapshot(model)}, f"{folder}/partial-ddp-rank{rank}.pt")
        # A DDP forward without gradients (an evaluation), then training on the bare model: LocoProp averages.
        model = _model()
        opt = _optimizer(model, CASES["M"][0])
        with torch.no_grad():
            nn.parallel.DistributedDataParallel(model)(_batches()[0][rank * shard : (rank + 1) * shard])
        for x in _batches()[:STEPS]:
            _step(model, opt, x[rank * shard : (rank + 1) * shard])
        torch.save({"params": snapshot(model)}, f"{folder}/evaluated-in-ddp-rank{rank}.pt")
        # A non-finite batch on rank 1 only: every rank skips the step.
        model = _model()
        opt = _optimizer(model, CASES["M"][0])
        x = _batches()[0][rank * shard : (rank + 1) * shard].clone()
        if rank == 1:
            x[0, 0] = float("nan")
        _step(model, opt, x)
        torch.save({"params": snapshot(model), "skipped": opt.skipped_steps}, f"{folder}/nonfinite-rank{rank}.pt")
    finally:
        # Objects of the finished cases left in reference cycles (DDP among them) must go before the
        # process group does: collected after it, at exit, they can abort the rank.
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W={w}")
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ranks{request.param}")
    mp.spawn(_worker, args=(request.param, str(folder)), nprocs=request.param, join=True)
    return request.param, folder


def _load(folder: pathlib.Path, name: str, rank: int) -> dict:
    return torch.load(folder / f"{name}-rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_w_ranks_take_the_step_of_one_process_on_the_whole_batch(ranks, case):
    world_size, folder = ranks
    kwargs, _ = CASES[case]
    model = _model(case)
    opt = _optimizer(model, kwargs)
    start = snapshot(model)
    for x in _batches()[:STEPS]:
        _step(model, opt, x, clip="clip" in case)
    expected = snapshot(model)
    for rank in range(world_size):
        got = _load(folder, case, rank)
        assert got["skipped"] == 0
        for name in expected:
            moved = (expected[name] - start[name]).abs().max()
            assert moved > 1e-5, name  # the steps are real
            torch.testing.assert_close(got["params"][name], expected[name], rtol=1e-9, atol=1e-12 * (1 + moved))
    # Every rank holds the same parameters and inner state, bit for bit.
    first = _load(folder, case, 0)
    for rank in range(1, world_size):
        other = _load(folder, case, rank)
        assert all(torch.equal(first["params"][n], other["params"][n]) for n in expected)
        assert str(first["state"]) == str(other["state"])


def test_a_model_wrapped_in_ddp_after_the_optimizer_is_built_sends_no_gradient_again(ranks):
    """DDP averaged the gradients: the optimizer, given the model before DDP wrapped it, sends what it sends
    when given DDP (it summed every gradient over the ranks a second time)."""
    world_size, folder = ranks
    for rank in range(world_size):
        later, given = _load(folder, "M-adam-ddp-later", rank), _load(folder, "M-adam-ddp", rank)
        assert later["bytes"] == given["bytes"] > 0
        assert later["params"].keys() == given["params"].keys()
        for name in later["params"]:
            assert torch.equal(later["params"][name], given["params"][name])


def test_a_model_of_which_ddp_wraps_a_part_takes_the_one_process_step(ranks):
    """DDP averages the gradients of the part it wraps, LocoProp the rest's: the ranks take the step of one
    process on the whole batch (the rest's gradients were left unaveraged, and the ranks drifted apart)."""
    world_size, folder = ranks
    model = _model()
    opt = _optimizer(model, CASES["M"][0])
    body, rest = model[:3], model[3:]
    for x in _batches()[:STEPS]:
        opt.zero_grad()
        bce_sum_mean(rest(body(x)), x).backward()
        opt.step()
    expected = snapshot(model)
    for rank in range(world_size):
        got = _load(folder, "partial-ddp", rank)["params"]
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)


def test_a_forward_through_ddp_without_gradients_averages_nothing(ranks):
    """An evaluation through DDP, then training on the bare model: DDP averaged none of its gradients, so
    LocoProp does (they were taken for averaged from then on, and the ranks drifted apart)."""
    world_size, folder = ranks
    model = _model()
    opt = _optimizer(model, CASES["M"][0])
    for x in _batches()[:STEPS]:
        _step(model, opt, x)
    expected = snapshot(model)
    for rank in range(world_size):
        got = _load(folder, "evaluated-in-ddp", rank)["params"]
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["M", "S-exact", "S-exact-amortised"])
def test_the_state_dict_of_rank_0_continues_in_one_process(ranks, case):
    """Rank 0's checkpoint after 3 distributed steps, reloaded in one process, takes the same 4th step."""
    _, folder = ranks
    kwargs, _ = CASES[case]
    saved = _load(folder, case, 0)
    reference = _model()
    reference_opt = _optimizer(reference, kwargs)
    batches = _batches()
    for x in batches:
        _step(reference, reference_opt, x)
    model = _model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(saved["params"][name])
    opt = _optimizer(model, kwargs)
    opt.load_state_dict(saved["state"])
    _step(model, opt, batches[STEPS])
    for name, p in snapshot(reference).items():
        torch.testing.assert_close(snapshot(model)[name], p, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_w_ranks_take_the_bfloat16_step_of_one_process_to_its_accuracy(ranks, case):
    """Within 5e-3 of the steps taken (tests/test_low_precision.py states the tolerance), every rank the same."""
    world_size, folder = ranks
    kwargs, _ = LOW_PRECISION_CASES[case]
    model = _model()
    opt = _optimizer(model, kwargs)
    start = snapshot(model)
    for x in _batches()[:STEPS]:
        _step(model, opt, x)
    expected = snapshot(model)
    first = _load(folder, case, 0)
    for name in expected:
        moved = (expected[name] - start[name]).norm()
        assert (first["params"][name] - expected[name]).norm() < 5e-3 * moved, name
    for rank in range(1, world_size):
        other = _load(folder, case, rank)
        assert all(torch.equal(first["params"][n], other["params"][n]) for n in expected)
        assert str(first["state"]) == str(other["state"])


def test_a_non_finite_batch_on_one_rank_skips_the_step_on_every_rank(ranks):
    world_size, folder = ranks
    start = snapshot(_model())
    for rank in range(world_size):
        got = _load(folder, "nonfinite", rank)
        assert got["skipped"] == 1
        assert all(torch.equal(got["params"][n], start[n]) for n in start)


def test_greedy_owners_balance_the_largest_solves_first():
    assert greedy_owners([1.0, 8.0, 3.0, 3.0, 2.0], ranks=2) == [0, 0, 1, 1, 1]  # loads 9 and 8
    assert greedy_owners([5.0], ranks=3) == [0]


def test_a_single_process_pays_nothing_for_the_communicator():
    model = _model()
    opt = _optimizer(model, CASES["M"][0])
    assert not opt.comm.distributed and opt.comm.world_size == 1
    _step(model, opt, _batches()[0])
    assert opt.comm.bytes_sent == 0


def test_one_local_sgd_step_on_w_ranks_is_sgd_on_the_clipped_global_gradient(ranks):
    """SPEC §2's identity on W ranks: the step follows the gradient the user clipped after DDP averaged it."""
    world_size, folder = ranks
    model = _model()
    for x in _batches()[:STEPS]:
        model.zero_grad()
        bce_sum_mean(model(x), x).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(1e-3 * 2.0 * p.grad)
    for rank in range(world_size):
        got = _load(folder, "S-identity-clip-ddp", rank)["params"]
        for name, p in snapshot(model).items():
            torch.testing.assert_close(got[name], p, rtol=1e-10, atol=1e-12)


ONE_EXAMPLE_RANKS = 4


def _one_example_worker(rank: int, world_size: int, folder: str) -> None:
    """Each rank trains on one example of a batch of ``world_size`` (a shard of one row)."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        for name in ("M", "S-gram"):
            model = _model()
            opt = _optimizer(model, CASES[name][0])
            for x in _batches()[:STEPS]:
                _step(model, opt, x[:world_size][rank : rank + 1])
            torch.save({"params": snapshot(model), "skipped": opt.skipped_steps}, f"{folder}/{name}-rank{rank}.pt")
    finally:
        # Objects of the finished cases left in reference cycles (DDP among them) must go before the
        # process group does: collected after it, at exit, they can abort the rank.
        gc.collect()
        dist.destroy_process_group()


def test_one_example_per_rank_on_four_ranks_takes_the_one_process_step(tmp_path):
    mp.spawn(_one_example_worker, args=(ONE_EXAMPLE_RANKS, str(tmp_path)), nprocs=ONE_EXAMPLE_RANKS, join=True)
    for name in ("M", "S-gram"):
        model = _model()
        opt = _optimizer(model, CASES[name][0])
        for x in _batches()[:STEPS]:
            _step(model, opt, x[:ONE_EXAMPLE_RANKS])
        for rank in range(ONE_EXAMPLE_RANKS):
            got = _load(tmp_path, name, rank)
            assert got["skipped"] == 0
            for param, p in snapshot(model).items():
                torch.testing.assert_close(got["params"][param], p, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------- the runner
TRAIN = ["train", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64", "--steps", "12",
         "--eval-every", "6", "--no-progress"]  # fmt: skip


def _run_losses(folder: pathlib.Path) -> list[tuple]:
    (run_dir,) = folder.iterdir()
    rows = run_directory.read_history(run_dir / "metrics.csv")
    return [(r["step"], r["train_loss"], r["valid_loss"], r["test_loss"]) for r in rows]


def _cli(*args, cwd, launcher=()):
    return subprocess.run([sys.executable, *launcher, "-m", "sweeps", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=HANG_GUARD_S)  # fmt: skip


@pytest.mark.parametrize("optimizer", ["locoprop-m", "locoprop-s-exact", "adam"])
def test_train_on_two_processes_follows_the_one_process_run(tmp_path, optimizer):
    """The same global batch of 64 on 2 ranks of 32: the same losses at every evaluation (float32 sums
    in another order: to 1e-5). Adam is averaged by DDP, LocoProp communicates itself."""
    one = _cli(*TRAIN, "--optimizer", optimizer, "--out", str(tmp_path / "one"), cwd=tmp_path)
    two = _cli(*TRAIN, "--optimizer", optimizer, "--nproc", "2", "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout.count("run directory:") == 1  # rank 0 reports
    expected, got = _run_losses(tmp_path / "one"), _run_losses(tmp_path / "two")
    assert [row[0] for row in got] == [0, 6, 12]
    assert got[-1][1] < got[0][1] - 1  # it trained
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=1e-5)
    (run_dir,) = (tmp_path / "two").iterdir()
    assert run_directory.read_json(run_dir / "summary.json")["world_size"] == 2


def test_torchrun_launches_the_same_run(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = _cli(*TRAIN, "--optimizer", "locoprop-m", "--out", str(tmp_path / "tr"), cwd=tmp_path,
                  launcher=torchrun)  # fmt: skip
    assert result.returncode == 0, result.stderr
    one = _cli(*TRAIN, "--optimizer", "locoprop-m", "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0
    for g, e in zip(_run_losses(tmp_path / "tr"), _run_losses(tmp_path / "one")):
        assert g == pytest.approx(e, rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "kfac"], "K-FAC is not data-parallel here"),
        (["--optimizer", "adam", "--batch-size", "63"], "does not split into 2 equal shards"),
    ],
)
def test_a_run_two_processes_cannot_share_is_refused_in_one_line(tmp_path, args, message):
    result = _cli(*TRAIN, *args, "--nproc", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
