"""Search spaces as data: one YAML file per optimizer, read by both back ends.

A file names its optimizer and its parameters::

    optimizer: adam
    params:
      lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
      one_minus_beta1: {type: float, low: 1.0e-2, high: 0.5, log: true}
      inner: {type: categorical, choices: [rmsprop-tf, adam]}
      one_minus_inner_momentum: {type: float, low: 1.0e-3, high: 0.5, log: true,
                                 when: {inner: [rmsprop-tf, momentum]}}
    fixed:
      fisher: empirical

Types: float (``log`` for log-uniform, ``step`` for a grid), int, and
categorical. A ``one_minus_X`` parameter is searched as 1 − X (momentum
near 1 is searched on a log scale that way) and sets hyperparameter X;
``when`` keeps a parameter only when another one has one of the listed
values; ``fixed`` hyperparameters are set in every trial. The same Optuna
distributions, and the same sampler (:class:`TrialSeededSampler`), feed Optuna
directly and Ray Tune through ``OptunaSearch``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import numpy as np
import optuna
import yaml

from baselines.registry import OPTIMIZERS

__all__ = ["SPACES_DIR", "SearchSpace", "SpaceError", "TrialSeededSampler", "load_space"]

SPACES_DIR = pathlib.Path(__file__).parent / "spaces"
ONE_MINUS = "one_minus_"


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A parsed search space.

    Attributes:
        optimizer: the registry name it searches.
        distributions: parameter name -> Optuna distribution.
        conditions: parameter name -> (other parameter, allowed values).
        fixed: hyperparameters set in every trial.
        source: the file it came from.
    """

    optimizer: str
    distributions: dict[str, optuna.distributions.BaseDistribution]
    conditions: dict[str, tuple[str, tuple]]
    fixed: dict[str, Any]
    source: str

    def to_hparams(self, params: dict[str, Any]) -> dict[str, Any]:
        """Registry hyperparameters from sampled parameters: reparametrised,
        conditional ones dropped, fixed ones added."""
        hparams = dict(self.fixed)
        for name, value in params.items():
            condition = self.conditions.get(name)
            if condition is not None and params.get(condition[0]) not in condition[1]:
                continue
            if name.startswith(ONE_MINUS):
                hparams[name.removeprefix(ONE_MINUS)] = 1.0 - value
            else:
                hparams[name] = value
        return hparams


def load_space(optimizer: str | None = None, path: str | os.PathLike | None = None) -> SearchSpace:
    """The search space of ``optimizer`` (from sweeps/search/spaces/) or of the file ``path``."""
    if path is None:
        if optimizer is None:
            raise SpaceError("load_space needs an optimizer name or a file")
        path = SPACES_DIR / f"{optimizer}.yaml"
        if not path.exists():
            raise SpaceError(f"No search space for optimizer {optimizer!r} in {SPACES_DIR}; pass --space FILE")
    path = pathlib.Path(path)
    if not path.exists():
        raise SpaceError(f"Search-space file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"Search-space file {path} is not valid YAML: {err}") from err
    space = _parse(data, str(path))
    if optimizer is not None and space.optimizer != optimizer:
        raise SpaceError(f"Search-space file {path} is for optimizer {space.optimizer!r}, not {optimizer!r}")
    return space


def _parse(data: Any, source: str) -> SearchSpace:
    if not isinstance(data, dict) or "optimizer" not in data or "params" not in data:
        raise SpaceError(f"{source}: expected a mapping with 'optimizer' and 'params'")
    unknown = sorted(set(data) - {"optimizer", "params", "fixed"})
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")
    optimizer = data["optimizer"]
    if optimizer not in OPTIMIZERS:
        raise SpaceError(f"{source}: unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    valid = set(OPTIMIZERS[optimizer].defaults)
    params = data["params"]
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{source}: 'params' must be a non-empty mapping")
    distributions, conditions = {}, {}
    for name, spec in params.items():
        where = f"{source}: parameter {name!r}"
        target = name.removeprefix(ONE_MINUS)
        if target not in valid:
            raise SpaceError(f"{where} sets {target!r}, which {optimizer!r} does not take ({', '.join(sorted(valid))})")
        if not isinstance(spec, dict):
            raise SpaceError(f"{where}: expected a mapping with a 'type'")
        distributions[name] = _distribution(spec, where)
        if "when" in spec:
            when = spec["when"]
            if not (isinstance(when, dict) and len(when) == 1):
                raise SpaceError(f"{where}: 'when' must map one parameter to its allowed values")
            ((other, allowed),) = when.items()
            if other not in params:
                raise SpaceError(f"{where}: 'when' refers to {other!r}, which is not a parameter of this space")
            conditions[name] = (other, tuple(allowed if isinstance(allowed, list) else [allowed]))
    fixed = data.get("fixed") or {}
    bad_fixed = sorted(set(fixed) - valid)
    if bad_fixed:
        raise SpaceError(f"{source}: fixed hyperparameter(s) {', '.join(bad_fixed)} not taken by {optimizer!r}")
    return SearchSpace(optimizer, distributions, conditions, dict(fixed), source)


def _distribution(spec: dict, where: str) -> optuna.distributions.BaseDistribution:
    kind = spec.get("type")
    allowed_keys = {"type", "when", "low", "high", "log", "step", "choices"}
    unknown = sorted(set(spec) - allowed_keys)
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
        return optuna.distributions.CategoricalDistribution(choices)
    if kind not in ("float", "int"):
        raise SpaceError(f"{where}: unknown type {kind!r}; expected float, int or categorical")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise SpaceError(f"{where}: needs numeric 'low' and 'high'") from None
    log = bool(spec.get("log", False))
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise SpaceError(f"{where}: low {low} must not exceed high {high}")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0, got {low}")
    try:
        if kind == "int":
            return optuna.distributions.IntDistribution(int(low), int(high), log=log, step=int(spec.get("step", 1)))
        return optuna.distributions.FloatDistribution(low, high, log=log, step=spec.get("step"))
    except ValueError as err:
        raise SpaceError(f"{where}: {err}") from None


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, with trial k's random draws seeded from (``seed``, k).

    A sampler seeded once per process repeats its first proposals in every
    process: a study continued by a second command, or shared by several
    workers, would evaluate the same points again. The storage hands out
    trial numbers once per study, so seeding each trial from its number
    gives every trial of every worker its own draws, while the same
    sequence of commands still proposes the same points. ``seed=None`` seeds
    from the operating system once per process (not reproducible).
    """

    def __init__(self, seed: int | None = None):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
            raise ValueError(f"Invalid sampler seed: {seed!r}; expected an integer from 0 to {2**32 - 1} (NumPy's)")
        self.seed = seed
        self._tpe = optuna.samplers.TPESampler(seed=seed)

    def trial_seed(self, number: int) -> int:
        """The seed of trial ``number``'s draws (a mix of both, not their sum: no two pairs collide in practice)."""
        return int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0])

    def before_trial(self, study, trial) -> None:
        if self.seed is not None:
            self._tpe = optuna.samplers.TPESampler(seed=self.trial_seed(trial.number))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()
