r"""Hypergradients of the activation learning rate γ (SPEC §12).

At step t the backprop gradient ∇L_t(θ_t) is known. θ_{t,m} came out of
step t−1's local solve of unit m with γ_{t−1,m}; no other unit's γ moves it
(each local problem has its own target). The hypergradient of unit m is

    h_{t,m} = ∂L_t(θ_t)/∂γ_{t−1,m} = ⟨∇_{θ_m}L_t(θ_t), s_m⟩,   s_m = ∂θ_{t,m}/∂γ_{t−1,m},

with the sensitivity s_m computed during step t−1 (Baydin et al.'s
hypergradient descent, with LocoProp's update in place of the last
gradient), in one of four ways:

- exact S: θ* = θ^old − γ·G(C + λI)⁻¹, linear in γ, so s = −G(C + λI)⁻¹;
- ``"implicit"``: at a local optimum ∇ℓ(θ*; γ) = 0, so s = −H⁻¹∂_γ∇ℓ with
  H = Jᵀ D J + λI the local objective's Hessian (D = f′(a) for M, the
  identity for S; J the layer's Jacobian in θ, a constant: the layers are
  affine in θ) and ∂_γ∇ℓ = G, the gradient handed over (the linear term of
  ℓ, :mod:`locoprop.local`). :func:`implicit_sensitivity` solves
  H s = −G by conjugate gradients on Hessian-vector products, never
  forming H, evaluated at the parameters the K inner steps reached;
- ``"unrolled"``: the exact derivative of the K inner steps that ran,
  inner-optimizer state included, by forward-mode differentiation written
  out per inner optimizer (:func:`unrolled_sensitivity`); the reference the
  other two are checked against;
- ``"gradient"``: s = −G, the direction of "implicit"'s first
  conjugate-gradient step without its length ⟨G, G⟩/⟨G, HG⟩, so that
  h = −⟨∇L_t, G_{t−1}⟩ correlates the new gradient with the one the last
  solve followed (Baydin et al.'s hypergradient of gradient descent). It
  costs a dot product where "implicit" costs a Hessian-vector product
  (30–45% of a step at K = 3–5); its h has no step length, so it takes the
  normalized rule, whose step does not depend on the scale of h.

γ then moves multiplicatively, by a step on log γ whose gradient is
u = h·γ = ∂L/∂log γ, by one of two rules (``hypergrad_rule``):

- ``"plain"`` (SPEC §12): γ ← γ·exp(−β·u);
- ``"normalized"``: an Adam step on log γ, γ ← γ·exp(−β·m̂/√v̂), with m and v
  running averages of u and u² (decays ``NORMALIZED_DECAYS``, bias
  corrected). The step no longer scales with the loss (u of a loss scaled
  by c is c·u: the plain step grows c-fold, this one not at all), so β is the
  largest change of log γ per step, and a steady sign of u moves γ by about
  e^β per step while a sign that flips averages out instead of throwing γ
  about.

Either way the factor is clipped to [1/``MAX_FACTOR``, ``MAX_FACTOR``] and γ
kept in ``GAMMA_RANGE``.

``hypergrad_scope`` says whose γ a rule moves: "unit" (SPEC §12), each
unit's by its own u_m = h_m·γ_m; or "shared", every unit's by one factor c
(γ_m = c·γ_m⁰, the paper's single γ when the units start equal), whose
log-gradient is the sum u = Σ_m h_m·γ_m, with one set of moments. Per-unit
adaptation has more freedom and more short-horizon bias: on the reference
autoencoder it drove the encoder's γ 50–100× below the tuned value, where
the one-step gain of a smaller step outweighs what the run loses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from locoprop.inner import RMSpropTF
from locoprop.local import layer_transpose, residual
from locoprop.transfer import Transfer

__all__ = [
    "ADAPTIVE_GAMMA",
    "GAMMA_RANGE",
    "HYPERGRAD_MODES",
    "HYPERGRAD_RULES",
    "HYPERGRAD_SCOPES",
    "MAX_FACTOR",
    "InnerTangent",
    "adapted_activation_lr",
    "implicit_sensitivity",
    "in_gamma_range",
    "inner_tangent",
    "normalized_activation_lr",
    "unrolled_sensitivity",
]

HYPERGRAD_MODES = ("implicit", "unrolled", "gradient")
HYPERGRAD_RULES = ("plain", "normalized")
# Whose γ one hypergradient moves: each unit's own, or one factor shared by every unit (the paper's one γ).
HYPERGRAD_SCOPES = ("unit", "shared")
# The normalized rule's decays of its running averages of u and of u² (Adam's β₁, and a β₂ short enough
# that v follows the hypergradient's scale within the few hundred steps of a run).
NORMALIZED_DECAYS = (0.9, 0.99)
# γ for a user who does not tune it (issue 27): pass ``**ADAPTIVE_GAMMA`` to LocoPropOptimizer; the activation_lr
# given is then not used. The first step sets γ = ρ·‖a‖/‖g‖ (ρ = 0.01, the low end of the best fixed ρ on the
# suite's workloads, 0.01-0.1), so no start is off by orders of magnitude: adaptation from below climbs about e^β
# per step (from 0.01x the tuned γ about 46 of the autoencoder's 139 steps; it ended 9-11% above the tuned loss),
# and the first steps from above do damage it does not undo. Then the normalized rule moves each unit's γ with the
# "gradient" sensitivity (a dot product, where "implicit" costs 30-45% of a step at K = 3-5); β chosen on the
# autoencoder's validation loss ({0.1, 0.2, 0.3}: the best worst start, under the start cap ρ̄ = 0.01 and ρ_max
# 0.1). On CURVES and the ResNet that proxy asks for more γ at nearly every step, so each unit's γ rises to its
# ceiling ρ_max·‖a_m‖/‖g_m‖, and the ceiling decides much of the outcome: ρ_max chosen on the ResNet's validation
# loss ({0.003, 0.01, 0.03, 0.1, 1}). At equal time it ends within 0.3% of the tuned γ's loss on the autoencoder,
# the ResNet and the transformer, but 38% above on CURVES, whose deep logistic stack wants ρ_max = 0.003 (README,
# "γ that needs no tuning").
ADAPTIVE_GAMMA = dict(
    hypergrad_lr=0.1,
    hypergrad_rule="normalized",
    hypergrad="gradient",
    relative_activation_lr=0.01,
    relative_activation_lr_ceiling=0.03,
)
# γ changes by at most this factor per step: one noisy hypergradient cannot throw it far.
MAX_FACTOR = 2.0
# ...and stays inside this range, so that a long drift cannot reach 0 or overflow.
GAMMA_RANGE = (1e-8, 1e8)

Forward = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def adapted_activation_lr(gamma: float, hypergradient: float, hypergrad_lr: float) -> float:
    """γ·exp(−β·h·γ), the factor clipped to [1/MAX_FACTOR, MAX_FACTOR] and γ to GAMMA_RANGE."""
    return _moved(gamma, -hypergrad_lr * hypergradient * gamma)


def normalized_activation_lr(gamma: float, hypergradient: float, hypergrad_lr: float, moments: list[float]) -> float:
    """γ·exp(−β·m̂/√v̂): one Adam step on log γ with gradient u = h·γ.

    ``moments`` is the unit's [m, v, t] (running averages of u and u², and the number of updates so far),
    updated in place: m ← ρ₁m + (1−ρ₁)u, v ← ρ₂v + (1−ρ₂)u², t ← t + 1, m̂ = m/(1−ρ₁ᵗ), v̂ = v/(1−ρ₂ᵗ)
    (ρ = ``NORMALIZED_DECAYS``). Where u has been 0 throughout, γ stays. The factor is clipped to
    [1/MAX_FACTOR, MAX_FACTOR] and γ to GAMMA_RANGE, as for the plain rule.
    """
    (rho1, rho2), u = NORMALIZED_DECAYS, hypergradient * gamma
    m, v, t = moments
    m, v, t = rho1 * m + (1 - rho1) * u, rho2 * v + (1 - rho2) * u * u, t + 1
    moments[:] = [m, v, t]
    m_hat, v_hat = m / (1 - rho1**t), v / (1 - rho2**t)
    return _moved(gamma, -hypergrad_lr * m_hat / math.sqrt(v_hat) if v_hat > 0 else 0.0)


def _moved(gamma: float, exponent: float) -> float:
    """γ·exp(exponent), the factor clipped to [1/MAX_FACTOR, MAX_FACTOR] and γ to GAMMA_RANGE."""
    limit = math.log(MAX_FACTOR)
    exponent = min(max(exponent, -limit), limit)
    return in_gamma_range(gamma * math.exp(exponent))


def in_gamma_range(gamma: float) -> float:
    """γ clipped to GAMMA_RANGE."""
    return min(max(gamma, GAMMA_RANGE[0]), GAMMA_RANGE[1])


# ------------------------------------------------------------------ implicit
def implicit_sensitivity(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    params: Sequence[Tensor],
    inputs: Sequence[Tensor],
    linear_term: Sequence[Tensor],
    prox: float,
    iters: int,
    linear: bool,
) -> list[Tensor]:
    """s = −H⁻¹G by ``iters`` conjugate-gradient steps from 0, H = Jᵀ D J + λI at ``params``.

    ``inputs`` holds the unit's recorded x of the step, ``linear_term`` is G;
    ``linear`` says the layer is an nn.Linear, whose J and Jᵀ are two matrix
    products (other layers go through autograd). Each step costs one
    Hessian-vector product: J·v and Jᵀu, about one local-solve iteration.
    Starting from 0 keeps s in the row space of J when λ = 0 and H is
    singular (fewer rows than inputs): the minimum-norm solution, which the
    local solve's steps also stay in.
    """
    # D at the reached parameters (M only): f′(a) elementwise, or for softmax the point a of its Jacobian.
    elementwise = not transfer.name.startswith("softmax")
    curvature = []
    if variant == "M":
        for x in inputs:
            a = forward(x, *_weight_and_bias(params))
            curvature.append(_derivative(transfer, a, None) if elementwise else a)

    def hessian_vector(v: list[Tensor]) -> list[Tensor]:
        total = [u.mul(prox) for u in v] if prox else [torch.zeros_like(u) for u in v]
        for i, x in enumerate(inputs):
            jv = forward(x, *_weight_and_bias(v))  # the layer is linear in θ: J·v is the layer with parameters v
            if variant == "M":
                jv = jv * curvature[i] if elementwise else _derivative(transfer, curvature[i], jv)
            for t, part in zip(total, _layer_transpose(forward, params, x, jv, linear)):
                t.add_(part)
        return total

    return conjugate_gradient(hessian_vector, [-g for g in linear_term], iters)


def conjugate_gradient(matvec: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], iters: int) -> list[Tensor]:
    """``iters`` steps of conjugate gradients on A s = b from s = 0 (A symmetric positive semi-definite).

    No early stop (it would cost a device sync per step); a zero residual
    gives zero steps instead of 0/0.
    """
    s = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    tiny = torch.finfo(rs.dtype).tiny
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / _dot(p, ap).clamp_min(tiny)
        torch._foreach_add_(s, torch._foreach_mul(p, alpha))
        torch._foreach_sub_(r, torch._foreach_mul(ap, alpha))
        rs_new = _dot(r, r)
        beta = rs_new / rs.clamp_min(tiny)
        p = torch._foreach_add(r, torch._foreach_mul(p, beta))
        rs = rs_new
    return s


# ------------------------------------------------------------------ unrolled
class InnerTangent:
    """One inner optimizer's update rule with its forward-mode derivative, for one param group.

    ``start`` copies a parameter's inner state as the step found it (so the
    real solve can change it); ``update`` applies one inner step to θ, the
    state and their tangents (derivatives in γ), out of place for the state.
    The rules are torch.optim's (``SGD``, ``Adam``, ``RMSprop``, ``Adagrad``)
    and :class:`~locoprop.inner.RMSpropTF`'s, for the options they support;
    :func:`inner_tangent` refuses the others.
    """

    def __init__(self, kind: str, group: dict):
        self.kind, self.group = kind, group

    def start(self, state: dict, p: Tensor) -> dict:
        kind, group, s = self.kind, self.group, {}
        if kind == "sgd":
            buf = state.get("momentum_buffer")
            s["buf"] = None if buf is None else buf.clone()
        elif kind == "adam":
            s["step"] = float(state["step"]) if "step" in state else 0.0
            s["m"] = state["exp_avg"].clone() if "exp_avg" in state else torch.zeros_like(p)
            s["v"] = state["exp_avg_sq"].clone() if "exp_avg_sq" in state else torch.zeros_like(p)
        elif kind == "rmsprop":
            s["v"] = state["square_avg"].clone() if "square_avg" in state else torch.zeros_like(p)
            s["buf"] = state["momentum_buffer"].clone() if "momentum_buffer" in state else torch.zeros_like(p)
        elif kind == "adagrad":
            s["step"] = float(state["step"]) if "step" in state else 0.0
            initial = group["initial_accumulator_value"]
            s["v"] = state["sum"].clone() if "sum" in state else torch.full_like(p, initial)
        else:  # rmsprop-tf
            s["v"] = state["ms"].clone() if "ms" in state else torch.ones_like(p)
            s["buf"] = state["mom"].clone() if "mom" in state else torch.zeros_like(p)
        tangents = {k: (torch.zeros_like(p) if isinstance(v, Tensor) else None) for k, v in s.items()}
        return {"value": s, "tangent": tangents}

    def update(self, p: Tensor, dp: Tensor, g: Tensor, dg: Tensor, state: dict, lr: float) -> tuple[Tensor, Tensor]:
        """One step: the new (θ, dθ); ``state`` is replaced by the new one."""
        kind, group = self.kind, self.group
        s, ds = state["value"], state["tangent"]
        decay = group.get("weight_decay", 0.0)
        if decay and not group.get("decoupled_weight_decay", False):
            g, dg = g + decay * p, dg + decay * dp
        if kind == "sgd":
            momentum = group["momentum"]
            direction, d_direction = g, dg
            if momentum:
                if s["buf"] is None:
                    s["buf"], ds["buf"] = g.clone(), dg.clone()
                else:
                    keep = 1.0 - group["dampening"]
                    s["buf"], ds["buf"] = momentum * s["buf"] + keep * g, momentum * ds["buf"] + keep * dg
                if group["nesterov"]:
                    direction, d_direction = g + momentum * s["buf"], dg + momentum * ds["buf"]
                else:
                    direction, d_direction = s["buf"], ds["buf"]
            return p - lr * direction, dp - lr * d_direction
        if kind == "adam":
            beta1, beta2 = group["betas"]
            if decay and group.get("decoupled_weight_decay", False):
                p, dp = p * (1 - lr * decay), dp * (1 - lr * decay)
            s["step"] += 1
            s["m"], ds["m"] = beta1 * s["m"] + (1 - beta1) * g, beta1 * ds["m"] + (1 - beta1) * dg
            s["v"], ds["v"] = beta2 * s["v"] + (1 - beta2) * g * g, beta2 * ds["v"] + 2 * (1 - beta2) * g * dg
            root, d_root = _sqrt_and_tangent(s["v"], ds["v"])
            correction = math.sqrt(1 - beta2 ** s["step"])
            denominator, d_denominator = root / correction + group["eps"], d_root / correction
            step_size = lr / (1 - beta1 ** s["step"])
            quotient, d_quotient = _quotient(s["m"], ds["m"], denominator, d_denominator)
            return p - step_size * quotient, dp - step_size * d_quotient
        if kind == "rmsprop":
            alpha = group["alpha"]
            s["v"], ds["v"] = alpha * s["v"] + (1 - alpha) * g * g, alpha * ds["v"] + 2 * (1 - alpha) * g * dg
            root, d_root = _sqrt_and_tangent(s["v"], ds["v"])
            quotient, d_quotient = _quotient(g, dg, root + group["eps"], d_root)
            if group["momentum"] > 0:
                momentum = group["momentum"]
                s["buf"], ds["buf"] = momentum * s["buf"] + quotient, momentum * ds["buf"] + d_quotient
                quotient, d_quotient = s["buf"], ds["buf"]
            return p - lr * quotient, dp - lr * d_quotient
        if kind == "adagrad":
            s["step"] += 1
            s["v"], ds["v"] = s["v"] + g * g, ds["v"] + 2 * g * dg
            root, d_root = _sqrt_and_tangent(s["v"], ds["v"])
            step_size = lr / (1 + (s["step"] - 1) * group["lr_decay"])
            quotient, d_quotient = _quotient(g, dg, root + group["eps"], d_root)
            return p - step_size * quotient, dp - step_size * d_quotient
        # rmsprop-tf: ms ← decay·ms + (1 − decay)·g²; mom ← momentum·mom + lr·g/√(ms + eps); θ ← θ − mom
        rate, momentum = group["decay"], group["momentum"]
        s["v"], ds["v"] = rate * s["v"] + (1 - rate) * g * g, rate * ds["v"] + 2 * (1 - rate) * g * dg
        root, d_root = _sqrt_and_tangent(s["v"] + group["eps"], ds["v"])
        quotient, d_quotient = _quotient(g, dg, root, d_root)
        s["buf"], ds["buf"] = momentum * s["buf"] + lr * quotient, momentum * ds["buf"] + lr * d_quotient
        return p - s["buf"], dp - ds["buf"]


def inner_tangent(inner: torch.optim.Optimizer, group_index: int) -> InnerTangent:
    """The forward-mode rule of ``inner``'s group ``group_index``; ValueError for what it does not cover."""
    kinds = {
        torch.optim.SGD: "sgd",
        torch.optim.Adam: "adam",
        torch.optim.RMSprop: "rmsprop",
        torch.optim.Adagrad: "adagrad",
        RMSpropTF: "rmsprop-tf",
    }
    kind = kinds.get(type(inner))
    if kind is None:
        raise ValueError(
            f"hypergrad='unrolled' differentiates the inner optimizer's update rule, which it knows for "
            f"{', '.join(sorted(c.__name__ for c in kinds))}; {type(inner).__name__} is none of them. "
            "Use hypergrad='implicit'"
        )
    group = inner.param_groups[group_index]
    unsupported = [
        option for option in ("amsgrad", "centered", "maximize", "differentiable") if group.get(option, False)
    ]
    if unsupported:
        raise ValueError(
            f"hypergrad='unrolled' does not differentiate {type(inner).__name__} with "
            f"{', '.join(f'{o}=True' for o in unsupported)}; use hypergrad='implicit'"
        )
    return InnerTangent(kind, group)


def unrolled_sensitivity(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    old_params: Sequence[Tensor],
    uses: Sequence[tuple[Tensor, tuple[Tensor, ...]]],
    linear_term: Sequence[Tensor],
    activation_lr: float,
    prox: float,
    rule: InnerTangent,
    states: Sequence[dict],
    lrs: Sequence[float],
    linear: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """(s, θ_K): the derivative in γ of the K inner steps at learning rates ``lrs``, and where they end.

    Re-runs the local solve from θ^old = ``old_params`` and the inner state
    ``states`` (one :meth:`InnerTangent.start` per parameter) with the
    tangents carried along. The local gradient Σ Jᵀr + γ·G + λΔθ
    (:mod:`locoprop.local`; ``uses`` holds (x, anchor) pairs, ``linear_term``
    is G) has tangent Σ Jᵀ(D·J·dθ) + G + λdθ, D = f′(a) for M and the
    identity for S.
    """
    params = [p.clone() for p in old_params]
    tangents = [torch.zeros_like(p) for p in old_params]
    for lr in lrs:
        delta = [p - q for p, q in zip(params, old_params)]
        residuals, d_residuals = [], []
        for x, anchor in uses:
            residuals.append(residual(variant, transfer, anchor, forward(x, *_weight_and_bias(delta))))
            ja = forward(x, *_weight_and_bias(tangents))  # linear in θ: J·dθ
            if variant == "M":
                ja = _derivative(transfer, forward(x, *_weight_and_bias(params)), ja)
            d_residuals.append(ja)
        inputs = [x for x, _ in uses]
        grads = _sum_transposes(forward, params, inputs, residuals, linear)
        d_grads = _sum_transposes(forward, params, inputs, d_residuals, linear)
        grads = [gr + activation_lr * g for gr, g in zip(grads, linear_term)]
        d_grads = [dgr + g for dgr, g in zip(d_grads, linear_term)]
        if prox:
            grads = [gr + prox * d for gr, d in zip(grads, delta)]
            d_grads = [dgr + prox * dp for dgr, dp in zip(d_grads, tangents)]
        stepped = [rule.update(p, dp, gr, dgr, st, lr) for p, dp, gr, dgr, st in
                   zip(params, tangents, grads, d_grads, states)]  # fmt: skip
        params, tangents = [new for new, _ in stepped], [d for _, d in stepped]
    return tangents, params


# ------------------------------------------------------------------ helpers
def _weight_and_bias(params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    return params[0], (params[1] if len(params) > 1 else None)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)), start=a[0].new_zeros(()))


def _derivative(transfer: Transfer, a: Tensor, tangent: Tensor | None) -> Tensor:
    """f′(a)·tangent (a Jacobian-vector product, softmax included); f′(a) itself when ``tangent`` is None."""
    with torch.enable_grad():
        return torch.func.jvp(transfer.fn, (a,), (torch.ones_like(a) if tangent is None else tangent,))[1]


def _layer_transpose(forward: Forward, params: Sequence[Tensor], x: Tensor, u: Tensor, linear: bool) -> list[Tensor]:
    """Jᵀu for one input x: the layer's parameter gradient for output gradient u."""
    if linear:
        rows_x, rows_u = x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
        weight = rows_u.T @ rows_x
        return [weight, rows_u.sum(0)] if len(params) > 1 else [weight]
    return layer_transpose(forward, params, x, u)


def _sum_transposes(forward, params, inputs, outputs, linear) -> list[Tensor]:
    total = None
    for x, u in zip(inputs, outputs):
        parts = _layer_transpose(forward, params, x, u, linear)
        total = parts if total is None else [t + q for t, q in zip(total, parts)]
    return total


def _sqrt_and_tangent(v: Tensor, dv: Tensor) -> tuple[Tensor, Tensor]:
    """(√v, dv/(2√v)), with tangent 0 where v = 0 (there dv = 0 too: v is a sum of squares of zero gradients)."""
    root = v.sqrt()
    safe = torch.where(root > 0, root, torch.ones_like(root))
    return root, torch.where(root > 0, dv / (2 * safe), torch.zeros_like(dv))


def _quotient(n: Tensor, dn: Tensor, d: Tensor, dd: Tensor) -> tuple[Tensor, Tensor]:
    """(n/d, its tangent dn/d − n·dd/d²)."""
    return n / d, dn / d - n * dd / (d * d)
