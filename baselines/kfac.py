"""K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016).

For every nn.Linear / nn.Conv2d layer, the Fisher block of its weight matrix
θ = [W, b] (shape d_out × d_in', the bias folded in as a last column) is
approximated by a Kronecker product A ⊗ G of

    A = E[x̃ x̃ᵀ]              x̃ = [x, 1]: one input row (a patch for Conv2d)
    G = E_i[Σ_t ĝ_it ĝ_itᵀ]   ĝ = N·dL/da: the gradient of example i's own
                              loss (L is assumed to be a batch mean), t its
                              positions (one for Linear)

The update of one layer, with Tikhonov damping λ split between the factors
by π = √((tr A / dim A) / (tr G / dim G)), is::

    V   = (G + √λ/π · I)⁻¹ ∇θ (A + π√λ · I)⁻¹    (eigendecompositions of A, G)
    ν   = min(1, √(kl_clip / (lr² Σ_layers ⟨V, ∇θ⟩)))   (KL clipping)
    buf ← momentum·buf + ν·V + weight_decay·θ
    θ   ← θ − lr·buf

Factors are exponential moving averages (``factor_decay``; 0 keeps only the
current batch) updated every ``factor_update_freq`` steps (the sampled
Fisher's extra pass runs only then); eigendecompositions are refreshed every
``inv_update_freq`` steps, from the factors as last updated. Both knobs trade
curvature freshness for cost per step (kfac-pytorch's ``factor_update_steps``
and ``inv_update_steps``). With ``fisher="empirical"`` G comes from the user's own backward
pass; with ``fisher="sampled"`` from an extra forward and backward pass on
the same inputs, with labels drawn from the model's predictive distribution
(``loss``: "cross_entropy", "bce" or "mse"). Parameters outside these
layers take SGD steps with the same momentum and weight decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locoprop.hooks import WeakHook, remove_when_gone
from locoprop.layers import RecordedLayer, find_layers, no_backward_error, unrecorded_gradient_error

__all__ = ["FISHER_TYPES", "KFAC", "SAMPLED_LOSSES"]

FISHER_TYPES = ("empirical", "sampled")
SAMPLED_LOSSES = ("cross_entropy", "bce", "mse")


class KFAC(torch.optim.Optimizer):
    """K-FAC for the nn.Linear and nn.Conv2d layers of ``model``.

    Args:
        model: the network; its layers are watched with module hooks.
        lr: learning rate.
        damping: Tikhonov damping λ > 0.
        momentum: momentum of the preconditioned step, in [0, 1).
        weight_decay: L2 coefficient added to the preconditioned step.
        factor_decay: EMA decay of A and G, in [0, 1); 0 uses the current batch only.
        kl_clip: bound on lr²·⟨V, ∇θ⟩ summed over layers; ``None`` turns it off.
        inv_update_freq: steps between eigendecompositions of the factors.
        factor_update_freq: steps between updates of the factors A and G.
        fisher: "empirical" (the user's gradients) or "sampled".
        loss: the per-example loss used to sample labels (sampled Fisher only):
            "cross_entropy" (softmax over the last dimension), "bce" (with
            logits, summed over outputs) or "mse" (½‖z − y‖², unit-variance Gaussian).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        damping: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        kl_clip: float | None = 1e-3,
        inv_update_freq: int = 10,
        fisher: str = "empirical",
        factor_update_freq: int = 1,
        loss: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"KFAC needs the model (an nn.Module), got {type(model).__name__}")
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
            inv_update_freq=inv_update_freq,
            factor_update_freq=factor_update_freq,
        )
        _check_hyperparameters(defaults)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"Invalid fisher: {fisher!r}; expected one of {', '.join(FISHER_TYPES)}")
        if fisher == "sampled" and loss not in SAMPLED_LOSSES:
            raise ValueError(
                f"Invalid loss for the sampled Fisher: {loss!r}; expected one of {', '.join(SAMPLED_LOSSES)}"
            )
        layers = find_layers(model)
        if not layers:
            raise ValueError(
                f"The model has no trainable nn.Linear or nn.Conv2d layers for K-FAC: {type(model).__name__}"
            )
        for layer in layers:
            if isinstance(layer.module, nn.Conv2d):
                # Fails now, not at the first step, for layouts unfold cannot express.
                layer.adapter.input_rows(torch.zeros(1, layer.module.in_channels, *layer.module.kernel_size))
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self.model = model
        self.fisher = fisher
        self.loss = loss
        self.layers: list[RecordedLayer] = layers
        self._layer_params = {p for layer in layers for p in layer.params}
        self._last_inputs: tuple[tuple, dict] | None = None
        self._handles = []
        for layer in layers:
            layer.attach()
        if fisher == "sampled":
            self._handles.append(model.register_forward_pre_hook(WeakHook(self._record_inputs), with_kwargs=True))
            remove_when_gone(self, self._handles)

    def _record_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
            self._last_inputs = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})

    def remove_hooks(self) -> None:
        for layer in self.layers:
            layer.detach()
        for handle in self._handles:
            handle.remove()

    @torch.no_grad()
    def step(self, closure=None):
        """One K-FAC step from the gradients of the last backward pass."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        _check_hyperparameters(group)
        active = []
        for layer in self.layers:
            if layer.backpropagated_records():
                active.append(layer)
            elif any(p.grad is not None for p in layer.params):
                raise unrecorded_gradient_error("Layer", layer.name)
        others = [p for p in group["params"] if p not in self._layer_params and p.grad is not None]
        if not active and not others:
            raise no_backward_error("KFAC")
        # The steps each layer has taken: its factors update on 0, F, 2F, …, its eigenbases on 0, T, 2T, ….
        steps = {layer: _steps_taken(self.state[layer.module.weight]) for layer in active}
        refreshing = [layer for layer in active if steps[layer] % group["factor_update_freq"] == 0]
        if self.fisher == "sampled" and refreshing:
            self._resample_output_gradients(refreshing)

        directions = {}
        for layer in active:
            state = self.state[layer.module.weight]
            if layer in refreshing:
                self._update_factors(layer, group)
            if steps[layer] % group["inv_update_freq"] == 0:
                _refresh_eigenbases(state)
            state["steps"] = steps[layer] + 1
            directions[layer] = self._precondition(layer, group)
        for layer in self.layers:
            layer.records.clear()

        scale = 1.0
        if group["kl_clip"] is not None and directions:
            vg = group["lr"] ** 2 * sum((v * _grad_matrix(layer)).sum().item() for layer, v in directions.items())
            if vg > 0:
                scale = min(1.0, math.sqrt(group["kl_clip"] / vg))
        for layer, direction in directions.items():
            for p, d in zip(layer.params, _split(direction.mul_(scale), layer.params)):
                self._apply(p, d, group)
        for p in others:
            self._apply(p, p.grad.clone(), group)
        return loss

    def _apply(self, p: Tensor, direction: Tensor, group: dict) -> None:
        """buf ← momentum·buf + direction + wd·θ; θ ← θ − lr·buf."""
        if group["weight_decay"]:
            direction.add_(p, alpha=group["weight_decay"])
        state = self.state[p]
        if group["momentum"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = direction.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(direction)
            direction = state["momentum_buffer"]
        p.sub_(direction, alpha=group["lr"])

    def _update_factors(self, layer: RecordedLayer, group: dict) -> None:
        records = layer.backpropagated_records()
        adapter = layer.adapter
        # In the weights' dtype: under autocast the recorded x and g are bfloat16, and the factors are state.
        dtype = layer.module.weight.dtype
        x_rows = torch.cat([adapter.input_rows(r.x) for r in records]).to(dtype)
        g_rows = torch.cat([adapter.output_rows(r.g) for r in records]).to(dtype)
        batch_size = sum(r.x.shape[0] for r in records)
        if layer.module.bias is not None:
            x_rows = torch.cat([x_rows, x_rows.new_ones(x_rows.shape[0], 1)], dim=1)
        a_factor = x_rows.T @ x_rows / x_rows.shape[0]
        # Per-example gradients are N·g; E_i Σ_t (N g)(N g)ᵀ = N Σ g gᵀ.
        g_factor = g_rows.T @ g_rows * batch_size
        state = self.state[layer.module.weight]
        decay = group["factor_decay"]
        if "A" not in state:
            state["A"], state["G"] = a_factor, g_factor
        else:
            state["A"].mul_(decay).add_(a_factor, alpha=1 - decay)
            state["G"].mul_(decay).add_(g_factor, alpha=1 - decay)

    def _precondition(self, layer: RecordedLayer, group: dict) -> Tensor:
        state = self.state[layer.module.weight]
        root = math.sqrt(group["damping"])
        damp_a, damp_g = state["pi"] * root, root / state["pi"]
        grad = _grad_matrix(layer)
        v = state["QG"].T @ grad @ state["QA"]
        v /= (state["dG"][:, None] + damp_g) * (state["dA"][None, :] + damp_a)
        return state["QG"] @ v @ state["QA"].T

    def _resample_output_gradients(self, active: list[RecordedLayer]) -> None:
        """Replace the recorded g by those of a loss on sampled labels."""
        if self._last_inputs is None:
            raise RuntimeError("The sampled Fisher needs the model's inputs; no forward pass was recorded")
        for layer in self.layers:
            layer.records.clear()
        args, kwargs = self._last_inputs
        with torch.enable_grad():
            logits = self.model(*args, **kwargs)
            sampled = _sampled_loss(self.loss, logits)
            # Only the layer-output hooks matter: they store g for the factors.
            torch.autograd.grad(sampled, [layer.module.weight for layer in active], allow_unused=True)


def _sampled_loss(kind: str, logits: Tensor) -> Tensor:
    """Batch-mean loss with labels drawn from the model's own predictions."""
    logits_d = logits.detach()
    if kind == "cross_entropy":
        labels = torch.multinomial(torch.softmax(logits_d.reshape(-1, logits.shape[-1]), -1), 1).squeeze(1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum") / logits.shape[0]
    if kind == "bce":
        labels = torch.bernoulli(torch.sigmoid(logits_d))
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / logits.shape[0]
    labels = logits_d + torch.randn_like(logits_d)
    return 0.5 * (logits - labels).square().sum() / logits.shape[0]


def _grad_matrix(layer: RecordedLayer) -> Tensor:
    weight, bias = layer.module.weight, layer.module.bias
    grad = weight.grad.reshape(weight.shape[0], -1)
    return torch.cat([grad, bias.grad[:, None]], dim=1) if bias is not None else grad


def _split(direction: Tensor, params: list[Tensor]) -> list[Tensor]:
    weight = params[0]
    pieces = [direction[:, : weight[0].numel()].reshape(weight.shape)]
    if len(params) > 1:
        pieces.append(direction[:, -1])
    return pieces


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a factor, computed in float64.

    A factor often has many zero eigenvalues (MNIST's border pixels are always
    0), and float32 eigh (MKL) then returns NaN for some batches; float64
    does not, at about twice the cost of a refresh that runs every few steps.

    Entries that round to subnormal numbers in the factor's dtype are set to 0:
    the eigenvectors of those zero eigenvalues have components of about 1e-40
    after the cast, and every product with a subnormal operand takes the CPU's
    slow path (measured on the reference autoencoder: the steps before the
    first refresh 1.4× slower, those after 1.07×). They are below the dtype's
    smallest normal number, so no product of the step can tell them from 0.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())
    eigenvalues = _flush_subnormal(eigenvalues.clamp_(min=0.0).to(matrix.dtype))
    return eigenvalues, _flush_subnormal(eigenvectors.to(matrix.dtype))


def _flush_subnormal(tensor: Tensor) -> Tensor:
    """``tensor`` with its subnormal entries (nonzero, below the dtype's smallest normal number) set to 0."""
    return tensor.masked_fill_(tensor.abs() < torch.finfo(tensor.dtype).tiny, 0.0)


def _pi(a_factor: Tensor, g_factor: Tensor) -> float:
    mean_a = a_factor.trace().item() / a_factor.shape[0]
    mean_g = g_factor.trace().item() / g_factor.shape[0]
    if mean_a <= 0 or mean_g <= 0:
        return 1.0
    return math.sqrt(mean_a / mean_g)


def _steps_taken(state: dict) -> int:
    # A checkpoint from before factor_update_freq counted factor updates, one a step: the same number.
    return state.get("steps", state.get("factor_steps", 0))


def _refresh_eigenbases(state: dict) -> None:
    state["dA"], state["QA"] = _eigh(state["A"])
    state["dG"], state["QG"] = _eigh(state["G"])
    state["pi"] = _pi(state["A"], state["G"])


def _check_hyperparameters(group: dict) -> None:
    if not group["lr"] > 0:
        raise ValueError(f"Invalid learning rate: {group['lr']}")
    if not group["damping"] > 0:
        raise ValueError(f"Invalid damping: {group['damping']}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"Invalid momentum: {group['momentum']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"Invalid weight_decay: {group['weight_decay']}")
    if not 0 <= group["factor_decay"] < 1:
        raise ValueError(f"Invalid factor_decay: {group['factor_decay']}")
    if group["kl_clip"] is not None and not group["kl_clip"] > 0:
        raise ValueError(f"Invalid kl_clip: {group['kl_clip']}; expected a positive number or None")
    freq = group["inv_update_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ValueError(f"Invalid inv_update_freq: {freq}; expected an integer ≥ 1")
    freq = group["factor_update_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ValueError(f"Invalid factor_update_freq: {freq}; expected an integer ≥ 1")
