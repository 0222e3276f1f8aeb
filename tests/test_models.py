"""LocoProp on the models researchers train: every linear map a unit, whatever calls it (SPEC §2).

Tiny random configurations of Hugging Face's GPT-2, BERT, Llama, Falcon and
Mamba, torch's nn.TransformerEncoder and encoder-decoder nn.Transformer
(cross-attention), a small ResNet with BatchNorm and an LSTM language model.
For each: the share of parameters solved locally, SPEC §2's SGD identity
(expected parameters from autograd on a copy), a checkpoint that continues
bit for bit, what the forward pass recorded (checked against module hooks
and hand-written projections), and on 2 gloo ranks the one-process step.
"""

import copy
import gc
import pathlib
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers
from helpers import assert_round_trip_continues, snapshot
from torch import nn

from locoprop import LocoPropOptimizer

transformers.logging.set_verbosity_error()

VOCAB, WIDTH, LENGTH = 64, 32, 12


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2,
                                     intermediate_size=2 * WIDTH, vocab_size=VOCAB, max_position_embeddings=LENGTH,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=WIDTH, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=2 * WIDTH, vocab_size=VOCAB,
                                      max_position_embeddings=LENGTH)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _falcon() -> nn.Module:
    """FalconLinear computes x @ W.T: F.linear written out."""
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=LENGTH)  # fmt: skip
    return transformers.FalconForCausalLM(config)


def _mamba() -> nn.Module:
    """Mamba's time step is dt_proj.weight @ x (the weight on the left); its convolution reads a squeezed and
    unsqueezed view of conv1d.weight; A_log enters through exp and stays outside the units."""
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, state_size=8)
    return transformers.MambaForCausalLM(config)


def _xlnet() -> nn.Module:
    """XLNet's attention projections are 3-D weights applied by torch.einsum ("ibh,hnd->ibnd")."""
    config = transformers.XLNetConfig(vocab_size=VOCAB, d_model=WIDTH, n_layer=2, n_head=2, d_inner=2 * WIDTH,
                                      dropout=0.0)  # fmt: skip
    return transformers.XLNetLMHeadModel(config)


class EncoderLM(nn.Module):
    """An embedding, torch's nn.TransformerEncoder (nn.MultiheadAttention inside) and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)))


class Seq2Seq(nn.Module):
    """An embedding shared by source and target, torch's encoder-decoder nn.Transformer and a head: the decoder's
    cross-attention projects its query and its keys and values with separate row blocks of in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.transformer = nn.Transformer(WIDTH, 2, 1, 1, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, source, target):
        return self.head(self.transformer(self.embed(source), self.embed(target)))


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """A ResNet with BatchNorm (basic blocks), written here: torchvision does not import on this CPU build."""

    def __init__(self, channels=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())  # fmt: skip
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.fc = nn.Linear(channels, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class LSTMLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])


def _tokens(seed=0):
    return torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(seed))


def _causal_lm_loss(m, seed=0):
    ids = _tokens(seed)
    return m(input_ids=ids, labels=ids).loss


def _classifier_loss(m, seed=0):
    labels = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(seed))
    return m(input_ids=_tokens(seed), labels=labels).loss


def _next_token_loss(m, seed=0):
    ids = _tokens(seed)
    return F.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _translation_loss(m, seed=0):
    source, target = _tokens(seed), _tokens(seed + 1000)[:, :7]
    return F.cross_entropy(m(source, target[:, :-1]).flatten(0, 1), target[:, 1:].flatten())


def _image_loss(m, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 1, 8, 8, generator=generator, dtype=next(m.parameters()).dtype)
    return F.cross_entropy(m(images), torch.randint(0, 10, (8,), generator=generator))


# name -> (model, loss, the least share of parameters that is local)
MODELS = {
    "gpt2": (_gpt2, _causal_lm_loss, 0.95),
    "bert": (_bert, _classifier_loss, 0.95),
    "llama": (_llama, _causal_lm_loss, 0.95),
    "falcon": (_falcon, _causal_lm_loss, 0.95),
    "mamba": (_mamba, _causal_lm_loss, 0.9),
    "xlnet": (_xlnet, _causal_lm_loss, 0.95),
    "transformer-encoder": (EncoderLM, _next_token_loss, 0.95),
    "transformer-seq2seq": (Seq2Seq, _translation_loss, 0.95),
    "resnet": (SmallResNet, _image_loss, 0.95),
    # The fused recurrent weights (weight_ih_l0, weight_hh_l0) take plain inner steps, and say so.
    "lstm": (LSTMLanguageModel, _next_token_loss, 0.3),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().double()


def _quiet_step(opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # variant M's S target for GELU/SiLU units is said once, in its own test
        opt.step()


@pytest.mark.parametrize("name", MODELS)
def test_most_parameters_are_local_and_describe_says_which(name):
    model = _model(name)
    _, loss_fn, least = MODELS[name]
    opt = LocoPropOptimizer(model, variant="M")
    loss_fn(model).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    description = opt.describe()
    share_warnings = [str(w.message) for w in caught if "solved locally" in str(w.message)]
    if description.local_share < 0.5:  # said at the first step, naming the largest parameters that are not local
        assert len(share_warnings) == 1 and description.outside[0][0] in share_warnings[0]
    else:
        assert not share_warnings
    assert description.local_share >= least, str(description)
    text = str(description)
    assert "local:" in text and all(row.unit in text for row in description.rows)
    if name == "lstm":
        assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0"} <= {n for n, _ in description.outside}


def test_what_each_model_shows_in_its_forward_pass():
    """Kinds of map and transfer functions found at run time, not from module classes in a Sequential."""
    kinds = {}
    for name in ("gpt2", "bert", "llama", "transformer-encoder", "transformer-seq2seq"):
        model = _model(name)
        opt = LocoPropOptimizer(model, variant="M")
        MODELS[name][1](model).backward()
        _quiet_step(opt)
        kinds[name] = {row.unit: (row.kind, row.transfer, row.variant) for row in opt.describe().rows}
    gpt2 = kinds["gpt2"]
    assert gpt2["transformer.h.0.attn.c_attn"] == ("matmul", "identity", "M")  # HF Conv1D: torch.addmm
    assert gpt2["transformer.h.0.mlp.c_fc"] == ("matmul", "NewGELUActivation", "S")  # not monotone: S, never identity
    assert gpt2["transformer.wte"][:1] == ("embedding",) and gpt2["lm_head"][:1] == ("linear",)  # tied, both local
    bert = kinds["bert"]
    assert bert["bert.encoder.layer.0.intermediate.dense"] == ("linear", "GELUActivation", "S")
    assert bert["bert.pooler.dense"] == ("linear", "tanh", "M")  # a functional tanh, found at run time
    llama = kinds["llama"]
    assert llama["model.layers.0.mlp.gate_proj"][1:] == ("SiLUActivation", "S")
    assert llama["model.layers.0.mlp.up_proj"] == ("linear", "identity", "M")
    encoder = kinds["transformer-encoder"]
    assert encoder["encoder.layers.0.self_attn.in_proj"] == ("linear", "identity", "M")  # q, k, v packed
    assert encoder["encoder.layers.0.self_attn.out_proj"] == ("linear", "identity", "M")  # called through F.linear
    assert encoder["encoder.layers.0.linear1"] == ("linear", "relu", "M")  # F.relu inside the layer
    seq2seq = kinds["transformer-seq2seq"]
    # cross-attention: the query's rows and the key's and value's rows of in_proj_weight, both recorded
    assert seq2seq["transformer.decoder.layers.0.multihead_attn.in_proj"] == ("linear", "identity", "M")


def test_the_recorded_uses_are_the_maps_the_model_computed():
    """Against independent hooks: each module-called unit records its module input and output; the packed
    in-projection of nn.MultiheadAttention records its query and F.linear(query, in_proj_weight, in_proj_bias)."""
    model = _model("transformer-encoder")
    opt = LocoPropOptimizer(model)
    seen = {}
    attention = model.encoder.layers[0].self_attn

    def capture(module, args, kwargs, output):
        seen[module] = (args[0] if args else kwargs["query"], output)

    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in (model.head, model.encoder.layers[0].linear1,
                                                                            attention)]  # fmt: skip
    _next_token_loss(model).backward()
    for handle in handles:
        handle.remove()
    units = {unit.name: unit for unit in opt.units}
    for module, unit_name in ((model.head, "head"), (model.encoder.layers[0].linear1, "encoder.layers.0.linear1")):
        (record,) = units[unit_name].records
        torch.testing.assert_close(record.x, seen[module][0], rtol=0, atol=0)
        torch.testing.assert_close(record.a, seen[module][1].detach(), rtol=0, atol=0)
    (record,) = units["encoder.layers.0.self_attn.in_proj"].records
    query = seen[attention][0].transpose(0, 1)  # (batch_first: the attention runs on sequence-first rows)
    torch.testing.assert_close(record.x, query, rtol=0, atol=0)
    expected = F.linear(query, attention.in_proj_weight, attention.in_proj_bias).detach()
    torch.testing.assert_close(record.a, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize(
    "name",
    ["gpt2", "bert", "llama", "falcon", "mamba", "xlnet", "transformer-encoder", "transformer-seq2seq", "resnet"],
)
def test_one_local_sgd_step_is_the_backprop_sgd_step(name, variant):
    """SPEC §2's identity, within 1e-10 relative in float64, with every unit's step taken locally."""
    model = _model(name)
    loss_fn = MODELS[name][1]
    eta, gamma = 0.05, 2.0
    clone = copy.deepcopy(model)
    loss_fn(clone).backward()
    with torch.no_grad():
        expected = {n: p - eta * gamma * p.grad for n, p in clone.named_parameters() if p.grad is not None}
    opt = LocoPropOptimizer(model, variant=variant, lr=eta, activation_lr=gamma, local_iters=1, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    loss_fn(model).backward()
    _quiet_step(opt)
    got = {n: p.detach() for n, p in model.named_parameters() if n in expected}
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12, msg=n)
    assert opt.describe().local_share >= MODELS[name][2]


@pytest.mark.parametrize("name", ["gpt2", "transformer-encoder", "transformer-seq2seq", "resnet"])
def test_a_checkpoint_continues_bit_for_bit(name):
    loss_fn = MODELS[name][1]
    assert_round_trip_continues(
        lambda: _model(name),
        lambda m: LocoPropOptimizer(m, variant="M", lr=1e-3, activation_lr=1.0, local_iters=3, inner="adam"),
        list(range(5)),
        lambda m, seed: loss_fn(m, seed),
    )


# ------------------------------------------------------------------------------- two ranks
# GPT-2 and BERT read their position embeddings with ids of shape (1, L), shared by every sequence: that use
# counts once per rank, so on W ranks its divergence is W times the one-process one (README, Data parallel).
RANK_MODELS = ("llama", "transformer-encoder")


def _rank_loss(name, model, seed, rank=None, ranks=1):
    """The mean loss over this rank's share of 4 sequences (all 4 in one process)."""
    ids = _tokens(seed)
    if rank is not None:
        ids = ids.chunk(ranks)[rank]
    if name == "llama":
        return model(input_ids=ids, labels=ids).loss
    return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _rank_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        for name in RANK_MODELS:
            model = _model(name)
            opt = LocoPropOptimizer(model, variant="S", lr=1e-3, activation_lr=1.0, local_iters=3, inner="adam")
            for seed in range(2):
                opt.zero_grad()
                _rank_loss(name, model, seed, rank, world_size).backward()
                _quiet_step(opt)
            torch.save(snapshot(model), pathlib.Path(folder) / f"{name}-rank{rank}.pt")
    finally:
        # Objects of the finished cases left in reference cycles (DDP among them) must go before the
        # process group does: collected after it, at exit, they can abort the rank.
        gc.collect()
        dist.destroy_process_group()


def test_on_two_ranks_each_model_takes_the_one_process_step(tmp_path):
    """Llama's per-token mean loss over a rank's sequences is the global mean when every sequence has as
    many tokens, so two ranks take the step of one process on all four sequences."""
    mp.spawn(_rank_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for name in RANK_MODELS:
        model = _model(name)
        opt = LocoPropOptimizer(model, variant="S", lr=1e-3, activation_lr=1.0, local_iters=3, inner="adam")
        for seed in range(2):
            opt.zero_grad()
            _rank_loss(name, model, seed).backward()
            _quiet_step(opt)
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=True)
            for n, p in snapshot(model).items():
                where = f"{name} rank {rank}: {n}"
                torch.testing.assert_close(got[n], p, rtol=1e-9, atol=1e-12, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hidden_states_returned_beside_the_logits_leave_the_head_the_output_unit(name):
    """``output_hidden_states=True``: Llama's first hidden state is its embedding's own output; the head still
    takes ``output_activation`` (it was refused as ambiguous)."""
    model = _model(name)
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    ids = _tokens()
    model(input_ids=ids, labels=ids, output_hidden_states=True).loss.backward()
    _quiet_step(opt)
    assert [u.name for u in opt.units if u.transfer.name == "softmax"] == ["lm_head"]
