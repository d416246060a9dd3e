"""Static widths: constants in a traced graph that count a layer's channels.

Code such as ``x.reshape(-1, self.feat_dim)`` (a width held in an attribute) or torchvision
ViT's ``x.reshape(n, self.hidden_dim, n_h * n_w)`` bakes a channel count into the graph as a
Python int. After that layer loses channels the constant is stale and the forward fails.
:func:`static_widths` finds such constants: the size arguments of reshape / view / expand calls
whose input holds the output channels of a conv / linear layer in a known dim (the
:mod:`~fxgndi.fx.analysis` channel dim) and that equal the size of a run of the input's dims
that includes that channel dim (``C``, ``C * H * W``, ...). The attribute that held a constant
is found by perturbation: an int attribute of the module whose forward made the call, equal to
the constant, that moves the constant when it is changed and the model traced again. Pruning
then updates the attribute (:func:`update_widths`) or keeps the layer's width when the constant
is a literal.

A size can also be read off another tensor: ``B, N, C = x.shape`` at the top of an attention
block, then ``out.reshape(B, N, C)`` on a tensor whose channels come from other layers
(the q / k / v projections). Pruning either set of layers leaves that size stale, and no
attribute holds it; :func:`shape_widths` finds these, and pruning keeps both widths.

Whatever still fails is found by running the pruned model: :func:`forward_failure` names the
first node of its trace that raises and the dense layers whose widths feed it (in every instance
of the module class that made the call), so that pruning can keep those and prune again.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from fxgndi.core.layers import LAYERS, out_width
from fxgndi.core.runtime import eval_mode
from fxgndi.fx.analysis import analyze, facts
from fxgndi.fx.trace import trace

_RESHAPES = frozenset({"reshape", "view", "expand"})
# Int arithmetic a size read off a shape goes through on its way into a reshape.
_INT_OPS = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv,
                      operator.truediv, operator.mod, operator.neg, int, math.prod})


@dataclass(frozen=True)
class StaticWidth:
    """One constant of the graph that counts a layer's channels.

    Attributes:
        node: the reshape-like node that uses it.
        value: the constant.
        layer: the conv / linear layer whose output channels it counts.
        per_channel: ``value / out channels of layer`` (what one channel contributes).
        owner: the module whose forward made the call (``""``: the model itself).
        attribute: the int attribute of ``owner`` that held the constant, or None (a literal,
            or several attributes with that value).

    Example:
        >>> StaticWidth("reshape", 128, "conv2", 16, "", "feat_dim").attribute
        'feat_dim'
    """

    node: str
    value: int
    layer: str
    per_channel: int
    owner: str
    attribute: str | None


def static_widths(model: nn.Module, example_inputs: Any, *,
                  leaf_modules: Iterable[str | type] = (),
                  concrete_args: dict[str, Any] | None = None) -> list[StaticWidth]:
    """The constants of ``model``'s trace that count a layer's channels (see the module
    docstring); runs the trace once on ``example_inputs`` to know the shapes. Attributes are
    looked up on ``model`` itself.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.width = nn.Conv2d(1, 4, 1), 4 * 9
        ...     def forward(self, x):
        ...         return self.conv(x).reshape(-1, self.width)
        >>> [(w.layer, w.value, w.attribute) for w in static_widths(
        ...     Net(), torch.zeros(1, 1, 3, 3))]
        [('conv', 36, 'width')]
    """
    gm = _shaped_trace(model, example_inputs, leaf_modules, concrete_args)
    modules = dict(model.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not _is_reshape(node):
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        meta, f = source.meta.get("tensor_meta"), facts(source)
        if meta is None or not hasattr(meta, "shape") or f.layer is None \
                or f.channel_dim is None:
            continue
        dims = list(meta.shape[1:])
        channel = f.channel_dim - 1 if f.channel_dim > 0 else len(dims) + f.channel_dim
        channels = out_width(modules[f.layer])
        if not 0 <= channel < len(dims) or dims[channel] != channels:
            continue
        counts = {math.prod(dims[lo:hi]) for lo in range(channel + 1)
                  for hi in range(channel + 1, len(dims) + 1)}
        owner = _owner(node)
        for position, value in _int_sizes(node.args):
            if value > 1 and value in counts:
                attribute = _attribute(model, modules.get(owner), owner, node.name, position,
                                       value, leaf_modules, concrete_args)
                found.append(StaticWidth(node.name, value, f.layer, value // channels, owner,
                                         attribute))
    return found


@dataclass(frozen=True)
class ShapeWidth:
    """A reshape size read off the channel dim of another tensor's shape.

    Attributes:
        node: the reshape-like node.
        source: the node whose shape the size was read from.
        layers: the conv / linear layers whose widths must stay for the size to stay right:
            those that make the reshaped tensor and those that make ``source`` (sorted).

    Example:
        >>> ShapeWidth("reshape", "x", ("inp", "q")).layers
        ('inp', 'q')
    """

    node: str
    source: str
    layers: tuple[str, ...]


def shape_widths(model: nn.Module, example_inputs: Any, *,
                 leaf_modules: Iterable[str | type] = (),
                 concrete_args: dict[str, Any] | None = None) -> list[ShapeWidth]:
    """The reshape / view / expand sizes of ``model``'s trace computed from the channel dim of
    a tensor (``x.shape[-1]``, ``x.size(1)``, ``C // heads``) that the reshaped tensor does not
    share its channels with (no conv / linear layer in common among their nearest producers):
    pruning the layers of either leaves the size stale. Sizes read off the reshaped tensor itself
    follow its width and are not listed.

    Example:
        >>> class Attention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.inp, self.v = nn.Linear(2, 4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         x = self.inp(x)
        ...         B, N, C = x.shape
        ...         return self.v(x).transpose(1, 2).reshape(B, N, C)
        >>> [(w.source, w.layers) for w in shape_widths(Attention(), torch.zeros(1, 3, 2))]
        [('inp', ('inp', 'v'))]
    """
    gm = _shaped_trace(model, example_inputs, leaf_modules, concrete_args)
    found = []
    for node in gm.graph.nodes:
        if not _is_reshape(node) or not isinstance(node.args[0], fx.Node):
            continue
        own = facts(node.args[0]).layers
        sources = {s for a in _flat_nodes(node.args[1:]) for s in _channel_reads(a)}
        for source in sorted(sources, key=lambda n: n.name):
            theirs = facts(source).layers
            if own and theirs and not own & theirs:
                found.append(ShapeWidth(node.name, source.name, tuple(sorted(own | theirs))))
    return found


@dataclass(frozen=True)
class Failure:
    """Where a pruned model's forward fails.

    Attributes:
        node: the first node of its trace that raises.
        error: the error, as ``Type: message``.
        layers: the dense model's conv / linear layers nearest to that node's inputs, and to
            the same node in every other instance of the module class that made the call
            (sorted): the widths to keep for it to run. For a call of a leaf module, also the
            layers inside it.
        parameters: the parameters read there as tensors (a position embedding added, the
            direct parameters of a leaf module), whose widths torch-pruning prunes with a
            group of their own: those groups must keep their widths too.

    Example:
        >>> Failure("reshape_1", "RuntimeError: shape", ("blocks.0.q",)).layers
        ('blocks.0.q',)
    """

    node: str
    error: str
    layers: tuple[str, ...]
    parameters: tuple[str, ...] = ()


def forward_failure(pruned: nn.Module, dense: nn.Module, example_inputs: Any, *,
                    leaf_modules: Iterable[str | type] = (),
                    concrete_args: dict[str, Any] | None = None) -> Failure | None:
    """Run ``pruned`` (a pruned copy of ``dense``: same module names, same code) node by node
    on ``example_inputs``; None when it runs, else the :class:`Failure`. Also a Failure with no
    layers when the pruned model fails but does not trace (nothing to point at).

    Example:
        >>> dense = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1))
        >>> pruned = nn.Sequential(nn.Linear(2, 3), nn.Linear(4, 1))
        >>> forward_failure(pruned, dense, torch.zeros(1, 2)).layers
        ('0',)
        >>> forward_failure(dense, dense, torch.zeros(1, 2)) is None
        True
    """
    inputs = _as_inputs(example_inputs)
    try:
        gm = trace(pruned, leaf_modules=leaf_modules, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - reported as a failure nothing points at
        try:
            with eval_mode(pruned), torch.no_grad():
                pruned(*inputs)
            return None
        except Exception as again:  # noqa: BLE001
            return Failure("", f"{type(again).__name__}: {again}", ())
        del exc
    where: list[str] = []

    class _Run(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            try:
                return super().run_node(n)
            except Exception:
                where.append(n.name)
                raise

    try:
        with eval_mode(gm), torch.no_grad():
            _Run(gm).run(*inputs)
        return None
    except Exception as exc:  # noqa: BLE001 - the failure is the answer
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        if not where:
            return Failure("", error, ())
    graph = analyze(trace(dense, leaf_modules=leaf_modules, concrete_args=concrete_args))
    nodes = {n.name: n for n in graph.graph.nodes}
    failed = nodes.get(where[0])
    if failed is None:
        return Failure(where[0], error, ())
    positions = _code_positions(graph.graph)
    key = positions.get(failed)
    layers: set[str] = set()
    modules = dict(dense.named_modules())
    parameters: set[str] = set()
    for n in graph.graph.nodes:
        if n is failed or key is not None and positions.get(n) == key:
            for a in n.all_input_nodes:
                layers |= facts(a).layers
                parameters |= _parameters_read(a, dense)
            if n.op == "call_module" and n.target in modules \
                    and not isinstance(modules[n.target], LAYERS):  # a leaf: what is inside
                inside = modules[n.target]
                layers |= {f"{n.target}.{name}".strip(".") for name, m in
                           inside.named_modules() if isinstance(m, LAYERS)}
                parameters |= {f"{n.target}.{name}" for name, _ in
                               inside.named_parameters(recurse=False)}
    return Failure(where[0], error, tuple(sorted(layers)), tuple(sorted(parameters)))


def update_widths(model: nn.Module, widths: list[StaticWidth]) -> list[str]:
    """Set each width's attribute on ``model`` (the pruned one: same module names) to its
    layer's pruned channel count times ``per_channel``; returns ``owner.attribute`` of each
    changed attribute.

    Example:
        >>> net = nn.Module(); net.conv = nn.Conv2d(1, 2, 1); net.width = 36
        >>> update_widths(net, [StaticWidth("r", 36, "conv", 9, "", "width")]), net.width
        (['width'], 18)
    """
    changed = []
    for w in widths:
        if w.attribute is None:
            continue
        owner = model.get_submodule(w.owner)
        new = out_width(model.get_submodule(w.layer)) * w.per_channel
        if getattr(owner, w.attribute) != new:
            setattr(owner, w.attribute, new)
            changed.append(f"{w.owner}.{w.attribute}" if w.owner else w.attribute)
    return changed


def _shaped_trace(model: nn.Module, example_inputs: Any, leaf_modules: Iterable[str | type],
                  concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    """``model``'s trace with shapes (ShapeProp on ``example_inputs``) and facts."""
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*_as_inputs(example_inputs))
    return analyze(gm)


def _as_inputs(example_inputs: Any) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else \
        tuple(example_inputs)


def _is_reshape(node: fx.Node) -> bool:
    return bool(node.op == "call_method" and node.target in _RESHAPES and node.args
                or node.op == "call_function" and node.target is torch.reshape)


def _flat_nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _channel_reads(node: fx.Node) -> set[fx.Node]:
    """The tensors whose channel dim (per the analysis) the int ``node`` is computed from:
    ``x.shape[d]``, ``x.size(d)``, ``x.size()[d]``, through int arithmetic."""
    if node.op == "call_function" and node.target in _INT_OPS:
        return {s for a in node.all_input_nodes for s in _channel_reads(a)}
    if node.op == "call_function" and node.target is operator.getitem \
            and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node):
        whole = node.args[0]
        if whole.op == "call_function" and whole.target is getattr and whole.args[1] == "shape" \
                or whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1:
            return _if_channel(whole.args[0], node.args[1])
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 \
            and isinstance(node.args[1], int):
        return _if_channel(node.args[0], node.args[1])
    return set()


def _if_channel(tensor: Any, dim: int) -> set[fx.Node]:
    if not isinstance(tensor, fx.Node):
        return set()
    meta, channel = tensor.meta.get("tensor_meta"), facts(tensor).channel_dim
    if meta is None or not hasattr(meta, "shape") or channel is None:
        return set()
    rank = len(meta.shape)
    return {tensor} if rank and dim % rank == channel % rank else set()


def _parameters_read(node: fx.Node, model: nn.Module) -> set[str]:
    """The parameters ``node`` is (a ``get_attr``) or is made of without any layer between (a
    reshape, a slice, an interpolation of one)."""
    if node.op == "get_attr":
        names = dict(model.named_parameters())
        return {node.target} if node.target in names else set()
    if node.op in ("call_method", "call_function") and not facts(node).layers:
        return {p for a in node.all_input_nodes for p in _parameters_read(a, model)}
    return set()


def _code_positions(graph: fx.Graph) -> dict[fx.Node, tuple]:
    """What makes a node the same line of code in every instance of a module class: the class
    of the module whose forward made the call, the op, the target (relative to that module for
    a module call), and the node's place among that module's nodes of the same op and target.
    Calls made by the model's own forward have none."""
    positions: dict[fx.Node, tuple] = {}
    counts: dict[tuple, int] = {}
    for node in graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        paths = [entry[0] if isinstance(entry, tuple) else entry for entry in stack]
        classes = [entry[1] if isinstance(entry, tuple) else None for entry in stack]
        if node.op == "call_module" and paths and paths[-1] == node.target:
            paths, classes = paths[:-1], classes[:-1]  # the module called is not its caller
        if not paths or not paths[-1]:
            continue
        owner, target = paths[-1], str(node.target)
        if node.op == "call_module" and target.startswith(owner + "."):
            target = target[len(owner) + 1:]
        base = (owner, classes[-1], node.op, target)
        index = counts.get(base, 0)
        counts[base] = index + 1
        positions[node] = (classes[-1], node.op, target, index)
    return positions


def _int_sizes(args: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, int]]:
    """``(position, value)`` of every int among the arguments (nested sizes too)."""
    for i, a in enumerate(args):
        if isinstance(a, (tuple, list)):
            yield from _int_sizes(a, (*prefix, i))
        elif isinstance(a, int) and not isinstance(a, bool):
            yield (*prefix, i), a


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return (path[0] if isinstance(path, tuple) else path) or ""


def _attribute(model: nn.Module, owner: nn.Module | None, owner_name: str, node: str,
               position: tuple, value: int, leaf_modules: Iterable[str | type],
               concrete_args: dict[str, Any] | None) -> str | None:
    """The one int attribute of ``owner`` that the constant at ``position`` of ``node`` comes
    from: changing it (temporarily) and tracing again moves the constant. None for a literal,
    or when several attributes do."""
    if owner is None:
        return None
    found = []
    for name, current in list(vars(owner).items()):
        if name.startswith("_") or isinstance(current, bool) or current != value \
                or not isinstance(current, int):
            continue
        setattr(owner, name, value + 1)
        try:
            gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
            again = next((n for n in gm.graph.nodes if n.name == node), None)
            moved = again is not None and _at(again.args, position) == value + 1
        except Exception:  # a perturbed model that no longer traces: not this attribute
            moved = False
        finally:
            setattr(owner, name, current)
        if moved:
            found.append(name)
    return found[0] if len(found) == 1 else None


def _at(args: Any, position: tuple) -> Any:
    for i in position:
        if not isinstance(args, (tuple, list)) or i >= len(args):
            return None
        args = args[i]
    return args
