"""Step costs of a time budget, measured side by side on throwaway models (SPEC §7).

:func:`sweeps.runner.budget.step_costs` times steps; this module builds the
steps it times: for each optimizer a fresh model and optimizer of the run's
config, stepping through the training split in a seeded order as a run does.
Its two users:

- :func:`price_steps`: the table of ``locoprop compare``, every optimizer of
  the comparison and the reference optimizer timed in one process, in
  interleaved rounds;
- :func:`calibrate_run`: a run given no step cost prices its own optimizer
  against the same reference, in the same way.

Neither changes the runs: the models are built and stepped under a forked
torch RNG seeded by the config's seed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import torch

from baselines import make_optimizer
from baselines.registry import cost_period
from sweeps.runner import budget, contract
from sweeps.runner.budget import (
    REFERENCE_OPTIMIZER,
    Calibration,
    CalibrationSkipped,
    StepCost,
    budget_clock,
    run_threads,
    step_costs,
)
from sweeps.runner.config import RunConfig
from sweeps.runner.data import Dataset, DataShape
from sweeps.runner.precision import forward, optimizer_hparams
from sweeps.runner.workloads import build_model, get_workload

__all__ = ["StepCostTable", "calibrate_run", "price_steps", "timed_steps"]

Wrap = Callable[[torch.nn.Module, torch.optim.Optimizer], torch.nn.Module]


@dataclasses.dataclass(frozen=True)
class StepCostTable:
    """Step costs measured together: per optimizer its :class:`StepCost`, and how they were measured."""

    costs: dict[str, StepCost]
    reference: str
    timed_steps: int  # per optimizer whose steps all cost the same (a periodic one times whole periods)
    threads: int
    clock: str  # what the seconds count: "cpu" or "wall" (budget.budget_clock)
    skipped_steps: dict[str, int]  # per optimizer, steps its throwaway optimizer skipped as non-finite


def timed_steps(period: int = 1) -> int:
    """How many steps of an optimizer whose work repeats every ``period`` steps a measurement times (read at
    call time: tests shorten it)."""
    return budget.CALIBRATION_ROUNDS * budget.round_steps(budget.CALIBRATION_ROUND_STEPS, period)


def _measure(
    configs: Mapping[str, RunConfig],
    reference: str,
    shape: DataShape,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    device: torch.device,
    shard: slice = slice(None),
    wrap: Wrap | None = None,
    data_parallel: bool = False,
) -> tuple[dict[str, StepCost], dict[str, int], dict[str, int]]:
    """Each config's step cost against ``configs[reference]`` (by :func:`~sweeps.runner.budget.budget_clock`),
    the steps each throwaway optimizer skipped, and the steps of each that were timed (whole periods of its
    periodic work, :func:`~baselines.registry.cost_period`)."""
    periods = {name: cost_period(config.optimizer, config.hparams) for name, config in configs.items()}
    first = next(iter(configs.values()))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(first.seed)
        steps, optimizers = {}, {}
        for name, config in configs.items():
            steps[name], optimizers[name] = _throwaway_step(config, shape, train_x, train_y, device, shard, wrap)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        costs = step_costs(steps, reference, sync=sync, clock=budget_clock(device, data_parallel), periods=periods)
    skipped = {}
    for name, optimizer in optimizers.items():
        skipped[name] = contract.skipped_steps(optimizer)
        contract.remove_hooks(optimizer)  # the hooks would keep the throwaway model alive
    return costs, skipped, {name: timed_steps(period) for name, period in periods.items()}


def _throwaway_step(
    config: RunConfig,
    shape: DataShape,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    device: torch.device,
    shard: slice,
    wrap: Wrap | None,
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One step at a time of a fresh model and optimizer of ``config``, through the training split in a seeded order."""
    workload = get_workload(config.workload)
    model = build_model(workload, shape, config.width_mult, config.depth_mult, device)
    hparams = optimizer_hparams(config.optimizer, config.hparams, config.precision)
    optimizer = make_optimizer(config.optimizer, model, loss=workload.loss_kind, **hparams)
    net = wrap(model, optimizer) if wrap is not None else model  # its steps cost what the run's will
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(config.seed)).to(device)
    steps_per_epoch = len(train_x) // config.batch_size
    done = [0]

    def step() -> None:
        start = (done[0] % steps_per_epoch) * config.batch_size
        batch = order[start : start + config.batch_size][shard]
        optimizer.zero_grad(set_to_none=True)
        output = forward(net, train_x[batch], config.precision, device)
        workload.loss(output, workload.target(train_x[batch], train_y[batch])).backward()
        optimizer.step()
        done[0] += 1

    return step, optimizer


def calibrate_run(
    config: RunConfig,
    shape: DataShape,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    device: torch.device,
    shard: slice = slice(None),
    wrap: Wrap | None = None,
    data_parallel: bool = False,
) -> Calibration:
    """The time budget of ``config`` as a step count: its optimizer's step cost against the reference's.

    ``train_x``, ``train_y``: the training split on ``device``; ``shard`` and
    ``wrap`` make the throwaway steps those of one rank of a ``data_parallel`` run.
    """
    configs = {config.optimizer: config}
    if config.optimizer != REFERENCE_OPTIMIZER:
        configs[REFERENCE_OPTIMIZER] = dataclasses.replace(config, optimizer=REFERENCE_OPTIMIZER, hparams={})
    costs, skipped, timed = _measure(
        configs, REFERENCE_OPTIMIZER, shape, train_x, train_y, device, shard, wrap, data_parallel
    )
    return Calibration.of(
        config.time_budget, costs[config.optimizer], timed[config.optimizer], skipped[config.optimizer]
    )


def price_steps(
    base: RunConfig, hparams: Mapping[str, dict], data: Dataset, optimizers: Mapping[str, str] | None = None
) -> StepCostTable:
    """The step costs of a comparison: every optimizer of ``hparams`` (name -> its hyperparameters) on ``base``'s
    model and batch, and the reference optimizer, timed in one process in interleaved rounds, with ``base``'s
    threads (:func:`~sweeps.runner.budget.run_threads`). ``optimizers`` gives the registry name of each
    entry whose name is not one (variants of one optimizer at several cost-knob values, priced side by side).

    ``data``: the data set (its validation split is held out here as in the
    runs). A throwaway optimizer that skipped steps as non-finite is named
    in a :class:`~sweeps.runner.budget.CalibrationSkipped` warning.
    """
    on_cuda = base.device == "cuda" or (base.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_cuda else "cpu")
    split = data.with_validation(base.valid_fraction)
    optimizers = optimizers or {}
    configs = {
        name: dataclasses.replace(base, optimizer=optimizers.get(name, name), hparams=dict(given))
        for name, given in hparams.items()
    }
    if REFERENCE_OPTIMIZER not in configs:  # Adam's hyperparameters do not change what its step costs
        configs[REFERENCE_OPTIMIZER] = dataclasses.replace(base, optimizer=REFERENCE_OPTIMIZER, hparams={})
    with run_threads(base.threads) as threads:
        x, y = split.train_x.to(device), split.train_y.to(device)
        costs, skipped, timed = _measure(configs, REFERENCE_OPTIMIZER, data.shape, x, y, device)
        clock = budget_clock(device)
    for name, count in skipped.items():
        if count:
            warnings.warn(
                CalibrationSkipped(
                    f"{name}: {count} of the {budget.CALIBRATION_WARMUP + timed[name]} steps that priced its step "
                    "were skipped as non-finite, so its step count may overrun the time budget"
                ),
                stacklevel=2,
            )
    return StepCostTable(
        costs={name: costs[name] for name in hparams},
        reference=REFERENCE_OPTIMIZER,
        timed_steps=timed_steps(),
        threads=threads,
        clock=clock,
        skipped_steps={name: skipped[name] for name in hparams},
    )
