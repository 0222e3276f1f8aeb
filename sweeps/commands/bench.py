"""``locoprop bench``: step time and memory per optimizer (SPEC §7, §10).

Each optimizer runs in a fresh subprocess (so that peak memory is its own)
on the same model, batch and seed: a few warm-up steps, then the median of
``steps`` timed steps (forward, backward, optimizer step). Reported per
optimizer:

- ``step_time_s`` and ``ratio_to_adam``: the median step time, and its
  ratio to the median of Adam steps on an identical model taken in the same
  process, alternating with this optimizer's steps;
- ``step_time_mean_s`` and ``mean_ratio_to_adam``: the same with means,
  which price in work done once every few steps (the refresh of an
  amortised exact solve every ``covariance_refresh`` steps, K-FAC's inverses)
  that the median leaves out; ``steps`` is rounded up to whole periods of
  that work (``baselines.registry.cost_period``), so the mean holds each
  refresh as often as a run does;
- ``peak_mem_bytes``: on CUDA the peak of allocated memory; on CPU the
  process's peak resident memory above what it held before the model was
  built (parameters, gradients, optimizer state and activations), from a
  separate two-step run in which glibc returns every large block at once
  (``MALLOC_MMAP_THRESHOLD_``), so that the peak is live memory rather than
  allocator caching (that setting would slow the timed run);
- ``comm_bytes_per_step`` (with ``nproc`` ranks): the bytes a rank sends per
  step, counted at the collectives (LocoProp's communicator; a DDP
  communication hook for the others), a ring all-reduce of n bytes sending
  2n(W−1)/W;
- ``hypergrad_overhead`` (LocoProp with ``hypergrad`` "implicit",
  "unrolled" or "gradient", β > 0): the median step time over the median step of the same
  LocoProp with β = 0 on an identical model, its steps alternating with
  these, minus one (``plain_step_time_s`` is that median);
- ``flop_bound_ratio`` (iterative LocoProp): the measured step time over the
  FLOP-proportional bound, one backprop step (3 × the forward FLOPs) plus
  K × (unit forward + weight gradient) = (3 + 2K) × forward FLOPs, priced at
  the matmul throughput of the model's own unit forwards measured in the
  same process; the K local forwards at the throughput of those forwards in
  the local dtype (``local_matmul_gflops`` with ``local_dtype``, bfloat16
  inner matmuls) and the K weight gradients at that of the units' own
  weight-gradient products rᵀx in that dtype, also measured
  (``local_gradient_matmul_gflops``: their operands are transposed against
  the forward's); under ``precision`` "bf16" the
  backprop step's at the throughput of the forwards in bfloat16;
- the roofline: ``matmul_peak_gflops``, the machine's matmul peak per dtype
  (float32 and bfloat16: the fastest of 5 square matmuls of side 2048 on
  CPU, 8192 on CUDA, measured once per bench run, in the parent process,
  before the optimizers, on the threads they run on); ``step_flops``
  (``step_flops_by_dtype``: the FLOPs of a step by the dtype of their
  matmuls), one backprop step, 3 ×
  the model's forward FLOPs (torch's FLOP counter: matmuls and
  convolutions), in the dtype of the forward (bfloat16 under ``precision``
  "bf16"), and for iterative LocoProp 2K × the units' forward FLOPs in its
  local dtype; the other optimizers' own arithmetic (K-FAC's factors and
  inverses, the exact solve's Gram matrix and solve, Shampoo's roots) is
  not counted, so their achieved rate is a lower bound;
  ``achieved_gflops`` = ``step_flops`` / ``step_time_s``; ``roofline_s``,
  each dtype's FLOPs at its peak; ``peak_gflops`` = ``step_flops`` /
  ``roofline_s``, the peak of the dtype the step runs in (a blend of two
  for a float32 step with bfloat16 local iterations); and
  ``peak_fraction`` = ``achieved_gflops`` / ``peak_gflops``: how close the
  step is to the machine's limit (``1 / peak_fraction``: the step over its
  roofline).

Every optimizer runs on ``threads`` intra-op threads on CPU, as a run of
``locoprop train --threads`` does (None: one fewer than the cores,
``sweeps.runner.budget.default_threads``; ``OMP_NUM_THREADS`` decides when
set); each record's ``threads`` is the count it ran on.

``precision`` "bf16" times every optimizer, and its Adam twin, with the
forward and backward under bfloat16 autocast and LocoProp's inner matmuls in
bfloat16 (:mod:`sweeps.runner.precision`); ``hparams`` are the registry
hyperparameters of the optimizer (``locoprop bench --hparam NAME=VALUE`` sets
one for every optimizer that takes it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from baselines.registry import cost_period
from sweeps.runner import contract
from sweeps.runner.budget import interleaved_step_times, round_steps, run_threads
from sweeps.runner.precision import DEFAULT_PRECISION, autocast, check_precision, forward, optimizer_hparams
from sweeps.runner.ranks import Ranks, launch

__all__ = ["PEAK_DTYPES", "PEAK_MATMUL_SIZE", "BenchConfig", "add_roofline", "bench", "matmul_peaks", "measure"]


@dataclasses.dataclass
class BenchConfig:
    optimizer: str = "adam"
    workload: str = "autoencoder"
    data: str | None = None  # only its shape (default: the workload's data set): the batch is random data
    batch_size: int = 1000
    width_mult: float = 1.0
    depth_mult: int = 1
    local_iters: int = 10
    steps: int = 10
    warmup: int = 3
    device: str = "cpu"
    hparams: dict = dataclasses.field(default_factory=dict)
    parallel: str | None = None
    nproc: int = 1  # data-parallel ranks: batch_size is the global batch
    hypergrad: str | None = None  # LocoProp: γ adapted by hypergradients of this mode (None: β = 0)
    memory_only: bool = False  # the separate memory run: no Adam twin, no probe
    precision: str = DEFAULT_PRECISION  # "bf16": the forward and backward under bfloat16 autocast (and Adam's twin)
    threads: int | None = None  # intra-op threads on CPU, as a run's (None: budget.default_threads; a rank: its share)

    def __post_init__(self):
        from sweeps.runner.workloads import WORKLOADS

        if self.data is None and self.workload in WORKLOADS:  # an unknown workload is refused by validate()
            self.data = WORKLOADS[self.workload].default_data

    def validate(self) -> None:
        """Refuse a config that cannot be measured, naming the bad value."""
        from baselines.registry import OPTIMIZERS, check_hparams
        from sweeps.runner.workloads import check_data, check_width_mult

        check_data(self.workload, self.data)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer: {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        for name, least in (("batch_size", 1), ("depth_mult", 1), ("local_iters", 1), ("steps", 1), ("warmup", 0),
                            ("nproc", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Invalid {name}: {value!r}; expected an integer ≥ {least}")
        check_width_mult(self.width_mult)
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"Invalid device: {self.device!r}; expected cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid device: {self.device!r}; no CUDA device is available (use --device cpu or auto)")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"Invalid device: {self.device!r}; expected cpu or cuda")
        if self.hypergrad is not None:
            from locoprop.hypergrad import HYPERGRAD_MODES

            if self.hypergrad not in HYPERGRAD_MODES:
                raise ValueError(f"Invalid hypergrad: {self.hypergrad!r}; expected one of {', '.join(HYPERGRAD_MODES)}")
            if not self.optimizer.startswith("locoprop"):
                raise ValueError(f"hypergrad={self.hypergrad!r} is for LocoProp, not {self.optimizer!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):  # fmt: skip
            raise ValueError(f"Invalid threads: {self.threads!r}; expected an integer ≥ 1")
        if self.batch_size % self.nproc:
            raise ValueError(f"Invalid batch_size: {self.batch_size} does not split into {self.nproc} equal shards")
        check_precision(self.precision)
        check_hparams(self.optimizer, self.hparams)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unit_forward_flops(unit, a: torch.Tensor) -> float:
    """Multiply-add FLOPs of one recorded use of ``unit`` with output ``a`` (an embedding's gather: none)."""
    kind = unit.kind
    if kind == "embedding":
        return 0.0
    if kind == "linear":
        return 2.0 * a.numel() * unit.weight.shape[1]  # W: d_out × d_in
    if kind == "matmul":
        return 2.0 * a.numel() * unit.weight.shape[0]  # W: d_in × d_out (Hugging Face's Conv1D)
    return 2.0 * a.numel() * unit.weight[0].numel()  # a convolution: C_in/groups · kernel size


def _matmul_throughput(units, device: torch.device, repeats: int = 5, dtype=None) -> tuple[float, float]:
    """(forward FLOPs of all units, FLOP/s of running them), from recorded inputs; in ``dtype``, else in the
    parameters' dtype (inputs and weights cast once, before the clock starts: under autocast the records are
    bfloat16)."""
    flops = sum(_unit_forward_flops(u, r.a) for u in units for r in u.records)

    def cast(t, unit):
        return t.to(dtype or unit.weight.dtype) if t is not None and t.is_floating_point() else t

    operands = [(unit, cast(record.x, unit), cast(unit.weight.detach(), unit),
                 cast(unit.bias.detach(), unit) if unit.uses_bias else None)
                for unit in units for record in unit.records]  # fmt: skip
    forwards = [lambda u=unit, x=x, w=weight, b=bias: u.adapter.forward(x, w, b) for unit, x, weight, bias in operands]
    return flops, flops / _median_seconds(forwards, device, repeats)


def _median_seconds(products: list, device: torch.device, repeats: int) -> float:
    """The median over ``repeats`` of the time to run every call of ``products`` once, without autograd."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            for product in products:
                product()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _weight_gradient_throughput(units, device: torch.device, repeats: int = 5, dtype=None) -> float:
    """FLOP/s of the units' weight-gradient products, the other half of each local iteration's FLOPs: rᵀx for a
    linear unit (xᵀr for a ``matmul`` one) with r shaped as its output, from recorded inputs, in ``dtype`` as
    :func:`_matmul_throughput`. Their operands are transposed against the forward's, so their rate is measured,
    not assumed (alone, at the reference autoencoder's shapes in bfloat16, the CPU ran them 14-48% slower than
    the forwards; between steps, all units in turn, about as fast); a unit of another kind counts its forward."""
    flops = sum(_unit_forward_flops(u, r.a) for u in units for r in u.records)
    generator = torch.Generator().manual_seed(0)
    work = []
    for unit in units:
        for record in unit.records:
            x = record.x.to(dtype or unit.weight.dtype) if record.x.is_floating_point() else record.x
            if unit.kind in ("linear", "matmul"):
                x = x.reshape(-1, x.shape[-1])
                r = torch.randn(x.shape[0], record.a.shape[-1], generator=generator).to(device=x.device, dtype=x.dtype)
                work.append((lambda x=x, r=r: torch.matmul(r.mT, x)) if unit.kind == "linear" else
                            (lambda x=x, r=r: torch.matmul(x.mT, r)))  # fmt: skip
            else:
                weight = unit.weight.detach().to(dtype or unit.weight.dtype)
                bias = unit.bias.detach().to(weight.dtype) if unit.uses_bias else None
                work.append(lambda unit=unit, x=x, weight=weight, bias=bias: unit.adapter.forward(x, weight, bias))
    return flops / _median_seconds(work, device, repeats)


def _setup(config: BenchConfig, optimizer_name: str, device: torch.device, hparams: dict):
    """(model, optimizer, step function) for one optimizer on the bench batch."""
    from baselines import make_optimizer
    from sweeps.runner.data import data_shape
    from sweeps.runner.workloads import get_workload

    torch.manual_seed(0)
    workload = get_workload(config.workload)
    shape = data_shape(config.data)
    x, y = shape.random_batch(config.batch_size)
    model = workload.build_model(shape, config.width_mult, config.depth_mult).to(device)
    ranks = Ranks()
    x, y = x[ranks.shard(len(x))].to(device), y[ranks.shard(len(y))].to(device)
    target = workload.target(x, y)
    hparams = optimizer_hparams(optimizer_name, hparams, config.precision)
    optimizer = make_optimizer(optimizer_name, model, loss=workload.loss_kind, **hparams)
    net, counter = model, None
    if ranks.many and not contract.data_parallel(optimizer):
        net, counter = _counted_ddp(model)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        workload.loss(forward(net, x, config.precision, device), target).backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    def forward_backward() -> None:
        workload.loss(forward(net, x, config.precision, device), target).backward()

    def forward_flops() -> float:
        """FLOPs of one forward of the model on the batch, as torch's FLOP counter counts them (a matmul of
        m×k by k×n: 2mkn; elementwise work is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter, autocast(config.precision, device):
            net(x)
        return float(counter.get_total_flops())

    def bytes_sent() -> int:
        """Bytes this rank has sent so far (the ring all-reduce's 2(W−1)/W of each bucket)."""
        return counter[0] if counter is not None else contract.bytes_sent(optimizer)

    return optimizer, step, forward_backward, bytes_sent, forward_flops


def _counted_ddp(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """``model`` in DDP, with a communication hook that counts the bytes of its all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter = [0]
    world = dist.get_world_size()

    def counting_hook(state, bucket):
        counter[0] += 2 * (world - 1) * bucket.buffer().numel() * bucket.buffer().element_size() // world
        return allreduce_hook(state, bucket)

    net = nn.parallel.DistributedDataParallel(model)
    net.register_comm_hook(None, counting_hook)
    return net, counter


def _plain_hparams(config: BenchConfig) -> dict:
    """The optimizer's hyperparameters over the registry's: the config's, LocoProp's K and solve path."""
    hparams = dict(config.hparams)
    if config.optimizer.startswith("locoprop"):
        if config.optimizer != "locoprop-s-exact":
            hparams.setdefault("local_iters", config.local_iters)
        if config.parallel:
            hparams.setdefault("parallel", config.parallel)
    return hparams


def _measured_hparams(config: BenchConfig) -> dict:
    """The hyperparameters of the measured optimizer: with ``hypergrad``, γ adapting by that sensitivity (β's
    size does not change the cost; small, so that γ stays near its start on the random batch; the free
    "gradient" sensitivity takes the normalized rule, the only one it works with, unless one is given)."""
    hparams = _plain_hparams(config)
    if config.hypergrad is not None:
        hparams = {**hparams, "hypergrad": config.hypergrad, "hypergrad_lr": 1e-3}
        if config.hypergrad == "gradient":
            hparams.setdefault("hypergrad_rule", "normalized")
    return hparams


def check_builds(config: BenchConfig) -> None:
    """Refuse (ValueError) a config whose optimizer refuses its model (the exact solve on convolutions, …), as
    the measurement would build it (:func:`~sweeps.runner.train.check_optimizer_takes_model`)."""
    from sweeps.runner.data import data_shape
    from sweeps.runner.train import check_optimizer_takes_model

    check_optimizer_takes_model(config.workload, data_shape(config.data), config.width_mult, config.depth_mult,
                                config.optimizer, _measured_hparams(config), config.precision)  # fmt: skip


def measure(config: BenchConfig) -> dict:
    """Benchmark one optimizer in this process; returns its JSON record.

    Its steps alternate with Adam steps on an identical model (and, for
    LocoProp, with the throughput probe), so that the ratios compare
    measurements taken under the same machine conditions. It runs on
    ``config.threads`` intra-op threads as a run would (:func:`~sweeps.runner.train.train`: None is
    :func:`~sweeps.runner.budget.default_threads`, and a data-parallel rank keeps its share of the cores);
    the record's ``threads`` says how many.
    """
    config.validate()
    threads = config.threads or (torch.get_num_threads() if Ranks().many else None)
    with run_threads(threads):
        return _measure(config)


def _measure(config: BenchConfig) -> dict:
    from locoprop import LocoPropOptimizer

    device = torch.device(config.device)
    baseline_rss = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline_cuda = torch.cuda.memory_allocated(device)
    hparams = _plain_hparams(config)
    plain_step = None
    if config.hypergrad is not None:
        if not config.memory_only:  # the same LocoProp with β = 0, for the overhead
            _, plain_step, *_ = _setup(config, config.optimizer, device, hparams)
        hparams = _measured_hparams(config)
    optimizer, step, forward_backward, bytes_sent, forward_flops = _setup(config, config.optimizer, device, hparams)
    model_flops = forward_flops()  # before any step: a forward without grad records nothing
    is_locoprop = isinstance(optimizer, LocoPropOptimizer)
    contract.set_synchronize_timing(optimizer, device.type == "cuda")
    reference_step = None
    if config.optimizer != "adam" and not config.memory_only:
        _, reference_step, *_ = _setup(config, "adam", device, {})

    for _ in range(config.warmup):
        step()
        if reference_step is not None:
            reference_step()
        if plain_step is not None:
            plain_step()
    phases, probes = [], []

    def optimizer_step() -> None:
        step()
        if is_locoprop:
            phases.append(contract.last_step_seconds(optimizer))

    param_dtype = next(iter(optimizer.param_groups[0]["params"])).dtype
    forward_dtype = torch.bfloat16 if config.precision == "bf16" else param_dtype  # of autocast's matmuls
    local_name = getattr(optimizer, "local_dtype", None)
    local_dtype = getattr(torch, local_name) if local_name else param_dtype  # of LocoProp's inner matmuls

    def probe() -> None:  # its time is not used: it prices FLOPs with the unit forwards of this very model and batch
        forward_backward()
        flops, forward_rate = _matmul_throughput(optimizer.units, device, dtype=forward_dtype)
        local_rate = forward_rate
        if local_dtype != forward_dtype:
            local_rate = _matmul_throughput(optimizer.units, device, dtype=local_dtype)[1]
        gradient_rate = _weight_gradient_throughput(optimizer.units, device, dtype=local_dtype)
        probes.append((flops, forward_rate, local_rate, gradient_rate))
        for unit in optimizer.units:
            unit.records.clear()

    timed = {"optimizer": optimizer_step}
    if plain_step is not None:
        timed["plain"] = plain_step
    if is_locoprop and optimizer.solve == "iterative" and not config.memory_only:
        timed["probe"] = probe
    if reference_step is not None:
        timed["reference"] = reference_step
    sent_before = bytes_sent()
    # One step of each in turn, as the calibration of a time budget does in rounds (sweeps.runner.budget), over
    # whole periods of the optimizer's periodic work, so that the mean prices it in (see the module's docstring).
    rounds = round_steps(config.steps, cost_period(config.optimizer, hparams))
    seconds = interleaved_step_times(timed, rounds=rounds, sync=lambda: _sync(device)).wall
    times, plain_times, reference_times = seconds["optimizer"], seconds.get("plain", []), seconds.get("reference", [])
    record = {
        "optimizer": config.optimizer,
        "workload": config.workload,
        "batch_size": config.batch_size,
        "width_mult": config.width_mult,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "precision": config.precision,
        "step_time_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_time_mean_s": statistics.fmean(times),
        "steps": len(times),
        "nproc": config.nproc,
        "comm_bytes_per_step": (bytes_sent() - sent_before) / len(times),
    }
    if config.hypergrad is not None:
        record["hypergrad"] = config.hypergrad
    if plain_times:
        record["plain_step_time_s"] = statistics.median(plain_times)
        record["hypergrad_overhead"] = record["step_time_s"] / record["plain_step_time_s"] - 1
    if reference_times:
        record["adam_step_time_s"] = statistics.median(reference_times)
        record["ratio_to_adam"] = record["step_time_s"] / record["adam_step_time_s"]
        record["mean_ratio_to_adam"] = record["step_time_mean_s"] / statistics.fmean(reference_times)
    elif config.optimizer == "adam":
        record["adam_step_time_s"] = record["step_time_s"]
        record["ratio_to_adam"] = record["mean_ratio_to_adam"] = 1.0
    if device.type == "cuda":
        record["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - baseline_cuda
    else:
        record["peak_mem_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    if is_locoprop:
        record["local_iters"] = optimizer.param_groups[0]["local_iters"]
        record["parallel"] = optimizer.parallel
        record["compile"] = bool(hparams.get("compile", False))
        record["local_solve_s"] = statistics.median(p["local_solve"] for p in phases)
        if probes:
            k = record["local_iters"]
            flops = probes[0][0]
            throughput = statistics.median(p[1] for p in probes)
            local = statistics.median(p[2] for p in probes)
            gradient = statistics.median(p[3] for p in probes)
            # K local iterations: a unit forward (Δa from Δθ) and a weight-gradient product each, at their rates.
            record["flop_bound_s"] = 3 * flops / throughput + k * flops / local + k * flops / gradient
            record["local_gradient_matmul_gflops"] = gradient / 1e9
            if local_name is not None:
                record["local_dtype"] = local_name
                record["local_matmul_gflops"] = local / 1e9
            record["flop_bound_ratio"] = record["step_time_s"] / record["flop_bound_s"]
            record["matmul_gflops"] = throughput / 1e9
    if not config.memory_only and (probes or not (is_locoprop and optimizer.solve == "iterative")):
        # The step's FLOPs by the dtype of their matmuls: backprop's 3 forwards in autocast's dtype; for iterative
        # LocoProp K local iterations of a unit forward and a weight gradient each, in its local dtype.
        by_dtype = {_dtype_name(forward_dtype): 3 * model_flops}
        if probes:
            local_flops = 2 * record["local_iters"] * probes[0][0]
            by_dtype[_dtype_name(local_dtype)] = by_dtype.get(_dtype_name(local_dtype), 0.0) + local_flops
        record["step_flops_by_dtype"] = by_dtype
        record["step_flops"] = sum(by_dtype.values())
        record["achieved_gflops"] = record["step_flops"] / record["step_time_s"] / 1e9
    return record


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The side of the square matmul that measures a dtype's peak: big enough to keep every core (or the GPU) busy.
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
PEAK_DTYPES = ("float32", "bfloat16")


def matmul_peaks(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """The machine's matmul peak per dtype of :data:`PEAK_DTYPES`, in FLOP/s: an n×n by n×n product (2n³ FLOPs,
    n = :data:`PEAK_MATMUL_SIZE`) in that dtype, the fastest of ``repeats`` after one untimed, in this process with
    its threads (float32 without TF32, as the runs' float32 matmuls are)."""
    n = PEAK_MATMUL_SIZE[device.type]
    peaks = {}
    generator = torch.Generator().manual_seed(0)
    for name in PEAK_DTYPES:
        dtype = getattr(torch, name)
        a, b = (torch.randn(n, n, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
        out = torch.matmul(a, b)  # untimed: the first call sets the kernel up
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            _sync(device)
            times.append(time.perf_counter() - start)
        peaks[name] = 2.0 * n**3 / min(times)
        del a, b, out
    return peaks


def add_roofline(record: dict, peaks: dict[str, float]) -> None:
    """Add to ``record`` (of :func:`measure`) its roofline against the machine's ``peaks`` (:func:`matmul_peaks`):
    ``matmul_peak_gflops`` (per dtype), ``roofline_s`` (the step's FLOPs at the peak of each one's dtype),
    ``peak_gflops`` (its FLOPs over that time: the peak of the dtype it runs in, or the blend of two) and
    ``peak_fraction`` = ``achieved_gflops`` / ``peak_gflops`` = ``roofline_s`` / ``step_time_s``. None where the
    record counts no FLOPs (a LocoProp run without its probe)."""
    record["matmul_peak_gflops"] = {name: peak / 1e9 for name, peak in peaks.items()}
    by_dtype = record.get("step_flops_by_dtype")
    if not by_dtype:
        record.update(roofline_s=None, peak_gflops=None, peak_fraction=None)
        return
    record["roofline_s"] = sum(flops / peaks[name] for name, flops in by_dtype.items())
    record["peak_gflops"] = record["step_flops"] / record["roofline_s"] / 1e9
    record["peak_fraction"] = record["achieved_gflops"] / record["peak_gflops"]


def _measure_on_ranks(config: BenchConfig, out: str) -> None:
    """One rank of a data-parallel measurement; rank 0 writes the record to ``out``."""
    record = measure(config)
    if Ranks().writes:
        pathlib.Path(out).write_text(json.dumps(record))


def _main(config: BenchConfig) -> dict:
    """The measurement of ``config`` in this process, or on ``config.nproc`` new ones."""
    if config.nproc == 1:
        return measure(config)
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "record.json"
        launch(config.nproc, config.device, _measure_on_ranks, config, str(out))
        return json.loads(out.read_text())


def _run_worker(config: BenchConfig, env: dict | None = None) -> dict:
    command = [sys.executable, "-m", "sweeps.commands.bench", json.dumps(dataclasses.asdict(config))]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark of {config.optimizer} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench(configs: list[BenchConfig]) -> list[dict]:
    """Run each config in its own subprocess; add the roofline (:func:`add_roofline`) against the matmul peaks
    measured once, here, before the first.

    Raises:
        ValueError: a bad config (all are checked before any runs).
    """
    for config in configs:
        config.validate()
        check_builds(config)
    # Once per bench run, before the optimizers: the peaks every record's roofline is read against, on the threads
    # the records are measured on (one set per thread count the configs ask for).
    peaks = {}
    for config in configs:
        key = (config.device, config.threads)
        if key not in peaks:
            with run_threads(config.threads):
                peaks[key] = matmul_peaks(torch.device(config.device))
    records = []
    for config in configs:
        record = _run_worker(config)
        if config.device == "cpu" and config.nproc == 1:
            memory_run = dataclasses.replace(config, steps=1, warmup=1, memory_only=True)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
            record["peak_mem_bytes"] = _run_worker(memory_run, env)["peak_mem_bytes"]
        records.append(record)
    for config, record in zip(configs, records):
        record.setdefault("flop_bound_ratio", None)
        record.setdefault("hypergrad_overhead", None)
        add_roofline(record, peaks[config.device, config.threads])
    return records


if __name__ == "__main__":
    print(json.dumps(_main(BenchConfig(**json.loads(sys.argv[1])))))
