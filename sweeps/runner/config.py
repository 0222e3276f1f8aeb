"""What defines a run: :class:`RunConfig` (saved as config.json) and the name of its directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from typing import Any

import torch

from baselines.registry import check_hparams, inert_hparams
from sweeps import schema
from sweeps.runner.budget import StepCost
from sweeps.runner.precision import DEFAULT_PRECISION, check_precision
from sweeps.runner.workloads import WORKLOADS, check_data, get_workload

__all__ = [
    "ABSENT_AT",
    "DEVICES",
    "MAX_SEED",
    "SCHEDULES",
    "RunConfig",
    "absent",
    "config_digest",
    "run_dir_name",
    "run_identity",
]

SCHEDULES = ("official", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_EPOCHS = 10  # the budget of a config that gives none
# The largest seed: NumPy's, and small enough that every seed derived from it (an epoch's batch order is seeded
# by seed × 100003 + epoch) fits torch's 64-bit generator.
MAX_SEED = 2**32 - 1


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run; saved as config.json.

    Attributes:
        data, batch_size: default to the workload's (``Workload.default_data``,
            ``default_batch_size``: mnist5k and 1000 for the autoencoder).
        out: the run directory.
        hparams: optimizer hyperparameters (registry names), over its defaults.
        schedule: "official" (linear warmup, then linear decay to zero, as
            the official code), "cosine" (after the same warmup) or "constant".
        epochs, steps, time_budget: the budget, exactly one of them: passes
            over the training split, optimizer steps, or seconds of training
            time (evaluation excluded), which the run converts once into a
            step count by timing its own steps against a reference
            optimizer's (``sweeps.runner.budget``). With none given, 10 epochs.
        warmup_epochs: warmup length; default 5% of the run's steps (5 of the
            official 100 epochs).
        valid_fraction: the share of the training split held out as the
            validation split (the same examples for every run).
        eval_every: steps between evaluations; default once per epoch, but
            at most 50 evaluations a run. The last step is always evaluated.
        divergence_factor: a training loss above this times the initial one
            counts as diverged.
        step_cost: with a time budget, the optimizer's step cost as a
            comparison measured it beside the others' (``locoprop compare``'s
            table, :class:`~sweeps.runner.budget.StepCost`): the run takes
            ⌊time_budget / step_cost.step_time_s⌋ steps instead of timing its
            own. None: the run times its own.
        threads: intra-op threads of the run on CPU (None: one fewer than the
            cores, :func:`~sweeps.runner.budget.default_threads`).
        precision: "fp32" (float32 throughout) or "bf16" (forward and backward
            under bfloat16 autocast, float32 weights and optimizer state;
            :mod:`sweeps.runner.precision`). A config.json written before the
            field existed lacks it and loads as "fp32", which it was.
    """

    workload: str = "autoencoder"
    data: str | None = None
    optimizer: str = "locoprop-m"
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int | None = None
    steps: int | None = None
    time_budget: float | None = None
    batch_size: int | None = None
    seed: int = 0
    schedule: str = "official"
    warmup_epochs: float | None = None
    width_mult: float = 1.0
    depth_mult: int = 1
    device: str = "auto"
    data_dir: str | None = None
    valid_fraction: float = 0.1
    eval_every: int | None = None
    divergence_factor: float = 10.0
    eval_batch_size: int = 1000
    step_cost: StepCost | None = None
    threads: int | None = None
    precision: str = DEFAULT_PRECISION
    out: str = "runs/run"

    def __post_init__(self):
        if self.epochs is None and self.steps is None and self.time_budget is None:
            self.epochs = DEFAULT_EPOCHS
        if isinstance(self.step_cost, dict):  # from config.json, or a trial's config sent as JSON
            unknown = sorted(set(self.step_cost) - {f.name for f in dataclasses.fields(StepCost)})
            if unknown:
                raise ValueError(f"Invalid step_cost: {self.step_cost!r}; unknown field(s) {', '.join(unknown)}")
            self.step_cost = StepCost(**self.step_cost)
        workload = WORKLOADS.get(self.workload)  # an unknown one is refused by validate()
        if workload is not None:
            self.data = workload.default_data if self.data is None else self.data
            self.batch_size = workload.default_batch_size if self.batch_size is None else self.batch_size

    def validate(self) -> None:
        """Refuse a bad value, naming it; the checks that need the data set
        (batch size against its size) are the run's."""
        get_workload(self.workload)
        check_data(self.workload, self.data)
        check_hparams(self.optimizer, self.hparams)
        for name in ("epochs", "steps", "batch_size", "depth_mult", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if value is None and name in ("epochs", "steps", "eval_every"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r}; expected an integer ≥ 1")
        budgets = [name for name in schema.BUDGET_FIELDS if getattr(self, name) is not None]
        if len(budgets) != 1:
            given = ", ".join(f"{name}={getattr(self, name)!r}" for name in budgets)
            raise ValueError(f"Give the run one budget (epochs, steps or time_budget), not several: {given}")
        if self.time_budget is not None and not (_finite(self.time_budget) and self.time_budget > 0):
            raise ValueError(f"Invalid time_budget: {self.time_budget!r}; expected seconds, a finite number > 0")
        if self.step_cost is not None:
            if self.time_budget is None:
                raise ValueError(f"step_cost={self.step_cost!r} converts a time budget into steps; give time_budget")
            if not isinstance(self.step_cost, StepCost):
                raise ValueError(f"Invalid step_cost: {self.step_cost!r}; expected a StepCost")
            self.step_cost.check()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):  # fmt: skip
            raise ValueError(f"Invalid threads: {self.threads!r}; expected an integer ≥ 1")
        if not (_finite(self.valid_fraction) and 0 < self.valid_fraction <= 0.5):
            raise ValueError(f"Invalid valid_fraction: {self.valid_fraction!r}; expected a number in (0, 0.5]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"Invalid seed: {self.seed!r}; expected an integer from 0 to {MAX_SEED}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        check_precision(self.precision)
        if self.device not in DEVICES:
            raise ValueError(f"Invalid device: {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("Invalid device: 'cuda'; no CUDA device is available (use --device cpu or auto)")
        if not _finite(self.width_mult) or not self.width_mult > 0:
            raise ValueError(f"Invalid width_mult: {self.width_mult!r}; expected a finite number > 0")
        warmup = self.warmup_epochs
        if warmup is not None and not (
            _finite(warmup) and 0 <= warmup and (self.epochs is None or warmup <= self.epochs)
        ):
            raise ValueError(f"Invalid warmup_epochs: {self.warmup_epochs!r}; expected 0..epochs")
        if warmup and self.schedule == "constant":
            raise ValueError(
                f"warmup_epochs={warmup!r} has no effect with schedule 'constant' (no warmup); leave it out, or use "
                "schedule 'official' or 'cosine'"
            )
        if not _finite(self.divergence_factor) or not self.divergence_factor > 1:
            raise ValueError(f"Invalid divergence_factor: {self.divergence_factor!r}; expected a finite number > 1")

    @property
    def budget(self) -> tuple[str, float]:
        """(kind, value): ("epochs", 20), ("steps", 500) or ("time", 30.0)."""
        return schema.budget_of(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """The config of a config.json (which may hold the calibration of a time budget too)."""
        data = {key: value for key, value in data.items() if key != schema.CALIBRATION}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown run-config field(s): {', '.join(unknown)}")
        return cls(**data)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Fields added after runs were made without them, and the value those runs had: left out of the identity at that
# value, so that those runs keep their directories and can still be resumed. "FIELD.KEY": a key added to a field
# that is a record of its own (step_cost's variants, priced since cost knobs are tuned).
ABSENT_AT = {"step_cost": None, "threads": None, "precision": DEFAULT_PRECISION, "step_cost.variants": None}


def absent(key: str, value: Any) -> bool:
    """Whether config field ``key`` at ``value`` is what a record made before the field existed holds
    (:data:`ABSENT_AT`): such a field is left out where two configs are compared."""
    return key in ABSENT_AT and value == ABSENT_AT[key]


def run_identity(config: dict[str, Any]) -> dict[str, str]:
    """What makes a run: every config field but ``out`` (and a time budget's calibration), each as canonical JSON.

    Where a run directory lives is not part of what the run is (sweep back
    ends restore trials into new folders), nor is a hyperparameter that
    changes none of its steps (``baselines.registry.inert_hparams``:
    ``--hypergrad implicit`` and ``unrolled`` at β = 0 are one run). JSON
    makes a tuple and a list, or a config and its config.json, compare equal. The fields of
    :data:`ABSENT_AT` count only away from the value older runs had (unset; "fp32").
    """
    identity = dict(config)
    hparams = config.get("hparams")
    if isinstance(hparams, dict):
        inert = inert_hparams(config.get("optimizer"), hparams)
        identity["hparams"] = {key: value for key, value in hparams.items() if key not in inert}
    for key, value in list(identity.items()):
        if isinstance(value, dict):
            identity[key] = {inner: v for inner, v in value.items() if not absent(f"{key}.{inner}", v)}
    return {
        key: json.dumps(value, sort_keys=True, default=repr)
        for key, value in identity.items()
        if key not in ("out", schema.CALIBRATION) and not absent(key, value)
    }


def config_digest(config: RunConfig) -> str:
    """Eight hex digits of the SHA-256 of the run's identity (every field but ``out``).

    The CLI puts it in the run directory's name: runs that differ in any
    setting get different directories, and the same command finds its own
    directory again. (``--lr 1`` and ``--hparam lr=1.0`` or an explicit
    default count as different settings: they get their own directories;
    a setting that changes nothing, as the hypergradient mode at β = 0, is
    left out.)
    """
    text = json.dumps(run_identity(dataclasses.asdict(config)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_dir_name(config: RunConfig) -> str:
    """The name of a run's directory: what it trains, readable, then its config's digest.

    For example ``adam-autoencoder-synthetic-seed0-1a2b3c4d``: runs that differ
    in any setting (:func:`config_digest`) get different directories, and
    the same command finds its own directory again (``--resume``).
    """
    return f"{config.optimizer}-{config.workload}-{config.data}-seed{config.seed}-{config_digest(config)}"
