"""Consumer taps: an identity node on the input edge of every conv / linear call.

What a layer reads is not always a node of its own: a tensor a conv reads may also flow on
through a residual skip. A tap sits on one layer's input edge only, so an intervention there
changes what that layer reads and nothing else (what removing the layer's input channels does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch.fx as fx
import torch.nn as nn

from fxgndi.core.layers import LAYERS, input_channel_dim
from fxgndi.fx.trace import trace

TAP_PREFIX = "fxgndi_tap_"


@dataclass
class Tap:
    """An identity node in front of one call of a conv / linear layer: what that layer reads.

    Example:
        >>> Tap("fxgndi_tap_0", "layer1.0.conv1", 1).module
        'layer1.0.conv1'
    """

    name: str
    module: str
    channel_dim: int


def tap_consumers(model: nn.Module, *, leaf_modules: Iterable[str | type] = (),
                  consumers: dict[type, int] | None = None,
                  concrete_args: dict[str, Any] | None = None
                  ) -> tuple[fx.GraphModule, list[Tap]]:
    """Trace ``model`` and put an ``nn.Identity`` tap on the input edge of every conv / linear call
    and of every call of a ``consumers`` class (traced as a leaf; the value is its channel dim).

    The GraphModule shares the model's parameters; only the tapped layer sees the tap, other users
    of the same tensor (a residual skip) do not.

    Example:
        >>> gm, taps = tap_consumers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        >>> [(t.module, t.channel_dim) for t in taps]
        [('0', -1), ('2', -1)]
    """
    consumers = dict(consumers or {})
    gm = trace(model, leaf_modules=(*leaf_modules, *consumers), concrete_args=concrete_args)
    modules = dict(gm.named_modules())
    taps: list[Tap] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        module = modules[node.target]
        extra = next((d for t, d in consumers.items() if isinstance(module, t)), None)
        if extra is None and not isinstance(module, LAYERS):
            continue
        channel_dim = extra if extra is not None else input_channel_dim(module)
        tap = Tap(f"{TAP_PREFIX}{len(taps)}", node.target, channel_dim)
        gm.add_submodule(tap.name, nn.Identity())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(tap.name, (node.args[0],))
        node.update_arg(0, new)
        taps.append(tap)
    gm.graph.lint()
    gm.recompile()
    return gm, taps
