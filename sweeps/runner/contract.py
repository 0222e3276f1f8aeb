"""The runner's optimizer contract, written once (as AlgoPerf's ``spec.py`` writes its submission API).

:class:`RunnerOptimizer` is everything the training loop (:mod:`sweeps.runner.train`), the budget's
calibration (:mod:`sweeps.runner.calibration`) and ``locoprop bench`` read from or set on an optimizer.
Beside what every ``torch.optim.Optimizer`` has (``param_groups``, ``zero_grad``, ``step``,
``state_dict``, ``load_state_dict``), each member is optional: an optimizer that lacks one behaves as
its default, and :data:`DEFAULTS` is the one place those defaults are written.

Code outside this module never probes an optimizer for an optional member: it calls the function of
that member here (:func:`skipped_steps`, :func:`step_phases`, :func:`last_step_seconds`,
:func:`set_synchronize_timing`, :func:`adapted_hyperparameters`, :func:`data_parallel`,
:func:`remove_hooks`, :func:`bytes_sent`), which gives the optimizer's value or the default.
``tests/test_registry.py`` checks every registered optimizer against the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

__all__ = [
    "DEFAULTS",
    "OPTIONAL",
    "REQUIRED",
    "Communicator",
    "RunnerOptimizer",
    "adapted_hyperparameters",
    "bytes_sent",
    "data_parallel",
    "last_step_seconds",
    "remove_hooks",
    "set_synchronize_timing",
    "skipped_steps",
    "step_phases",
]


class Communicator(Protocol):
    """What the contract reads from the communicator of an optimizer that communicates itself."""

    bytes_sent: int
    """The bytes this rank has sent so far over the ranks (by its own cost model), a count that only grows."""


class RunnerOptimizer(Protocol):
    """An optimizer as the runner sees it. The first five members are ``torch.optim.Optimizer``'s and
    required; every other member is optional, with the default of :data:`DEFAULTS` (named below)."""

    param_groups: list[dict[str, Any]]
    """Its parameter groups; each has an ``lr``, which the runner's schedule sets before every step."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients before a step's backward pass."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update from the gradients of the last backward pass."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue exactly; readable with ``torch.load(weights_only=True)``."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`."""

    skipped_steps: int
    """How many steps it refused because a value was not finite (a refused step changes nothing); recorded
    in metrics.csv and summary.json. Default 0: it never refuses a step."""

    step_phases: tuple[str, ...]
    """The names of the phases of its step that it times (LocoProp: "targets", "local_solve"), never
    "forward_backward", which the runner times itself; one metrics.csv column each. Default (): it times none."""

    last_step_seconds: dict[str, float]
    """The seconds of each of :attr:`step_phases` in its last step, keyed by exactly those names once it has
    stepped. Default {}: nothing timed."""

    synchronize_timing: bool
    """Set by the runner (True on CUDA) so that the phases it times wait for their kernels. Default: it has
    no such switch, and setting it does nothing."""

    data_parallel: bool
    """True when it communicates over the ranks of a data-parallel run itself (LocoProp); the runner then
    gives it the model without DDP. Default False: the runner wraps the model in DDP on several ranks."""

    comm: Communicator
    """Its communicator, where it communicates itself; ``locoprop bench`` reports its ``bytes_sent``.
    Default: none, no bytes sent by the optimizer (DDP's are counted by bench's own hook)."""

    def adapted_hyperparameters(self) -> dict[str, float]:
        """The hyperparameters it adapts itself, by metrics.csv column (LocoProp with hypergradients: each
        unit's γ as ``gamma/UNIT``), recorded at every evaluation; the same keys at every call, since
        metrics.csv's header is written before the first step. Default {}: it adapts none."""

    def remove_hooks(self) -> None:
        """Removes every hook it put on the model, so that a throwaway optimizer keeps nothing alive (it
        may not step afterwards). Default: it put no hooks on the model, nothing to remove."""


# The members every torch.optim.Optimizer has; the runner calls them directly.
REQUIRED = ("param_groups", "zero_grad", "step", "state_dict", "load_state_dict")

# The default of each optional member: the value the runner sees where an optimizer lacks it (for the
# methods, what a call returns; for synchronize_timing, what the optimizer does, unsynchronized).
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "skipped_steps": 0,
        "step_phases": (),
        "last_step_seconds": MappingProxyType({}),
        "synchronize_timing": False,
        "data_parallel": False,
        "comm": None,
        "adapted_hyperparameters": MappingProxyType({}),
        "remove_hooks": None,
    }
)
OPTIONAL = tuple(DEFAULTS)

_ABSENT = object()


def _member(optimizer: RunnerOptimizer, name: str) -> Any:
    """``optimizer``'s optional member ``name``, or ``_ABSENT``: the one probe of the contract."""
    return getattr(optimizer, name, _ABSENT)


def skipped_steps(optimizer: RunnerOptimizer) -> int:
    """The steps ``optimizer`` refused as non-finite so far (default 0)."""
    value = _member(optimizer, "skipped_steps")
    return DEFAULTS["skipped_steps"] if value is _ABSENT else value


def step_phases(optimizer: RunnerOptimizer) -> tuple[str, ...]:
    """The phases of its step that ``optimizer`` times (default: none)."""
    value = _member(optimizer, "step_phases")
    return DEFAULTS["step_phases"] if value is _ABSENT else tuple(value)


def last_step_seconds(optimizer: RunnerOptimizer) -> dict[str, float]:
    """A copy of the seconds of each timed phase of ``optimizer``'s last step (default: empty)."""
    value = _member(optimizer, "last_step_seconds")
    return dict(DEFAULTS["last_step_seconds"] if value is _ABSENT else value)


def set_synchronize_timing(optimizer: RunnerOptimizer, synchronize: bool) -> None:
    """Have ``optimizer``'s timed phases wait for their kernels (``synchronize``) or not, where it has
    the switch; an optimizer without it times nothing itself, and is left as it is."""
    if _member(optimizer, "synchronize_timing") is not _ABSENT:
        optimizer.synchronize_timing = synchronize


def data_parallel(optimizer: RunnerOptimizer) -> bool:
    """Whether ``optimizer`` communicates over the ranks itself (default False: the model goes in DDP)."""
    value = _member(optimizer, "data_parallel")
    return DEFAULTS["data_parallel"] if value is _ABSENT else value


def bytes_sent(optimizer: RunnerOptimizer) -> int:
    """The bytes ``optimizer``'s own communicator has sent from this rank (default 0: it has none)."""
    comm = _member(optimizer, "comm")
    return 0 if comm is _ABSENT or comm is DEFAULTS["comm"] else comm.bytes_sent


def adapted_hyperparameters(optimizer: RunnerOptimizer) -> dict[str, float]:
    """The hyperparameters ``optimizer`` adapts itself, by metrics column (default: none)."""
    method = _member(optimizer, "adapted_hyperparameters")
    return dict(DEFAULTS["adapted_hyperparameters"]) if method is _ABSENT else method()


def remove_hooks(optimizer: RunnerOptimizer) -> None:
    """Remove the hooks ``optimizer`` put on its model, where it put any (default: nothing to remove)."""
    method = _member(optimizer, "remove_hooks")
    if method is not _ABSENT:
        method()
