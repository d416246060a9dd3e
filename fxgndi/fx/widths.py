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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from fxgndi.core.layers import out_width
from fxgndi.core.runtime import eval_mode
from fxgndi.fx.analysis import analyze, facts
from fxgndi.fx.trace import trace

_RESHAPES = frozenset({"reshape", "view", "expand"})


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
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else \
        tuple(example_inputs)
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    analyze(gm)
    modules = dict(model.named_modules())
    found = []
    for node in gm.graph.nodes:
        if not (node.op == "call_method" and node.target in _RESHAPES
                or node.op == "call_function" and node.target is torch.reshape):
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
