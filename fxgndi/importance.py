"""G-NDI importance of torch-pruning groups: the causal effect of removing coupled channels.

Removing channel ``c`` of a torch-pruning group deletes it from every member of the group. What
the rest of the network sees is that every *consumer* of the group (a conv or linear layer whose
input channels the group prunes) stops reading channel ``c``: exactly as if it read 0 there, or,
with compensation (``fxgndi.prune(..., compensate=True)``), the channel's mean. So the intervention
site of a group is the activation its consumers read, and fxgndi intervenes on each consumer's
input *edge* (an identity "tap" inserted in front of every conv / linear call), not on the tensor
node: a tensor that a consumer reads may also flow on through a residual skip, and intervening on
the node would move that path too, which removal does not.

Why consumer inputs rather than the members' outputs (say BatchNorm outputs): for a zero baseline
and ReLU networks both give the same function of alpha (ReLU, max-pool and add are positively
homogeneous, so zeroing BN outputs scales every consumer read by ``1 - alpha``), hence the same
tangents and ablations. For a channel-mean baseline only the consumer-input site makes the scored
intervention, ``do(read_c := E[read_c])``, the one that compensation applies; BN-output sites
would score ``read_c := relu(E[bn_c])`` instead. And the consumer-input site needs no guess at which
member is "last" in branching groups (DenseNet concatenations, ConvNeXt residual streams).

Per group and sample, the K-vector tangents of all the group's taps are summed per root channel
(linearity: one alpha drives all of them) before the p-norm; the score is the mean over samples.
All tangents come from one channel-granularity InterventionGraph by K vector-Jacobian products per
batch (:func:`fxgndi.estimate.reverse_tangents`), shared by every group. Memory: one batch of
tangents, ``B x (sum of consumer input channels) x K`` floats, at a time; scores of all groups are
computed in one pass over the data and cached until the model's parameters change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch_pruning as tp
from tqdm.auto import tqdm

from .baselines import calibrate
from .errors import NonFiniteError
from .estimate import READOUTS, _check_choice, readout as apply_readout, reverse_tangents
from .graph import InterventionGraph, intervene, trace
from .runtime import device_of, eval_mode
from .streams import RunningMoments, first_batch, iter_batches

METHODS = ("gndi", "ablation")
NORMALIZERS = (None, "mean", "max", "sum", "standarization", "gaussian", "lamp")
TAP_PREFIX = "fxgndi_tap_"
_ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM)  # BasePruner's default
_SAMPLES_PER_CHUNK = 256


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
                  consumers: dict[type, int] | None = None
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
    gm = trace(model, leaf_modules=(*leaf_modules, *consumers))
    modules = dict(gm.named_modules())
    taps: list[Tap] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        module = modules[node.target]
        extra = next((d for t, d in consumers.items() if isinstance(module, t)), None)
        if extra is None and not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        channel_dim = extra if extra is not None else \
            1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        tap = Tap(f"{TAP_PREFIX}{len(taps)}", node.target, channel_dim)
        gm.add_submodule(tap.name, nn.Identity())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(tap.name, (node.args[0],))
        node.update_arg(0, new)
        taps.append(tap)
    gm.graph.lint()
    gm.recompile()
    return gm, taps


@dataclass
class GroupPlan:
    """Where a group's channels are read: per entry, tap channel ``channels[i]`` carries root
    channel ``positions[i]`` (an index into the group's root idxs, ``size`` of them).

    Example:
        >>> GroupPlan(2, [("t", torch.tensor([0, 1]), torch.tensor([1, 0]))]).size
        2
    """

    size: int
    entries: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def consumer_items(group: Any) -> list[tuple[nn.Module, list[int], list[int]]]:
    """``(layer, idxs, root_idxs)`` of the group's consumers: the layers whose *input* channels
    (only) the group prunes: conv, linear, LSTM. Depthwise convs, BatchNorm and the like, whose
    in and out channels go together, are members, not consumers.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=10).eval()
        >>> dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 32, 32))
        >>> g = dg.get_pruning_group(m.layer1[0].conv1, tp.prune_conv_out_channels, [0, 1])
        >>> [type(layer).__name__ for layer, _, _ in consumer_items(g)]
        ['Conv2d']
    """
    dg = group._DG
    out = []
    for item in group:
        handler = item.dep.handler
        if dg.is_in_channel_pruning_fn(handler) and not dg.is_out_channel_pruning_fn(handler):
            out.append((item.dep.target.module, [int(i) for i in item.idxs],
                        [int(i) for i in item.root_idxs]))
    return out


def plan_group(group: Any, names: dict[nn.Module, str], taps_of: dict[str, list[Tap]],
               channels: dict[str, int]) -> GroupPlan:
    """The tap channels that carry each root channel of ``group`` (see :class:`GroupPlan`).

    Raises ValueError when the group has no conv / linear consumer fxgndi can tap.

    Example:
        >>> plan = plan_group(group, names, taps_of, channels)  # doctest: +SKIP
    """
    root_idxs = [int(i) for i in group[0].idxs]
    position = {r: k for k, r in enumerate(root_idxs)}
    seen: set[tuple[str, int, int]] = set()
    per_tap: dict[str, tuple[list[int], list[int]]] = {}
    for layer, idxs, roots in consumer_items(group):
        taps = taps_of.get(names.get(layer, ""), [])
        if not taps:
            raise ValueError(f"'{names.get(layer, layer)}' reads channels of the group rooted "
                             f"at '{_root_name(group, names)}' but is not a conv or linear "
                             "layer called in the traced graph (an LSTM, or inside a leaf "
                             "module), so G-NDI cannot intervene on what it reads: add it, or "
                             "the group's layers, to ignored_layers")
        for tap in taps:
            chans, poss = per_tap.setdefault(tap.name, ([], []))
            for i, r in zip(idxs, roots):
                if r not in position or (tap.name, i, position[r]) in seen:
                    continue
                if not 0 <= i < channels[tap.name]:
                    raise ValueError(f"torch-pruning maps a channel of the group rooted at "
                                     f"'{_root_name(group, names)}' to input channel {i} of "
                                     f"'{tap.module}', which reads {channels[tap.name]}: the "
                                     "dependency graph is stale; rebuild it after editing the "
                                     "model")
                seen.add((tap.name, i, position[r]))
                chans.append(i)
                poss.append(position[r])
    entries = [(t, torch.tensor(c, dtype=torch.long), torch.tensor(p, dtype=torch.long))
               for t, (c, p) in per_tap.items() if c]
    if not entries:
        raise ValueError(f"the pruning group rooted at '{_root_name(group, names)}' has no conv "
                         "or linear layer reading its channels (they reach the model output "
                         "directly, or pass through layers fxgndi cannot tap): add that layer "
                         "to ignored_layers")
    return GroupPlan(len(root_idxs), entries)


def group_norms(tangents: dict[str, torch.Tensor], plan: GroupPlan, p: float) -> torch.Tensor:
    """Per-sample p-norm [B, size] of each root channel's summed tangent (sum before norm).

    ``tangents`` maps tap names to [B, C, K] channel tangents.

    Example:
        >>> t = {"a": torch.ones(1, 2, 3), "b": torch.ones(1, 1, 3)}
        >>> plan = GroupPlan(2, [("a", torch.tensor([0, 1]), torch.tensor([0, 1])),
        ...                      ("b", torch.tensor([0]), torch.tensor([0]))])
        >>> group_norms(t, plan, 1)
        tensor([[6., 3.]])
    """
    first = tangents[plan.entries[0][0]]
    total = first.new_zeros(first.shape[0], plan.size, first.shape[-1])
    for tap, chans, positions in plan.entries:
        t = tangents[tap]
        total.index_add_(1, positions.to(t.device), t.index_select(1, chans.to(t.device)))
    return torch.linalg.vector_norm(total, ord=p, dim=-1)


def group_ablated_outputs(graph: InterventionGraph, x: torch.Tensor, plan: GroupPlan,
                          fn: Callable[[torch.Tensor], torch.Tensor] = lambda out: out,
                          chunk_size: int | None = None) -> Iterable[torch.Tensor]:
    """``fn(outputs)`` with ``alpha = 1`` at every tap channel of one root channel at a time,
    in chunks of [U, B, ...] (root channels in order).

    Like :func:`fxgndi.estimate.ablated_outputs`, ``vmap``-ed over interventions, but each
    intervention sets several sites at once: a group's channel is read through several taps.

    Example:
        >>> outs = torch.cat(list(group_ablated_outputs(graph, x, plan)))  # doctest: +SKIP
    """
    sizes = {s.name: s.channels for s in graph.sites}
    dtype = next(graph.parameters()).dtype
    chunk = chunk_size or max(1, _SAMPLES_PER_CHUNK // x.shape[0])
    for lo in range(0, plan.size, chunk):
        hi = min(plan.size, lo + chunk)
        alphas = {}
        for tap, chans, positions in plan.entries:
            mask = (positions >= lo) & (positions < hi)
            if not bool(mask.any()):
                continue
            a = alphas.get(tap)
            if a is None:
                a = torch.zeros(hi - lo, x.shape[0], sizes[tap], dtype=dtype, device=x.device)
                alphas[tap] = a
            a[(positions[mask] - lo).to(x.device), :, chans[mask].to(x.device)] = 1
        yield torch.func.vmap(lambda al: fn(graph(x, alphas=al)))(alphas)


class GNDIImportance(tp.importance.Importance):
    """A torch-pruning importance: the causal effect on the output of removing each channel of a
    group, ``E_x || d f / d alpha ||_p`` (first-order G-NDI, ``method="gndi"``) or the exact
    ``E_x || f(do) - f ||_p`` (``method="ablation"``, one forward per channel: small models).

    Call it on a torch-pruning group; it returns one score per root channel (a CPU float tensor
    of ``len(group[0].idxs)``). The intervention is at the group's consumer inputs (see the
    module docstring), set to ``baseline``: ``"zero"`` (what removal does) or ``"channel-mean"``
    (what removal with compensation does), calibrated on ``data``.

    Args:
        data: batches of ``(x, y)`` or ``x`` (labels only for the ``loss`` / ``margin`` readouts),
            re-iterable (a DataLoader or a list): read again whenever the model changed.
        method: ``"gndi"`` (K reverse passes per batch for all groups) or ``"ablation"``.
        readout: ``"logits"``, ``"probs"``, ``"loss"`` or ``"margin"``.
        baseline: ``"zero"``, ``"channel-mean"`` or ``"mean"`` (per position).
        p: the norm of the change of the readout.
        normalizer: as torch-pruning's importances (None, "mean", "max", "sum",
            "standarization", "gaussian", "lamp", "sentinel_<q>", or a callable); None keeps
            the raw effects, on one scale (the readout's) across groups.
        max_batches: read at most this many batches of ``data``.
        consumers: module class -> channel dim of the modules, besides conv / linear layers,
            that read a group's channels as a whole (a torch-pruning customized pruner's
            in-channels, e.g. Swin's patch merging): traced as leaves and tapped.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> imp = GNDIImportance([torch.randn(8, 3, 32, 32)])
        >>> dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
        >>> group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(64)))
        >>> imp(group).shape
        torch.Size([64])
    """

    def __init__(self, data: Iterable, *, method: str = "gndi", readout: str = "logits",
                 baseline: str = "zero", p: float = 2, normalizer: Any = None,
                 max_batches: int | None = None, chunk_size: int | None = None,
                 leaf_modules: Sequence[str | type] = (), progress: bool = False,
                 consumers: dict[type, int] | None = None) -> None:
        _check_choice("method", method, METHODS)
        _check_choice("readout", readout, READOUTS)
        _check_choice("baseline", baseline, ("zero", "mean", "channel-mean"))
        if not (callable(normalizer) or normalizer in NORMALIZERS
                or str(normalizer).startswith("sentinel_")):
            raise ValueError(f"unknown normalizer {normalizer!r}: use one of {NORMALIZERS}, "
                             "'sentinel_<q>' or a callable")
        if p <= 0:
            raise ValueError(f"p must be positive, not {p}")
        self.data = data
        self.method, self.readout, self.baseline, self.p = method, readout, baseline, p
        self.normalizer = normalizer
        self.max_batches, self.chunk_size = max_batches, chunk_size
        self.leaf_modules, self.progress = tuple(leaf_modules), progress
        self.consumers = dict(consumers or {})
        self._signature: tuple | None = None
        self._model: nn.Module | None = None
        self._state: dict[str, Any] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0  # time spent scoring, over all calls

    def __call__(self, group: Any) -> torch.Tensor:
        dg = group._DG
        signature = _signature(dg.model)
        if signature != self._signature:  # a new model, or pruned: score every group afresh
            self._build(dg.model)
            self._signature, self._cache = signature, {}
            self._cache.update(self._score(self._all_plans(dg)))
        elif dg.model is not self._model:  # an identical copy: the scores stand
            self._model, self._state = dg.model, {}
        key = _group_key(group, _names(dg.model))
        if key not in self._cache:  # a group that get_all_groups() does not yield
            if not self._state:
                self._build(dg.model)
            self._cache.update(self._score({key: self._plan(group)}))
        return _normalize(self._cache[key].clone(), self.normalizer)

    def _build(self, model: nn.Module) -> None:
        """Tap the consumers of ``model`` and set the taps' baselines."""
        start = time.perf_counter()
        gm, taps = tap_consumers(model, leaf_modules=self.leaf_modules,
                                 consumers=self.consumers)
        graph = intervene(gm, sites=[t.name for t in taps], granularity="channel")
        for site, tap in zip(graph.sites, taps):
            site.channel_dim = tap.channel_dim  # a Linear reading NHWC has channels last
        device = device_of(model)
        with eval_mode(graph):
            if self.baseline == "zero":
                graph.describe(first_batch(iter_batches(self.data, device=device)))
            else:
                means = calibrate(graph, self.data, kind=self.baseline,
                                  max_batches=self.max_batches)
                for name, value in means.items():
                    graph.set_baseline(name, value)
        taps_of: dict[str, list[Tap]] = {}
        for tap in taps:
            taps_of.setdefault(tap.module, []).append(tap)
        self._model = model
        self._state = {"graph": graph, "device": device, "taps_of": taps_of,
                       "names": _names(model),
                       "channels": {s.name: s.channels for s in graph.sites}}
        self.seconds += time.perf_counter() - start

    def _all_plans(self, dg: Any) -> dict[tuple, GroupPlan]:
        plans = {}
        for group in dg.get_all_groups(root_module_types=_ROOT_TYPES):
            try:
                plans[_group_key(group, self._state["names"])] = self._plan(group)
            except ValueError:
                continue  # e.g. the classifier's outputs: an error only if the pruner asks
        return plans

    def _plan(self, group: Any) -> GroupPlan:
        s = self._state
        return plan_group(group, s["names"], s["taps_of"], s["channels"])

    def _score(self, plans: dict[tuple, GroupPlan]) -> dict[tuple, torch.Tensor]:
        """One pass over the data: the mean per-channel effect of every planned group."""
        start = time.perf_counter()
        graph, moments = self._state["graph"], {key: RunningMoments() for key in plans}
        needs_labels = self.readout in ("loss", "margin")
        batches = iter_batches(self.data, device=self._state["device"],
                               max_batches=self.max_batches, need_labels=needs_labels,
                               why=f"readout '{self.readout}'")
        with eval_mode(graph), torch.no_grad():
            for x, y in tqdm(batches, desc=f"{self.method} importance", disable=not self.progress):
                if self.method == "gndi":
                    tangents = reverse_tangents(graph, x, y, self.readout, self.chunk_size)
                    for key, plan in plans.items():
                        moments[key].update(group_norms(tangents, plan, self.p))
                else:
                    for key, plan in plans.items():
                        moments[key].update(self._ablation_effects(graph, x, y, plan))
        self.seconds += time.perf_counter() - start
        out = {}
        for key, m in moments.items():
            values = m.mean.to(torch.float32).cpu()
            if not bool(torch.isfinite(values).all()):
                raise NonFiniteError(f"NaN or Inf in the {self.method} importance of the group "
                                     f"rooted at '{key[0]}': check the model's activations on "
                                     "this data")
            out[key] = values
        return out

    def _ablation_effects(self, graph: InterventionGraph, x: torch.Tensor,
                          y: torch.Tensor | None, plan: GroupPlan) -> torch.Tensor:
        """Per-sample ``|| readout(do) - readout ||_p``, [B, size]."""
        reference = apply_readout(graph(x), y, self.readout)

        def effect(out: torch.Tensor) -> torch.Tensor:
            change = apply_readout(out, y, self.readout) - reference
            return torch.linalg.vector_norm(change, ord=self.p, dim=-1)

        chunks = group_ablated_outputs(graph, x, plan, effect, self.chunk_size)
        return torch.cat(list(chunks), 0).T


def check_importance_length(scores: torch.Tensor | None, group: Any, who: str) -> None:
    """Raise when an importance returned other than one finite score per channel of the group.

    torch-pruning silently accepts a vector of the wrong length and prunes the wrong channels.

    Example:
        >>> check_importance_length(torch.ones(3), group, "MyImportance")  # doctest: +SKIP
    """
    if scores is None:
        return
    expected = len(group[0].idxs)
    if scores.dim() != 1 or scores.numel() != expected:
        root = group[0].dep.target.name
        raise ValueError(f"{who} returned {tuple(scores.shape)} scores for the group rooted at "
                         f"{root}, which has {expected} channels: an importance must return one "
                         "score per channel of group[0].idxs (1-D)")
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteError(f"{who} returned NaN or Inf for the group rooted at "
                             f"{group[0].dep.target.name}: check the model and the data")


def _signature(model: nn.Module) -> tuple:
    """Names, shapes and sums of every parameter and buffer: changes when the model does."""
    with torch.no_grad():
        return tuple((n, tuple(t.shape), float(t.double().sum()) if t.is_floating_point()
                      else int(t.sum()))
                     for n, t in [*model.named_parameters(), *model.named_buffers()])


def _group_key(group: Any, names: dict[nn.Module, str]) -> tuple:
    return (_root_name(group, names), group[0].dep.handler.__name__,
            tuple(int(i) for i in group[0].idxs))


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _root_name(group: Any, names: dict[nn.Module, str]) -> str:
    module = group[0].dep.target.module
    return names.get(module, group[0].dep.target.name)


def _normalize(scores: torch.Tensor, normalizer: Any) -> torch.Tensor:
    """torch-pruning's own normalisation, so that GNDI mixes with its importances."""
    if normalizer is None:
        return scores
    return tp.importance.GroupMagnitudeImportance(normalizer=normalizer)._normalize(
        scores, normalizer)
