"""LocoPropOptimizer under the Hugging Face Trainer: ``Trainer(optimizers=(opt, None))`` takes the plain loop's steps.

The Trainer wraps the optimizer (accelerate's ``AcceleratedOptimizer``), clips ``p.grad`` with ``max_grad_norm``
before ``step()``, runs the forward under bf16 autocast with ``bf16=True``, accumulates micro-batches, schedules η
and saves/restores ``optimizer.state_dict()`` in its checkpoints. Each test runs a real Trainer on a tiny random
GPT-2 against a loop written out on a copy of the same model.
"""

import copy

import pytest
import torch
from helpers import snapshot
from torch import nn

from locoprop import LocoPropOptimizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
transformers.logging.set_verbosity_error()
# (GPT-2's GELU has no convex integral: its unit takes S's target under M, and says so)
pytestmark = pytest.mark.filterwarnings("ignore:Variant M takes the S target")

VOCAB, LENGTH, BATCH = 64, 12, 8
# Plain inner SGD: rmsprop normalises each gradient entry, so clipping would not show, and bf16 noise on tiny
# entries would flip their signs.
SGD = dict(lr=0.002, activation_lr=1.0, local_iters=3, inner="sgd", inner_schedule="constant")


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


TOKENS = torch.randint(0, VOCAB, (4 * BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
# The first token is no target of a causal LM's shifted loss; marked so, the Trainer's count of targets (which
# normalises the loss over accumulated micro-batches) is the model's whichever way the Trainer counts.
LABELS = TOKENS.clone()
LABELS[:, 0] = -100


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return len(TOKENS)

    def __getitem__(self, i):
        return {"input_ids": TOKENS[i], "labels": LABELS[i]}


def _trainer(model, opt, out, steps, batch=BATCH, **args):
    # (the Trainer clips at norm 1 unless told otherwise: off here, as in the loop, unless a test sets it)
    args = dict(dict(save_strategy="no", lr_scheduler_type="constant", max_grad_norm=0.0), **args)
    args = transformers.TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=batch, use_cpu=True, report_to=[], disable_tqdm=True,
        seed=0, logging_steps=1000, **args
    )  # fmt: skip
    # (no shuffling: the loop below takes the batches in order)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def _loop(model, opt, steps, clip=None, bf16=False, micro=1):
    """The loop written out: per step ``micro`` backward passes of loss/micro, clipping, ``opt.step()``."""
    size = BATCH // micro
    for step in range(steps):
        for m in range(micro):
            rows = slice(step * BATCH + m * size, step * BATCH + (m + 1) * size)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=TOKENS[rows], labels=LABELS[rows]).loss
            (loss / micro).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_the_trainer_takes_the_loops_steps_with_its_gradient_clipping(tmp_path, variant):
    model = _gpt2()
    start = snapshot(model)
    copies = [copy.deepcopy(model) for _ in range(2)]
    opt = LocoPropOptimizer(model, variant=variant, **SGD)
    _trainer(model, opt, tmp_path, steps=3, max_grad_norm=0.1).train()
    assert opt.describe().local_share > 0.9

    clipped, unclipped = copies
    _loop(clipped, LocoPropOptimizer(clipped, variant=variant, **SGD), steps=3, clip=0.1)
    _loop(unclipped, LocoPropOptimizer(unclipped, variant=variant, **SGD), steps=3)
    moved = _largest_difference(snapshot(clipped), start)
    assert _largest_difference(snapshot(model), snapshot(clipped)) < 1e-4 * moved
    # (the Trainer's clipping is what the local problems started from)
    assert _largest_difference(snapshot(clipped), snapshot(unclipped)) > 0.1 * moved


def test_under_bf16_the_forward_runs_in_bf16_and_weights_stay_float32(tmp_path):
    model = _gpt2()
    start = snapshot(model)
    reference = copy.deepcopy(model)
    seen = set()
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    opt = LocoPropOptimizer(model, variant="M", **SGD)
    _trainer(model, opt, tmp_path, steps=2, bf16=True).train()
    assert seen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    _loop(reference, LocoPropOptimizer(reference, variant="M", **SGD), steps=2, bf16=True)
    moved = _largest_difference(snapshot(reference), start)
    # The same bf16 forwards (the float32 loop's step differs by 0.5% of the step: bf16's rounding).
    assert _largest_difference(snapshot(model), snapshot(reference)) < 1e-3 * moved


def test_accumulated_micro_batches_take_the_whole_batchs_step(tmp_path):
    """Two micro-batches of 4 accumulated in ``.grad``: LocoProp records both, and the step is the batch of 8's."""
    model = _gpt2()
    start = snapshot(model)
    whole = copy.deepcopy(model)
    opt = LocoPropOptimizer(model, variant="M", **SGD)
    _trainer(model, opt, tmp_path, steps=2, batch=BATCH // 2, gradient_accumulation_steps=2).train()

    _loop(whole, LocoPropOptimizer(whole, variant="M", **SGD), steps=2)
    moved = _largest_difference(snapshot(whole), start)
    # The position table is looked up once per forward and broadcast over the batch: two micro-batches record it
    # twice, so its divergence counts twice (the whole batch's counts it once). Every other unit sees examples.
    per_example = {name: p for name, p in snapshot(model).items() if name != "transformer.wpe.weight"}
    assert _largest_difference(per_example, snapshot(whole)) < 1e-4 * moved


def test_a_trainer_checkpoint_resumes_bit_for_bit(tmp_path):
    """A run of 4 steps saving at step 2, and new objects resumed from that checkpoint: the same parameters
    (LocoProp's state, the inner rmsprop-tf's and η's linear decay come back)."""
    hparams = dict(variant="M", lr=1e-3, activation_lr=1.0, local_iters=3, inner="rmsprop-tf")
    saving = dict(lr_scheduler_type="linear", save_strategy="steps", save_steps=2)
    whole = _gpt2()
    start = snapshot(whole)
    _trainer(whole, LocoPropOptimizer(whole, **hparams), tmp_path, steps=4, **saving).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()

    resumed = _gpt2()
    opt = LocoPropOptimizer(resumed, **hparams)
    _trainer(resumed, opt, tmp_path, steps=4, **saving).train(resume_from_checkpoint=str(checkpoint))
    assert _largest_difference(snapshot(resumed), snapshot(whole)) == 0.0
    assert _largest_difference(snapshot(whole), start) > 0
    assert opt.state_dict()["inner"]["state"], "the inner optimizer's state came back"


def test_a_warm_up_from_zero_is_refused_before_anything_changes(tmp_path):
    """The Trainer's warm-up starts η at 0, which LocoProp refuses (SPEC §3: lr > 0); the error says why."""
    model = _gpt2()
    start = snapshot(model)
    opt = LocoPropOptimizer(model, variant="M", **SGD)
    trainer = _trainer(model, opt, tmp_path, steps=2, lr_scheduler_type="linear", warmup_steps=1)
    with pytest.raises(ValueError, match="Invalid learning rate: 0.0.*start and end the schedule above 0"):
        trainer.train()
    assert _largest_difference(snapshot(model), start) == 0.0
