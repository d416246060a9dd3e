"""G-NDI importance of torch-pruning groups: the causal effect of removing coupled channels.

Removing channel ``c`` of a torch-pruning group deletes it from every member of the group. What
the rest of the network sees is that every *consumer* of the group (a conv or linear layer whose
input channels the group prunes) stops reading channel ``c``: exactly as if it read 0 there, or,
with compensation (``fxgndi.prune(..., repair={"compensate": True})``), the channel's mean. So
the intervention site of a group is the activation its consumers read, and fxgndi intervenes on
each consumer's input *edge* (an identity "tap" inserted in front of every conv / linear call),
not on the tensor node: a tensor that a consumer reads may also flow on through a residual
skip, and intervening on the node would move that path too, which removal does not.

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
batch (:func:`fxgndi.gndi.tangents.reverse_tangents`), shared by every group. Memory: one batch of
tangents, ``B x (sum of consumer input channels) x K`` floats, at a time; scores of all groups are
computed in one pass over the data and cached until the model's parameters change.

:class:`GNDIImportance` (the first-order estimate) and :class:`AblationImportance` (the exact
effect of removing each channel, one forward per channel) share everything but that per-batch
step: both are built on :class:`GroupEffectImportance`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn as nn
import torch_pruning as tp
from tqdm.auto import tqdm

from fxgndi.core.checks import check_choice, check_finite
from fxgndi.core.moments import RunningMoments
from fxgndi.core.names import BASELINES, READOUTS
from fxgndi.core.options import RunKwargs, RunOptions, run_options
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import batch_count, first_batch, iter_batches
from fxgndi.fx.intervention import InterventionGraph, calibrate, intervene
from fxgndi.fx.taps import Tap, tap_consumers
from fxgndi.gndi.readouts import readout as apply_readout
from fxgndi.gndi.tangents import SAMPLES_PER_CHUNK, reverse_tangents
from fxgndi.pruning._tp import ROOT_TYPES, consumer_items, graph_of, normalize

if TYPE_CHECKING:
    from typing_extensions import Unpack

NORMALIZERS = (None, "mean", "max", "sum", "standarization", "gaussian", "lamp")


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

    Like :func:`fxgndi.gndi.ablation.ablated_outputs`, ``vmap``-ed over interventions, but each
    intervention sets several sites at once: a group's channel is read through several taps.

    Example:
        >>> outs = torch.cat(list(group_ablated_outputs(graph, x, plan)))  # doctest: +SKIP
    """
    sizes = {s.name: s.channels for s in graph.sites}
    dtype = next(graph.parameters()).dtype
    chunk = chunk_size or max(1, SAMPLES_PER_CHUNK // x.shape[0])
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


class GroupEffectImportance(tp.importance.Importance):
    """The shared base of fxgndi's torch-pruning importances: the effect on the readout of
    removing each channel of a group, at the group's consumer inputs (see the module
    docstring), averaged over ``data``. Subclasses give the per-batch effect
    (:meth:`batch_effects`).

    Call it on a torch-pruning group; it returns one score per root channel (a CPU float tensor
    of ``len(group[0].idxs)``). The intervention sets what the consumers read to ``baseline``:
    ``"zero"`` (what removal does) or ``"channel-mean"`` (what removal with compensation does),
    calibrated on ``data``. The scores of every group of a model come from one pass over the
    data and are reused until the model changes.

    Args:
        data: batches of ``(x, y)`` or ``x`` (labels only for the ``loss`` / ``margin``
            readouts), re-iterable (a DataLoader or a list): read again whenever the model
            changed.
        readout: ``"logits"``, ``"probs"``, ``"loss"`` or ``"margin"``.
        baseline: ``"zero"``, ``"channel-mean"`` or ``"mean"`` (per position).
        p: the norm of the change of the readout.
        normalizer: as torch-pruning's importances (None, "mean", "max", "sum",
            "standarization", "gaussian", "lamp", "sentinel_<q>", or a callable); None keeps
            the raw effects, on one scale (the readout's) across groups.
        consumers: module class -> channel dim of the modules, besides conv / linear layers,
            that read a group's channels as a whole (a torch-pruning customized pruner's
            in-channels, e.g. Swin's patch merging): traced as leaves and tapped.
        **run: run options (:class:`fxgndi.RunOptions`): ``max_batches``, ``chunk_size``,
            ``leaf_modules``, ``progress`` (default False), ...
    """

    name = "effect"

    def __init__(self, data: Iterable, *, readout: str = "logits", baseline: str = "zero",
                 p: float = 2, normalizer: Any = None,
                 consumers: dict[type, int] | None = None, **run: Unpack[RunKwargs]) -> None:
        check_choice("readout", readout, READOUTS)
        check_choice("baseline", baseline, BASELINES)
        if not (callable(normalizer) or normalizer in NORMALIZERS
                or str(normalizer).startswith("sentinel_")):
            raise ValueError(f"unknown normalizer {normalizer!r}: use one of {NORMALIZERS}, "
                             "'sentinel_<q>' or a callable")
        if p <= 0:
            raise ValueError(f"p must be positive, not {p}")
        self.data = data
        self.readout, self.baseline, self.p = readout, baseline, p
        self.normalizer = normalizer
        self.consumers = dict(consumers or {})
        self.run: RunOptions = run_options(type(self).__name__, run, progress=False)
        self._signature: tuple | None = None
        self._model: nn.Module | None = None
        self._state: dict[str, Any] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0  # time spent scoring, over all calls

    def batch_effects(self, graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                      plans: dict[tuple, GroupPlan]) -> dict[tuple, torch.Tensor]:
        """Per-sample effects [B, size] of removing each root channel of every planned group,
        on one batch."""
        raise NotImplementedError

    def __call__(self, group: Any) -> torch.Tensor:
        dg = graph_of(group)
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
        return normalize(self._cache[key].clone(), self.normalizer)

    def _build(self, model: nn.Module) -> None:
        """Tap the consumers of ``model`` and set the taps' baselines."""
        start = time.perf_counter()
        gm, taps = tap_consumers(model, leaf_modules=self.run.leaf_modules,
                                 consumers=self.consumers,
                                 concrete_args=self.run.concrete_args)
        graph = intervene(gm, sites=[t.name for t in taps], granularity="channel",
                          output=self.run.output)
        for site, tap in zip(graph.sites, taps):
            site.channel_dim = tap.channel_dim  # a Linear reading NHWC has channels last
        device = device_of(model)
        with eval_mode(graph):
            if self.baseline == "zero":
                graph.describe(first_batch(iter_batches(self.data, device=device)))
            else:
                means = calibrate(graph, self.data, kind=self.baseline,
                                  max_batches=self.run.max_batches)
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
        for group in dg.get_all_groups(root_module_types=ROOT_TYPES):
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
        batches = iter_batches(self.data, device=self._state["device"],
                               max_batches=self.run.max_batches,
                               need_labels=self.readout in ("loss", "margin"),
                               why=f"readout '{self.readout}'")
        with eval_mode(graph), torch.no_grad():
            for x, y in tqdm(batches, desc=f"{self.name} importance",
                             disable=not self.run.progress,
                             total=batch_count(self.data, self.run.max_batches)):
                for key, effects in self.batch_effects(graph, x, y, plans).items():
                    moments[key].update(effects)
        self.seconds += time.perf_counter() - start
        out = {}
        for key, m in moments.items():
            values = m.mean.to(torch.float32).cpu()
            check_finite(values, f"the {self.name} importance of the group rooted at "
                         f"'{key[0]}'", fix="check the model's activations on this data")
            out[key] = values
        return out


class GNDIImportance(GroupEffectImportance):
    """First-order G-NDI of each channel of a torch-pruning group, ``E_x || d f / d alpha ||_p``:
    K reverse passes per batch (K = the readout's width) score every group of the model at once.

    Arguments as :class:`GroupEffectImportance`.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> imp = GNDIImportance([torch.randn(8, 3, 32, 32)])
        >>> dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
        >>> group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(64)))
        >>> imp(group).shape
        torch.Size([64])
    """

    name = "gndi"

    def batch_effects(self, graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                      plans: dict[tuple, GroupPlan]) -> dict[tuple, torch.Tensor]:
        tangents = reverse_tangents(graph, x, y, self.readout, self.run.chunk_size)
        return {key: group_norms(tangents, plan, self.p) for key, plan in plans.items()}


class AblationImportance(GroupEffectImportance):
    """The exact effect of removing each channel of a torch-pruning group,
    ``E_x || f(do) - f ||_p``: one forward pass per channel (small models, or the reference
    G-NDI is checked against).

    Arguments as :class:`GroupEffectImportance`.

    Example:
        >>> imp = AblationImportance([torch.randn(8, 3, 32, 32)])  # doctest: +SKIP
    """

    name = "ablation"

    def batch_effects(self, graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                      plans: dict[tuple, GroupPlan]) -> dict[tuple, torch.Tensor]:
        reference = apply_readout(graph(x), y, self.readout)

        def effect(out: torch.Tensor) -> torch.Tensor:
            change = apply_readout(out, y, self.readout) - reference
            return torch.linalg.vector_norm(change, ord=self.p, dim=-1)

        return {key: torch.cat(list(group_ablated_outputs(graph, x, plan, effect,
                                                          self.run.chunk_size)), 0).T
                for key, plan in plans.items()}


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
    check_finite(scores, f"the scores {who} returned for the group rooted at "
                 f"{group[0].dep.target.name}", fix="check the model and the data")


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
