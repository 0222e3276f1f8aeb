"""compile=True: the linear kernels' residual in one compiled pass (locoprop.fused).

The kernel is checked against the change computed in float64 from its definition, f(a + Δa) − f(a), and the
optimizer's compiled step against its float64 step (as tests/test_low_precision.py does for bfloat16).
"""

import copy

import pytest
import torch
from helpers import bce_sum_mean, relative_errors
from torch import nn

from locoprop import LocoPropOptimizer, fused
from locoprop.transfer import leaky_relu, softplus, transfer_by_name

TRANSFERS = {
    "tanh": lambda: transfer_by_name("tanh"),
    "sigmoid": lambda: transfer_by_name("sigmoid"),
    "relu": lambda: transfer_by_name("relu"),
    "leaky_relu": lambda: leaky_relu(0.2),
    "identity": lambda: transfer_by_name("identity"),
    "softplus": lambda: softplus(2.0),
}


def _points(lead=()):
    """Pre-activations a and moves Δa over many scales: saturated units, moves that cross zero and moves far
    below a's rounding (where f(a + Δa) − f(a) computed directly would cancel)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(*lead, 64, 48, generator=generator, dtype=torch.float64) * 4
    scales = torch.logspace(-7, 1, 48, dtype=torch.float64)
    delta = torch.randn(*lead, 64, 48, generator=generator, dtype=torch.float64) * scales
    return a, delta


@pytest.mark.parametrize("name", TRANSFERS)
@pytest.mark.parametrize("stacked", [False, True])
def test_the_float32_kernel_gives_the_change_and_its_row_sum(name, stacked):
    """In the parameters' dtype: r to a few float32 ulp of |r| + |Δa| (these f are 1-Lipschitz; the eager
    change's 1 − y·tanh(a + Δa) rounds as backprop's 1 − y² does, to ulp(1) where f saturates), and Σr; the
    piecewise-linear changes have no kernel there (eager is as fast)."""
    transfer = TRANSFERS[name]()
    kernel = fused.residual_kernel("M", transfer, low_precision=False, elements=1 << 20)
    if name in ("relu", "leaky_relu", "identity", "softplus"):
        assert kernel is None
        return
    a, delta = _points((3,) if stacked else ())
    expected = transfer.fn(a + delta) - transfer.fn(a)
    a32, delta32 = a.float(), delta.float()
    r = delta32.clone()
    row_sum = kernel(r, None, transfer.anchor_at(a32))  # (r written over the product)
    exact = transfer.fn(a32.double() + delta32.double()) - transfer.fn(a32.double())  # (of the rounded inputs)
    assert r.dtype == torch.float32 and row_sum.dtype == torch.float32
    error = (r.double() - exact).abs()
    assert (error <= 8 * 2**-24 * (exact.abs() + delta32.double().abs())).all(), error.max()
    assert torch.allclose(row_sum.double(), exact.sum(-2), rtol=1e-5, atol=1e-6)
    assert torch.allclose(r.double(), expected, rtol=1e-3, atol=1e-6)  # (and near the float64 change itself)
    eager = transfer.change_from(transfer.anchor_at(a32), delta32.clone())
    assert torch.allclose(r, eager, rtol=1e-5, atol=1e-7)
    # With a bias: the kernel adds Δb (the shift) to the product itself.
    bias = torch.linspace(-1e-3, 1e-3, delta.shape[-1])
    shifted = (delta32 - bias).clone()
    kernel(shifted, bias, transfer.anchor_at(a32))
    assert torch.allclose(shifted, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", TRANSFERS)
@pytest.mark.parametrize("variant", ["M", "S"])
def test_the_low_precision_kernel_adds_the_shift_and_rounds_the_change(name, variant):
    """In low precision the kernel takes the rounded product and the shift v: Δa = product + v, r rounded to
    bfloat16 (2⁻⁹ of each number), Σr of the unrounded r in float32."""
    transfer = TRANSFERS[name]()
    kernel = fused.residual_kernel(variant, transfer, low_precision=True, elements=1 << 20)
    if name == "softplus" and variant == "M":
        assert kernel is None
        return
    a, delta = _points()
    product = delta.to(torch.bfloat16)
    shift = torch.linspace(-1e-3, 1e-3, delta.shape[-1], dtype=torch.float32)
    moved = product.double() + shift.double()
    if variant == "S":
        expected = moved
        anchor = ()
    else:
        expected = transfer.fn(a.float().double() + moved) - transfer.fn(a.float().double())
        anchor = transfer.anchor_at(a.float())
    r = product.clone()
    row_sum = kernel(r, shift, anchor)  # (r written over the product, rounded)
    assert r.dtype == torch.bfloat16 and row_sum.dtype == torch.float32
    assert (r.double() - expected).abs().le(2**-8 * expected.abs() + 1e-6).all()
    assert torch.allclose(row_sum.double(), expected.sum(-2), rtol=1e-5, atol=1e-6)


def test_softplus_the_softmax_a_transfer_without_a_change_and_small_units_keep_the_eager_change():
    """Softplus's and the softmax's changes take expm1, which inductor's CPU code computes as exp(x) − 1; a unit
    of fewer than MIN_ELEMENTS outputs costs less eagerly than a compiled call's dispatch."""
    many = 1 << 20
    assert fused.residual_kernel("M", softplus(), low_precision=True, elements=many) is None
    assert fused.residual_kernel("M", transfer_by_name("softmax"), low_precision=True, elements=many) is None
    assert fused.residual_kernel("M", leaky_relu(2.0), low_precision=True, elements=many) is None  # (α > 1)
    # S has one kernel, the identity's, whatever the transfer function.
    assert fused.residual_kernel("S", transfer_by_name("softmax"), low_precision=True, elements=many) is not None
    tanh = transfer_by_name("tanh")
    assert fused.residual_kernel("M", tanh, low_precision=True, elements=fused.MIN_ELEMENTS - 1) is None
    assert fused.residual_kernel("M", tanh, low_precision=True, elements=fused.MIN_ELEMENTS) is not None


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "relu", "identity"])
@pytest.mark.parametrize("low_precision", [False, True])
def test_the_residual_compiles_to_one_graph(name, low_precision):
    """No graph break: the whole residual (cast, shift, change, rounding, Σr) is one compiled function."""
    transfer = TRANSFERS[name]()
    a, delta = _points()
    anchor = transfer.anchor_at(a.float())
    values, shift = (delta.to(torch.bfloat16), torch.zeros(48)) if low_precision else (delta.float(), None)
    explained = torch._dynamo.explain(fused._residual_of(transfer.change))(values, shift, *anchor)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("stacked", [False, True])
def test_the_low_precision_bias_gradient_sums_the_unrounded_residual(stacked):
    """∇b = Σr of the residual before its rounding to bfloat16 (which only rᵀx takes). With rows and moves of a
    few bits, centred rows of mean 0 and one row per column, every bfloat16 product is exact, so Δa is, and ∇b
    matches float64 to float32's accuracy; a sum of the rounded r would be 2⁻⁹ of each term off."""
    from locoprop import kernels

    generator = torch.Generator().manual_seed(4)
    lead = (2,) if stacked else ()
    half = torch.randint(-2, 3, (*lead, 32, 6), generator=generator, dtype=torch.float64)
    x = torch.cat([half, -half], dim=-2)  # (column means exactly 0: centring changes nothing)
    delta_w = torch.randint(-1, 2, (*lead, 40, 6), generator=generator, dtype=torch.float64) * 2**-6
    delta_b = torch.randint(-1, 2, (*lead, 40), generator=generator, dtype=torch.float64) * 2**-7
    a_old = torch.randn(*lead, 64, 40, generator=generator, dtype=torch.float64)
    tanh = transfer_by_name("tanh")
    expected = kernels.divergence_grads("M", tanh, x, tanh.anchor_at(a_old), delta_w, delta_b)[1]
    rows = kernels.low_precision_rows(x.float(), torch.bfloat16)
    kernel = fused.residual_kernel("M", tanh, low_precision=True, elements=1 << 20)
    out = [torch.empty_like(delta_w.float()), torch.empty_like(delta_b.float())]
    got = kernels.low_precision_divergence_grads(
        "M", tanh, rows, tanh.anchor_at(a_old.float()), delta_w.float(), delta_b.float(),
        torch.empty(*lead, 64, 40, dtype=torch.bfloat16), None, kernels.low_precision_buffers(rows, delta_w.float()),
        out, residual_kernel=kernel)[1]  # fmt: skip
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-6


def _model(activation: nn.Module) -> nn.Module:
    """Two hidden units of one shape (stacked into one batched kernel) and three of their own shapes, one of them
    without a bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), copy.deepcopy(activation), nn.Linear(24, 24), copy.deepcopy(activation),
                         nn.Linear(24, 8), nn.Linear(8, 24, bias=False), copy.deepcopy(activation), nn.Linear(24, 24),
                         copy.deepcopy(activation), nn.Linear(24, 40))  # fmt: skip


def _step(model, x, **kwargs) -> list[torch.Tensor]:
    opt = LocoPropOptimizer(model, lr=1e-3, local_iters=5, inner="rmsprop-tf", output_activation="sigmoid",
                            activation_lr=1.0, parallel="batched", **kwargs)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    bce_sum_mean(model(x), x).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("activation", [nn.Tanh(), nn.ReLU(), nn.Softplus()], ids=["tanh", "relu", "softplus"])
@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("local_dtype", [None, "bfloat16"])
def test_a_compiled_step_is_the_float64_step(activation, variant, local_dtype, monkeypatch):
    """compile=True takes the float64 step as closely as compile=False does in float32 (which is 3e-4 to
    2e-3 of the step away here: float32's rounding, amplified by rmsprop-tf's division), or to bfloat16's
    accuracy (5e-3, as tests/test_low_precision.py); and the kernels did run."""
    calls = []
    original = fused.residual_kernel

    def counted(*args, **kwargs):
        kernel = original(*args, **kwargs)
        if kernel is None:
            return None
        return lambda *a: calls.append(args[0]) or kernel(*a)

    monkeypatch.setattr("locoprop.local_gradients.residual_kernel", counted)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)  # (the units here are small)
    x = torch.rand(8, 40, generator=torch.Generator().manual_seed(1)).mul_(0.6).add_(0.3)
    reference = _step(_model(activation).double(), x.double(), variant=variant, local_dtype=local_dtype)
    steps = _step(_model(activation), x, variant=variant, local_dtype=local_dtype, compile=True)
    errors = relative_errors(steps, reference)
    if local_dtype:
        assert max(errors) < 5e-3, errors
    else:
        eager = _step(_model(activation), x, variant=variant)
        eager_errors = relative_errors(eager, reference)
        assert max(errors) < 1.1 * max(eager_errors) + 1e-6, (errors, eager_errors)
    # Per inner iteration after the first (4): five kernels (the two 24 → 24 units stacked into one), each
    # with a compiled residual in bfloat16 but softplus's under M and S's 8 → 24 unit (in the Gram form, by
    # FLOPs); in float32 only M's tanh and sigmoid ones (the sigmoid output, and the hidden units if tanh).
    tanh = isinstance(activation, nn.Tanh)
    if local_dtype:
        per_iteration = 4 if variant == "S" else 2 if isinstance(activation, nn.Softplus) else 5
    elif variant == "M":
        per_iteration = 4 if tanh else 1
    else:
        per_iteration = 0
    assert len(calls) == 4 * per_iteration, (len(calls), per_iteration)


def test_a_model_without_compile_runs_no_kernel(monkeypatch):
    monkeypatch.setattr("locoprop.local_gradients.residual_kernel", lambda *a: pytest.fail("compiled a kernel"))
    x = torch.rand(8, 40, generator=torch.Generator().manual_seed(1))
    _step(_model(nn.Tanh()), x, variant="M", local_dtype="bfloat16")


def test_units_of_many_kinds_in_one_process_take_their_steps(monkeypatch):
    """Each dtype pairing, a batch of one and one over 4096 rows compile graphs of their own; past MAX_GRAPHS
    (lowered to 2 here) a kind's residual runs eagerly, and says so: no step fails, and each equals the eager
    step."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused, "MAX_GRAPHS", 2)
    monkeypatch.setattr(fused, "_FAILED", set())
    fused._compiled.cache_clear()  # (the kinds compile afresh, with the lower limit; again after the test)
    try:
        with pytest.warns(RuntimeWarning, match="could not be compiled"):
            _steps_of_many_kinds()
    finally:
        fused._compiled.cache_clear()


def _steps_of_many_kinds():
    x = torch.rand(5000, 40, generator=torch.Generator().manual_seed(1)).mul_(0.6).add_(0.3)
    for dtype, local_dtype, rows in [(torch.float32, None, 8), (torch.float32, "bfloat16", 8),
                                     (torch.float64, "bfloat16", 1), (torch.float32, "bfloat16", 5000),
                                     (torch.float64, None, 13)]:  # fmt: skip
        batch = x[:rows].to(dtype)
        compiled = _step(_model(nn.Tanh()).to(dtype), batch, variant="M", local_dtype=local_dtype, compile=True)
        eager = _step(_model(nn.Tanh()).to(dtype), batch, variant="M", local_dtype=local_dtype)
        errors = relative_errors(compiled, eager)
        assert max(errors) < 1e-3, (dtype, local_dtype, rows, errors)


def test_a_residual_that_cannot_compile_runs_eagerly_with_a_warning(monkeypatch):
    """No C++ compiler, an inductor failure: the step warns once and takes the eager residual."""

    def failing(change):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(fused, "_compiled", failing)
    monkeypatch.setattr(fused, "_FAILED", set())
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    x = torch.rand(8, 40, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="could not be compiled .*InvalidCxxCompiler") as caught:
        compiled = _step(_model(nn.Tanh()), x, variant="M", local_dtype="bfloat16", compile=True)
    # one warning per kind: tanh, the sigmoid, the identity
    assert len([w for w in caught if "could not be compiled" in str(w.message)]) == 3
    eager = _step(_model(nn.Tanh()), x, variant="M", local_dtype="bfloat16")
    errors = relative_errors(compiled, eager)
    assert max(errors) < 1e-5, errors


def test_the_tanh_kernel_keeps_small_changes_when_inductor_would_decompose_tanh():
    """Inductor can write tanh as (exp(2x) − 1)/(exp(2x) + 1) (``cpp.use_decompose_tanh``, or its environment
    variable), which loses small arguments (7e-2 of a change at Δa = 1e-6); the kernel turns it off."""
    from torch._inductor import config as inductor_config

    transfer = transfer_by_name("tanh")
    a = torch.linspace(-1, 1, 64 * 48).reshape(64, 48)
    delta = torch.full((64, 48), 1e-6)
    exact = torch.tanh(a.double() + delta.double()) - torch.tanh(a.double())
    change = lambda anchor, d: transfer.change(anchor, d)  # noqa: E731 (a kind of its own: a fresh compilation)
    with inductor_config.patch({"cpp.use_decompose_tanh": True}):
        r = delta.clone()
        fused._run(change, r, None, transfer.anchor_at(a))
    assert ((r.double() - exact).abs() / exact.abs()).max().item() < 1e-5
