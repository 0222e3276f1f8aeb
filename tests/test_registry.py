"""The optimizer registry serves every name of SPEC §7."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines import OPTIMIZERS, CombinedOptimizer, make_optimizer, optimizer_names
from locoprop import LocoPropOptimizer

SPEC_NAMES = [
    "sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop-tf", "adagrad", "kfac", "shampoo",
    "soap", "muon", "locoprop-m", "locoprop-s", "locoprop-s-exact",
]  # fmt: skip

# The registry defaults suit the reference autoencoder at batch 1000; a tiny
# classifier needs larger steps from some of them.
SMALL_PROBLEM = {
    "locoprop-m": dict(lr=1e-3, activation_lr=1.0, inner_momentum=0.9),
    "locoprop-s": dict(lr=1e-3, activation_lr=1.0, inner_momentum=0.9),
    "rmsprop-tf": dict(lr=1e-2),  # ms starts at 1: small first steps
    "shampoo": dict(lr=1e-2, start_preconditioning_step=2, preconditioning_compute_steps=2),
}


def test_registry_names_are_the_spec_names():
    assert optimizer_names() == SPEC_NAMES
    for spec in OPTIMIZERS.values():
        assert set(spec.searched) <= set(spec.defaults), spec.name


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_optimizer_builds_and_lowers_the_loss(name):
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = (x[:, :3] @ torch.randn(3, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = make_optimizer(name, model, loss="cross_entropy", **SMALL_PROBLEM.get(name, {}))
    assert isinstance(opt, torch.optim.Optimizer)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < initial - 0.01, (initial, final)


def test_locoprop_entries_take_the_output_transfer_from_the_loss_and_flat_inner_kwargs():
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8))
    opt = make_optimizer("locoprop-m", model, loss="bce", inner_momentum=0.5)
    assert isinstance(opt, LocoPropOptimizer)
    assert opt.variant == "M"
    assert opt.units[-1].transfer.name == "sigmoid"
    assert opt.inner.defaults["momentum"] == 0.5
    assert opt.inner.defaults["decay"] == 0.9  # registry default
    exact = make_optimizer("locoprop-s-exact", copy.deepcopy(model))
    assert (exact.variant, exact.solve) == ("S", "exact")


def test_muon_takes_matrices_and_adamw_the_rest():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = make_optimizer("muon", model)
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(model[2].weight), id(model[4].weight)}
    rest = [model[0].weight, model[0].bias, model[2].bias, model[3].weight, model[3].bias, model[4].bias]
    assert [id(p) for g in adamw.param_groups for p in g["params"]] == [id(p) for p in rest]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    scheduler.step()
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert adamw.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_combined_optimizer_state_dict_round_trip():
    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    batches = [torch.randn(8, 4) for _ in range(4)]

    def train(m, opt, xs):
        for x in xs:
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()

    model = make()
    opt = make_optimizer("muon", model)
    train(model, opt, batches[:2])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, batches[2:])
    fresh = make()
    fresh.load_state_dict(saved[0])
    fresh_opt = make_optimizer("muon", fresh)
    fresh_opt.load_state_dict(saved[1])
    train(fresh, fresh_opt, batches[2:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_unknown_names_and_hyperparameters_are_refused_with_the_valid_ones():
    model = nn.Linear(3, 2)
    with pytest.raises(
        ValueError, match="Unknown optimizer: 'lion'; expected one of sgd, momentum, .*locoprop-s-exact"
    ):
        make_optimizer("lion", model)
    with pytest.raises(ValueError, match="Unknown hyperparameter\\(s\\) for 'adam': betas; it takes beta1, beta2, eps"):
        make_optimizer("adam", model, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="Unknown loss: 'hinge'"):
        make_optimizer("kfac", model, loss="hinge")
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        make_optimizer("locoprop-m", model, lr=-1)
