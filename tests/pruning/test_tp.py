"""torch-pruning's internals are reached through fxgndi/pruning/_tp.py only."""

from __future__ import annotations

import pathlib
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import fxgndi
from fxgndi.pruning import _tp

from tests.helpers import removed_channels, zeroed_output

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "fxgndi"
PRIVATE = re.compile(r"\._DG\b|\bmodule2node\b|\._normalize\(|is_(in|out)_channel_pruning_fn")


def test_private_api_is_used_in_tp_py_only():
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if PRIVATE.search(p.read_text()))
    assert users == ["pruning/_tp.py"]


def test_version_check():
    assert _tp.tested_version(tp.__version__)
    assert _tp.tested_version("1.5.2") and not _tp.tested_version("0.9") \
        and not _tp.tested_version("banana")


def test_missing_internal_names_itself():
    class Stub:
        pass

    try:
        _tp.graph_of(Stub())
    except RuntimeError as exc:
        assert "Stub._DG" in str(exc) and "torch-pruning" in str(exc)
    else:
        raise AssertionError("no error")


class GlobalQuery(nn.Module):
    """A per-head query (5-D, as GCViT's global query) broadcast over the batch: with
    ``expand`` or implicitly; torch-pruning 1.6 reads the 5-D expand as grouped-query attention
    and divides by zero."""

    def __init__(self, expand: bool) -> None:
        super().__init__()
        self.expand = expand
        self.embed, self.query, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 4, 3]
        h = self.embed(x)
        q = self.query(h[:1]).reshape(1, 2, 1, 4, 4)
        if self.expand:
            q = q.expand(x.shape[0], 2, 1, 4, 4)
        a = (q * h.reshape(-1, 2, 1, 4, 4)).sum(1).reshape(-1, 4, 4)
        return self.head(a).mean(1)


def _layer_ops(model: nn.Module, root: nn.Module) -> set[tuple[str, str, tuple[int, ...]]]:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 4, 3))
    group = dg.get_pruning_group(root, tp.prune_linear_out_channels, [0, 5])
    names = {m: n for n, m in model.named_modules()}
    return {(names[dep.target.module], dep.handler.__name__, tuple(int(i) for i in idxs))
            for dep, idxs in group if dep.target.module in names}


def test_a_broadcast_5d_expand_groups_as_the_implicit_broadcast():
    torch.manual_seed(0)
    expanded, implicit = GlobalQuery(expand=True), GlobalQuery(expand=False)
    implicit.load_state_dict(expanded.state_dict())
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(expanded(x), implicit(x))
    for root in ("embed", "query"):
        ops = _layer_ops(expanded, expanded.get_submodule(root))
        assert ops == _layer_ops(implicit, implicit.get_submodule(root))
        # the query's channels multiply the embedding's: one group, the same indices
        assert {("embed", "prune_out_channels", (0, 5)),
                ("query", "prune_out_channels", (0, 5))} <= ops


class EmptyChunkCSP(nn.Module):
    """A CSP stage as timm's CSPDarkNet traces: a split with an empty chunk, a residual add
    whose shortcut comes last, then a concat. torch-pruning 1.6 cannot infer the add's channel
    count there (it indexes the split's sizes by output position) and raised TypeError summing
    the concat's counts before its own return for unknown counts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _, b = self.stem(x).split([8, 0, 8], dim=1)
        b = torch.relu(self.block(b)) + b
        h = torch.relu(self.out(torch.cat([b, a], 1)))
        return self.fc(h.mean((2, 3)))


def test_a_concat_of_unknown_width_builds_and_prunes_as_zeroing():
    torch.manual_seed(0)
    model = EmptyChunkCSP().eval()
    x = torch.randn(4, 3, 8, 8)
    tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])  # raised TypeError
    r = fxgndi.prune(model, [(x, torch.randint(0, 4, (4,)))], importance="l1", sparsity=0.5,
                     repair=False)
    assert len(r.kept["out"]) == 4 and "stem" in r.skipped  # the literal split keeps stem
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), zeroed_output(
            model, x, outputs=removed_channels(model, r.kept)))


class GainConv(nn.Conv2d):
    """A conv with one more parameter per output channel, as timm's ScaledStdConv2d has:
    torch-pruning 1.6 cuts weight and bias only (the pruned NFNet failed its forward)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.gain, self.bias)


def test_per_channel_parameters_of_a_conv_subclass_are_cut_with_its_channels():
    torch.manual_seed(0)
    model = nn.Sequential(GainConv(3, 8, 3), nn.ReLU(), GainConv(8, 6, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    gains = [model[0].gain.detach().clone(), model[2].gain.detach().clone()]
    x = torch.randn(4, 3, 10, 10)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], importance="l1", sparsity=0.5,
                     repair=False)
    for name, before in zip(("0", "2"), gains):
        layer = r.model.get_submodule(name)
        assert len(r.kept[name]) == layer.out_channels < before.shape[0]
        torch.testing.assert_close(layer.gain, before[r.kept[name]])
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), zeroed_output(
            model, x, outputs=removed_channels(model, r.kept)))


def test_a_split_sized_only_in_part_gets_no_sizes():
    # DINOv3's rotary chunk: torch-pruning inferred [None, None] sizes, and its split pruner
    # raised TypeError summing them; a fully sized split keeps its sizes
    def node(sizes):
        return SimpleNamespace(type=tp.ops.OPTYPE.SPLIT, grad_fn=None, module=SimpleNamespace(
            split_sizes=sizes, offsets=[0, 4]))

    part, full = node([None, 4]), node([4, 4])
    graph = SimpleNamespace(module2node={"a": part, "b": full})
    _tp._exact_split_sizes(lambda g: None)(graph)
    assert part.module.split_sizes is None and part.module.offsets is None
    assert full.module.split_sizes == [4, 4]
    pruner = tp.dependency.graph.DependencyGraph().REGISTERED_PRUNERS[tp.ops.OPTYPE.SPLIT]
    pruner.prune_out_channels(part.module, [0])  # no sizes: the split is left as it is


class SingleHeadAttention(nn.Module):
    """SHViT's single-head attention: torch-pruning infers 0 channels for the attention's
    product and divided by them in its reshape map (ZeroDivisionError)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.qkv = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 8, 1)
        self.proj, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, _, h, w = x.shape
        x1, x2 = torch.split(x, [4, 4], dim=1)
        q, k, v = torch.split(self.qkv(x1), [2, 2, 4], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)
        x1 = (v @ attn.transpose(-2, -1)).reshape(b, 4, h, w)
        return self.fc(torch.relu(self.proj(torch.cat([x1, x2], 1))).mean((2, 3)))


class Rotary(nn.Module):
    """A rotary embedding: each half of a split read twice, so torch-pruning found more
    consumers than pieces and indexed the split's sizes past their end (IndexError)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.q, self.fc = nn.Linear(6, 6), nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("sin", torch.randn(5, 4))
        self.register_buffer("cos", torch.randn(5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.q(torch.relu(self.pre(x))).split([4, 4], -1)
        h = torch.cat([a * self.cos - b * self.sin, b * self.cos + a * self.sin], -1)
        return self.fc(h).mean(1)


@pytest.mark.parametrize("cls, shape, pruned", [(SingleHeadAttention, (4, 3, 4, 4), "proj"),
                                                (Rotary, (4, 5, 6), "pre")])
def test_graphs_torch_pruning_could_not_build_prune_as_zeroing(cls, shape, pruned):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], importance="l1", sparsity=0.5,
                     repair=False)
    assert 0 < len(r.kept[pruned]) < model.get_submodule(pruned).weight.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), zeroed_output(
            model, x, outputs=removed_channels(model, r.kept)))


class Res2Stage(nn.Module):
    """Res2Net's split: equal pieces (one saved split_size), read by a conv, an add chain and
    the final concat. torch-pruning sized the pieces by its consumers in the order it met
    them ([12, 4, 4, 4] for four pieces of 4) and paired consumer i with piece i."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, groups=groups)
                                   for _ in range(3))
        self.conv3, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(torch.relu(self.conv1(x)), 4, 1)
        sp, out = pieces[0], []
        for i, conv in enumerate(self.convs):
            sp = torch.relu(conv(sp if i == 0 else sp + pieces[i]))
            out.append(sp)
        h = torch.relu(self.conv3(torch.cat([*out, pieces[3]], 1)))
        return self.fc(h.mean((2, 3)))


def test_a_split_into_equal_pieces_prunes_within_each_piece_as_zeroing():
    torch.manual_seed(0)
    model = Res2Stage().eval()
    x = torch.randn(4, 3, 6, 6)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [1, 6, 15])
    for item in group:  # torch-pruning sent conv1 indices up to 35 (of 16) before
        layer = item.dep.target.module
        if isinstance(layer, nn.Conv2d):
            inputs = _tp.prunes_inputs_only(dg, item.dep.handler)
            assert max(item.idxs) < (layer.in_channels if inputs else layer.out_channels)
    r = fxgndi.prune(model, [(x, torch.randint(0, 3, (4,)))], importance="l1", sparsity=0.5,
                     repair=False)
    assert len(r.kept["convs.2"]) < 4  # conv1 keeps its 16: the code splits in 4s
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), zeroed_output(
            model, x, outputs=removed_channels(model, r.kept)))


def test_a_grouped_conv_on_a_split_piece_counts_its_groups_in_the_roots_channels():
    torch.manual_seed(0)
    model = Res2Stage(groups=2).eval()  # ResNeXt-style convs on the pieces
    x = torch.randn(1, 3, 6, 6)
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    group = pruner.DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels,
                                        list(range(16)))
    # each conv sees 4 of conv1's 16 channels in 2 groups: 8 blocks of 2 (torch-pruning: 2)
    assert _tp.channel_groups(pruner, group) == 8
    for g in pruner.step(interactive=True):
        g.prune()  # raised IndexError in a piece conv's in-channel pruning before
    assert model.conv1.out_channels == 8
    for conv in model.convs:
        assert conv.weight.shape[1] * conv.groups == conv.in_channels


class WideFanOut(nn.Module):
    """A stem read by eight convs (its group: the stem, the ReLU and eight readers) beside
    nine small groups (a side conv or a reader, the concat, the head). torch-pruning builds
    readers.7's group before the stem's: it is given before the restart."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Conv2d(3, 8, 1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.readers = nn.ModuleList(nn.Conv2d(16, 8, 1) for _ in range(8))
        self.head = nn.Linear(72, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side(x).mean((2, 3))
        h = torch.relu(self.stem(x))
        return self.head(torch.cat([side, *(r(h).mean((2, 3)) for r in self.readers)], 1))


def test_a_group_that_runs_away_keeps_its_width_and_the_rest_prunes(monkeypatch):
    """A group past the bound stands for one whose index maps never close (timm's rexnet,
    efficientformerv2): pruning goes on without it, and says which."""
    torch.manual_seed(0)
    model = WideFanOut().eval()
    x = torch.randn(4, 3, 6, 6)
    data = [(x, torch.randint(0, 4, (4,)))]
    nodes = len(tp.DependencyGraph().build_dependency(model, example_inputs=x[:1]).module2node)
    monkeypatch.setattr(_tp, "_ENTRIES_PER_NODE", 6 / (nodes + 16))  # the stem's group: 10+
    monkeypatch.setattr(_tp, "_RUNAWAYS", {})  # nothing remembered from other graphs
    with pytest.warns(RuntimeWarning, match=r"past 6 entries building the group of 'stem'"):
        r = fxgndi.prune(model, data, importance="l1", sparsity=0.5, repair=False)
    assert len(r.kept["stem"]) == 16 and all(len(r.kept[f"readers.{i}"]) == 4 for i in range(8))
    assert len(r.kept["side"]) == 4  # readers.7, given before the restart, is not pruned twice
    assert "ran away" in r.skipped["stem"]
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), zeroed_output(
            model, x, outputs=removed_channels(model, r.kept)))
