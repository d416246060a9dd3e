"""Pruning to a latency target: a per-layer latency table and an importance that ranks
channels by their G-NDI (or any importance) per second of latency they cost.

With ``fxgndi.prune(..., target=Latency(...))`` the channel ratio is searched until the measured
latency of the pruned model (on the runtime asked for) drops by the sparsity. Under local
pruning every group keeps the same fraction, so the ranking decides only which channels go;
under ``global_pruning=True`` :class:`PerLatency` divides every group's scores by the latency one
of its channels costs (from :func:`layer_latencies`, measured once on the dense model, each
conv / linear layer alone on the input it sees), so that the groups whose channels buy the most
time at the least causal effect lose the most (HALP's greedy, with G-NDI as the value).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from fxgndi.core.layers import LAYERS, in_width, out_width
from fxgndi.core.streams import call_hooked
from fxgndi.deploy.latency import Latency, median_seconds, repeat_batch
from fxgndi.pruning._tp import graph_of, prunes_inputs_only, prunes_outputs


def layer_latencies(model: nn.Module, example_inputs: Any, latency: Latency) -> dict[str, float]:
    """Seconds of each conv / linear layer of ``model`` alone, on the input it sees in a batch
    of ``latency.batch_size`` made from ``example_inputs`` (eagerly: the table ranks layers
    against each other, whatever runtime the whole model is timed on).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
        >>> sorted(layer_latencies(net, torch.zeros(1, 8), Latency(repeat=2)))
        ['0', '2']
    """
    seen = layer_inputs(model, repeat_batch(example_inputs, latency.batch_size))
    modules = dict(model.named_modules())
    return {name: median_seconds(lambda name=name: modules[name](x), repeat=latency.repeat,
                                 warmup=latency.warmup, threads=latency.threads,
                                 steady_heap=latency.steady_heap)
            for name, (x, _) in seen.items()}


def layer_inputs(model: nn.Module, inputs: Any, kinds: tuple[type[nn.Module], ...] = LAYERS
                 ) -> dict[str, tuple[torch.Tensor, tuple]]:
    """Each conv / linear layer's (each module of ``kinds``') input on its first call in
    ``model(inputs)``, and the shape of its output (one hooked forward, eval mode, no
    gradients).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x, out = layer_inputs(net, torch.zeros(3, 8))["2"]
        >>> tuple(x.shape), out
        ((3, 4), (3, 2))
    """
    seen: dict[str, tuple[torch.Tensor, tuple]] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, kinds)}

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            seen.setdefault(names[mod], (args[0].detach(), tuple(out.shape)))

    call_hooked(model, inputs, dict.fromkeys(names, hook))
    return seen


class PerLatency(tp.importance.Importance):
    """``inner``'s scores of a group divided by the seconds one of its channels costs: the sum,
    over the layers that lose it, of the layer's latency over its width (output channels for the
    group's members, input channels for its consumers).

    Example:
        >>> imp = PerLatency(tp.importance.GroupMagnitudeImportance(), {"0": 1e-3})
    """

    def __init__(self, inner: tp.importance.Importance, table: dict[str, float]) -> None:
        self.inner, self.table = inner, table

    @property
    def skipped(self) -> dict[str, str]:
        """The inner importance's reasons for the groups it did not score."""
        return getattr(self.inner, "skipped", {})

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = self.inner(group)
        if scores is None:
            return None
        return scores / max(self.cost(group), 1e-12)

    def cost(self, group: Any) -> float:
        """Seconds one channel of ``group`` costs."""
        dg = graph_of(group)
        names = {m: n for n, m in dg.model.named_modules()}  # the model being pruned (a copy)
        total = 0.0
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            seconds = self.table.get(names.get(layer, ""))
            if seconds is None or not isinstance(layer, LAYERS):
                continue
            if prunes_inputs_only(dg, handler):
                total += seconds / in_width(layer)
            elif prunes_outputs(dg, handler):
                total += seconds / out_width(layer)
        return total

    def __getattr__(self, name: str) -> Any:  # seconds, options(), ... of the inner importance
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
