"""Consumer taps: an identity node on the input edge of every conv / linear call.

What a layer reads is not always a node of its own: a tensor a conv reads may also flow on
through a residual skip. A tap sits on one layer's input edge only, so an intervention there
changes what that layer reads and nothing else (what removing the layer's input channels does).

A *flat* tap reads its layer's input flattened per sample (``[B, C * h * w]``, then reshaped
back), so that every element is a channel of the tap: for a layer whose input channels are
each made of several prunable units (``Linear -> view(B, C, h, w) -> conv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxgndi.core.layers import LAYERS, input_channel_dim
from fxgndi.core.streams import call_hooked
from fxgndi.fx.trace import trace

TAP_PREFIX = "fxgndi_tap_"


@dataclass
class Tap:
    """An identity node in front of one call of a conv / linear layer: what that layer reads
    (``channel_dim``: the layer's input channel dim), or its flattened input when ``flat``.

    Example:
        >>> Tap("fxgndi_tap_0", "layer1.0.conv1", 1).module
        'layer1.0.conv1'
    """

    name: str
    module: str
    channel_dim: int
    flat: bool = False
    folded: bool = False  # its tensor holds several rows per sample in dim 0 (mark_folded)

    @property
    def site_dim(self) -> int:
        """The channel dim of what the tap node carries: the layer's, or -1 when flat."""
        return -1 if self.flat else self.channel_dim


def tap_consumers(model: nn.Module, *, leaf_modules: Iterable[str | type] = (),
                  consumers: dict[type, int] | None = None,
                  concrete_args: dict[str, Any] | None = None, flat: Iterable[str] = ()
                  ) -> tuple[fx.GraphModule, list[Tap]]:
    """Trace ``model`` and put an ``nn.Identity`` tap on the input edge of every conv / linear call
    and of every call of a ``consumers`` class (traced as a leaf; the value is its channel dim).
    The taps of the modules named in ``flat`` are flat (channel dim -1 of the flattened input).

    The GraphModule shares the model's parameters; only the tapped layer sees the tap, other users
    of the same tensor (a residual skip) do not.

    Example:
        >>> gm, taps = tap_consumers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        >>> [(t.module, t.channel_dim) for t in taps]
        [('0', -1), ('2', -1)]
        >>> gm, taps = tap_consumers(nn.Sequential(nn.Conv2d(2, 3, 1)), flat=["0"])
        >>> taps[0].flat, gm(torch.ones(1, 2, 4, 4)).shape
        (True, torch.Size([1, 3, 4, 4]))
    """
    consumers, flat = dict(consumers or {}), set(flat)
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
        tap = Tap(f"{TAP_PREFIX}{len(taps)}", node.target, channel_dim, node.target in flat)
        gm.add_submodule(tap.name, nn.Identity())
        read = node.args[0]
        with gm.graph.inserting_before(node):
            if tap.flat:
                flattened = gm.graph.call_method("flatten", (read, 1))
                new = gm.graph.call_method("reshape_as", (gm.graph.call_module(
                    tap.name, (flattened,)), read))
            else:
                new = gm.graph.call_module(tap.name, (read,))
        node.update_arg(0, new)
        taps.append(tap)
    gm.graph.lint()
    gm.recompile()
    return gm, taps


def mark_folded(gm: fx.GraphModule, taps: Sequence[Tap], batch: Any) -> None:
    """Set ``folded`` on the taps of ``gm`` (from :func:`tap_consumers`) whose tensor does not
    have ``batch``'s samples in dim 0: windowed attention folds its windows into the batch dim
    (``[B * windows, tokens, C]``), where a per-sample intervention does not broadcast. Runs
    ``gm`` once on ``batch`` (a tensor or inputs with two samples or more; with one, nothing is
    marked: a single sample broadcasts over its rows).

    Example:
        >>> class Windows(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.fc = nn.Linear(2, 2)
        ...     def forward(self, x):  # [B, 4, 2] -> windows of 2 tokens folded into dim 0
        ...         return self.fc(x.reshape(-1, 2, 2)).reshape(x.shape)
        >>> gm, taps = tap_consumers(Windows())
        >>> mark_folded(gm, taps, torch.zeros(2, 4, 2)); taps[0].folded
        True
    """
    samples = int(batch.shape[0])
    if samples < 2:
        return
    seen: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            seen.setdefault(name, int(out.shape[0]))
        return hook

    call_hooked(gm, batch, {gm.get_submodule(t.name): record(t.name) for t in taps})
    for t in taps:
        t.folded = t.name in seen and seen[t.name] != samples
