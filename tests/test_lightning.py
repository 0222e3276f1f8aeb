"""LocoPropOptimizer driven by PyTorch Lightning, as users plug it in: ``configure_optimizers`` returns it.

Every test runs a real ``lightning.Trainer`` (or Fabric) on CPU and compares the parameters with an
independent plain PyTorch loop on a deep copy of the same model over the same batches (no shuffle, no
dropout), written the way the README tells users to drive the optimizer. Lightning's automatic optimization
calls ``optimizer.step(closure)``; the closure runs ``training_step``, ``zero_grad`` (after the forward
pass, before ``backward``), ``backward``, the ``on_before_optimizer_step`` hooks and gradient clipping, and
``LocoPropOptimizer.step`` runs it before it reads ``p.grad``. Each check also asserts that the thing it
checks changed the result (clipped ≠ unclipped, scheduled ≠ constant, ...), so that it can fail.
"""

import copy
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_params, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from locoprop import LocoPropOptimizer

L = pytest.importorskip("lightning")

# Lightning's own pytree helper, on recent torch; nothing of locoprop's.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")

BATCH, STEPS = 16, 4
CLOSE = dict(rtol=1e-6, atol=1e-7)  # float32 runs of the same operations; in practice they agree bit for bit
TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False)  # fmt: skip
# What locoprop's warnings say (describe.py, output_unit.py); under Lightning they are attributed to torch's or
# Lightning's frames, so they are told by their text.
LOCOPROP_WARNING = re.compile(r"LocoProp|locoprop|opt\.describe|param group of this optimizer|no unit takes")
# Variant M with cross-entropy: the output unit's transfer is the softmax the loss folds in.
OPTIONS = dict(lr=1e-2, activation_lr=1.0, local_iters=3, output_activation="softmax")
SGD = dict(OPTIONS, lr=0.1, inner="sgd")  # where clipping or a changed lr scales the step (rmsprop normalises)


@functools.cache
def _initial() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def _net() -> nn.Module:
    """A deep copy of the one initial model: each run, Lightning's or the plain loop's, starts from it."""
    return copy.deepcopy(_initial())


def _data(batches: int = STEPS) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * BATCH, 8, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (batches * BATCH,), generator=generator))


def _batches(data: TensorDataset, size: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _loss(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


class LocoPropModule(L.LightningModule):
    """A LightningModule whose ``configure_optimizers`` returns a LocoPropOptimizer on ``net`` (and, given
    ``scheduler``, an lr scheduler stepped every optimizer step); ``on_before_optimizer_step`` notes what the
    optimizer is about to read: whether every parameter has a gradient, and each unit's recorded uses."""

    def __init__(self, net: nn.Module, scheduler=None, whole=False, **options):
        super().__init__()
        self.net, self.options, self.scheduler, self.whole = net, options, scheduler, whole
        self.before_step: list[tuple[bool, list[int]]] = []

    def training_step(self, batch, batch_idx):
        return _loss(self.net, batch)

    def configure_optimizers(self):
        opt = LocoPropOptimizer(self if self.whole else self.net, **self.options)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        has_grads = all(p.grad is not None for p in self.net.parameters())
        self.before_step.append((has_grads, [len(unit.records) for unit in optimizer.units]))


def _fit(module: L.LightningModule, data: TensorDataset, ckpt_path=None, val_data=None, **trainer_options):
    """The Trainer after ``fit(module)`` on ``data`` in batches of BATCH (in order; ``val_data`` validates); the
    warnings it gave are in ``trainer.caught``."""
    trainer = L.Trainer(**{"max_steps": STEPS, **TRAINER, **trainer_options})
    val = DataLoader(val_data, batch_size=BATCH) if val_data is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(data, batch_size=BATCH), val, ckpt_path=ckpt_path, weights_only=True)
    trainer.caught = caught
    return trainer


def _plain(net: nn.Module, batches, options: dict, clip=None, scheduler=None, autocast=False, accumulate=1):
    """The plain loop: per ``accumulate`` batches, ``(loss / accumulate).backward()`` for each (the forward
    under bfloat16 autocast with ``autocast``), ``clip(params)`` on the gradients, ``opt.step()``,
    ``opt.zero_grad()``, then ``scheduler.step()``. Returns the optimizer."""
    opt = LocoPropOptimizer(net, **options)
    schedule = scheduler(opt) if scheduler is not None else None
    for index, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(net, batch)
        (loss / accumulate).backward()
        if (index + 1) % accumulate:
            continue
        if clip is not None:
            clip([p for group in opt.param_groups for p in group["params"]])
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
    return opt


def _plain_params(batches, options: dict, **kwargs) -> dict[str, torch.Tensor]:
    net = _net()
    _plain(net, batches, options, **kwargs)
    return snapshot(net)


def _assert_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], by: float = 1e-5) -> None:
    gap = max((a[name] - b[name]).abs().max().item() for name in a)
    assert gap > by, f"the runs differ by {gap:.2e} only: the check could not fail"


@pytest.mark.parametrize("variant", ["M", "S"])
def test_automatic_optimization_takes_the_plain_loops_steps(variant):
    """Lightning's ``optimizer.step(closure)`` takes the steps of ``backward(); step(); zero_grad()``; every
    unit is solved locally, sees exactly its batch's use, and no warning comes from locoprop."""
    data = _data()
    options = dict(OPTIONS, variant=variant)
    module = LocoPropModule(_net(), **options)
    trainer = _fit(module, data)
    assert trainer.global_step == STEPS

    expected = _plain_params(_batches(data), options)
    assert_same_params(module.net, expected, **CLOSE)
    _assert_differs(snapshot(module.net), snapshot(_net()))

    opt = trainer.optimizers[0]
    assert isinstance(opt, LocoPropOptimizer)
    description = opt.describe()
    assert description.local_share == 1.0 and not description.outside
    assert [(row.kind, row.variant) for row in description.rows] == [("linear", variant)] * 3
    # The closure ran before the step read the gradients: each unit holds this batch's one use.
    assert module.before_step == [(True, [1, 1, 1])] * STEPS
    from_locoprop = [w for w in trainer.caught if LOCOPROP_WARNING.search(str(w.message))]
    assert not from_locoprop, [str(w.message) for w in from_locoprop]


class WholeModule(LocoPropModule):
    """``configure_optimizers`` returns ``LocoPropOptimizer(self)``; ``training_step`` calls the LightningModule
    (``self(x)``, whose forward calls ``self.net``) or, with ``direct``, ``self.net`` itself."""

    def __init__(self, net: nn.Module, direct: bool, **options):
        super().__init__(net, whole=True, **options)
        self.direct = direct

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return _loss(self.net if self.direct else self, batch)


@pytest.mark.parametrize("direct", [False, True], ids=["self(x)", "self.net(x)"])
def test_the_lightning_module_itself_may_be_the_model(direct):
    """``LocoPropOptimizer(self)`` in ``configure_optimizers`` finds the units inside ``self.net`` (tanh, tanh,
    softmax) and takes the steps of ``LocoPropOptimizer(self.net)``, whether ``training_step`` calls
    ``self(x)`` or ``self.net(x)`` (then the LightningModule's forward never runs)."""
    data = _data()
    module = WholeModule(_net(), direct=direct, **OPTIONS)
    trainer = _fit(module, data)
    rows = trainer.optimizers[0].describe().rows
    assert [(row.unit, row.transfer) for row in rows] == [("net.0", "tanh"), ("net.2", "tanh"), ("net.4", "softmax")]
    assert module.before_step == [(True, [1, 1, 1])] * STEPS
    assert_same_params(module.net, _plain_params(_batches(data), OPTIONS), **CLOSE)


class ValidatedModule(LocoPropModule):
    """Counts its validation batches."""

    validated = 0

    def validation_step(self, batch, batch_idx):
        self.validated += 1
        self.log("val_loss", _loss(self.net, batch))


def test_validation_between_steps_changes_nothing():
    """The sanity check (the model's first forward passes, before the optimizer saw any) and a validation
    every 2 steps run forward passes under ``inference_mode`` between the steps: the steps and the output
    unit's transfer (softmax) are those of training alone."""
    data = _data()
    module = ValidatedModule(_net(), **OPTIONS)
    trainer = _fit(module, data, val_data=_data(2), val_check_interval=2, num_sanity_val_steps=2)
    assert module.validated == 2 + 2 * 2
    assert [row.transfer for row in trainer.optimizers[0].describe().rows] == ["tanh", "tanh", "softmax"]
    assert_same_params(module.net, _plain_params(_batches(data), OPTIONS), **CLOSE)
    assert module.before_step == [(True, [1, 1, 1])] * STEPS


class SkippingModule(LocoPropModule):
    """Returns None from ``training_step`` at batch 1: Lightning's documented way to skip a batch."""

    def training_step(self, batch, batch_idx):
        loss = _loss(self.net, batch)
        return None if batch_idx == 1 else loss


def test_a_batch_skipped_by_returning_none_takes_no_step():
    """A ``training_step`` that returns None skips the batch: the steps are those of the other batches."""
    data = _data()
    module = SkippingModule(_net(), **OPTIONS)
    _fit(module, data)
    batches = _batches(data)
    assert_same_params(module.net, _plain_params(batches[:1] + batches[2:], OPTIONS), **CLOSE)


@pytest.mark.parametrize(
    "algorithm, value, clip",
    [
        ("norm", 0.05, lambda params: torch.nn.utils.clip_grad_norm_(params, 0.05)),
        ("value", 0.01, lambda params: torch.nn.utils.clip_grad_value_(params, 0.01)),
    ],
    ids=["norm", "value"],
)
def test_gradient_clip_val_reaches_every_local_problem(algorithm, value, clip):
    """``gradient_clip_val`` clips ``p.grad`` after the closure and before LocoProp reads it: the steps are
    the plain loop's with ``clip_grad_norm_``/``clip_grad_value_`` before ``opt.step()``, not the unclipped
    ones (README: clipping reaches every local problem)."""
    data = _data()
    module = LocoPropModule(_net(), **SGD)
    _fit(module, data, gradient_clip_val=value, gradient_clip_algorithm=algorithm)

    expected = _plain_params(_batches(data), SGD, clip=clip)
    assert_same_params(module.net, expected, **CLOSE)
    _assert_differs(expected, _plain_params(_batches(data), SGD))


def test_bf16_mixed_runs_the_forward_in_bfloat16_and_steps_the_float32_parameters():
    """``precision="bf16-mixed"`` runs the forward under CPU autocast (a forward hook sees bfloat16 outputs),
    the parameters stay float32, and the steps are those of the plain loop under ``torch.autocast``, which
    differ from the float32 ones."""
    data = _data()
    net = _net()
    dtypes = set()
    net[2].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    module = LocoPropModule(net, **SGD)
    _fit(module, data, precision="bf16-mixed")

    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    expected = _plain_params(_batches(data), SGD, autocast=True)
    assert_same_params(net, expected, rtol=1e-5, atol=1e-6)
    _assert_differs(expected, _plain_params(_batches(data), SGD))


def test_accumulated_batches_are_all_in_the_step():
    """``accumulate_grad_batches=2`` divides each loss by 2 and steps every second batch: the plain loop that
    accumulates two ``(loss / 2).backward()``; each unit holds both micro-batches' uses (README: batches whose
    gradients accumulate all are), so the step is the one on the two batches as one batch of 2·BATCH."""
    data = _data()
    module = LocoPropModule(_net(), **OPTIONS)
    trainer = _fit(module, data, max_steps=STEPS // 2, accumulate_grad_batches=2)
    assert trainer.global_step == STEPS // 2

    assert module.before_step == [(True, [2, 2, 2])] * (STEPS // 2)
    assert_same_params(module.net, _plain_params(_batches(data), OPTIONS, accumulate=2), **CLOSE)
    # Σ over both batches' rows of the divergence, G the gradient of the mean loss over 2·BATCH rows.
    assert_same_params(module.net, _plain_params(_batches(data, 2 * BATCH), OPTIONS), rtol=1e-5, atol=1e-6)
    # Only the last batch of each pair, at the same G: a step that dropped the first one's uses.
    _assert_differs(snapshot(module.net), _plain_params(_batches(data)[1::2], OPTIONS))


def test_a_resumed_fit_continues_as_the_uninterrupted_one(tmp_path):
    """``Trainer.save_checkpoint`` after 2 epochs and ``fit(ckpt_path=...)`` of a fresh module and Trainer for a
    third (checkpoint loaded with ``weights_only=True``) give the parameters of 3 uninterrupted epochs: the
    checkpoint holds the inner optimizer's state, without which the continuation differs."""
    data = _data()
    first = LocoPropModule(_net(), **OPTIONS)
    _fit(first, data, max_steps=-1, max_epochs=2).save_checkpoint(tmp_path / "two-epochs.ckpt")

    other = _net()
    with torch.no_grad():  # other initial weights: the checkpoint must bring the model's
        for p in other.parameters():
            p.normal_()
    resumed = LocoPropModule(other, **OPTIONS)
    trainer = _fit(resumed, data, ckpt_path=tmp_path / "two-epochs.ckpt", max_steps=-1, max_epochs=3)
    assert trainer.global_step == 3 * STEPS

    uninterrupted = LocoPropModule(_net(), **OPTIONS)
    _fit(uninterrupted, data, max_steps=-1, max_epochs=3)
    assert_same_params(resumed.net, snapshot(uninterrupted.net), **CLOSE)
    assert_same_params(resumed.net, _plain_params(_batches(data) * 3, OPTIONS), **CLOSE)

    # A fresh optimizer (inner state lost) for the third epoch takes other steps.
    net = _net()
    _plain(net, _batches(data) * 2, OPTIONS)
    _plain(net, _batches(data), OPTIONS)
    _assert_differs(snapshot(resumed.net), snapshot(net))


def test_an_lr_scheduler_from_configure_optimizers_sets_eta_as_in_the_plain_loop():
    """A StepLR returned with ``interval="step"`` scales every group's ``lr`` (η) after each step as the
    plain loop's ``scheduler.step()`` does: same η at the end, same parameters, not the constant-η ones."""
    data = _data()
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)  # noqa: E731
    module = LocoPropModule(_net(), scheduler=scheduler, **SGD)
    trainer = _fit(module, data)

    etas = [group["lr"] for group in trainer.optimizers[0].param_groups]
    assert etas == pytest.approx([SGD["lr"] * 0.1**2] * 3)
    expected = _plain_params(_batches(data), SGD, scheduler=scheduler)
    assert_same_params(module.net, expected, **CLOSE)
    _assert_differs(expected, _plain_params(_batches(data), SGD))


def test_fp16_with_a_grad_scaler_skips_the_overflowing_steps_as_the_plain_loop():
    """16-mixed with a GradScaler (Lightning's GPU path; on CPU it falls back to bf16, so the plugin is given
    explicitly): Lightning runs the closure, unscales, and the scaler calls ``optimizer.step()`` without a
    closure, or not at all when the scaled gradients overflow. At an initial scale of 2²⁰ the first two
    batches overflow; the steps are the plain ``scaler.scale(loss).backward(); scaler.step(opt)`` loop's,
    and no skipped batch's uses reach a later step."""
    from lightning.pytorch.plugins import MixedPrecision

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**20)

    data = _data()
    net = _net()
    dtypes = set()
    net[2].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    module = LocoPropModule(net, **OPTIONS)
    steps = []
    module.on_train_start = lambda: module.trainer.optimizers[0].register_step_post_hook(lambda *_: steps.append(1))
    _fit(module, data, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler())])
    assert dtypes == {torch.float16} and len(steps) == 2
    assert module.before_step == [(True, [1, 1, 1])] * STEPS

    plain = _net()
    opt, plain_scaler = LocoPropOptimizer(plain, **OPTIONS), scaler()
    for batch in _batches(data):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss(plain, batch)
        plain_scaler.scale(loss).backward()
        plain_scaler.step(opt)
        plain_scaler.update()
        opt.zero_grad()
    assert_same_params(net, snapshot(plain), **CLOSE)
    _assert_differs(snapshot(plain), _plain_params(_batches(data), OPTIONS))


class ManualModule(LocoPropModule):
    """Manual optimization: ``zero_grad``, ``manual_backward``, ``clip_gradients`` (norm ``clip``, if given),
    ``step`` on the LightningOptimizer that ``self.optimizers()`` wraps it in."""

    def __init__(self, net: nn.Module, clip=None, **options):
        super().__init__(net, **options)
        self.automatic_optimization = False
        self.clip = clip

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = _loss(self.net, batch)
        self.manual_backward(loss)
        if self.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        return loss


@pytest.mark.parametrize("clip", [None, 0.05], ids=["unclipped", "clipped"])
def test_manual_optimization_takes_the_plain_loops_steps(clip):
    """With ``automatic_optimization = False`` (``manual_backward``, ``self.clip_gradients``, ``opt.step()``)
    the steps are the plain loop's, clipping included."""
    data = _data()
    module = ManualModule(_net(), clip=clip, **SGD)
    _fit(module, data)

    norm_clip = (lambda params: torch.nn.utils.clip_grad_norm_(params, clip)) if clip else None
    expected = _plain_params(_batches(data), SGD, clip=norm_clip)
    assert_same_params(module.net, expected, **CLOSE)
    assert module.before_step == [(True, [1, 1, 1])] * STEPS
    if clip:
        _assert_differs(expected, _plain_params(_batches(data), SGD))


def test_fabric_with_clipping_takes_the_plain_loops_steps():
    """Lightning Fabric: ``fabric.setup`` wraps model and optimizer; ``fabric.backward``,
    ``fabric.clip_gradients`` and ``opt.step()`` take the plain loop's clipped steps."""
    data = _data()
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net = _net()
    model, opt = fabric.setup(net, LocoPropOptimizer(net, **SGD))
    for batch in _batches(data):
        opt.zero_grad()
        fabric.backward(_loss(model, batch))
        fabric.clip_gradients(model, opt, max_norm=0.05)
        opt.step()

    clip = lambda params: torch.nn.utils.clip_grad_norm_(params, 0.05)  # noqa: E731
    expected = _plain_params(_batches(data), SGD, clip=clip)
    assert_same_params(net, expected, **CLOSE)
    _assert_differs(expected, _plain_params(_batches(data), SGD))
