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
    """The loss's softmax there is over positions, not channels (a first version gave the channel softmax, over
    one channel, or over two instead of the positions, silently). The span head's positions are a dimension of
    the convolution's output: it takes the softmax over them; the policy's, flattened from two, are none: M
    takes the S target for it, and says so."""
    model = PolicyHead(kind)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    out = model(torch.randn(2, 3, 5, 5) if kind == "policy" else torch.randn(2, 3, 7))
    (out.sum() if kind == "policy" else out[0].sum() + out[1].sum()).backward()
    if kind == "span":
        opt.step()
        assert _transfers(opt) == [("final", "softmax(dim=2)")]
    else:
        with pytest.warns(UserWarning, match=r"Variant M takes the S target .* 'final'"):
            opt.step()
        assert _transfers(opt) == [("final", "softmax of a reshaped output")]


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


class NormedHead(nn.Module):
    """A tanh layer, then a head whose weight is computed from parameters (DINO's weight-normed last layer, a
    spectral-normed discriminator's)."""

    def __init__(self, norm):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = norm(nn.Linear(5, 3))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("norm", [torch.nn.utils.parametrizations.weight_norm,
                                  torch.nn.utils.parametrizations.spectral_norm])  # fmt: skip
def test_a_head_whose_weight_is_computed_is_no_unit_and_the_body_keeps_its_transfer(norm):
    """The output comes from a map no unit records: no unit takes the output activation, with a warning, and the
    body's step is the one it takes with its discovered tanh (the body took the softmax, silently)."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    named, discovered = NormedHead(norm).double(), NormedHead(norm).double()
    discovered.load_state_dict(named.state_dict())
    kwargs = dict(variant="M", lr=0.1, activation_lr=1.0, local_iters=3, inner="sgd")
    for model, extra in ((named, dict(output_activation="softmax")), (discovered, {})):
        opt = LocoPropOptimizer(model, **kwargs, **extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert {unit.name: unit.transfer.name for unit in opt.units}["body"] == "tanh"
        said = any("one computed from parameters" in str(w.message) for w in caught)
        assert said == bool(extra)
    assert_same_params(named, snapshot(discovered))


class ComputedHead(nn.Module):
    """A tanh layer, then a head whose weight is computed from parameters, applied by ``torch.addmm`` (Hugging
    Face's Conv1D, pruned), ``torch.einsum`` (its operands one by one, or as one list) or ``torch.bmm`` (a weight
    scaled by a learned gain)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.body = how, nn.Linear(4, 6)
        self.weight, self.gain = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.ones(3))

    def forward(self, x):
        h, weight = torch.tanh(self.body(x)), self.weight * self.gain
        if self.how == "addmm":
            return torch.addmm(self.gain, h, weight)
        if self.how == "einsum-list":
            return torch.einsum("bi,io->bo", [h, weight])
        return torch.einsum("bi,io->bo", h, weight) if self.how == "einsum" else torch.bmm(h[None], weight[None])[0]


@pytest.mark.parametrize("how", ["addmm", "einsum", "einsum-list", "bmm"])
def test_a_computed_weight_in_any_product_is_no_unit(how):
    """(F.linear's and convolutions' computed weights were told, these products' not: the body took the output
    activation, silently.)"""
    model = ComputedHead(how)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    with pytest.warns(UserWarning, match="one computed from parameters"):
        F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ("only 40% ... local")
        opt.step()
    assert {unit.name: unit.transfer.name for unit in opt.units}["body"] == "tanh"


class ConcatenatedDecoder(nn.Module):
    """A tanh layer, then scores against a matrix concatenated from two weights (MobileBERT's decoder,
    ``h @ cat([decoder.weight.T, dense.weight])``); or, ``pointer``, scores of queries against keys, both units'
    outputs."""

    def __init__(self, pointer: bool = False):
        super().__init__()
        self.pointer = pointer
        self.body, self.tied, self.extra = nn.Linear(4, 6), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if self.pointer:
            return self.tied(h[:, :3]) @ self.extra(h[:, 3:]).T
        return h @ torch.cat([self.tied.weight.T, self.extra.weight])


def test_a_matrix_concatenated_from_weights_is_no_unit_and_the_body_keeps_its_transfer():
    """(The body took the output activation, silently: the product with a computed matrix was walked through.)
    Scores of two units' outputs, queries against keys, stay ambiguous: their product's operand is an
    activation, not a weight."""
    model = ConcatenatedDecoder()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    with pytest.warns(UserWarning, match="one computed from parameters"):
        F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
    opt.step()
    assert {unit.name: unit.transfer.name for unit in opt.units}["body"] == "tanh"
    model = ConcatenatedDecoder(pointer=True)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 6, (6,))).backward()
    with pytest.raises(RuntimeError, match=r"units \['tied', 'extra'\] all reach it"):
        opt.step()


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
        with pytest.raises(
            ValueError, match="nothing shows which dimension of the convolution's output the loss reads"
        ):
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
        self.conv = nn.Conv2d(1, 2, 3)  # (two channels: a softmax over one would be 1, the loss's over no channel)
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


class ScoreHead(nn.Module):
    """Heads whose scores the model regroups before the loss: a question-answering head's two columns split into
    start and end logits over the positions (BERT's ``qa_outputs``), a pointer's one score per position squeezed
    (XLNet's start pooler), a multiple-choice head's one score per (question, choice) row viewed as questions ×
    choices (``BertForMultipleChoice``); or a column of scores the loss squeezes itself."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 2 if kind == "span" else 1)

    def forward(self, x):
        a = self.head(torch.tanh(self.body(x)))
        if self.kind == "span":
            start, end = a.split(1, dim=-1)
            return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        return {"pointer": lambda: a.squeeze(-1), "choice": lambda: a.view(-1, 3), "column": lambda: a}[self.kind]()


def _scores_loss(out, labels):
    outputs = out if isinstance(out, tuple) else (out.squeeze(-1) if out.dim() == 3 else out,)
    return sum(F.cross_entropy(scores, y) for scores, y in zip(outputs, labels))


@pytest.mark.parametrize("kind", ["span", "pointer", "choice", "column"])
def test_a_head_whose_scores_the_model_regroups_takes_the_loss_softmax_or_the_s_target(kind):
    """The loss's softmax of a span or pointer head is over the positions, dimension 1 of the head's B × T × k
    output: M's step of the head is the minimiser's K inner SGD steps written out with autograd, F the
    logsumexp over positions (it took the softmax over its k outputs, over one for the pointer, silently). A
    multiple-choice head's scores are regrouped from its rows, no dimension of its output, and a column's softmax
    over its one output is 1, not the loss's: they take the S target, and say so."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, dtype=torch.float64) if kind != "choice" else torch.randn(6, 5, dtype=torch.float64)
    labels = [torch.randint(0, 4 if kind != "choice" else 3, (6 if kind != "choice" else 2,)) for _ in range(2)]
    model = ScoreHead(kind).double()
    before = copy.deepcopy(model)
    eta, gamma, k = 0.3, 0.5, 2
    opt = LocoPropOptimizer(model, variant="M", lr=eta, activation_lr=gamma, local_iters=k, inner="sgd",
                            inner_schedule="constant", output_activation="softmax")  # fmt: skip
    _scores_loss(model(x), labels).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    took_s = [w for w in caught if "takes the S target" in str(w.message)]

    # Independently: the head's input and output, the loss's gradient there, the target, K steps on the objective.
    h = torch.tanh(before.body(x)).detach()
    a = before.head(h).detach().requires_grad_()
    regrouped = {"span": lambda a: tuple(c.squeeze(-1) for c in a.split(1, dim=-1)), "pointer": lambda a: a.squeeze(-1),
                 "choice": lambda a: a.view(-1, 3), "column": lambda a: a}[kind]  # fmt: skip
    (g,) = torch.autograd.grad(_scores_loss(regrouped(a), labels), a)
    if kind in ("choice", "column"):
        target = a.detach() - gamma * g  # S: ½‖a_θ − â‖²

        def objective(a_theta):
            return 0.5 * (a_theta - target).square().sum()
    else:
        target = torch.softmax(a.detach(), dim=1) - gamma * g  # M: Σ logsumexp over positions − ŷ·a_θ

        def objective(a_theta):
            return torch.logsumexp(a_theta, dim=1).sum() - (target * a_theta).sum()

    weight, bias = before.head.weight.detach().clone(), before.head.bias.detach().clone()
    for _ in range(k):
        weight.requires_grad_(), bias.requires_grad_()
        grads = torch.autograd.grad(objective(F.linear(h, weight, bias)), (weight, bias))
        weight, bias = weight.detach() - eta * grads[0], bias.detach() - eta * grads[1]
    torch.testing.assert_close(model.head.weight, weight, **CLOSE)
    torch.testing.assert_close(model.head.bias, bias, **CLOSE)
    expected = "softmax of a reshaped output" if kind in ("choice", "column") else "softmax(dim=1)"
    assert _transfers(opt) == [("body", "tanh"), ("head", expected)]
    assert [str(w.message).split(":")[0] for w in took_s] == (
        ["Variant M takes the S target (pre-activation) for unit(s) 'head' (softmax of a reshaped output)"]
        if kind in ("choice", "column")
        else []
    )


def _bert_config(**extra):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=40, max_position_embeddings=12, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **extra)  # fmt: skip


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("BertForQuestionAnswering", ("qa_outputs", "softmax(dim=1)")),
        ("BertForMultipleChoice", ("classifier", "softmax of a reshaped output")),
        ("BertForTokenClassification", ("classifier", "softmax")),
        ("BertForSequenceClassification", ("classifier", "softmax")),
        ("GPT2ForSequenceClassification", ("score", "softmax")),
    ],
)
def test_hugging_face_heads_take_the_softmax_their_loss_applies(head, expected):
    """Hugging Face's heads as their own loss reads them: question answering's start and end logits over the
    positions, multiple choice's over the choices (regrouped rows: the S target), tokens' and sequences' over
    the classes (GPT-2's gathered at each sequence's last token)."""
    import transformers

    if head.startswith("GPT2"):
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=12,
                                         pad_token_id=0, num_labels=3)  # fmt: skip
    else:
        config = _bert_config(num_labels=2 if head == "BertForQuestionAnswering" else 3)
    model = getattr(transformers, head)(config)
    torch.manual_seed(0)
    ids = torch.randint(1, 40, (2, 3, 8) if head == "BertForMultipleChoice" else (2, 8))
    labels = {"BertForQuestionAnswering": dict(start_positions=torch.tensor([1, 5]),
                                               end_positions=torch.tensor([3, 6])),
              "BertForTokenClassification": dict(labels=torch.randint(0, 3, (2, 8)))}.get(
        head, dict(labels=torch.tensor([2, 0])))  # fmt: skip
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    model(input_ids=ids, **labels).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (GELU's units take the S target)
        opt.step()
    name, transfer = expected
    assert {unit.name: unit.transfer.name for unit in opt.units}[name] == transfer


_VIEW_CHAINS = {
    "split, squeeze, contiguous": lambda a: a.split(1, dim=-1)[1].squeeze(-1).contiguous(),
    "split into sizes": lambda a: a.split([3, 2], dim=1)[0],
    "chunk of the last": lambda a: a.chunk(2, dim=-1)[0],
    "select": lambda a: a[:, 2],
    "unbind": lambda a: a.unbind(1)[0],
    "slice of the last": lambda a: a[..., 1:],
    "whole slice": lambda a: a[1:, :, :],
    "narrow": lambda a: a.narrow(1, 0, 3),
    "transpose": lambda a: a.transpose(-1, 1),
    "permute": lambda a: a.permute(2, 0, 1),
    "flatten the leading": lambda a: a.flatten(0, 1),
    "flatten the last": lambda a: a.flatten(1),
    "reshape a transpose": lambda a: a.transpose(0, 1).reshape(-1, 2),
    "view regrouped": lambda a: a.reshape(4, 5, 2).view(2, 2, 10),
    "unsqueeze": lambda a: a.unsqueeze(-1).squeeze(-1).unsqueeze(0),
    "unsqueeze last": lambda a: a.unsqueeze(-1),
    "squeeze all": lambda a: a[:, :1].squeeze(),
    "squeeze dims": lambda a: a[:, :1].squeeze((1,)),
    "expand": lambda a: a[:, None].expand(4, 3, 5, 2),
    "expand a dimension": lambda a: a[..., :1].expand(4, 5, 3),
    "gathered rows": lambda a: a[torch.arange(4), torch.tensor([0, 1, 4, 2])],
    "indexed last": lambda a: a[..., torch.tensor([1, 1])],
    "indexed middle": lambda a: a[:, torch.tensor([[0, 1], [4, 2]])],
    "indexed apart": lambda a: a[torch.tensor([0, 1]), :, torch.tensor([1, 0])],
    "boolean mask": lambda a: a[:, torch.tensor([True, False, True, True, False])],
    "mask of two dimensions": lambda a: a[:, torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0], [0, 0]]).bool()],
    "mask of the trailing two": lambda a: a.permute(2, 0, 1)[:, torch.tensor([[1, 0, 1, 1, 0]] * 4).bool()],
    "t": lambda a: a[:, :, 0].t(),
    "a dimension of one beside": lambda a: a.reshape(20, 2).view(20, 1, 2),
    "cast, clone": lambda a: a.to(torch.float64).clone().transpose(0, 2),
}


@pytest.mark.parametrize("chain", list(_VIEW_CHAINS))
def test_the_dimension_an_output_reads_is_found_through_views(chain):
    """Which dimension of a unit's 4 × 5 × 2 output each dimension of a view is, against the values themselves:
    the unit's output numbers its elements, and a row of the view along a dimension is a whole dimension of it
    when it holds every element along that dimension, the others fixed. The last dimension's is found exactly;
    another's may be left unknown (None: the loss's softmax is then taken as over no dimension of the unit's),
    never taken for a wrong one."""
    from locoprop.views import dimension_through_views

    shape = (4, 5, 2)
    a = torch.arange(40.0).view(shape).requires_grad_() * 1
    out = _VIEW_CHAINS[chain](a)
    for dim in range(out.dim()):
        node, found = dimension_through_views(out.grad_fn, out.shape, dim, {a.grad_fn: "unit"})
        assert node is a.grad_fn
        rows = out.detach().movedim(dim, -1).long().reshape(-1, out.shape[dim])
        coordinates = torch.stack(torch.unravel_index(rows, shape), -1)
        whole = [
            d
            for d in range(3)
            if shape[d] == out.shape[dim]
            and all(
                sorted(row[:, d].tolist()) == list(range(shape[d]))
                and (row[:, [o for o in range(3) if o != d]] == row[0, [o for o in range(3) if o != d]]).all()
                for row in coordinates
            )
        ]
        if dim == out.dim() - 1:
            assert found == (whole[0] if whole else None)
        else:
            assert found is None or found == whole[0], dim


def test_a_first_batch_of_one_question_leaves_the_choices_regrouped():
    """A multiple-choice head's (1·C) × 1 scores viewed as 1 × C hold C in a row, as its dimension 0 would: the
    first batch (of one question) fixed softmax(dim=0), over every row of the larger batches after it."""
    model = ScoreHead("choice")
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    for questions in (1, 2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(3 * questions, 5)), torch.zeros(questions, dtype=torch.long)).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (M takes the S target)
            opt.step()
        assert _transfers(opt)[1] == ("head", "softmax of a reshaped output")


class FlatTokens(nn.Module):
    """A head applied to the flattened tokens, its logits viewed back as B × T × V."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 5)

    def forward(self, x):
        batch, length, _ = x.shape
        return self.head(torch.tanh(self.body(x.reshape(batch * length, -1)))).view(batch, length, 5)


def test_a_first_batch_of_one_token_keeps_the_logits_softmax():
    """B·1 × V logits viewed as B × 1 × V keep V whole (a first rule for batches of one took them for regrouped,
    and M the S target, for every later batch)."""
    model = FlatTokens()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    for length in (1, 3):
        opt.zero_grad()
        logits = model(torch.randn(2, length, 4))
        F.cross_entropy(logits.flatten(0, 1), torch.zeros(2 * length, dtype=torch.long)).backward()
        opt.step()
        assert _transfers(opt) == [("body", "tanh"), ("head", "softmax")]


class ConvScores(nn.Module):
    """A convolution's scores returned as one channel's heat map, B × H × W (the loss may read H, W or both), or
    at the valid pixels of a mask, B × C × N (cross-entropy's classes are the channels)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.head = kind, nn.Conv2d(3, 2, 1)

    def forward(self, x):
        a = self.head(x)
        return a[:, 0] if self.kind == "heat map" else a[:, :, torch.ones(4, 5).tril().bool()]


@pytest.mark.parametrize(("kind", "expected"), [("heat map", "softmax of a reshaped output"),
                                                ("valid pixels", "softmax(dim=1)")])  # fmt: skip
def test_a_convolution_output_indexed_keeps_its_channels_or_tells_none(kind, expected):
    """(The heat map took softmax(dim=2), over W, and the valid pixels softmax(dim=3), silently: a boolean mask
    was read as indexing one dimension.)"""
    model = ConvScores(kind)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    model(torch.randn(2, 3, 4, 5)).square().sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert _transfers(opt) == [("head", expected)]
    assert any("takes the S target" in str(w.message) for w in caught) == (kind == "heat map")


class _ScoresInside(nn.Module):
    """Positions' scores and their softmax inside a submodule that the training code calls itself."""

    def __init__(self):
        super().__init__()
        self.net = nn.Module()
        self.net.score, self.net.enc = nn.Linear(6, 1), nn.Linear(5, 6)
        self.net.forward = lambda x: torch.softmax(self.net.score(torch.tanh(self.net.enc(x))), dim=1)


def test_the_output_activations_holder_is_never_read_again():
    """The holder, found as the last unit to run (the model's own forward never runs), keeps the output
    activation when a first batch of one grows (its own reading, from before, took it over)."""
    model = _ScoresInside()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    for batch in (1, 4):
        opt.zero_grad()
        F.nll_loss(
            model.net(torch.randn(batch, 5, 5)).squeeze(-1).log(), torch.zeros(batch, dtype=torch.long)
        ).backward()
        opt.step()
        assert {unit.name: unit.transfer.name for unit in opt.units}["net.score"] == "softmax"
