"""Groups through reshapes: a Linear's units viewed as channels of a conv (several units per
channel) and a conv's channels flattened into a Linear (several features per channel), scored
against the exact effect of each unit computed with forward pre-hooks (plain PyTorch)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from fxgndi.pruning.importance import AblationImportance, GNDIImportance
from tests.helpers import randomize_batchnorm


class ExpandNet(nn.Module):
    """fc's 32 units are viewed as 8 channels of 2 x 2 (4 units per channel) read by conv_a
    and conv_b, whose channels are coupled by an add and flattened into head (4 features per
    channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 32)
        self.bn = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(torch.relu(self.fc(x)).view(-1, 8, 2, 2)))
        h = torch.relu(self.conv_a(h)) + self.conv_b(h)
        return self.head(h.flatten(1))


def _setup():
    torch.manual_seed(0)
    model = randomize_batchnorm(ExpandNet()).double()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    return model, data, dg


@contextlib.contextmanager
def _scaled_inputs(layers, index, alpha):
    """Scale input element ``index`` (per sample, flattened) of each layer by 1 - alpha."""
    def hook(module, args):
        h = args[0].clone()
        h.view(h.shape[0], -1)[:, index] *= 1 - alpha
        return (h,)
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _reference(model, data, layers, units, exact):
    """Per unit (a list of input elements of ``layers``): E_x of the L2 change of the logits
    when they are zeroed (``exact``), or of its central-difference tangent in alpha."""
    def out(index, alpha, x):
        with _scaled_inputs(layers, index, alpha), torch.no_grad():
            return model(x)
    values = []
    for index in units:
        per_batch = []
        for x in data:
            if exact:
                change = out(index, 1.0, x) - out(index, 0.0, x)
            else:
                change = (out(index, 1e-6, x) - out(index, -1e-6, x)) / 2e-6
            per_batch.append(change.norm(dim=1))
        values.append(torch.cat(per_batch).mean())
    return torch.stack(values)


@pytest.mark.parametrize("cls, exact", [(GNDIImportance, False), (AblationImportance, True)])
def test_each_unit_viewed_as_part_of_a_channel_has_its_own_effect(cls, exact):
    model, data, dg = _setup()
    group = dg.get_pruning_group(model.fc, tp.prune_linear_out_channels, list(range(32)))
    scores = cls(data)(group)
    # unit r is element r of what conv_a and conv_b read (view keeps the row-major order)
    reference = _reference(model, data, [model.conv_a, model.conv_b],
                           [[r] for r in range(32)], exact)
    assert bool((reference > 0).all())
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("cls, exact", [(GNDIImportance, False), (AblationImportance, True)])
def test_a_channel_flattened_into_a_linear_is_all_of_its_features(cls, exact):
    model, data, dg = _setup()
    group = dg.get_pruning_group(model.conv_a, tp.prune_conv_out_channels, list(range(6)))
    scores = cls(data)(group)
    reference = _reference(model, data, [model.head],
                           [list(range(4 * c, 4 * c + 4)) for c in range(6)], exact)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-8)


def test_a_reshape_then_a_concat_is_unscorable():
    class CatNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.side = nn.Linear(5, 16), nn.Conv2d(1, 2, 1)
            self.conv = nn.Conv2d(6, 3, 1)

        def forward(self, x):
            h = self.fc(x).view(-1, 4, 2, 2)
            h = torch.cat([h, self.side(h[:, :1])], 1)
            return self.conv(h).mean((2, 3))

    torch.manual_seed(0)
    model, data = CatNet().eval(), [torch.randn(4, 5)]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][:1])
    group = dg.get_pruning_group(model.fc, tp.prune_linear_out_channels, list(range(16)))
    imp = GNDIImportance(data)
    assert imp(group) is None
    assert "an op that moves elements" in imp.skipped["fc"]
