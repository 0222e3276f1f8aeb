"""Every parallel path of the local solves equals the reference path (SPEC §10)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import snapshot, train_steps
from torch import nn

from locoprop import LocoPropOptimizer, kernels, local
from locoprop.exact import lower_gram
from locoprop.layers import LinearAdapter
from locoprop.transfer import transfer_by_name


class Mixed(nn.Module):
    """Conv2d units, three linear units of one shape (batched together), a
    shared layer used twice, and a LayerNorm outside every unit."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc_in = nn.Linear(4 * 2 * 2, 12)
        self.norm = nn.LayerNorm(12)
        self.same = nn.ModuleList([nn.Linear(12, 12) for _ in range(3)])
        self.shared = nn.Linear(12, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h)).flatten(1)
        h = self.norm(torch.tanh(self.fc_in(h)))
        for layer in self.same:
            h = torch.tanh(layer(h))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.out(h)

    def units(self):
        return [(self.conv1, "relu"), (self.conv2, "tanh"), (self.fc_in, "tanh"),
                *[(m, "tanh") for m in self.same], (self.shared, "tanh"), (self.out, "softmax")]  # fmt: skip


def _train(model, mode, variant, inner, prox, steps=4):
    opt = LocoPropOptimizer(
        model, variant=variant, lr=1e-3, activation_lr=2.0, local_iters=5, inner=inner, prox=prox,
        units=model.units(), parallel=mode,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(24, 1, 6, 6, dtype=torch.float64, generator=generator),
            torch.randint(0, 5, (24,), generator=generator),
        )
        for _ in range(steps)
    ]
    train_steps(model, opt, batches, lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]))
    return snapshot(model), opt


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("inner, prox", [("rmsprop-tf", 0.0), ("adam", 0.5), ("momentum", 0.0)])
def test_batched_path_equals_reference_path(variant, inner, prox):
    torch.manual_seed(0)
    model = Mixed().double()
    reference, _ = _train(copy.deepcopy(model), "none", variant, inner, prox)
    batched, _ = _train(copy.deepcopy(model), "batched", variant, inner, prox)
    for name in reference:
        torch.testing.assert_close(batched[name], reference[name], rtol=1e-9, atol=1e-11, msg=name)


def test_batched_path_stacks_linear_units_of_equal_shape_into_one_kernel(monkeypatch):
    """Each local iteration after the first runs one batched kernel for the three
    `same` layers and one kernel each for fc_in, shared and out (the convolutions
    take the reference path)."""
    calls = []
    divergence_grads = kernels.divergence_grads

    def counting(variant, transfer, x, *args, **kwargs):
        calls.append(x.shape[0] if x.dim() == 3 else 1)
        return divergence_grads(variant, transfer, x, *args, **kwargs)

    monkeypatch.setattr(kernels, "divergence_grads", counting)
    model = Mixed().double()
    opt = LocoPropOptimizer(model, variant="M", local_iters=3, units=model.units(), parallel="batched")
    F.cross_entropy(model(torch.randn(8, 1, 6, 6, dtype=torch.float64)), torch.randint(0, 5, (8,))).backward()
    opt.step()
    assert sorted(calls) == [1, 1, 1, 1, 1, 1, 3, 3]  # 2 iterations × (fc_in, shared, out and the stacked three)


@pytest.mark.parametrize("bias", [True, False])
def test_gram_form_equals_the_batch_form_of_the_s_gradient(bias):
    """C = x̃ᵀx̃ gives ∇ of ½Σ‖Δa‖² + γ·⟨G, Δθ⟩ at any Δθ as Δθ·C + γ·G, as the batch kernel and autograd do."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias).double()
    delta = [0.3 * torch.randn_like(p) for p in layer.parameters()]  # a later local iteration
    x = torch.randn(50, 6, dtype=torch.float64)
    linear_term = [torch.randn_like(d) for d in delta]
    gamma = 0.7
    identity = transfer_by_name("identity")
    reference = local.divergence_grads("S", identity, LinearAdapter(layer).forward, delta, [(x, ())])
    torch._foreach_add_(reference, linear_term, alpha=gamma)
    covariance = kernels.gram_covariance(x, has_bias=bias)
    delta_bias = delta[1] if bias else None
    out = [torch.empty_like(d) for d in delta]
    gram = kernels.gram_grads(covariance, delta[0], delta_bias, linear_term, gamma, out)
    direct = kernels.divergence_grads("S", identity, x, (), delta[0], delta_bias, None, linear_term, gamma)
    for r, gr, d in zip(reference, gram, direct, strict=True):
        torch.testing.assert_close(gr, r)
        torch.testing.assert_close(d, r)


@pytest.mark.parametrize("transfer", ["tanh", "sigmoid", "relu", "softmax"])
def test_the_batch_kernel_of_m_equals_autograd_on_the_divergence(transfer):
    """Σ Jᵀr with r = f(a^old + Δa) − f(a^old), by the kernel and by autograd on Σ F(a) − f(a^old)·a."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).double()
    x = torch.randn(30, 7, dtype=torch.float64)
    f = transfer_by_name(transfer)
    delta = [0.3 * torch.randn_like(p) for p in layer.parameters()]
    with torch.no_grad():
        a_old = layer(x)
    got = kernels.divergence_grads("M", f, x, f.anchor_at(a_old), *delta)
    leaves = [d.clone().requires_grad_(True) for d in delta]
    a = a_old + F.linear(x, *leaves)
    (f.integral(a) - (f.fn(a_old) * a).sum()).backward()
    for g, leaf in zip(got, leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad)


def _changed_gradients(model):
    """After backward(): clip, as users do, and add weight decay to one weight by hand."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    model.fc_in.weight.grad.add_(model.fc_in.weight.detach(), alpha=0.3)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_batched_path_follows_changed_gradients_as_the_reference_does(variant):
    """Clipped gradients, and a decay added by hand to one weight: both paths solve the same problems."""
    torch.manual_seed(0)
    model = Mixed().double()
    results = {}
    for mode in ("none", "batched"):
        m = copy.deepcopy(model)
        opt = LocoPropOptimizer(m, variant=variant, lr=1e-3, activation_lr=2.0, local_iters=3, inner="sgd",
                                units=m.units(), parallel=mode)  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(torch.randn(24, 1, 6, 6, dtype=torch.float64, generator=generator)),
                            torch.randint(0, 5, (24,), generator=generator)).backward()  # fmt: skip
            _changed_gradients(m)
            opt.step()
        results[mode] = snapshot(m)
    for name in results["none"]:
        torch.testing.assert_close(results["batched"][name], results["none"][name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("width", [5, 200, 301, 1030])
def test_lower_gram_fills_the_lower_triangle_that_cholesky_reads(width):
    torch.manual_seed(0)
    x = torch.randn(width + 20, width, dtype=torch.float64)
    out = torch.full((width, width), float("nan"), dtype=torch.float64)
    lower_gram(x, out=out)
    full = x.T @ x
    lower = torch.ones(width, width, dtype=torch.bool).tril()
    torch.testing.assert_close(out[lower], full[lower])
    # Whatever lies above the diagonal (here NaN where blocks leave it unset) is not read.
    torch.testing.assert_close(torch.linalg.cholesky(out), torch.linalg.cholesky(full))


def test_gram_form_is_chosen_by_flop_count():
    assert kernels.gram_is_cheaper(rows=1000, d_in=250, d_out=30, local_iters=10)
    assert not kernels.gram_is_cheaper(rows=16, d_in=1000, d_out=500, local_iters=10)
    assert not kernels.gram_is_cheaper(rows=1000, d_in=100, d_out=100, local_iters=1)  # nothing to amortise C over
    # On several ranks by the numbers sent: C's lower triangle once, against K − 1 gradients.
    assert not kernels.gram_is_cheaper(rows=125, d_in=784, d_out=1000, local_iters=10)  # few rows: FLOPs say batch
    assert kernels.gram_is_cheaper(rows=125, d_in=784, d_out=1000, local_iters=10, ranks=2)  # 0.31M < 7.1M numbers
    assert not kernels.gram_is_cheaper(rows=125, d_in=1000, d_out=30, local_iters=10, ranks=2)  # 0.50M > 0.27M


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
@pytest.mark.parametrize("variant", ["M", "S"])
def test_streams_path_equals_reference_path_on_cuda(variant):
    torch.manual_seed(0)
    model = Mixed().double().cuda()

    def run(mode):
        m = copy.deepcopy(model)
        opt = LocoPropOptimizer(m, variant=variant, lr=1e-3, activation_lr=2.0, local_iters=5, units=m.units(),
                                parallel=mode)  # fmt: skip
        generator = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(3):
            x = torch.randn(24, 1, 6, 6, dtype=torch.float64, device="cuda", generator=generator)
            y = torch.randint(0, 5, (24,), device="cuda", generator=generator)
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return snapshot(m)

    reference, streams = run("none"), run("streams")
    for name in reference:
        torch.testing.assert_close(streams[name], reference[name], rtol=1e-9, atol=1e-11)


def test_streams_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="'streams' needs a CUDA device"):
        LocoPropOptimizer(nn.Linear(3, 2), parallel="streams")
    with pytest.raises(ValueError, match="Invalid parallel: 'threads'"):
        LocoPropOptimizer(nn.Linear(3, 2), parallel="threads")
