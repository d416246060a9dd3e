"""Widths a model's code holds: forward flags fixed by concrete_args, attribute-held reshape
widths updated, literal ones kept; the pruned model runs, exports, and equals the dense model
with the removed channels zeroed (hooks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxgndi

from tests.helpers import randomize_batchnorm, removed_channels, zeroed_output


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
    # zeroing a conv's output channel is removal only if its BatchNorm maps 0 to 0: zero the
    # BatchNorm outputs instead (removal drops the channel after the BN too)
    expected = zeroed_output(model, x, outputs={"bn": gone["conv"], "bn2": gone["conv2"]})
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


def test_without_concrete_args_the_flag_is_bound_to_its_default_and_said(data):
    with pytest.warns(UserWarning, match=r"\{'return_features': False\} bound.*concrete_args="):
        r = fxgndi.prune(_model(), data, sparsity=0.5, importance="l1", repair=False)
    given = fxgndi.prune(_model(), data, sparsity=0.5, importance="l1", repair=False,
                         concrete_args={"return_features": False})
    assert r.kept == given.kept and r.model.feat_dim == given.model.feat_dim == 16
    torch.testing.assert_close(r.model(data[0][0]), given.model(data[0][0]))


# Widths torch-pruning does not follow: the pruned model runs, the groups that cannot be pruned
# keep their widths and say why, and the rest equals the dense model with the removed channels
# zeroed (hooks on the untouched model).

def _zeroed(model: nn.Module, kept: dict[str, list[int]], x: torch.Tensor) -> torch.Tensor:
    """The dense model's output with every removed output channel of a conv / linear layer
    zeroed; removal is that where nothing between a layer and its readers normalises over
    channels."""
    return zeroed_output(model, x, outputs=removed_channels(model, kept))


class ShapeAttention(nn.Module):
    """``B, N, C = x.shape`` then ``out.reshape(B, N, C)`` on the attention output: C is the
    stream's width, not v's (PVT, CaiT, timm's ViT attention)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp, self.v, self.proj = nn.Linear(4, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2, self.head = nn.Linear(d, 16), nn.Linear(16, d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        a = self.v(x).reshape(B, N, 2, -1).transpose(1, 2)
        x = x + self.proj(a.softmax(-1).transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_a_size_read_off_another_tensors_shape_keeps_both_widths():
    torch.manual_seed(0)
    model, x = ShapeAttention().eval(), torch.randn(4, 5, 4)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], sparsity=0.5, target="channels",
                     importance="l1", repair=False)
    for name in ("inp", "v"):
        assert "read off the channels of inp" in r.skipped[name]
        assert r.channels[name][0] == r.channels[name][1]
    assert r.channels["fc1"] == (16, 8)  # the MLP inside still prunes
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), _zeroed(model, r.kept, x))


class GatingBlock(nn.Module):
    """gMLP's spatial gating: half of fc1's channels normalised, mixed over tokens by a Linear
    on the transposed tensor (which torch-pruning reads as channels), times the other half."""

    def __init__(self, d: int = 8, tokens: int = 4) -> None:
        super().__init__()
        self.fc1, self.norm = nn.Linear(d, 2 * d), nn.LayerNorm(d)
        self.mix, self.fc2 = nn.Linear(tokens, tokens), nn.Linear(d, d)

    def forward(self, x):
        u, v = self.fc1(x).chunk(2, dim=-1)
        v = self.mix(self.norm(v).transpose(-1, -2)).transpose(-1, -2)
        return self.fc2(u * v)


def test_a_failing_pruned_forward_keeps_the_widths_feeding_it_in_every_block():
    torch.manual_seed(0)
    model = nn.Sequential(GatingBlock(), GatingBlock(), nn.Flatten(), nn.Linear(32, 3)).eval()
    x = torch.randn(4, 4, 8)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], sparsity=0.5, target="channels",
                     importance="l1", repair=False)
    for name in ("0.fc1", "1.fc1"):  # found at block 0's LayerNorm, kept in both blocks
        assert "node _0_norm of the forward fails" in r.skipped[name]
        assert r.channels[name] == (16, 16)
    assert r.channels["0.fc2"] == (8, 4)
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), _zeroed(model, r.kept, x))


class SlicedConcat(nn.Module):
    """A grouped conv on part of a concat that a residual couples whole: torch-pruning slices
    the concat's group in the conv's 3 groups, which do not divide its 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 2, 1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.mix, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        a = self.a(x)
        z = torch.cat([a + self.grouped(a), self.b(x)], dim=1)
        z = z + self.mix(z)
        return self.head(z.mean((2, 3)))


def test_a_group_sliced_unevenly_by_a_grouped_conv_is_skipped_not_a_crash():
    torch.manual_seed(0)
    model, x = SlicedConcat().eval(), torch.randn(4, 3, 6, 6)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], sparsity=0.5, target="channels",
                     importance="gndi", repair=False)
    assert any("3 equal slices" in why for why in r.skipped.values())
    assert r.model.mix.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), _zeroed(model, r.kept, x))


def test_a_group_norm_without_bias_prunes_and_keeps_no_bias():
    torch.manual_seed(0)
    norm = nn.GroupNorm(1, 8)
    norm.bias = None  # timm's GroupNorm1NoBias
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(4, 3, 6, 6)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], sparsity=0.5, target="channels",
                     importance="l1", repair=False)
    pruned = r.model[1]
    assert r.model[0].out_channels == 4 and pruned.num_channels == 4
    assert pruned.bias is None and model[1].bias is None
    kept = torch.tensor(r.kept["0"])
    # by hand: the kept conv channels, normalised over themselves, scaled by the kept weights
    h = nn.functional.conv2d(x, model[0].weight[kept], model[0].bias[kept])
    h = torch.relu(nn.functional.group_norm(h, 1, model[1].weight[kept], None))
    with torch.no_grad():
        torch.testing.assert_close(r.model[2](pruned(r.model[0](x))), h.detach())


class FoldedWindows(nn.Module):
    """Windows of two tokens folded into the batch dim before a Linear (Swin / DaViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.win = nn.Linear(2, 8), nn.Linear(8, 8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):  # [B, 4, 2]
        h = self.stem(x)
        h = h + self.win(h.reshape(-1, 2, h.shape[-1])).reshape(h.shape)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


def test_windows_folded_into_the_batch_make_their_group_unscorable_not_a_crash():
    torch.manual_seed(0)
    model, x = FoldedWindows().eval(), torch.randn(4, 4, 2)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], sparsity=0.5, target="channels",
                     importance="gndi", repair=False)
    # the stream (stem, win, fc2 coupled by the residual adds) is read by win, folded
    assert ["'win' reads its channels with several rows per sample in the batch dim" in why
            for why in r.skipped.values()] == [True]
    assert r.channels["stem"] == (8, 8) and r.channels["fc1"] == (16, 8)
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), _zeroed(model, r.kept, x))
