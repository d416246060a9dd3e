"""Tied weights (one parameter held by two layers) stay tied through fxgndi.prune, and the
pruned model computes what the dense one computes with the removed channels zeroed (forward
pre-hooks on the dense model: independent of torch-pruning and of fxgndi)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxgndi
from fxgndi.core.errors import FxgndiError

from tests.helpers import removed_channels, zeroed_output


class TiedChain(nn.Module):
    """a -> b -> c -> d with ``c.weight = b.weight``: b's outputs are c's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.d = nn.Linear(8, 3)
        self.c.weight = self.b.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.d(torch.relu(self.c(h)))


class TiedBranches(nn.Module):
    """conv a, then two convs b and c with one weight side by side, concatenated: only the tie
    couples b's outputs with c's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b, self.c = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.c.weight = self.b.weight
        self.d = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.cat([torch.relu(self.b(h)), torch.tanh(self.c(h))], 1)
        return self.d(h.mean((2, 3)))


def _unique_parameters(model: nn.Module) -> int:
    return len({id(p) for m in model.modules() for p in m.parameters(recurse=False)})


@pytest.mark.parametrize("cls, shape, target", [(TiedChain, (6,), "macs"),
                                                (TiedBranches, (2, 5, 5), "channels")])
@pytest.mark.parametrize("importance", ["gndi", "l1"])
def test_tied_weights_stay_one_parameter_and_the_output_is_the_zeroed_dense_one(
        cls, shape, target, importance):
    torch.manual_seed(0)
    model = cls().double().eval()
    dense = copy.deepcopy(model)
    weight = model.b.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    r = fxgndi.prune(model, data, target=target, sparsity=0.5, importance=importance,
                     repair=False)

    assert r.model.b.weight is r.model.c.weight
    assert _unique_parameters(r.model) == _unique_parameters(dense) == 7
    assert model.b.weight is model.c.weight and torch.equal(model.b.weight, weight)  # untouched
    kept_out, kept_in = r.kept["b"], r.kept_inputs["b"]
    assert len(kept_out) < 8 if cls is TiedChain else len(kept_in) < 6  # something was pruned
    assert r.kept["c"] == kept_out and r.kept_inputs["c"] == kept_in
    assert torch.equal(r.model.b.weight, weight[kept_out][:, kept_in])
    x = torch.randn(5, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = r.model(x)
    expected = zeroed_output(dense, x, inputs=removed_channels(dense, r.kept_inputs, "in"))
    torch.testing.assert_close(out, expected)


def test_a_tied_bias_keeps_its_tie_and_compensation_refuses_it():
    torch.manual_seed(0)
    model = TiedChain().double().eval()
    model.c.bias = model.b.bias
    data = [(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    r = fxgndi.prune(model, data, sparsity=0.5, importance="l1")  # the default repair too
    assert r.model.b.bias is r.model.c.bias and r.model.b.weight is r.model.c.weight
    assert {"b", "c"} <= set(r.settings["repair_ran"]["reconstruct"]["skipped"])
    with pytest.raises(FxgndiError, match=r"'b.bias' and 'c.bias' are one tied parameter, and "
                                          r"compensate.*Fix: untie the biases"):
        fxgndi.prune(model, data, sparsity=0.5, repair={"compensate": True})


def test_tied_weights_stay_tied_with_compensation_global_and_iterative_pruning():
    torch.manual_seed(0)
    model = TiedChain().double().eval()
    data = [(torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    r = fxgndi.prune(model, data, sparsity=0.5, global_pruning=True, iterative_steps=2,
                     repair={"compensate": True, "reconstruct": False})
    assert r.model.b.weight is r.model.c.weight
    assert r.model.b.weight.shape[0] < 8 and _unique_parameters(r.model) == 7
    assert r.model(data[0][0]).shape == (8, 3)


class _NoIteration:
    """Data that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("the data was read before the refusal")


def test_a_tie_fxgndi_cannot_keep_is_refused_before_any_work():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4))
    model[2].weight = model[0].weight  # depthwise: torch-pruning prunes its dims together
    with pytest.raises(FxgndiError, match=r"'0.weight' and '2.weight' are one tied parameter.*"
                                          r"not 0.weight \(Conv2d\).*Fix: untie them"):
        fxgndi.prune(model, _NoIteration(), sparsity=0.5)
    assert model[2].weight is model[0].weight
