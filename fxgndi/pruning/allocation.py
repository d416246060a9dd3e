"""How a MAC (or latency) budget is spread over the groups of local pruning: each group's own
ratio.

Local pruning removes the same fraction of every group's channels, so a MAC cut falls on the
groups in proportion to their MACs. Time does not follow MACs: a pointwise conv's MACs fall
with the product of its kept input and output fractions while its memory traffic, a depthwise
conv's, a norm's and an activation's time fall with one of them, and those cost time out of
proportion to their MACs. Pruned uniformly to half its MACs, mobilenet_v2 ran only 1.5x faster
(README).

:func:`balance` keeps each group's channels where it can, removes the MACs asked for, and makes
the model's time fall as fast as its MACs. With ``k_g`` the fraction of group ``g``'s channels
kept and ``w_g`` the group's share of the time over its share of the MACs (both to first order
in ``1 - k_g``), minimising ``sum_g c_g (-log k_g)`` (``c_g``: the group's MACs; under the MAC
budget alone, to first order, the minimum is uniform pruning) under the MAC budget and a time
budget gives ``k_g = min(1, 1 / (lambda + nu w_g))``. ``lambda`` meets the MAC budget; ``nu``,
the tilt, is the least that makes the predicted time fall by as much as the MACs. The
prediction: every conv / linear layer, norm and activation module timed alone
(:func:`~fxgndi.pruning.kernels.scaling_seconds`: the seconds that go with the product of its
kept fractions, compute, and with each of them, memory), plus the rest of the whole model's
measured time, which no channel costs. Uniform (no tilt) where uniform pruning already does
that. A latency target uses the same allocation (its tilt computed for a MAC cut of its
sparsity), so that its time falls with far fewer MACs removed. Which channels of a group go is
still the importance's choice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from fxgndi.core.layers import CONVS, LAYERS, NORMS, in_width, out_width
from fxgndi.core.streams import call_hooked
from fxgndi.deploy.latency import Latency, repeat_batch  # noqa: F401 (Latency: the examples)
from fxgndi.pruning._tp import graph_of, prunes_inputs_only, prunes_outputs
from fxgndi.pruning.kernels import (DISPATCH_BOUND, KernelTimer, Scaling, macs_per_sample,
                                    scaling_seconds)
from fxgndi.pruning.latency import layer_inputs


@dataclass
class LayerCost:
    """One conv / linear layer or norm: its MACs per sample, the seconds per call that its
    channels cost (:class:`~fxgndi.pruning.kernels.Scaling`; zero where it was not timed), and
    the groups (indices) that cut its outputs and its inputs (None: not cut, or, for a
    depthwise conv or a norm, cut with its outputs).

    Example:
        >>> cost = LayerCost(100.0, Scaling(2.0, 0.5, 0.5), out_group=0, in_group=1)
        >>> cost.kept_macs([0.5, 0.5]), cost.kept_seconds([0.5, 0.5])
        (25.0, 1.0)
    """

    macs: float
    scaling: Scaling
    out_group: int | None
    in_group: int | None

    def kept_macs(self, keep: Sequence[float]) -> float:
        """MACs per sample left where group ``g`` keeps ``keep[g]`` of its channels."""
        out, ins = self._fractions(keep)
        return self.macs * out * ins

    def kept_seconds(self, keep: Sequence[float]) -> float:
        """Seconds per call (of those the channels cost) left where group ``g`` keeps
        ``keep[g]`` of its channels."""
        out, ins = self._fractions(keep)
        s = self.scaling
        return s.product * out * ins + s.outputs * out + s.inputs * ins

    @property
    def seconds(self) -> float:
        """Seconds per call its channels cost, all kept."""
        return sum(self.scaling)

    def shares(self) -> dict[int, tuple[float, float]]:
        """Group -> (seconds, MACs) that go with its kept fraction: the derivatives of
        :meth:`kept_seconds` and :meth:`kept_macs` by it, everything kept."""
        s = self.scaling
        found: dict[int, tuple[float, float]] = {}
        if self.out_group is not None:
            found[self.out_group] = (s.product + s.outputs, self.macs)
        if self.in_group is not None:
            t, m = found.get(self.in_group, (0.0, 0.0))
            found[self.in_group] = (t + s.product + s.inputs, m + self.macs)
        return found

    def _fractions(self, keep: Sequence[float]) -> tuple[float, float]:
        return (keep[self.out_group] if self.out_group is not None else 1.0,
                keep[self.in_group] if self.in_group is not None else 1.0)


@dataclass
class TimeAllocation:
    """Per-group ratios: group ``g`` keeps ``min(1, (1 - r) (1 + tilt) / (1 + tilt w_g))`` of
    its channels where the ratio search asks for ``r`` (``1 - r`` for the groups without a
    weight, and for all at ``tilt`` 0: uniform).

    Example:
        >>> alloc = TimeAllocation({"a": 3.0, "b": 0.5}, tilt=1.0)
        >>> {k: round(v, 3) for k, v in alloc.ratios(0.2).items()}
        {'a': 0.6, 'b': 0.0}
    """

    weights: dict[str, float] = field(default_factory=dict)  # layer -> its group's w
    tilt: float = 0.0

    def keep(self, layer: str, ratio: float) -> float:
        """The fraction of ``layer``'s group kept where the search asks for ``ratio``."""
        w = self.weights.get(layer)
        if w is None or self.tilt == 0:
            return 1 - ratio
        return _kept(ratio, self.tilt, w)

    def ratio(self, layer: str, ratio: float) -> float:
        """The pruning ratio of ``layer``'s group where the search asks for ``ratio``."""
        return 1 - self.keep(layer, ratio)

    def ratios(self, ratio: float) -> dict[str, float]:
        """Every weighted layer's ratio where the search asks for ``ratio``."""
        return {name: self.ratio(name, ratio) for name in self.weights}


def _kept(ratio: float, tilt: float, w: float) -> float:
    return min(1.0, (1 - ratio) * (1 + tilt) / (1 + tilt * w))


def balance(layers: Sequence[LayerCost], groups: Sequence[Sequence[str]], sparsity: float,
            fixed: float = 0.0, max_tilt: float = 1e6) -> TimeAllocation:
    """The allocation of :mod:`this module <fxgndi.pruning.allocation>` over ``groups`` (each
    named by its member layers) for a cut of ``sparsity`` of the MACs of ``layers``: the least
    tilt at which the model's time (``layers``' model of what the channels cost, plus ``fixed``
    seconds that no channel costs) falls by at least as much as the MACs; where no tilt makes
    it (the fixed time dominates), the least at which the time the channels cost does; where
    not even that, ``max_tilt`` (each group keeping in inverse proportion to its ``w``).
    Uniform (tilt 0) where uniform pruning already meets the goal, or where no group's
    channels cost measurable time.

    Example:
        >>> layers = [LayerCost(100.0, Scaling(0, 3, 0), 0, None),  # a: 3 s for 100 MACs
        ...           LayerCost(200.0, Scaling(1, 0, 0), 1, 0)]  # b: 1 s for 200, a's x b's
        >>> alloc = balance(layers, [["a"], ["b"]], sparsity=0.5)
        >>> round(alloc.weights["a"] / alloc.weights["b"], 3), round(alloc.tilt, 2)
        (2.667, 4.0)
    """
    macs = math.fsum(layer.macs for layer in layers)
    seconds = math.fsum(layer.seconds for layer in layers)
    time_share, mac_share = [0.0] * len(groups), [0.0] * len(groups)
    for layer in layers:  # first-order shares of each group: d(cost) / d(k_g) at k = 1
        for g, (t, m) in layer.shares().items():
            time_share[g] += t / seconds if seconds > 0 else 0.0
            mac_share[g] += m / macs if macs > 0 else 0.0
    w = [t / m if m > 0 else 1.0 for t, m in zip(time_share, mac_share)]
    weights = {name: w[g] for g, members in enumerate(groups) for name in members}
    if seconds <= 0 or macs <= 0 or not any(time_share):
        return TimeAllocation()

    def excess(tilt: float, fixed: float) -> float:
        """Predicted fraction of the time kept (``fixed`` seconds included) below that of the
        MACs, where the MACs removed are the target's."""
        lo, hi = 0.0, 1.0
        for _ in range(50):
            ratio = (lo + hi) / 2
            keep = [_kept(ratio, tilt, wg) for wg in w]
            removed = 1 - math.fsum(layer.kept_macs(keep) for layer in layers) / macs
            lo, hi = (ratio, hi) if removed < sparsity else (lo, ratio)
        keep = [_kept(hi, tilt, wg) for wg in w]
        return (math.fsum(layer.kept_macs(keep) for layer in layers) / macs
                - (fixed + math.fsum(layer.kept_seconds(keep) for layer in layers))
                / (fixed + seconds))

    # The whole model's time if some tilt makes it fall as fast as the MACs; else (time that
    # no channel costs dominates: small inputs, dispatch) the time the channels cost.
    for time_fixed in dict.fromkeys((fixed, 0.0)):
        if excess(0.0, time_fixed) >= 0:
            return TimeAllocation(weights, 0.0)
        if excess(max_tilt, time_fixed) >= 0:
            lo, hi = 0.0, 1.0
            while excess(hi, time_fixed) < 0:
                lo, hi = hi, hi * 4
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if excess(mid, time_fixed) < 0 else (lo, mid)
            return TimeAllocation(weights, hi)
    return TimeAllocation(weights, max_tilt)


class GroupRecorder(tp.importance.Importance):
    """An importance that scores nothing (every group keeps its width) and records each group
    it is asked about: ``(layer or norm name, whether its outputs are cut)`` for its modules.
    A dry run of the pruner with it lists the groups the pruner would prune.

    Example:
        >>> rec = GroupRecorder()
        >>> rec.groups
        []
    """

    def __init__(self) -> None:
        self.groups: list[list[tuple[str, bool]]] = []

    def __call__(self, group: Any) -> None:
        dg = graph_of(group)
        names = {m: n for n, m in dg.model.named_modules()}
        items: dict[tuple[str, bool], None] = {}
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if module not in names or not isinstance(module, (*LAYERS, *NORMS)):
                continue
            if prunes_outputs(dg, handler):
                items[(names[module], True)] = None
            elif isinstance(module, LAYERS) and prunes_inputs_only(dg, handler):
                items[(names[module], False)] = None
        if items:
            self.groups.append(list(items))
        return None


def time_allocation(model: nn.Module, example_inputs: Any, timer: KernelTimer,
                    dry_run: Callable[[nn.Module, tp.importance.Importance], Any],
                    sparsity: float) -> TimeAllocation:
    """The :func:`balance` of ``model``'s groups for a cut of ``sparsity`` of its MACs:
    ``dry_run(copy, recorder)`` (a pruning run of a copy of ``model`` with a
    :class:`GroupRecorder` as importance) lists them; ``timer`` times every conv / linear
    layer, norm and activation module (:func:`elementwise_calls`), at full width and at half
    of each side a group cuts, on inputs shaped as in ``model(example_inputs)``, and the whole
    model, whose time beyond theirs is fixed. A dispatch-bound kernel (less work per call than
    :data:`~fxgndi.pruning.kernels.DISPATCH_BOUND`) is not timed; with none timed, uniform.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> def dry_run(work, recorder):
        ...     pruner = tp.pruner.BasePruner(work, torch.zeros(1, 4), importance=recorder,
        ...                                   ignored_layers=[work[2]])
        ...     list(pruner.step(interactive=True))
        >>> timer = KernelTimer(Latency(repeat=1, warmup=0), cache="/tmp/k.json")
        >>> time_allocation(net, torch.zeros(1, 4), timer, dry_run, 0.5).tilt  # dispatch-bound
        0.0
    """
    recorder = GroupRecorder()
    dry_run(copy.deepcopy(model), recorder)
    sides: dict[tuple[str, bool], int] = {}
    for g, group in enumerate(recorder.groups):
        for key in group:
            sides.setdefault(key, g)
    modules = dict(model.named_modules())
    seen = layer_inputs(model, repeat_batch(example_inputs, 1), (*LAYERS, *NORMS))
    layers = []
    for name, (x, out) in seen.items():
        module, shape = modules[name], tuple(x.shape[1:])
        macs = macs_per_sample(module, out[1:]) if isinstance(module, LAYERS) else 0
        single = isinstance(module, NORMS) or _depthwise(module)  # one width: in = out
        out_group, in_group = sides.get((name, True)), sides.get((name, False))
        in_group = None if single else in_group
        scaling = None
        if (macs or math.prod(shape)) * timer.latency.batch_size >= DISPATCH_BOUND:
            scaling = scaling_seconds(timer, module, shape, out_group is not None,
                                      in_group is not None)
        layers.append(LayerCost(float(macs), scaling or Scaling(0.0, 0.0, 0.0), out_group,
                                in_group))
    for call in elementwise_calls(model, repeat_batch(example_inputs, 1)):
        group = sides.get((call.producer, True))
        if group is None or call.x.numel() * timer.latency.batch_size < DISPATCH_BOUND:
            continue
        scaling = _elementwise_scaling(timer, modules[call.name], call)
        if scaling is not None:
            layers.append(LayerCost(0.0, scaling, group, None))
    if not any(layer.seconds for layer in layers):  # dispatch-bound throughout: uniform
        timer.save()
        return TimeAllocation()
    fixed = timer.seconds(model, repeat_batch(example_inputs, 1)) - math.fsum(
        layer.seconds for layer in layers)
    timer.save()
    members = [[name for name, outputs in group if outputs] for group in recorder.groups]
    return balance(layers, members, sparsity, fixed=max(0.0, fixed))


class ElementwiseCall(NamedTuple):
    """One call of a parameterless leaf module that keeps its input's shape (an activation,
    a dropout): its name, its input, the dim of it that holds channels, and the conv / linear
    layer or norm whose outputs those channels are (directly or through such calls)."""

    name: str
    x: torch.Tensor
    channel_dim: int
    producer: str


def elementwise_calls(model: nn.Module, inputs: Any) -> list[ElementwiseCall]:
    """Every call in ``model(inputs)`` of a parameterless leaf module whose output has its
    input's shape, on the outputs of a conv / linear layer or norm (an activation's time goes
    with the channels of the layer that feeds it). One hooked forward, eval mode.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> [(c.name, c.channel_dim, c.producer) for c in elementwise_calls(net, torch.zeros(
        ...     1, 1, 5, 5))]
        [('2', 1, '1')]
    """
    names = {m: n for n, m in model.named_modules()}
    made: dict[int, tuple[str, int]] = {}  # id(output) -> (producer, width)
    alive: list[torch.Tensor] = []  # ids of tensors still alive are not reused
    calls: list[ElementwiseCall] = []

    def produced(module: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            made[id(out)] = (names[module], out_width(module))
            alive.append(out)

    def passed(module: nn.Module, args: tuple, out: Any) -> None:
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                and out.shape == x.shape and id(x) in made):
            return
        producer, width = made[id(x)]
        dims = [d for d in (1, x.dim() - 1) if 0 < d < x.dim() and x.shape[d] == width]
        if dims:
            calls.append(ElementwiseCall(names[module], x.detach().clone(), dims[0], producer))
            made[id(out)] = made[id(x)]
            alive.append(out)

    hooks: dict[nn.Module, Any] = {}
    for module in names:
        if isinstance(module, (*LAYERS, *NORMS)):
            hooks[module] = produced
        elif not any(True for _ in module.children()) and not any(
                True for _ in module.parameters(recurse=False)):
            hooks[module] = passed
    call_hooked(model, inputs, hooks)
    return calls


def _elementwise_scaling(timer: KernelTimer, module: nn.Module, call: ElementwiseCall
                         ) -> Scaling | None:
    """What the channels of one elementwise call cost: its seconds at full width less those at
    half, per fraction removed."""
    full = call.x.shape[call.channel_dim]
    half = full // 2
    if half < 1:
        return None
    try:
        whole = timer.seconds(module, call.x)
        less = whole - timer.seconds(module, call.x.narrow(call.channel_dim, 0, half).clone())
    except (RuntimeError, TypeError, ValueError):
        return None
    return Scaling(0.0, max(0.0, less / (1 - half / full)), 0.0)


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, CONVS) and module.groups == in_width(module) == \
        out_width(module) > 1
