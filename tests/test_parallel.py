"""Every parallel path of the local solves equals the reference path (SPEC §10)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import snapshot, train_steps
from torch import nn

from locoprop import LocoPropOptimizer, kernels
from locoprop.exact import lower_gram
from locoprop.gradient_checks import backprop_gradient_mismatch, reuse_tolerance
from locoprop.layers import LinearAdapter
from locoprop.local import local_grads, make_target
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
    linear_grads = kernels.linear_grads

    def counting(variant, transfer, x, *args, **kwargs):
        calls.append(x.shape[0] if x.dim() == 3 else 1)
        return linear_grads(variant, transfer, x, *args, **kwargs)

    monkeypatch.setattr(kernels, "linear_grads", counting)
    model = Mixed().double()
    opt = LocoPropOptimizer(model, variant="M", local_iters=3, units=model.units(), parallel="batched")
    F.cross_entropy(model(torch.randn(8, 1, 6, 6, dtype=torch.float64)), torch.randint(0, 5, (8,))).backward()
    opt.step()
    assert sorted(calls) == [1, 1, 1, 1, 1, 1, 3, 3]  # 2 iterations × (fc_in, shared, out and the stacked three)


@pytest.mark.parametrize("bias", [True, False])
def test_gram_form_equals_the_batch_form_of_the_s_gradient(bias):
    """C and B = θ^old C − γ·Gᵀx̃ from the backprop record give ∇ℓ_S at any θ,
    as autograd does on ℓ_S with the target â = a − γ·g written out."""
    torch.manual_seed(0)
    old = nn.Linear(6, 4, bias=bias).double()
    layer = copy.deepcopy(old)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # θ ≠ θ^old: a later local iteration
    x = torch.randn(50, 6, dtype=torch.float64)
    g = torch.randn(50, 4, dtype=torch.float64)
    gamma = 0.7
    with torch.no_grad():
        target = old(x) - gamma * g
    identity = transfer_by_name("identity")
    params = list(layer.parameters())
    reference = local_grads("S", identity, LinearAdapter(layer).forward, params, [(x, target)])
    cross = kernels.backprop_cross(x, g, has_bias=bias)
    old_bias = old.bias.detach() if bias else None
    covariance, statistic = kernels.gram_statistics(x, old.weight.detach(), old_bias, cross, gamma)
    out = [torch.empty_like(p) for p in params]
    layer_bias = layer.bias.detach() if bias else None
    gram = kernels.gram_grads(covariance, statistic, layer.weight.detach(), layer_bias, out)
    direct = kernels.linear_grads("S", identity, x, target, layer.weight.detach(), layer_bias)
    for r, gr, d in zip(reference, gram, direct, strict=True):
        torch.testing.assert_close(gr, r)
        torch.testing.assert_close(d, r)


@pytest.mark.parametrize("variant, transfer", [("M", "tanh"), ("M", "softmax"), ("S", "relu")])
def test_first_iteration_gradient_from_the_backprop_record_equals_autograd(variant, transfer):
    """At θ^old the local gradient is γ·[gᵀx, Σg]: no forward matmul needed."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).double()
    x = torch.randn(30, 7, dtype=torch.float64)
    g = torch.randn(30, 5, dtype=torch.float64)
    gamma = 0.7
    f = transfer_by_name(transfer)
    with torch.no_grad():
        target = make_target(variant, f, layer(x), g, gamma)
    reference = local_grads(variant, f, LinearAdapter(layer).forward, [layer.weight, layer.bias], [(x, target)])
    out = [torch.empty_like(layer.weight), torch.empty_like(layer.bias)]
    for fast_grad, ref in zip(kernels.backprop_grads(x, g, gamma, out), reference, strict=True):
        torch.testing.assert_close(fast_grad, ref)


def test_backprop_gradient_check_accepts_rounding_and_rejects_real_differences():
    torch.manual_seed(0)
    x, g = torch.randn(500, 40), torch.randn(500, 30)
    exact = [g.T @ x, g.sum(0)]
    assert backprop_gradient_mismatch(exact, x, g) <= reuse_tolerance(torch.float32)
    clipped = [0.999 * t for t in exact]
    assert backprop_gradient_mismatch(clipped, x, g) > reuse_tolerance(torch.float32)
    one_entry = [exact[0].clone(), exact[1]]
    one_entry[0][3, 7] += 0.05 * exact[0].norm()
    assert backprop_gradient_mismatch(one_entry, x, g) > reuse_tolerance(torch.float32)
    assert backprop_gradient_mismatch([exact[0], exact[1] + 1.0], x, g) > reuse_tolerance(torch.float32)
    assert backprop_gradient_mismatch([exact[0], None], x, g) == float("inf")
    assert reuse_tolerance(torch.bfloat16) == 0.0


def _changed_gradients(model):
    """After backward(): clip, as users do, and add weight decay to one weight by hand."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    model.fc_in.weight.grad.add_(model.fc_in.weight.detach(), alpha=0.3)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_batched_path_uses_the_recorded_gradients_when_grads_were_changed(variant):
    """The fast first iteration reuses p.grad only where it is still the
    backprop gradient; clipped or changed gradients fall back to γ·gᵀx."""
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
    # On several ranks by the numbers sent: C's lower triangle and Gᵀx̃ once, against K gradients.
    assert not kernels.gram_is_cheaper(rows=125, d_in=784, d_out=1000, local_iters=10)  # few rows: FLOPs say batch
    assert kernels.gram_is_cheaper(rows=125, d_in=784, d_out=1000, local_iters=10, ranks=2)  # 1.1M < 7.9M numbers
    assert not kernels.gram_is_cheaper(rows=125, d_in=1000, d_out=30, local_iters=10, ranks=2)  # 0.53M > 0.30M


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
