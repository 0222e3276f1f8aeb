"""The unit that produces the output: the forward pass finds it (whatever the
order in which the model registers its layers), it takes the output transfer
function, and an output that several units reach, or that the transfer
function does not fit, refuses the step.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import CLOSE, ETA, GAMMA, assert_same_params, classification_loss, locoprop_trained, snapshot
from torch import nn

from locoprop import LocoPropOptimizer


class HeadFirst(nn.Module):
    """The output layer is registered before the body."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


def _transfers(opt):
    names = [(unit.name, unit.transfer.name) for unit in opt.units]
    assert names == [(group["unit"], group["transfer"]) for group in opt.param_groups]
    return names


def test_output_activation_goes_to_the_unit_that_produces_the_output():
    model = HeadFirst().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    # The same network with its output layer last, where registration order is right.
    ordered = nn.Sequential(copy.deepcopy(model.body[0]), nn.Tanh(), copy.deepcopy(model.head))
    kwargs = dict(variant="M", local_iters=3, inner="sgd", output_activation="softmax")
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, **kwargs)
    assert _transfers(opt) == [("head", "identity"), ("body.0", "softmax")]  # until a forward pass tells
    with torch.no_grad():
        model(x)  # no graph: nothing to tell
    F.cross_entropy(model(x), y).backward()
    assert _transfers(opt) == [("head", "softmax"), ("body.0", "tanh")]
    opt.step()
    expected = locoprop_trained(ordered, classification_loss(x, y), steps=1, **kwargs)
    torch.testing.assert_close(model.head.weight, expected["2.weight"], **CLOSE)
    torch.testing.assert_close(model.body[0].weight, expected["0.weight"], **CLOSE)


def test_output_unit_of_a_model_whose_forward_is_bypassed_is_the_last_unit_to_run():
    model = HeadFirst()
    opt = LocoPropOptimizer(model, variant="M", output_activation="sigmoid")
    model.head(model.body(torch.randn(4, 5))).sum().backward()
    opt.step()
    assert _transfers(opt) == [("head", "sigmoid"), ("body.0", "tanh")]


class TwoHeads(nn.Module):
    def __init__(self, tuple_output):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.left, self.right = nn.Linear(4, 3), nn.Linear(4, 3)
        self.tuple_output = tuple_output

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return (self.left(h), self.right(h)) if self.tuple_output else self.left(h) + self.right(h)


@pytest.mark.parametrize("tuple_output", [False, True], ids=["sum", "tuple"])
def test_an_ambiguous_output_unit_refuses_the_step(tuple_output):
    model = TwoHeads(tuple_output)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    out = model(torch.randn(4, 5))
    sum(o.sum() for o in out).backward() if tuple_output else out.sum().backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"units \['left', 'right'\] all reach it\. Pass units=\[\(layer"):
        opt.step()
    assert_same_params(model, before)


class EncoderDecoder(nn.Module):
    """Returns, beside the logits, the hidden states they are computed from (an encoder-decoder's
    ``encoder_last_hidden_state``, ``output_hidden_states``) and, with labels, the loss."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder, self.head = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, y=None):
        memory = torch.tanh(self.encoder(x))
        hidden = torch.tanh(self.decoder(memory))
        logits = self.head(hidden)
        out = {"logits": logits, "encoder_last_hidden_state": memory, "hidden_states": (memory, hidden)}
        return out if y is None else {"loss": F.cross_entropy(logits, y), **out}


@pytest.mark.parametrize("labels", [False, True], ids=["logits", "loss"])
def test_outputs_that_the_logits_are_computed_from_leave_the_head_the_output_unit(labels):
    """The encoder's state and the hidden states, returned beside the logits, do not make the output ambiguous
    (every Hugging Face encoder-decoder was refused): the head takes the softmax, the others their tanh, and the
    step is that of the model returning its logits alone."""
    model = EncoderDecoder().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    kwargs = dict(variant="M", local_iters=3, inner="sgd", output_activation="softmax")
    plain = copy.deepcopy(nn.Sequential(model.encoder, nn.Tanh(), model.decoder, nn.Tanh(), model.head))
    expected = locoprop_trained(plain, classification_loss(x, y), steps=1, **kwargs)
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, **kwargs)
    out = model(x, y) if labels else model(x)
    (out["loss"] if labels else F.cross_entropy(out["logits"], y)).backward()
    opt.step()
    assert _transfers(opt) == [("encoder", "tanh"), ("decoder", "tanh"), ("head", "softmax")]
    for name, index in (("encoder", 0), ("decoder", 2), ("head", 4)):
        torch.testing.assert_close(getattr(model, name).weight, expected[f"{index}.weight"], **CLOSE)


class AuxiliaryHead(nn.Module):
    """Logits and an auxiliary head's output computed from them: two units' outputs, one from the other."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        logits = self.head(torch.tanh(self.body(x)))
        return logits, self.aux(logits)


def test_an_output_computed_from_another_units_output_leaves_the_output_unit_ambiguous():
    """The logits are a unit's output: returned beside an output computed from them, they still count (the
    auxiliary head was given the softmax, silently), so two units reach the outputs and the step is refused."""
    model = AuxiliaryHead()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    logits, aux = model(torch.randn(4, 5))
    (logits.sum() + aux.sum()).backward()
    with pytest.raises(RuntimeError, match=r"units \['head', 'aux'\] all reach it"):
        opt.step()


class HiddenStates(nn.Module):
    """A language model returning, as Hugging Face's do with ``output_hidden_states``, a tuple of hidden states
    whose first is the embedding's own output (Llama's), beside its logits."""

    def __init__(self):
        super().__init__()
        self.embed, self.mlp, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10)

    def forward(self, ids):
        h0 = self.embed(ids)
        h1 = torch.tanh(self.mlp(h0))
        return {"logits": self.head(h1), "hidden_states": (h0, h1)}


def test_hidden_states_returned_in_a_tuple_leave_the_head_the_output_unit():
    """(The embedding's own output among them was kept as a unit's output, and the step refused as ambiguous.)"""
    model = HiddenStates()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    ids = torch.randint(0, 10, (3, 5))
    F.cross_entropy(model(ids)["logits"].flatten(0, 1), ids.flatten()).backward()
    opt.step()
    assert _transfers(opt) == [("embed", "identity"), ("mlp", "tanh"), ("head", "softmax")]


class ConvClassifier(nn.Module):
    """A convolution's scores, returned as they are viewed (flattened 1×1 maps; a Conv1d's B × C × T read as
    B × T × C, a CTC head) or computed from (pooled, upsampled, added to the input)."""

    def __init__(self, ending: str):
        super().__init__()
        self.ending = ending
        conv = nn.Conv1d if ending == "transposed" else nn.Conv2d
        self.final = conv(3, 3, 1)

    def forward(self, x):
        a = self.final(x)
        return {"flattened": lambda: a.flatten(1), "transposed": lambda: a.transpose(1, 2),
                "pooled": lambda: a.mean((2, 3)), "upsampled": lambda: F.interpolate(a, scale_factor=2.0),
                "residual": lambda: x + a}[self.ending]()  # fmt: skip


class PolicyHead(nn.Module):
    """Go-style policy: one channel of scores per board position, flattened (the loss's softmax is over the 25
    positions), or a two-channel span head returning each channel's scores over positions (QA start and end)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.final = nn.Conv2d(3, 1, 1) if kind == "policy" else nn.Conv1d(3, 2, 1)

    def forward(self, x):
        a = self.final(x)
        return a.flatten(1) if self.kind == "policy" else (a[:, 0], a[:, 1])


@pytest.mark.parametrize("kind", ["policy", "span"])
def test_views_that_merge_or_select_a_convolutions_channels_take_no_channel_softmax(kind):
    """The loss's softmax there is over positions, not channels: M refuses (a first version gave the channel
    softmax, over one channel, or over two instead of the positions, silently)."""
    model = PolicyHead(kind)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    out = model(torch.randn(2, 3, 5, 5) if kind == "policy" else torch.randn(2, 3, 7))
    (out.sum() if kind == "policy" else out[0].sum() + out[1].sum()).backward()
    with pytest.raises(ValueError, match="which output_activation gives only to a convolution whose own output"):
        opt.step()


class TwoViews(nn.Module):
    """A convolution's scores returned as they are and flattened over positions, in either order."""

    def __init__(self, flattened_first: bool):
        super().__init__()
        self.flattened_first, self.final = flattened_first, nn.Conv1d(3, 2, 1)

    def forward(self, x):
        a = self.final(x)
        return (a.flatten(1), a) if self.flattened_first else (a, a.flatten(1))


@pytest.mark.parametrize("flattened_first", [False, True])
def test_the_channel_softmax_does_not_depend_on_the_order_of_the_outputs(flattened_first):
    model = TwoViews(flattened_first)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    model(torch.randn(2, 3, 5))[1].sum().backward()
    opt.step()
    assert _transfers(opt) == [("final", "softmax(dim=1)")]


class FrozenHead(nn.Module):
    """One trainable unit, then a frozen tanh layer that produces the output."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.frozen = nn.Linear(5, 3).requires_grad_(False)

    def forward(self, x):
        return self.frozen(torch.tanh(self.first(x)))


def test_a_single_unit_behind_a_frozen_head_reads_its_own_transfer_at_the_first_step():
    """The frozen map, not the unit, produces the output: the unit takes its tanh back (with the warning), in the
    first step too (it solved that step with the identity)."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    kwargs = dict(variant="M", lr=0.1, activation_lr=1.0, local_iters=3, inner="sgd")
    named, discovered = FrozenHead().double(), FrozenHead().double()
    discovered.load_state_dict(named.state_dict())
    for model, extra in ((named, dict(output_activation="softmax")), (discovered, {})):
        opt = LocoPropOptimizer(model, **kwargs, **extra)
        F.cross_entropy(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ("no unit takes the output activation")
            opt.step()
        assert _transfers(opt) == [("first", "tanh")]
    assert_same_params(named, snapshot(discovered))


class NestedAuxiliary(nn.Module):
    """Logits, and a list of auxiliary logits they are refined from (DETR's ``aux_outputs``)."""

    def __init__(self):
        super().__init__()
        self.coarse, self.refine = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        coarse = self.coarse(x)
        return self.refine(coarse), [coarse]


def test_auxiliary_logits_nested_in_the_output_leave_the_output_unit_ambiguous():
    model = NestedAuxiliary()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    logits, (auxiliary,) = model(torch.randn(4, 4))
    (logits.sum() + auxiliary.sum()).backward()
    with pytest.raises(RuntimeError, match=r"units \['coarse', 'refine'\] all reach it"):
        opt.step()


@pytest.mark.parametrize("ending", ["flattened", "transposed", "pooled", "upsampled", "residual"])
def test_a_convolution_takes_the_channel_softmax_only_when_the_output_shows_its_own(ending):
    """A view of the convolution's output keeps its channels, so cross-entropy's softmax is over them; an output
    computed from it by more than views is not its own, and M refuses the channel softmax (the residual sum was
    given it by an equal-shape rule, the views refused by it)."""
    model = ConvClassifier(ending)
    shape = (2, 3, 1, 1) if ending in ("flattened", "pooled") else (2, 3, 7) if ending == "transposed" else (2, 3, 4, 4)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    model(torch.randn(shape)).square().sum().backward()
    if ending in ("flattened", "transposed"):
        opt.step()
        assert _transfers(opt) == [("final", "softmax(dim=1)")]
    else:
        with pytest.raises(ValueError, match="which output_activation gives only to a convolution whose own output"):
            opt.step()


class PooledConv(nn.Module):
    """A 1×1-convolution classifier whose per-pixel scores are averaged (SqueezeNet's head): its output is
    pooled from the convolution's, not the convolution's own."""

    def __init__(self):
        super().__init__()
        self.body, self.final = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return F.relu(self.final(torch.tanh(self.body(x)))).mean((2, 3))


def test_a_convolution_whose_output_is_pooled_takes_no_softmax_over_its_channels():
    """The loss's softmax is of the pooled scores, not of the convolution's output per pixel: M refuses it
    (the channel softmax was given to the convolution, silently, a wrong divergence); S reads no transfer."""
    x, y = torch.randn(2, 2, 5, 5), torch.tensor([0, 2])
    for variant in ("M", "S"):
        model = PooledConv()
        opt = LocoPropOptimizer(model, variant=variant, output_activation="softmax")
        F.cross_entropy(model(x), y).backward()
        if variant == "M":
            with pytest.raises(ValueError, match="Softmax over the last dimension does not apply to Conv2d unit"):
                opt.step()
        else:
            opt.step()


class _ConvHead(nn.Module):
    """A segmentation head applying its own weight with F.conv2d: no nn.Conv2d, so its kind is known only at
    the first forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, 1, 1) * 0.3)

    def forward(self, h):
        return F.conv2d(h, self.weight)


def test_a_functional_convolution_head_takes_the_softmax_over_its_channels():
    """The last unit holds the output activation from the start; once its forward shows a convolution, the
    softmax is over its channels (it kept the softmax over the last dimension, the image's width)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), _ConvHead())
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    assert _transfers(opt) == [("0", "tanh"), ("2", "softmax")]
    F.cross_entropy(model(torch.randn(2, 2, 5, 5)), torch.randint(0, 3, (2, 5, 5))).backward()
    opt.step()
    assert _transfers(opt) == [("0", "tanh"), ("2", "softmax(dim=1)")]


class ConvOutput(nn.Module):
    """A convolution registered first produces the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.fc = nn.Linear(4, 9)

    def forward(self, x):
        return self.conv(self.fc(x).view(-1, 1, 3, 3))


def test_a_convolution_found_to_be_the_output_unit_takes_the_softmax_over_its_channels():
    """``output_activation="softmax"`` is the softmax cross-entropy folds in: over a convolution's channels
    (segmentation), dim=1. The convolution registered first is found to produce the output and takes it (it was
    refused as a softmax over the last dimension, under S too); the linear layer that held it gets its own back."""
    for variant in ("M", "S"):
        model = ConvOutput()
        opt = LocoPropOptimizer(model, variant=variant, output_activation="softmax")
        assert _transfers(opt) == [("conv", "identity"), ("fc", "softmax")]  # tentatively the last unit
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert _transfers(opt) == [("conv", "softmax(dim=1)"), ("fc", "identity")]


class HeadFirstFunctional(nn.Module):
    """The output layer registered before the body, whose tanh is a function call (no Sequential to guess
    from)."""

    def __init__(self):
        super().__init__()
        self.head, self.body = nn.Linear(4, 3), nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_the_unit_that_held_the_output_activation_reads_its_transfer_in_the_same_forward():
    """The last unit holds output_activation until the forward pass finds the output unit; handed back, its
    transfer was read only at the next forward, so the first step solved it with the identity."""
    model = HeadFirstFunctional().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ordered = nn.Sequential(copy.deepcopy(model.body), nn.Tanh(), copy.deepcopy(model.head))
    kwargs = dict(variant="M", local_iters=3, inner="sgd", output_activation="softmax")
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, **kwargs)
    F.cross_entropy(model(x), y).backward()
    assert _transfers(opt) == [("head", "softmax"), ("body", "tanh")]
    opt.step()
    expected = locoprop_trained(ordered, classification_loss(x, y), steps=1, **kwargs)
    torch.testing.assert_close(model.body.weight, expected["0.weight"], **CLOSE)


def test_an_output_layer_tied_to_an_embedding_is_no_unit_and_takes_no_output_activation():
    """F.linear(h, embedding.weight) as the head: that map is no unit's (the weight's unit is the embedding),
    so no unit takes the softmax (it went to the unit before the head) and a warning says so."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = nn.Embedding(10, 4), nn.Linear(4, 4)

        def forward(self, ids):
            return F.linear(torch.tanh(self.fc(self.embed(ids))), self.embed.weight)

    model = Tied().double()
    ids = torch.randint(0, 10, (6,))
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    with pytest.warns(UserWarning, match="output comes from a linear map that no unit records"):
        F.cross_entropy(model(ids), ids).backward()
    assert _transfers(opt) == [("embed", "identity"), ("fc", "tanh")]


def test_a_unit_head_added_to_a_tied_head_is_refused_as_ambiguous():
    """h1(h) + F.linear(h, embedding.weight): a unit and a map that is no unit both produce the output."""

    class TiedPlusHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc, self.h1 = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10)

        def forward(self, ids):
            h = torch.tanh(self.fc(self.embed(ids)))
            return self.h1(h) + F.linear(h, self.embed.weight)

    model = TiedPlusHead().double()
    ids = torch.randint(0, 10, (6,))
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    F.cross_entropy(model(ids), ids).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"units \['h1'\] and a linear map that is no unit"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
