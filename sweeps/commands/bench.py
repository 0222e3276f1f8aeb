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
  that the median leaves out: time a multiple of that period;
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
- ``hypergrad_overhead`` (LocoProp with ``hypergrad`` "implicit" or
  "unrolled", β > 0): the median step time over the median step of the same
  LocoProp with β = 0 on an identical model, its steps alternating with
  these, minus one (``plain_step_time_s`` is that median);
- ``flop_bound_ratio`` (iterative LocoProp): the measured step time over the
  FLOP-proportional bound, one backprop step (3 × the forward FLOPs) plus
  K × (unit forward + weight gradient) = (3 + 2K) × forward FLOPs, priced at
  the matmul throughput of the model's own unit forwards measured in the
  same process; with ``local_dtype`` (bfloat16 inner matmuls) the 2K local
  ones at the throughput of those forwards in that dtype, also measured
  (``local_matmul_gflops``).
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

from sweeps.runner import contract
from sweeps.runner.budget import interleaved_step_times
from sweeps.runner.ranks import Ranks, launch

__all__ = ["BenchConfig", "bench", "measure"]


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

    def __post_init__(self):
        from sweeps.runner.workloads import WORKLOADS

        if self.data is None and self.workload in WORKLOADS:  # an unknown workload is refused by validate()
            self.data = WORKLOADS[self.workload].default_data

    def validate(self) -> None:
        """Refuse a config that cannot be measured, naming the bad value."""
        from baselines.registry import OPTIMIZERS
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
        if self.batch_size % self.nproc:
            raise ValueError(f"Invalid batch_size: {self.batch_size} does not split into {self.nproc} equal shards")


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
    """(forward FLOPs of all units, FLOP/s of running them), from recorded inputs; in ``dtype`` if given
    (inputs and weights cast once, before the clock starts)."""
    flops = sum(_unit_forward_flops(u, r.a) for u in units for r in u.records)

    def cast(t):
        return t.to(dtype) if dtype is not None and t is not None and t.is_floating_point() else t

    operands = [(unit, cast(record.x), cast(unit.weight.detach()), cast(unit.bias.detach()) if unit.uses_bias else None)
                for unit in units for record in unit.records]  # fmt: skip
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            for unit, x, weight, bias in operands:
                unit.adapter.forward(x, weight, bias)
            _sync(device)
            times.append(time.perf_counter() - start)
    return flops, flops / statistics.median(times)


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
    optimizer = make_optimizer(optimizer_name, model, loss=workload.loss_kind, **hparams)
    net, counter = model, None
    if ranks.many and not contract.data_parallel(optimizer):
        net, counter = _counted_ddp(model)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        workload.loss(net(x), target).backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    def forward_backward() -> None:
        workload.loss(net(x), target).backward()

    def bytes_sent() -> int:
        """Bytes this rank has sent so far (the ring all-reduce's 2(W−1)/W of each bucket)."""
        return counter[0] if counter is not None else contract.bytes_sent(optimizer)

    return optimizer, step, forward_backward, bytes_sent


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


def measure(config: BenchConfig) -> dict:
    """Benchmark one optimizer in this process; returns its JSON record.

    Its steps alternate with Adam steps on an identical model (and, for
    LocoProp, with the throughput probe), so that the ratios compare
    measurements taken under the same machine conditions.
    """
    from locoprop import LocoPropOptimizer

    config.validate()
    device = torch.device(config.device)
    baseline_rss = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline_cuda = torch.cuda.memory_allocated(device)
    hparams = dict(config.hparams) if config.optimizer.startswith("locoprop") else {}
    if config.optimizer.startswith("locoprop"):
        if config.optimizer != "locoprop-s-exact":
            hparams.setdefault("local_iters", config.local_iters)
        if config.parallel:
            hparams.setdefault("parallel", config.parallel)
    plain_step = None
    if config.hypergrad is not None:
        if not config.memory_only:  # the same LocoProp with β = 0, for the overhead
            _, plain_step, _, _ = _setup(config, config.optimizer, device, hparams)
        # β's size does not change the cost; small, so that γ stays near its start on the random batch.
        hparams = {**hparams, "hypergrad": config.hypergrad, "hypergrad_lr": 1e-3}
    optimizer, step, forward_backward, bytes_sent = _setup(config, config.optimizer, device, hparams)
    is_locoprop = isinstance(optimizer, LocoPropOptimizer)
    contract.set_synchronize_timing(optimizer, device.type == "cuda")
    reference_step = None
    if config.optimizer != "adam" and not config.memory_only:
        _, reference_step, _, _ = _setup(config, "adam", device, {})

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

    def local_throughput() -> float | None:
        """FLOP/s of the unit forwards in the optimizer's local dtype (None: the parameters')."""
        dtype = getattr(optimizer, "local_dtype", None)
        return _matmul_throughput(optimizer.units, device, dtype=getattr(torch, dtype))[1] if dtype else None

    def probe() -> None:  # its time is not used: it prices FLOPs with the unit forwards of this very model and batch
        forward_backward()
        probes.append((*_matmul_throughput(optimizer.units, device), local_throughput()))
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
    # One step of each in turn, as the calibration of a time budget does in rounds (sweeps.runner.budget).
    seconds = interleaved_step_times(timed, rounds=config.steps, sync=lambda: _sync(device)).wall
    times, plain_times, reference_times = seconds["optimizer"], seconds.get("plain", []), seconds.get("reference", [])
    record = {
        "optimizer": config.optimizer,
        "workload": config.workload,
        "batch_size": config.batch_size,
        "width_mult": config.width_mult,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
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
            local = statistics.median(p[2] for p in probes) if probes[0][2] is not None else throughput
            record["flop_bound_s"] = 3 * flops / throughput + 2 * k * flops / local
            if probes[0][2] is not None:
                record["local_dtype"] = optimizer.local_dtype
                record["local_matmul_gflops"] = local / 1e9
            record["flop_bound_ratio"] = record["step_time_s"] / record["flop_bound_s"]
            record["matmul_gflops"] = throughput / 1e9
    return record


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
    """Run each config in its own subprocess; add ``ratio_to_adam``.

    Raises:
        ValueError: a bad config (all are checked before any runs).
    """
    for config in configs:
        config.validate()
    records = []
    for config in configs:
        record = _run_worker(config)
        if config.device == "cpu" and config.nproc == 1:
            memory_run = dataclasses.replace(config, steps=1, warmup=1, memory_only=True)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
            record["peak_mem_bytes"] = _run_worker(memory_run, env)["peak_mem_bytes"]
        records.append(record)
    for record in records:
        record.setdefault("flop_bound_ratio", None)
        record.setdefault("hypergrad_overhead", None)
    return records


if __name__ == "__main__":
    print(json.dumps(_main(BenchConfig(**json.loads(sys.argv[1])))))
