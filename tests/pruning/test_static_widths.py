"""Widths a model's code holds: forward flags fixed by concrete_args, attribute-held reshape
widths updated, literal ones kept; the pruned model runs, exports, and equals the dense model
with the removed channels zeroed (hooks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxgndi
from fxgndi.core.errors import FxgndiError

from tests.helpers import randomize_batchnorm


class FlagNet(nn.Module):
    """A forward flag and a classifier input width held in an attribute."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.literal = literal
        if not literal:
            self.feat_dim = 8 * 2 * 2
        self.fc = nn.Linear(32, 5)

    def forward(self, x, return_features=False):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = nn.functional.adaptive_avg_pool2d(h, 2)
        f = h.reshape(-1, 32) if self.literal else h.reshape(-1, self.feat_dim)
        if return_features:
            return f
        return self.fc(f)


def _model(literal=False):
    torch.manual_seed(0)
    return randomize_batchnorm(FlagNet(literal))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g))]


def test_flag_and_attribute_width_prune_run_export_and_equal_zeroing(data, tmp_path):
    model = _model()
    r = fxgndi.prune(model, data, sparsity=0.5, importance="gndi", repair=False,
                     concrete_args={"return_features": False})
    kept = r.kept["conv2"]
    assert len(kept) == 4 and r.model.feat_dim == 16 and model.feat_dim == 32
    assert r.settings["updated_widths"] == ["feat_dim"]
    x = data[0][0]
    # Independent reference: the dense model with conv2's removed channels zeroed (and conv's,
    # which the same prune removed), by hooks on the untouched model.
    gone = {"conv": sorted(set(range(16)) - set(r.kept["conv"])),
            "conv2": sorted(set(range(8)) - set(kept))}
    handles = [getattr(model, name).register_forward_hook(
        lambda m, a, out, idx=idx: out.index_fill(1, torch.tensor(idx, dtype=torch.long), 0))
        for name, idx in gone.items() if idx]
    # zeroing a conv's output channel is removal only if its BatchNorm maps 0 to 0: zero the
    # BatchNorm outputs instead (removal drops the channel after the BN too)
    for h in handles:
        h.remove()
    handles = [getattr(model, bn).register_forward_hook(
        lambda m, a, out, idx=idx: out.index_fill(1, torch.tensor(idx, dtype=torch.long), 0))
        for bn, idx in (("bn", gone["conv"]), ("bn2", gone["conv2"])) if idx]
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), expected, rtol=1e-5, atol=1e-5)
    result = fxgndi.export(r.model, tmp_path / "flag.pt2", example_inputs=x)
    assert result.max_abs_diff < 1e-5


def test_a_literal_width_keeps_the_layer_and_says_why(data):
    r = fxgndi.prune(_model(literal=True), data, sparsity=0.5, importance="l1",
                     concrete_args={"return_features": False})
    assert r.model.conv2.out_channels == 8 and r.model.conv.out_channels < 16
    assert "literal 32" in r.skipped["conv2"]
    r.model(data[0][0])


def test_without_concrete_args_the_refusal_names_the_fix(data):
    with pytest.raises(FxgndiError, match="concrete_args"):
        fxgndi.prune(_model(), data, sparsity=0.5, importance="l1")
