"""The optimizer registry: every name of SPEC §7 and its defaults.

``make_optimizer(name, model, loss=..., **hparams)`` returns a ready
``torch.optim.Optimizer`` that skips (and counts in ``skipped_steps``) a
step whose gradients are not all finite (:mod:`baselines.finite`; LocoProp
does so by itself). Hyperparameters are flat scalars (``beta1``, not
``betas``) so that one search-space file per optimizer can name them (what a
sweep searches lives only there: ``sweeps/search/spaces/NAME.yaml``). ``loss`` is the workload's
loss ("bce", "cross_entropy" or "mse"): LocoProp takes its output transfer
function from it, K-FAC its sampled Fisher.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from baselines.combined import CombinedOptimizer
from baselines.finite import finite_steps
from baselines.kfac import KFAC
from locoprop import LocoPropOptimizer, RMSpropTF

__all__ = [
    "LOSS_OUTPUT_ACTIVATION",
    "OPTIMIZERS",
    "OptimizerSpec",
    "check_hparams",
    "cost_knobs",
    "cost_period",
    "inert_hparams",
    "make_optimizer",
    "optimizer_names",
]

# The transfer function each loss folds into the model's last layer.
LOSS_OUTPUT_ACTIVATION = {"bce": "sigmoid", "cross_entropy": "softmax", "mse": "identity"}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry.

    Attributes:
        name: the registry name (``"adam"``).
        build: (model, loss, hparams) -> optimizer, hparams complete.
        defaults: every hyperparameter the entry takes, with its default.
        types: the type of each hyperparameter whose default is None (which
            accepts None too); the others take the type of their default.
        nullable: hyperparameters with a default that also accept None
            (for example a clipping that None turns off).
        inert: (hparams, complete) -> the hyperparameters that change none
            of its steps at these values (see :func:`inert_hparams`).
        cost_hparams: the hyperparameters that set what a step costs (LocoProp's
            K, K-FAC's refresh periods): a time budget is priced per value of
            these (:func:`cost_knobs`).
        period_hparams: those that are periods in steps (work done every P
            steps): a step's cost is timed over whole periods
            (:func:`cost_period`).
    """

    name: str
    build: Callable[[nn.Module, str | None, dict[str, Any]], torch.optim.Optimizer]
    defaults: dict[str, Any]
    types: dict[str, type] = dataclasses.field(default_factory=dict)
    nullable: tuple[str, ...] = ()
    inert: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
    cost_hparams: tuple[str, ...] = ()
    period_hparams: tuple[str, ...] = ()

    def expected_type(self, hparam: str) -> type:
        default = self.defaults[hparam]
        return type(default) if default is not None else self.types[hparam]

    def accepts_none(self, hparam: str) -> bool:
        return self.defaults[hparam] is None or hparam in self.nullable


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _sgd(model, loss, h):
    return finite_steps(torch.optim.SGD)(
        _trainable(model), lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"], weight_decay=h["weight_decay"]
    )


def _adam(cls):
    def build(model, loss, h):
        return finite_steps(cls)(
            _trainable(model), lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"]
        )

    return build


def _rmsprop(model, loss, h):
    return finite_steps(torch.optim.RMSprop)(
        _trainable(model), lr=h["lr"], alpha=h["alpha"], eps=h["eps"], momentum=h["momentum"], centered=h["centered"]
    )


def _rmsprop_tf(model, loss, h):
    return finite_steps(RMSpropTF)(
        _trainable(model), lr=h["lr"], decay=h["decay"], momentum=h["momentum"], eps=h["eps"]
    )


def _adagrad(model, loss, h):
    return finite_steps(torch.optim.Adagrad)(
        _trainable(model), lr=h["lr"], eps=h["eps"], weight_decay=h["weight_decay"]
    )


def _kfac(model, loss, h):
    return finite_steps(KFAC)(model, loss=loss, **h)


def _with_betas(load_class: Callable[[], type]):
    """An optimizer class (loaded when first built: pytorch_optimizer is slow to
    import) whose flat beta1/beta2 become its ``betas``."""

    def build(model, loss, h):
        h = dict(h)
        betas = (h.pop("beta1"), h.pop("beta2"))
        return finite_steps(load_class())(_trainable(model), betas=betas, **h)

    return build


def _soap() -> type:
    import pytorch_optimizer

    return pytorch_optimizer.SOAP


def _shampoo() -> type:
    # Not pytorch_optimizer.ScalableShampoo itself: its state holds objects
    # that a weights_only checkpoint cannot load.
    from baselines.shampoo import Shampoo

    return Shampoo


def _muon(model, loss, h):
    # Muon orthogonalises 2-D weight updates; biases, norms and conv kernels
    # go to AdamW, as Muon's authors recommend.
    matrices = [p for p in _trainable(model) if p.ndim == 2]
    rest = [p for p in _trainable(model) if p.ndim != 2]
    parts = []
    if matrices:
        parts.append(
            torch.optim.Muon(
                matrices,
                lr=h["lr"],
                momentum=h["momentum"],
                nesterov=h["nesterov"],
                weight_decay=h["weight_decay"],
                adjust_lr_fn=h["adjust_lr_fn"],
            )
        )
    if rest:
        parts.append(
            torch.optim.AdamW(
                rest,
                lr=h["adamw_lr"],
                betas=(h["adamw_beta1"], h["adamw_beta2"]),
                weight_decay=h["adamw_weight_decay"],
            )
        )
    return finite_steps(CombinedOptimizer)(parts)


def _locoprop(variant: str, solve: str = "iterative"):
    def build(model, loss, h):
        h = dict(h)
        # inner_<name> hyperparameters are keyword arguments of the inner optimizer.
        inner_kwargs = dict(_OFFICIAL_INNER_KWARGS.get(h["inner"], {}))
        inner_kwargs.update(h.pop("inner_kwargs") or {})
        for key in [k for k in h if k.startswith("inner_") and k != "inner_schedule"]:
            value = h.pop(key)
            if value is not None:  # None: the inner optimizer's own default
                inner_kwargs[key.removeprefix("inner_")] = value
        if h.get("output_activation") is None and loss is not None:
            h["output_activation"] = LOSS_OUTPUT_ACTIVATION[loss]
        return LocoPropOptimizer(model, variant=variant, solve=solve, inner_kwargs=inner_kwargs, **h)

    return build


# The official LocoProp setup (SPEC §2): rmsprop-tf inner with momentum 0.999.
# The inner_* defaults are None (the inner optimizer's own default, or the
# official one for rmsprop-tf) so that another inner optimizer can be chosen.
_OFFICIAL_INNER_KWARGS = {"rmsprop-tf": dict(momentum=0.999, decay=0.9, eps=1e-5)}
_LOCOPROP_DEFAULTS = dict(
    lr=1e-5,
    activation_lr=10.0,
    local_iters=10,
    inner="rmsprop-tf",
    inner_momentum=None,
    inner_decay=None,
    inner_eps=None,
    inner_kwargs=None,
    inner_schedule="linear-floor",
    prox=0.0,
    output_activation=None,
    units=None,
    parallel="auto",
    compile=False,
    # β > 0: γ adapts online by hypergradients (activation_lr is then where it starts); SPEC §12.
    hypergrad_lr=0.0,
    hypergrad="implicit",
    hypergrad_iters=1,
    hypergrad_rule="plain",
    hypergrad_scope="unit",
    # ρ: γ = ρ·‖a‖/‖g‖ from the first step's records, whatever the loss's scale (locoprop.relative_gamma);
    # None keeps activation_lr.
    relative_activation_lr=None,
    # ρ̄: the first step caps γ at ρ̄·‖a‖/‖g‖ (locoprop.relative_gamma); None: no cap.
    max_relative_activation_lr=None,
    # ρ_max: every step keeps each unit's γ ≤ ρ_max·‖a_m‖/‖g_m‖ (locoprop.relative_gamma); None: no ceiling.
    relative_activation_lr_ceiling=None,
    # "bfloat16": the inner iterations' matmuls in bfloat16, the step accurate to ~1e-3 of itself (locoprop.kernels).
    local_dtype=None,
)


def _locoprop_inert(exact: bool) -> Callable[[dict[str, Any]], tuple[str, ...]]:
    """LocoProp's hyperparameters that change nothing: γ's update rule and the sensitivity ∂θ/∂γ (hypergrad,
    and the CG steps that only "implicit" takes) count only while β = hypergrad_lr > 0, and the exact solve has
    the sensitivity in closed form."""

    def inert(h: dict[str, Any]) -> tuple[str, ...]:
        if h.get("hypergrad_lr") == 0:
            return ("hypergrad", "hypergrad_iters", "hypergrad_rule", "hypergrad_scope")
        if exact:
            return ("hypergrad", "hypergrad_iters")
        return ("hypergrad_iters",) if h.get("hypergrad") in ("unrolled", "gradient") else ()

    return inert


# The types of the LocoProp hyperparameters whose default (None) does not say it.
_LOCOPROP_TYPES = dict(
    inner_momentum=float,
    inner_decay=float,
    inner_eps=float,
    inner_kwargs=dict,
    output_activation=str,
    units=list,
    relative_activation_lr=float,
    max_relative_activation_lr=float,
    relative_activation_lr_ceiling=float,
    local_dtype=str,
)

_ADAM_DEFAULTS = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec(
            "sgd",
            _sgd,
            dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0),
        ),
        OptimizerSpec(
            "momentum",
            _sgd,
            dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0),
        ),
        OptimizerSpec(
            "nesterov",
            _sgd,
            dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.0),
        ),
        OptimizerSpec("adam", _adam(torch.optim.Adam), _ADAM_DEFAULTS),
        OptimizerSpec(
            "adamw",
            _adam(torch.optim.AdamW),
            {**_ADAM_DEFAULTS, "weight_decay": 0.01},
        ),
        OptimizerSpec(
            "rmsprop",
            _rmsprop,
            dict(lr=1e-3, alpha=0.99, eps=1e-8, momentum=0.0, centered=False),
        ),
        OptimizerSpec(
            "rmsprop-tf",
            _rmsprop_tf,
            dict(lr=1e-3, decay=0.9, momentum=0.0, eps=1e-10),
        ),
        OptimizerSpec("adagrad", _adagrad, dict(lr=1e-2, eps=1e-10, weight_decay=0.0)),
        OptimizerSpec(
            "kfac",
            _kfac,
            dict(
                lr=1e-2,
                damping=1e-3,
                momentum=0.9,
                weight_decay=0.0,
                factor_decay=0.95,
                kl_clip=1e-3,
                inv_update_freq=10,
                factor_update_freq=1,
                fisher="sampled",  # the true Fisher, as K-FAC is defined; "empirical" uses the batch's own labels
            ),
            nullable=("kl_clip",),
            cost_hparams=("factor_update_freq", "inv_update_freq"),
            period_hparams=("factor_update_freq", "inv_update_freq"),
        ),
        OptimizerSpec(
            "shampoo",
            _with_betas(_shampoo),
            dict(
                lr=1e-3,
                beta1=0.9,
                beta2=0.999,
                weight_decay=0.0,
                matrix_eps=1e-6,
                start_preconditioning_step=10,
                preconditioning_compute_steps=10,
                block_size=512,
            ),
            cost_hparams=("preconditioning_compute_steps",),
            # (start_preconditioning_step only picks the update applied: the preconditioners are recomputed
            # every P steps from the first on)
            period_hparams=("preconditioning_compute_steps",),
        ),
        OptimizerSpec(
            "soap",
            _with_betas(_soap),
            dict(lr=3e-3, beta1=0.95, beta2=0.95, weight_decay=0.01, precondition_frequency=10, eps=1e-8),
            cost_hparams=("precondition_frequency",),
            period_hparams=("precondition_frequency",),
        ),
        OptimizerSpec(
            "muon",
            _muon,
            dict(
                lr=0.02,
                momentum=0.95,
                nesterov=True,
                weight_decay=0.0,
                adjust_lr_fn="original",
                adamw_lr=1e-3,
                adamw_beta1=0.9,
                adamw_beta2=0.95,
                adamw_weight_decay=0.0,
            ),
        ),
        OptimizerSpec(
            "locoprop-m",
            _locoprop("M"),
            _LOCOPROP_DEFAULTS,
            types=_LOCOPROP_TYPES,
            inert=_locoprop_inert(exact=False),
            cost_hparams=("local_iters",),
        ),
        OptimizerSpec(
            "locoprop-s",
            _locoprop("S"),
            _LOCOPROP_DEFAULTS,
            types=_LOCOPROP_TYPES,
            inert=_locoprop_inert(exact=False),
            cost_hparams=("local_iters",),
        ),
        OptimizerSpec(
            "locoprop-s-exact",
            _locoprop("S", solve="exact"),
            # covariance_refresh T: (C̄ + λI)⁻¹ formed every T steps and reused in between (FOOF); with
            # covariance_decay ρ, C̄ an exponential moving average of the refresh steps' C. T = 1, ρ = 0: every batch.
            {
                # (no local_dtype: the exact solve has no inner matmuls to run in it)
                **{name: value for name, value in _LOCOPROP_DEFAULTS.items() if name != "local_dtype"},
                "activation_lr": 1.0,
                "prox": 10.0,
                "covariance_refresh": 1,
                "covariance_decay": 0.0,
            },
            types=_LOCOPROP_TYPES,
            inert=_locoprop_inert(exact=True),
            cost_hparams=("covariance_refresh",),
            period_hparams=("covariance_refresh",),
        ),
    ]
}


def inert_hparams(name: str, hparams: dict[str, Any]) -> set[str]:
    """Those of ``hparams`` (given over the defaults of ``name``) that change none of its steps at these
    values: LocoProp's hypergradient mode at β = 0 (``hypergrad_lr``), for example. Two configs that differ
    only in them train the same run. None for an unknown name."""
    spec = OPTIMIZERS.get(name)
    if spec is None or spec.inert is None or not isinstance(hparams, dict):
        return set()
    return set(spec.inert({**spec.defaults, **hparams})) & set(hparams)


def cost_knobs(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The values of ``name``'s cost hyperparameters in ``hparams`` (given over its defaults): what its step
    costs depends on, beyond the model, batch and machine."""
    spec = OPTIMIZERS[name]
    return {knob: hparams.get(knob, spec.defaults[knob]) for knob in spec.cost_hparams}


def optimizer_names() -> list[str]:
    return list(OPTIMIZERS)


def make_optimizer(name: str, model: nn.Module, *, loss: str | None = None, **hparams) -> torch.optim.Optimizer:
    """A ready optimizer for ``model``: the registry defaults of ``name``
    updated with ``hparams``.

    Raises:
        ValueError: unknown name (the valid ones are listed), unknown
            hyperparameter for that name or a value of the wrong type (see
            :func:`check_hparams`), unknown loss, or a value the optimizer
            refuses.
    """
    check_hparams(name, hparams)
    if loss is not None and loss not in LOSS_OUTPUT_ACTIVATION:
        raise ValueError(f"Unknown loss: {loss!r}; expected one of {', '.join(LOSS_OUTPUT_ACTIVATION)}")
    spec = OPTIMIZERS[name]
    return spec.build(model, loss, {**spec.defaults, **hparams})


def check_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Refuse an unknown optimizer, an unknown hyperparameter, or a value of
    the wrong type, naming it.

    The type of a hyperparameter is the type of its default (or
    ``OptimizerSpec.types``): a bool takes only true/false, an integer only
    integers, a float any finite number (integers included, booleans not), a
    string only strings. None only where the spec allows it. A momentum
    (``momentum``, ``inner_momentum``) must be in [0, 1): torch's SGD takes
    1.5 and diverges without a word. Other ranges (lr > 0, …) are the
    optimizers' own checks.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    spec = OPTIMIZERS[name]
    if not isinstance(hparams, dict):
        raise ValueError(f"Invalid hyperparameters for {name!r}: {hparams!r}; expected a dictionary of name: value")
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"Unknown hyperparameter(s) for {name!r}: {', '.join(unknown)}; it takes {', '.join(sorted(spec.defaults))}"
        )
    for hparam, value in hparams.items():
        if value is None and spec.accepts_none(hparam):
            continue
        expected = spec.expected_type(hparam)
        if not _is_a(value, expected):
            also = " (or null)" if spec.accepts_none(hparam) else ""
            raise ValueError(
                f"Invalid hyperparameter {hparam}={value!r} for {name!r}: expected {_TYPE_NAMES[expected]}{also}"
            )
        if hparam in ("momentum", "inner_momentum") and value is not None and not 0 <= value < 1:
            raise ValueError(f"Invalid hyperparameter {hparam}={value!r} for {name!r}: expected a number in [0, 1)")


_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    dict: "a dictionary",
    list: "a list",
}


def _is_a(value: Any, expected: type) -> bool:
    # bool is an int subclass: True is not a learning rate, nor 1 a switch.
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    if expected is int:
        return isinstance(value, numbers.Integral)
    if expected is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, expected)


def cost_period(name: str, hparams: dict[str, Any]) -> int:
    """The period of ``name``'s step cost at ``hparams`` (given over its defaults): its work repeats every that many
    steps (the least common multiple of its refresh periods; 1 for an optimizer whose steps all cost the same). A
    step's cost is its mean over whole periods: Shampoo refreshing its preconditioners every 30 steps, timed over
    10, was priced at half its cost."""
    spec = OPTIMIZERS[name]
    values = {**spec.defaults, **hparams}
    return math.lcm(*(max(1, int(values[knob])) for knob in spec.period_hparams)) if spec.period_hparams else 1
