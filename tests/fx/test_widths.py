"""Graph facts about widths: channel dims through layout ops, sizes read off another tensor's
shape, where a pruned forward fails (and the same code in every instance of its module class),
taps whose batch dim holds several rows per sample."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from fxgndi.fx.analysis import analyze, facts
from fxgndi.fx.taps import mark_folded, tap_consumers
from fxgndi.fx.widths import forward_failure, shape_widths


class Layouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = self.conv(x)                      # [B, 4, 2, 3], channels 1
        a = h.flatten(2)                      # [B, 4, 6]: keeps dims up to the channel
        b = h.permute(0, 2, 3, 1)             # [B, 2, 3, 4]: channels last
        c = b.reshape(x.shape[0], -1, 4)      # [B, 6, 4]: keeps the last dim
        d = c.transpose(1, 2)                 # [B, 4, 6]: channels back in dim 1
        e = b.reshape(x.shape[0], 2, 3, 2, 2)  # splits the channel dim: unknown
        return a, c, d, e


def test_channel_dims_follow_layout_ops():
    gm = fx.symbolic_trace(Layouts())
    ShapeProp(gm).propagate(torch.zeros(1, 3, 2, 3))
    analyze(gm)
    dims = {n.name: facts(n).channel_dim for n in gm.graph.nodes}
    # checked against the shapes in the comments above
    assert (dims["flatten"], dims["permute"], dims["reshape"], dims["transpose"],
            dims["reshape_1"]) == (1, -1, -1, 1, None)


class Block(nn.Module):
    """Attention-like: sizes read off the block input, then a reshape of another tensor."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.v = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        own = self.v(x)
        b, n, c = own.shape
        follows = own.transpose(1, 2).reshape(b, c, n)  # read off itself: follows its width
        return follows.transpose(1, 2).reshape(B, N, C)  # C is x's width, not v's


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(self.inp(x))


def test_shape_widths_lists_sizes_read_off_another_tensors_channels():
    found = shape_widths(Stack(), torch.zeros(1, 5, 3))
    # each block's last reshape: v's channels sized by the block input's channels, which the
    # block before makes (inp, then blocks.0.v); the reshape sized by v's own shape is not listed
    assert [(w.layers) for w in found] == [("blocks.0.v", "inp"), ("blocks.0.v", "blocks.1.v")]
    assert all(w.node.startswith("reshape") for w in found)


def test_a_reshape_sized_by_its_own_tensor_is_not_listed():
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)

        def forward(self, x):
            h = self.conv(x)
            B, C, H, W = h.shape
            return h.reshape(B, C, H * W)

    assert shape_widths(Own(), torch.zeros(1, 2, 3, 3)) == []


class Gate(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, 2 * d), nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        u, v = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(u * self.norm(v))


def test_forward_failure_names_the_layers_feeding_the_failing_node_in_every_instance():
    dense = nn.Sequential(Gate(), Gate())
    pruned = nn.Sequential(Gate(), Gate())
    pruned[0].fc1 = nn.Linear(4, 6)  # as if pruned without the LayerNorm: its half is 3 wide
    failure = forward_failure(pruned, dense, torch.zeros(1, 2, 4))
    assert failure.node == "_0_norm" and "normalized_shape" in failure.error
    # the LayerNorm reads fc1 (through the chunk); the second Gate runs the same code
    assert failure.layers == ("0.fc1", "1.fc1")
    assert forward_failure(dense, dense, torch.zeros(1, 2, 4)) is None


def test_forward_failure_names_the_parameters_a_failing_leaf_holds():
    class Embed(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.proj, self.pos = nn.Linear(2, 4), nn.Parameter(torch.zeros(1, 3, width))

        def forward(self, x):
            return self.proj(x) + self.pos

    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.embed = Embed(width)

        def forward(self, x):
            return self.embed(x)

    pruned = Net(width=2)
    failure = forward_failure(pruned, Net(), torch.zeros(1, 3, 2))
    assert failure.node == "add" and failure.parameters == ("embed.pos",)
    assert failure.layers == ("embed.proj",)


class Windows(nn.Module):
    """Two tokens per window folded into the batch dim, a Linear on the windows."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.win, self.head = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x: [B, 4, 2]
        h = self.stem(x)
        w = self.win(h.reshape(-1, 2, 4)).reshape(h.shape)
        return self.head(w.mean(1))


def test_mark_folded_marks_only_the_taps_with_rows_per_sample():
    gm, taps = tap_consumers(Windows())
    mark_folded(gm, taps, torch.zeros(3, 4, 2))
    assert {t.module: t.folded for t in taps} == {"stem": False, "win": True, "head": False}
    gm, taps = tap_consumers(Windows())
    mark_folded(gm, taps, torch.zeros(1, 4, 2))  # one sample broadcasts over its rows
    assert not any(t.folded for t in taps)
