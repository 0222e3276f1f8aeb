"""local_dtype="bfloat16": the inner iterations' matmuls in bfloat16, the step still accurate (locoprop.kernels).

The tolerance: each step is compared with the float64 step of the same model and batch, parameter by parameter,
by the relative error ‖Δθ − Δθ₆₄‖ / ‖Δθ₆₄‖ of the step Δθ = θ_new − θ_old. bfloat16 keeps 8 bits, a relative
rounding of 2⁻⁹ ≈ 2e-3 per number; every product here sums its terms in float32 and rounds once, and the first
inner iteration (γ·G) involves no rounding, so the step is held to 5e-3, a little over 2⁻⁸. (Measured: 4e-5 to
6e-4 with float64 parameters; float32 parameters add float32's own 1e-3; before the rows were centred, 1e-2 to
4e-2.) Rounding θ itself to bfloat16 could not meet it: at γ = 1e-4 the step is far below bfloat16's resolution
of θ.
"""

import copy

import pytest
import torch
from helpers import bce_sum_mean, relative_errors
from torch import nn

from locoprop import LocoPropOptimizer

TOLERANCE = 5e-3


def _model(width: int) -> nn.Module:
    """Pixels in, sigmoid out; two hidden units of one shape (batched together), a linear bottleneck."""
    torch.manual_seed(0)
    encoder = [nn.Linear(40, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8)]
    decoder = [nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 40)]
    return nn.Sequential(*encoder, *decoder)


def _pixels(rows: int) -> torch.Tensor:
    """Values in [0, 1] with a large mean, as images have (the case that centring is for)."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(rows, 40, generator=generator).mul_(0.6).add_(0.3)


def _step(model, x, **kwargs) -> list[torch.Tensor]:
    opt = LocoPropOptimizer(model, lr=1e-3, local_iters=5, inner="rmsprop-tf", output_activation="sigmoid",
                            inner_kwargs={"momentum": 0.9, "eps": 1e-5}, **kwargs)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    bce_sum_mean(model(x), x).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("parallel", ["none", "batched"])
@pytest.mark.parametrize("rows", [8, 200], ids=["batch-form", "gram-form"])  # S: its form by FLOPs
def test_a_bfloat16_local_solve_takes_the_float64_step_to_bfloat16_accuracy(variant, parallel, rows):
    """Float64 parameters isolate bfloat16's part of the error, at γ = 1 and 1e-4 alike: it is relative to the
    step, not to θ. Float32 parameters at γ = 1 too (at γ = 1e-4 float32's own rounding of θ, ulp(θ), is most
    of the step, with or without bfloat16, as for float32 SGD)."""
    x = _pixels(rows)
    for dtype, activation_lr in ((torch.float64, 1.0), (torch.float64, 1e-4), (torch.float32, 1.0)):
        kwargs = dict(variant=variant, parallel=parallel, activation_lr=activation_lr)
        reference = _step(_model(32).double(), x.double(), **kwargs)
        errors = relative_errors(_step(_model(32).to(dtype), x.to(dtype), local_dtype="bfloat16", **kwargs),
                                  reference)  # fmt: skip
        assert max(errors) < TOLERANCE, (dtype, activation_lr, errors)
        if dtype == torch.float64:  # the test can tell: bfloat16 did run (its rounding shows beyond float64's)
            assert max(errors) > 1e-7


def test_the_gram_form_and_batching_are_what_the_paths_use(monkeypatch):
    """The parametrisation above reaches every kernel: the stacked (batched) kernel at 8 rows, the Gram form
    of S at 200, and the per-unit kernel."""
    import locoprop.kernels as kernels

    calls = []
    for name in ("low_precision_divergence_grads", "low_precision_gram_grads"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _f=original, _n=name: calls.append(
            (_n, args[2].centered.dim() if _n.endswith("divergence_grads") else 2)) or _f(*args))  # fmt: skip
    _step(_model(32), _pixels(8), variant="S", parallel="batched", activation_lr=1.0, local_dtype="bfloat16")
    assert ("low_precision_divergence_grads", 3) in calls and ("low_precision_divergence_grads", 2) in calls
    calls.clear()
    _step(_model(32), _pixels(200), variant="S", parallel="batched", activation_lr=1.0, local_dtype="bfloat16")
    assert {name for name, _ in calls} == {"low_precision_gram_grads"}


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_the_low_precision_kernels_give_the_local_gradient_to_bfloat16_accuracy(variant, stacked, bias):
    """Kernel by kernel against the float64 kernel, on rows with a large mean: 2⁻⁸ of the gradient."""
    from locoprop import kernels
    from locoprop.transfer import transfer_by_name

    generator = torch.Generator().manual_seed(2)
    lead = (3,) if stacked else ()
    x = torch.rand(*lead, 50, 20, generator=generator, dtype=torch.float64).add_(2.0)  # mean 2.5, spread 0.3
    delta_w = torch.randn(*lead, 6, 20, generator=generator, dtype=torch.float64) * 1e-3
    delta_b = torch.randn(*lead, 6, generator=generator, dtype=torch.float64) * 1e-3 if bias else None
    term = [torch.randn_like(delta_w)] + ([torch.randn_like(delta_b)] if bias else [])
    a_old = torch.randn(*lead, 50, 6, generator=generator, dtype=torch.float64)
    tanh = transfer_by_name("tanh")
    anchor = tanh.anchor_at(a_old) if variant == "M" else ()
    expected = kernels.divergence_grads(variant, tanh, x, anchor, delta_w, delta_b, None, term, 0.5)
    rows = kernels.low_precision_rows(x, torch.bfloat16)
    product = torch.empty(*lead, 50, 6, dtype=torch.bfloat16)
    out = [torch.empty_like(delta_w)] + ([torch.empty_like(delta_b)] if bias else [])
    got = kernels.low_precision_divergence_grads(variant, tanh, rows, anchor, delta_w, delta_b, product,
                                                 torch.empty_like(a_old), kernels.low_precision_buffers(rows, delta_w),
                                                 out, term, 0.5)  # fmt: skip
    for g, e in zip(got, expected):
        assert 1e-7 < ((g - e).norm() / e.norm()).item() < 2**-8
    if variant == "S" and not stacked:
        covariance = kernels.gram_covariance(x, has_bias=bias)
        gram_expected = kernels.gram_grads(covariance, delta_w, delta_b, term, 0.5, [torch.empty_like(t) for t in term])
        gram = kernels.low_precision_gram(kernels.gram_covariance(x, has_bias=True), torch.bfloat16)
        gram_got = kernels.low_precision_gram_grads(gram, delta_w, delta_b, term, 0.5,
                                                    torch.empty_like(delta_w, dtype=torch.bfloat16),
                                                    [torch.empty_like(t) for t in term])  # fmt: skip
        errors = [((g - e).norm() / e.norm()).item() for g, e in zip(gram_got, gram_expected)]
        assert 1e-7 < errors[0] < 2**-8 and max(errors) < 2**-8  # (∇b = N·v + γ·G_b has no rounded product)


def test_float32_behaviour_is_unchanged_by_default():
    model = _model(16)
    x = _pixels(30)
    default = _step(copy.deepcopy(model), x, variant="M", parallel="batched", activation_lr=1.0)
    again = _step(copy.deepcopy(model), x, variant="M", parallel="batched", activation_lr=1.0, local_dtype=None)
    assert all(torch.equal(a, b) for a, b in zip(default, again))


def test_a_convolution_unit_solves_in_bfloat16_too():
    """Conv2d units take the autograd path, rounded the same way (without centring: padding breaks it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).double()
    x, y = torch.rand(20, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (20,))

    def step(**kwargs):
        m = copy.deepcopy(model)
        opt = LocoPropOptimizer(m, variant="M", lr=1e-2, activation_lr=1.0, local_iters=5, inner="sgd",
                                output_activation="softmax", **kwargs)  # fmt: skip
        before = [p.detach().clone() for p in m.parameters()]
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        return [p.detach() - b for p, b in zip(m.parameters(), before)]

    errors = relative_errors(step(local_dtype="bfloat16"), step())
    assert 1e-7 < max(errors) < 2e-2, errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(local_dtype="float16"), "Invalid local_dtype: 'float16'; expected None (the parameters' dtype) or"),
        (dict(local_dtype=torch.bfloat16), "Invalid local_dtype: torch.bfloat16"),
        (dict(variant="S", solve="exact", prox=1.0, local_dtype="bfloat16"), "solve='exact' has none"),
    ],
)
def test_bad_local_dtype_is_refused_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LocoPropOptimizer(_model(4), **kwargs)
