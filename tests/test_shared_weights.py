"""What the hooks record is what the step solves when a weight has several
uses: tied between units, shared with a module outside every unit, or used
again through a function that no unit records.

With one local SGD iteration, a LocoProp step is the backprop SGD step at
lr·γ (SPEC §2); the expected parameters come from autograd on a copy of the
model, never from locoprop. Local solves of several iterations are checked
against the summed local objectives written out with autograd here.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CLOSE,
    ETA,
    GAMMA,
    PARALLEL_PATHS,
    assert_same_params,
    backprop_sgd_step,
    classification_loss,
    locoprop_trained,
    one_locoprop_sgd_step,
    snapshot,
)
from torch import nn

from locoprop import LocoPropOptimizer


# -------------------------------------------------------------------- tied weights
class TiedLanguageModel(nn.Module):
    """An embedding tied to the output layer: a unit and a module outside
    every unit share one weight."""

    def __init__(self, vocab=7, width=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.embed.weight

    def forward(self, ids, use_head=True):
        h = torch.tanh(self.hidden(self.embed(ids)))
        return self.head(h) if use_head else h

    def units(self):
        return [(self.hidden, "tanh"), (self.head, "softmax")]


class TiedLayers(nn.Module):
    """Two linear units sharing a weight; without a bias, the second has no
    other parameter (an empty parameter group); with one, the two are solved
    stacked (one shape)."""

    def __init__(self, width=5, second_bias=False):
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width, bias=second_bias)
        self.second.weight = self.first.weight
        self.out = nn.Linear(width, 3)

    def forward(self, x, use_second=True):
        h = torch.tanh(self.first(x))
        return self.out(torch.tanh(self.second(h)) if use_second else h)

    def units(self):
        return [(self.first, "tanh"), (self.second, "tanh"), (self.out, "softmax")]


def _backprop_sgd_step_some_unused(model, loss_fn, lr):
    """As helpers' ``backprop_sgd_step``, leaving parameters the loss does not use alone."""
    clone = copy.deepcopy(model)
    params = list(clone.parameters())
    grads = torch.autograd.grad(loss_fn(clone), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)
    return snapshot(clone)


def _language_model_data():
    ids = torch.randint(0, 7, (12,))
    return ids, torch.randint(0, 7, (12,))


@pytest.mark.parametrize("parallel", PARALLEL_PATHS)
@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("use_all", [True, False], ids=["all-uses", "one-use"])
def test_embedding_tied_to_the_output_layer_gives_the_backprop_step(variant, parallel, use_all):
    model = TiedLanguageModel().double()
    ids, labels = _language_model_data()

    def loss_fn(m):  # without the head, the tied weight has only its embedding use
        return F.cross_entropy(m(ids), labels) if use_all else m(ids, use_head=False).square().sum()

    expected = _backprop_sgd_step_some_unused(model, loss_fn, ETA * GAMMA)
    opt = one_locoprop_sgd_step(model, loss_fn, variant=variant, units=model.units(), parallel=parallel)
    assert_same_params(model, expected, **CLOSE)
    assert opt.parameter_roles()["embed.weight"] == "head + backprop"


@pytest.mark.parametrize("parallel", PARALLEL_PATHS)
@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("use_all", [True, False], ids=["all-uses", "one-use"])
def test_two_tied_linear_units_give_the_backprop_step(variant, parallel, use_all):
    model = TiedLayers().double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))

    def loss_fn(m):
        return F.cross_entropy(m(x, use_second=use_all), y)

    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    opt = one_locoprop_sgd_step(model, loss_fn, variant=variant, units=model.units(), parallel=parallel)
    assert_same_params(model, expected, **CLOSE)
    assert opt.parameter_roles() == {
        "first.weight": "first + second",
        "first.bias": "first",
        "out.weight": "out",
        "out.bias": "out",
    }


def _local_term(variant, transfer, a, target):
    """One unit's local objective without the proximal term (SPEC §2)."""
    if variant == "S":
        return 0.5 * (a - target).square().sum()
    integral = torch.logsumexp(a, 1).sum() if transfer == "softmax" else torch.log(torch.cosh(a)).sum()
    return integral - (target * a).sum()


def _targets(variant, transfers, preactivations, loss):
    grads = torch.autograd.grad(loss, preactivations)
    targets = []
    for transfer, a, g in zip(transfers, preactivations, grads):
        output = a if variant == "S" else (torch.softmax(a, 1) if transfer == "softmax" else torch.tanh(a))
        targets.append((output - GAMMA * g).detach())
    return targets


def _assert_one_step_gives(model, expected, inputs, labels, **kwargs):
    """One LocoProp step (inner SGD at η, γ, cross-entropy) of a copy of ``model``
    on each solve path gives the ``expected`` parameters."""
    for parallel in PARALLEL_PATHS:
        trained = copy.deepcopy(model)
        opt = LocoPropOptimizer(
            trained, lr=ETA, activation_lr=GAMMA, inner="sgd", units=trained.units(), parallel=parallel, **kwargs
        )
        F.cross_entropy(trained(inputs), labels).backward()
        opt.step()
        for p, q in zip(trained.parameters(), expected):
            torch.testing.assert_close(p.detach(), q, **CLOSE, msg=parallel)


def _sgd_on(objective, params, local_iters):
    """K plain SGD steps at η_t = η·max(1 − t/K, 0.25) (the linear-floor schedule)."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    for t in range(local_iters):
        grads = torch.autograd.grad(objective(*params), params)
        lr = ETA * max(1 - t / local_iters, 0.25)
        params = [(p - lr * g).detach().requires_grad_(True) for p, g in zip(params, grads)]
    return [p.detach() for p in params]


@pytest.mark.parametrize("second_bias, prox", [(False, 0.0), (True, 0.5)])
@pytest.mark.parametrize("variant", ["M", "S"])
def test_tied_linear_units_minimise_the_sum_of_their_local_objectives(variant, second_bias, prox):
    """Each unit's objective has its own proximal term: a tied weight's sum has two."""
    model = TiedLayers(second_bias=second_bias).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    old = [p.detach().clone() for p in model.parameters()]
    weight, bias, *second_b, out_weight, out_bias = (p.requires_grad_(True) for p in copy.deepcopy(old))
    a1 = F.linear(x, weight, bias)
    h1 = torch.tanh(a1)
    a2 = F.linear(h1, weight, *second_b)
    h2 = torch.tanh(a2)
    a3 = F.linear(h2, out_weight, out_bias)
    transfers = ["tanh", "tanh", "softmax"]
    targets = _targets(variant, transfers, [a1, a2, a3], F.cross_entropy(a3, y))
    h1, h2 = h1.detach(), h2.detach()

    def objective(w, b, *rest):
        *b2, w_out, b_out = rest
        outputs = [F.linear(x, w, b), F.linear(h1, w, *b2), F.linear(h2, w_out, b_out)]
        terms = sum(_local_term(variant, f, a, t) for f, a, t in zip(transfers, outputs, targets))
        unit_params = [(w, b), (w, *b2), (w_out, b_out)]
        old_params = [(old[0], old[1]), (old[0], *old[2:-2]), (old[-2], old[-1])]
        displacement = sum((p - q).square().sum() for ps, qs in zip(unit_params, old_params) for p, q in zip(ps, qs))
        return terms + 0.5 * prox * displacement

    expected = _sgd_on(objective, [weight, bias, *second_b, out_weight, out_bias], local_iters=4)
    _assert_one_step_gives(model, expected, x, y, variant=variant, local_iters=4, prox=prox)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_a_weight_tied_to_an_embedding_adds_the_linear_objective_of_that_use(variant):
    """ℓ_hidden + ℓ_head + γ⟨∂L/∂E, W⟩, where ∂L/∂E is the gradient of the
    embedding's use of the shared weight W alone."""
    model = TiedLanguageModel().double()
    ids, labels = _language_model_data()
    table, hidden_w, hidden_b, head_b = (p.detach().clone().requires_grad_(True) for p in model.parameters())
    embedding_use = table.detach().clone().requires_grad_(True)  # the same values, a separate use
    x = F.embedding(ids, embedding_use)
    a1 = F.linear(x, hidden_w, hidden_b)
    h = torch.tanh(a1)
    a2 = F.linear(h, table, head_b)
    loss = F.cross_entropy(a2, labels)
    (embedding_share,) = torch.autograd.grad(loss, [embedding_use], retain_graph=True)
    transfers = ["tanh", "softmax"]
    targets = _targets(variant, transfers, [a1, a2], loss)
    x, h = x.detach(), h.detach()

    def objective(w_table, w_hidden, b_hidden, b_head):
        outputs = [F.linear(x, w_hidden, b_hidden), F.linear(h, w_table, b_head)]
        terms = sum(_local_term(variant, f, a, t) for f, a, t in zip(transfers, outputs, targets))
        return terms + GAMMA * (embedding_share * w_table).sum()

    expected = _sgd_on(objective, [table, hidden_w, hidden_b, head_b], local_iters=3)
    _assert_one_step_gives(model, expected, ids, labels, variant=variant, local_iters=3)


class _ScaledEmbedding(nn.Embedding):
    """An nn.Embedding subclass (Hugging Face's BartScaledWordEmbedding)."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class _ScaledEmbeddingLM(nn.Module):
    """BART's layout: a shared table, the encoder's scaled embedding and the head all hold one weight."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(16, 8)
        self.embed_tokens = _ScaledEmbedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.embed_tokens.weight = self.lm_head.weight = self.shared.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed_tokens(ids))))


def test_a_head_tied_to_an_embedding_subclass_is_the_heads_unit():
    """The head's map of a weight tied to an nn.Embedding subclass is the head's unit: the subclass's module is
    an embedding, whose unit takes lookups only (the head's map was credited to the subclass's unit, which
    showed as a linear unit, and the head as unseen)."""
    model = _ScaledEmbeddingLM()
    opt = LocoPropOptimizer(model)
    ids = torch.randint(0, 16, (4, 5))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    kinds = {row.unit: row.kind for row in opt.describe().rows}
    assert (kinds["shared"], kinds["body"], kinds["lm_head"]) == ("embedding", "linear", "linear")
    assert kinds["embed_tokens"] != "linear"


class _HeadFirstSubclassLM(nn.Module):
    """A head of an nn.Linear subclass, registered before the embedding it is tied to."""

    class Head(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.head = self.Head(8, 16, bias=False)
        self.embed = nn.Embedding(16, 8)
        self.embed.weight = self.head.weight
        self.mid = nn.Linear(8, 8)

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def test_a_linear_subclass_head_tied_to_an_embedding_does_not_take_its_lookups():
    """The lookup is the embedding's map, the head's is linear (the subclass took the lookup as its own map and
    lost the output activation)."""
    model = _HeadFirstSubclassLM()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    ids = torch.randint(0, 16, (4, 5))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    rows = {row.unit: (row.kind, row.transfer) for row in opt.describe().rows}
    assert rows["head"] == ("linear", "softmax") and rows["embed"] == ("embedding", "identity")


def test_exact_solve_refuses_weights_shared_by_units_naming_them():
    with pytest.raises(ValueError, match=r"'first.weight' is shared by unit 'first' and unit 'second'"):
        LocoPropOptimizer(TiedLayers(), variant="S", solve="exact", prox=1.0)


def _assert_exact_step_minimises(model, loss_fn, units, prox=0.5):
    """After one exact S step, ∇ of ½Σ‖layer_Δθ(x)‖² + γ·⟨G, Δθ⟩ + (λ/2)‖Δθ‖², written out here with
    autograd, is zero for every unit: G the unit parameters' whole gradient (every use), x the recorded input."""
    inputs = {}

    def record(module, args, output):
        inputs.setdefault(module, args[0].detach())

    handles = [m.register_forward_hook(record) for m, _ in units]
    opt = LocoPropOptimizer(model, variant="S", solve="exact", prox=prox, activation_lr=GAMMA, units=units)
    old = {m: [p.detach().clone() for p in m.parameters(recurse=False)] for m, _ in units}
    loss_fn(model).backward()
    grads = {m: [p.grad.clone() for p in m.parameters(recurse=False)] for m, _ in units}
    for handle in handles:
        handle.remove()
    opt.step()
    for m, _ in units:
        delta = [(p.detach() - q).requires_grad_(True) for p, q in zip(m.parameters(recurse=False), old[m])]
        objective = 0.5 * F.linear(inputs[m], *delta).square().sum()
        objective = objective + sum(GAMMA * (g * d).sum() + 0.5 * prox * d.square().sum()
                                    for g, d in zip(grads[m], delta))  # fmt: skip
        for gradient in torch.autograd.grad(objective, delta):
            assert gradient.abs().max() < 1e-9, m


def test_exact_solve_of_a_weight_tied_to_an_embedding_minimises_with_the_whole_gradient():
    model = TiedLanguageModel().double()
    ids, labels = _language_model_data()
    _assert_exact_step_minimises(model, lambda m: F.cross_entropy(m(ids), labels), model.units())


# ------------------------------------------------------------ uses through a function
class FunctionalEmbedding(nn.Module):
    """The output layer's weight is also the embedding table, read with
    ``F.embedding``: a use of a unit parameter that no module makes."""

    def __init__(self, vocab=7, width=5):
        super().__init__()
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        h = F.embedding(ids, self.head.weight)
        return self.head(h + torch.tanh(self.hidden(h)))

    def units(self):
        return [(self.hidden, "tanh"), (self.head, "softmax")]


class FunctionalTranspose(nn.Module):
    """A unit's weight used again, transposed, through ``F.linear``, with its bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.c = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(h) + F.linear(h, self.a.weight.t())[:, :3] + self.a.bias[:3]

    def units(self):
        return [(self.a, "tanh"), (self.c, "softmax")]


class FunctionalConv(nn.Module):
    """A convolution's kernel used a second time through ``F.conv2d``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.out = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.out(F.conv2d(h, self.conv.weight, padding=1).flatten(1))

    def units(self):
        return [(self.conv, "tanh"), (self.out, "softmax")]


def _functional_cases():
    ids, labels = _language_model_data()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    images = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    return {
        "embedding": (FunctionalEmbedding, lambda m: F.cross_entropy(m(ids), labels)),
        "transpose": (FunctionalTranspose, lambda m: F.cross_entropy(m(x), y)),
        "conv": (FunctionalConv, lambda m: F.cross_entropy(m(images), y[:4])),
    }


@pytest.mark.parametrize("parallel", PARALLEL_PATHS)
@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("case", ["embedding", "transpose", "conv"])
def test_a_unit_weight_also_used_through_a_function_gives_the_backprop_step(case, variant, parallel):
    """The use that no unit records joins the local objective as
    γ·⟨∇L of that use, θ⟩, so the step is still the backprop step."""
    model_class, loss_fn = _functional_cases()[case]
    model = model_class().double()
    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    one_locoprop_sgd_step(model, loss_fn, variant=variant, units=model.units(), parallel=parallel)
    assert_same_params(model, expected, **CLOSE)


@pytest.mark.parametrize("repeat", ["accumulated", "retain_graph"])
def test_a_weight_used_through_a_function_over_several_backward_passes_gives_the_backprop_step(repeat):
    """Two backward passes before one step (of two batches, or of one graph
    kept with retain_graph) add up in the unrecorded use as in ``.grad``."""
    model_class, loss_fn = _functional_cases()["embedding"]
    model = model_class().double()
    expected = backprop_sgd_step(model, lambda m: 2 * loss_fn(m), ETA * GAMMA)
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd", units=model.units())
    if repeat == "accumulated":
        loss_fn(model).backward()
        loss_fn(model).backward()
    else:
        loss = loss_fn(model)
        loss.backward(retain_graph=True)
        loss.backward()
    opt.step()
    assert_same_params(model, expected, **CLOSE)


def test_exact_solve_of_a_weight_used_through_a_function_minimises_with_the_whole_gradient():
    model = FunctionalTranspose().double()
    _, loss_fn = _functional_cases()["transpose"]
    _assert_exact_step_minimises(model, loss_fn, model.units())


def test_remove_hooks_removes_the_recording_hooks_and_they_keep_no_optimizer_alive():
    model = FunctionalEmbedding()
    opt = LocoPropOptimizer(model, units=model.units())
    assert model.head._forward_hooks
    opt.remove_hooks()
    assert not model.head._forward_hooks and not model.hidden._forward_hooks
    opt = LocoPropOptimizer(model, units=model.units())
    collected = weakref.ref(opt)
    del opt
    gc.collect()
    assert collected() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
@pytest.mark.parametrize("variant", ["M", "S"])
def test_streams_path_handles_tied_weights_and_in_place_activations(variant):
    class Model(TiedLayers):
        def forward(self, x, use_second=True):
            return self.out(torch.relu_(self.second(torch.relu_(self.first(x)))))

    model = Model(second_bias=True).double().cuda()
    x, y = torch.randn(9, 5, dtype=torch.float64, device="cuda"), torch.randint(0, 3, (9,), device="cuda")
    results = {}
    for parallel in ["none", "streams"]:
        trained = copy.deepcopy(model)
        units = [(trained.first, "relu"), (trained.second, "relu"), (trained.out, "softmax")]
        kwargs = dict(variant=variant, local_iters=3, inner="adam", units=units, parallel=parallel)
        results[parallel] = locoprop_trained(trained, classification_loss(x, y), **kwargs)
    for name in results["none"]:
        torch.testing.assert_close(results["streams"][name], results["none"][name], rtol=1e-9, atol=1e-11, msg=name)
