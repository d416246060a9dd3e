"""Graph analyses of a traced model, written once.

:func:`analyze` is one pass over the nodes of a GraphModule in topological order (the style of
``torch.fx.passes.shape_prop.ShapeProp``) that stores each node's :class:`NodeFacts` in
``node.meta["fxgndi"]``: what it depends on, whether it depends on the model input, which dim of
its output holds channels, which conv / linear layer produces it, and, for a residual add, which
input is the branch and which the skip. Site selection, depth pruning, validate's criteria and
pruning's output layers all read these facts instead of walking the graph themselves.

Facts describe the graph as it was when analysed: after editing a graph, analyse it again.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from fxgndi.core.layers import LAYERS

META_KEY = "fxgndi"

# Layers whose output keeps channels in dim 1 (NCHW) or in the last dim (tokens, NHWC).
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
# After these the channel dim is unknown (the layout changes).
_RESHAPES = frozenset({"permute", "flatten", "reshape", "view", "transpose", "cat", "concat"})
_ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
# Python-level ops that, on sizes, give sizes.
_SIZE_FUNCTIONS = frozenset({operator.getitem, operator.add, operator.sub, operator.mul,
                             operator.floordiv, operator.truediv, operator.mod, operator.neg,
                             int, math.prod})


@dataclass(frozen=True)
class NodeFacts:
    """What :func:`analyze` found about one node.

    Attributes:
        index: the node's position in topological order.
        ancestors: bit ``i`` is set when the node at ``index`` i feeds this one (directly or
            not); see :func:`feeds`.
        from_input: the node is, or depends on, a placeholder (a model input).
        channel_dim: the dim of its output that holds channels (1 for NCHW, -1 for tokens /
            NHWC), found through element-wise ops; None when a reshape makes it unknown.
        layer: the conv / linear module that is this node or produces it, following first
            inputs (None if there is none).
        layers: the nearest conv / linear modules up every input path (the node's frontier).
        residual: for a residual add (both inputs depend on the model input), the names of
            its ``(branch, skip)`` inputs; None otherwise.
        size: the node is a size read off a shape (``x.shape``, ``x.size(1)``, ``C // 2``),
            not a tensor; sizes do not carry layers into ``layers``.

    Example:
        >>> gm = analyze(fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())))
        >>> f = facts(list(gm.graph.nodes)[2]); f.layer, f.channel_dim, f.from_input
        ('0', 1, True)
    """

    index: int
    ancestors: int
    from_input: bool
    channel_dim: int | None
    layer: str | None
    layers: frozenset[str]
    residual: tuple[str, str] | None = None
    size: bool = False


def analyze(gm: fx.GraphModule) -> fx.GraphModule:
    """Store the :class:`NodeFacts` of every node of ``gm`` in ``node.meta["fxgndi"]``;
    returns ``gm``.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.conv = nn.Conv2d(2, 2, 1)
        ...     def forward(self, x):
        ...         h = x.relu()
        ...         return h + self.conv(h)
        >>> gm = analyze(fx.symbolic_trace(Block()))
        >>> [facts(n).residual for n in gm.graph.nodes if n.name == "add"]
        [('conv', 'relu')]
    """
    modules = dict(gm.named_modules())
    for index, node in enumerate(gm.graph.nodes):
        parents = node.all_input_nodes
        ancestors = 0
        for p in parents:
            pf = facts(p)
            ancestors |= pf.ancestors | (1 << pf.index)
        module = modules.get(node.target) if node.op == "call_module" else None
        is_layer = isinstance(module, LAYERS)
        first = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        size = _is_size(node)
        node.meta[META_KEY] = NodeFacts(
            index=index,
            ancestors=ancestors,
            from_input=node.op == "placeholder" or any(facts(p).from_input for p in parents),
            channel_dim=_channel_dim(node, module),
            layer=node.target if is_layer else (facts(first[0]).layer if first else None),
            layers=frozenset({node.target}) if is_layer else
            frozenset().union(*(facts(p).layers for p in parents if not facts(p).size)),
            residual=_residual(node), size=size)
    return gm


def facts(node: fx.Node) -> NodeFacts:
    """The facts :func:`analyze` stored for ``node``.

    Example:
        >>> gm = analyze(fx.symbolic_trace(nn.Linear(2, 2)))
        >>> facts(next(iter(gm.graph.nodes))).from_input
        True
    """
    try:
        return node.meta[META_KEY]
    except KeyError:
        raise RuntimeError(f"node {node.name!r} has no fxgndi facts: run "
                           "fxgndi.fx.analysis.analyze(gm) on its graph first") from None


def feeds(source: fx.Node, target: fx.Node) -> bool:
    """Whether ``source`` is an ancestor of ``target`` (both of one analysed graph).

    Example:
        >>> gm = analyze(fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        >>> x, lin, relu, out = gm.graph.nodes
        >>> feeds(x, relu), feeds(relu, lin)
        (True, False)
    """
    return bool(facts(target).ancestors >> facts(source).index & 1)


def only_ancestors(a: fx.Node, b: fx.Node) -> int:
    """How many ancestors ``a`` has that ``b`` has not.

    Example:
        >>> gm = analyze(fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        >>> x, lin, relu, out = gm.graph.nodes
        >>> only_ancestors(relu, lin)
        1
    """
    return (facts(a).ancestors & ~facts(b).ancestors).bit_count()


def is_add(node: fx.Node) -> bool:
    """Whether the node adds (``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``).

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x + 1)
        >>> [is_add(n) for n in gm.graph.nodes]
        [False, True, False]
    """
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_size(node: fx.Node) -> bool:
    """A shape read (``x.shape``, ``x.size()``), or int arithmetic / indexing on sizes only."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] == "shape"
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target in _SIZE_FUNCTIONS:
        parents = node.all_input_nodes
        return bool(parents) and all(facts(p).size for p in parents)
    return False


def _channel_dim(node: fx.Node, module: nn.Module | None) -> int | None:
    if isinstance(module, _CHANNELS_FIRST):
        return 1
    if isinstance(module, _CHANNELS_LAST):
        return -1
    if node.op in ("call_method", "call_function"):
        name = getattr(node.target, "__name__", str(node.target))
        if name in _RESHAPES:
            return _moved_channel_dim(node, name)
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op not in ("get_attr", "placeholder"):
            return facts(arg).channel_dim
    return None


def _moved_channel_dim(node: fx.Node, name: str) -> int | None:
    """The channel dim after a layout op: followed through ``permute`` / ``transpose``, and
    through a reshape that keeps the dims up to it (``[B, C, H, W] -> [B, C, H * W]``) or keeps
    it as the last dim (``[B, H, W, C] -> [B, H * W, C]``), when ShapeProp's shapes say so;
    None otherwise (a concat, a reshape that splits or merges the channel dim)."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or facts(source).channel_dim is None:
        return None
    channel = facts(source).channel_dim
    before, after = _shape_of(source), _shape_of(node)
    rank = len(before) if before is not None else None
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 or not node.args[1:] else node.args[1]
        dims = list(node.kwargs.get("dims", dims))
        if not dims or not all(isinstance(d, int) for d in dims):
            return None
        rank = len(dims)
        return _as_channel_dim([d % rank for d in dims].index(channel % rank), rank)
    if name == "transpose":
        dims = [*node.args[1:3], *(node.kwargs[k] for k in ("dim0", "dim1") if k in node.kwargs)]
        if rank is None or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
            return None
        a, b, c = dims[0] % rank, dims[1] % rank, channel % rank
        return _as_channel_dim(b if c == a else a if c == b else c, rank)
    if before is None or after is None or name in ("cat", "concat") or not rank:
        return None
    c = channel % rank
    if c == rank - 1 and after and after[-1] == before[-1]:
        return -1
    if len(after) > c and list(after[:c + 1]) == list(before[:c + 1]):
        return _as_channel_dim(c, len(after))
    return None


def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _as_channel_dim(dim: int, rank: int) -> int:
    """The last dim is written -1 (tokens, NHWC), others by position (1 for NCHW)."""
    return -1 if dim == rank - 1 else dim


def _residual(node: fx.Node) -> tuple[str, str] | None:
    if not is_add(node) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if not (facts(a).from_input and facts(b).from_input):
        return None  # e.g. x + positional_embedding: not a residual connection
    branch = _branch_of(a, b)
    return branch.name, (b if branch is a else a).name


def _branch_of(a: fx.Node, b: fx.Node) -> fx.Node:
    """Of the two inputs of a residual add, the one that is the branch (not the skip)."""
    if feeds(a, b):
        return b
    if feeds(b, a):
        return a
    # Neither feeds the other (a projection shortcut): the branch is the longer path.
    return a if only_ancestors(a, b) >= only_ancestors(b, a) else b
