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
Where a reshape makes several root units one consumer channel (``Linear -> view -> conv``),
torch-pruning removes the whole block of units for any unit it selects, so the block is what is
scored (its units' tangents summed), and the scores of its units are laid out so that
torch-pruning never selects two units of one block (:meth:`GroupPlan.unit_scores`: it would
keep the consumer's channel twice in its count and return a model whose forward fails).
All tangents come from one channel-granularity InterventionGraph by vector-Jacobian products,
shared by every group: K per batch (one per readout output), or, for a wide head (an ImageNet
classifier: K = 1000), R Rademacher projections of the readout (``mode="probe"``, chosen by
``"auto"`` when K >= 2R; p = 2), the group's tangents summed before the projection, as projecting
is linear too. Memory: ``B x (sum of consumer input channels) x chunk`` tangents at a time (the
norms are reduced one chunk of outputs or probes at a time), planned by ``max_memory``. The
scores of all groups are computed in one pass over the data and cached by a fingerprint of the
model (see :class:`GroupEffectImportance`).

:class:`GNDIImportance` (the first-order estimate) and :class:`AblationImportance` (the exact
effect of removing each channel, one forward per channel) share everything but that per-batch
step: both are built on :class:`GroupEffectImportance`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn as nn
import torch_pruning as tp
from tqdm.auto import tqdm

from fxgndi.core.checks import check_choice, check_finite
from fxgndi.core.errors import FxgndiError
from fxgndi.core.layers import in_width
from fxgndi.core.moments import RunningMoments
from fxgndi.core.names import BASELINES, DEFAULT_PROBES, PRUNE_MODES, READOUTS
from fxgndi.core.options import RunKwargs, RunOptions, run_options
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import batch_count, first_batch, input_arity, iter_batches
from fxgndi.fx.intervention import InterventionGraph, calibrate, intervene
from fxgndi.fx.taps import Tap, mark_folded, tap_consumers
from fxgndi.fx.trace import bind_defaults
from fxgndi.gndi.memory import pieces, plan_step
from fxgndi.gndi.readouts import check_labels, readout_width
from fxgndi.gndi.readouts import readout as apply_readout
from fxgndi.gndi.tangents import SAMPLES_PER_CHUNK, choose_mode, each_reverse_chunk, probe_signs
from fxgndi.pruning._tp import (ROOT_TYPES, consumer_items, element_reads, graph_of, normalize,
                                pruned_groups)

if TYPE_CHECKING:
    from typing_extensions import Unpack

NORMALIZERS = (None, "mean", "max", "sum", "standarization", "gaussian", "lamp")
# torch-pruning's ways of combining a group's per-member scores; for G-NDI a group has one
# (see GroupEffectImportance's group_reduction).
GROUP_REDUCTIONS = ("mean", "sum", "max", "prod", "first", "gate", None)
CACHED_MODELS = 8  # scored models kept: the dense model and those of a few iterative steps


@dataclass
class GroupPlan:
    """Where a group's channels are read: per entry, tap channel ``channels[i]`` carries scored
    position ``positions[i]`` (``size`` of them): a root channel (an index into the group's
    root idxs), or, where a reshape makes several root units one consumer channel, a *block*
    of them (``blocks[k]``: the block of root unit ``k``; see :meth:`unit_scores`).

    Example:
        >>> GroupPlan(2, [("t", torch.tensor([0, 1]), torch.tensor([1, 0]))]).size
        2
    """

    size: int
    entries: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    blocks: torch.Tensor | None = None

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One score per root unit from the ``size`` scored positions: the scores themselves,
        or, for blocks, the block's score at its first unit and, at its other units, the
        block's score plus an offset above every block's score (twice the largest, or 1).

        Why: torch-pruning removes a unit's whole block (every unit one consumer channel
        reads) for each unit it selects, and with two selected units in one block its
        consumer's item keeps that channel twice, unless a second pass over the graph happens
        to list it in another order (Python's set order): the consumer's ``in_channels`` then
        falls by the number of units, its weight by the number of blocks, and the pruned
        model's forward fails. Any ``n`` lowest of these scores, up to one per block, lie in
        ``n`` different blocks, chosen by the effect of removing the block.

        Example:
            >>> plan = GroupPlan(2, blocks=torch.tensor([0, 0, 1, 1]))
            >>> plan.unit_scores(torch.tensor([3.0, 1.0]))
            tensor([3., 9., 1., 7.])
        """
        if self.blocks is None:
            return scores
        top = float(scores.max()) if scores.numel() else 0.0
        per_unit = scores[self.blocks] + (2 * top if top > 0 else 1.0)
        units = torch.arange(len(self.blocks))
        first = torch.full((self.size,), len(self.blocks), dtype=torch.long)
        first.scatter_reduce_(0, self.blocks, units, reduce="amin")  # every block has a unit
        per_unit[first] = scores
        return per_unit


class UnscorableGroup(FxgndiError, ValueError):
    """A group whose removal effect G-NDI cannot measure: a reader of its channels is not a
    conv / linear call in the traced graph, or nothing reads them (they are model outputs).
    The importances return None for it, which torch-pruning's contract reads as "skip"."""


def plan_group(group: Any, names: dict[nn.Module, str], taps_of: dict[str, list[Tap]],
               channels: dict[str, int]) -> GroupPlan:
    """The tap channels that carry each root channel of ``group`` (see :class:`GroupPlan`).

    A consumer reads root channel ``r`` at the input channels torch-pruning maps it to; where a
    reshape splits the root's units into channels (``Linear -> view -> conv``: several units
    per input channel), each unit is one *element* of the input, read by a flat tap
    (:func:`fxgndi.pruning._tp.element_reads`); a flat tap's channels are elements, so a
    consumer that reads whole channels there reads all of a channel's elements. (A conv
    flattened into a Linear needs nothing special: torch-pruning maps each channel to all of
    its features.)

    Such a group is scored per *block*: the units one consumer channel reads (joined across
    consumers), all removed at once, as torch-pruning removes them (selecting any unit of a
    block prunes the consumer's channel and so, through the reshape, every unit of the
    block); :meth:`GroupPlan.unit_scores` says how each unit's score is then given.

    Raises :class:`UnscorableGroup` (the reason) when a consumer of the group cannot be tapped,
    its units have no element map, the group has no consumer, or torch-pruning maps a unit
    past the input its consumer reads.

    Example:
        >>> plan = plan_group(group, names, taps_of, channels)  # doctest: +SKIP
    """
    root_idxs = [int(i) for i in group[0].idxs]
    position = {r: k for k, r in enumerate(root_idxs)}
    per_tap: dict[str, dict[tuple[int, int], None]] = {}  # ordered sets of (tap channel, pos)
    shared: dict[tuple[str, int], list[int]] = {}  # (consumer, channel) -> positions it reads
    elements = element_reads(group)
    for layer, idxs, roots in consumer_items(group):
        name = names.get(layer, str(layer))
        taps = taps_of.get(name, [])
        if not taps:
            raise UnscorableGroup(f"'{name}' reads its channels but is not a conv or linear "
                                  "layer called in the traced graph (an LSTM, or inside a leaf "
                                  "module), so G-NDI cannot intervene on what it reads")
        if any(tap.folded for tap in taps):
            raise UnscorableGroup(f"'{name}' reads its channels with several rows per sample "
                                  "in the batch dim (windows folded into it), where a "
                                  "per-sample intervention does not broadcast")
        if layer in elements and elements[layer] is None:
            raise UnscorableGroup(f"'{name}' reads its units through a reshape that makes "
                                  "several of them one input channel, then an op that moves "
                                  "elements (a concat, a depthwise conv): G-NDI cannot tell "
                                  "which element each unit is")
        for tap in taps:
            width = in_width(layer) if tap.flat else channels[tap.name]
            if not 0 <= max(idxs, default=0) < width:
                # torch-pruning's own index map through a concat / reshape overshoots (its L1
                # crashes on the same group), or the graph was built before an edit: no input
                # channel carries the unit, so the group is skipped, not mis-scored.
                raise UnscorableGroup(f"torch-pruning maps a channel of the group rooted at "
                                      f"'{_root_name(group, names)}' to input channel "
                                      f"{max(idxs)} of '{tap.module}', which reads "
                                      f"{channels[tap.name]} (torch-pruning's index map "
                                      "through a concat or reshape, or a dependency graph "
                                      "built before the model was edited)")
            pairs = per_tap.setdefault(tap.name, {})
            if layer in elements:
                _add_elements(pairs, tap, elements[layer], dict(zip(roots, idxs)), position,
                              width, channels[tap.name], name, shared)
                continue
            for i, r in zip(idxs, roots):
                if r not in position:
                    continue
                for c in _elements_of(tap, i, width, channels[tap.name]):
                    pairs[(c, position[r])] = None
    blocks = _blocks(len(root_idxs), shared.values())
    if blocks is not None:  # score blocks: each entry's position becomes its unit's block
        per_tap = {t: {(c, int(blocks[q])): None for c, q in pairs}
                   for t, pairs in per_tap.items()}
    entries = [(t, torch.tensor([c for c, _ in pairs], dtype=torch.long),
                torch.tensor([q for _, q in pairs], dtype=torch.long))
               for t, pairs in per_tap.items() if pairs]
    if not entries:
        raise UnscorableGroup("no conv or linear layer reads its channels (they reach the model "
                              "output directly), so G-NDI has no consumer input to intervene on")
    if blocks is None:
        return GroupPlan(len(root_idxs), entries)
    return GroupPlan(int(blocks.max()) + 1, entries, blocks)


def _blocks(size: int, shared: Iterable[list[int]]) -> torch.Tensor | None:
    """The block of each of ``size`` positions, numbered in order of their first position,
    where each list of ``shared`` (the positions one consumer channel reads) is in one block;
    None when no two positions share one."""
    parent = list(range(size))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    merged = False
    for members in shared:
        a = find(members[0])
        for m in members[1:]:
            b = find(m)
            if a != b:
                parent[b], merged = a, True
    if not merged:
        return None
    ids: dict[int, int] = {}
    return torch.tensor([ids.setdefault(find(k), len(ids)) for k in range(size)],
                        dtype=torch.long)


def _elements_of(tap: Tap, channel: int, width: int, size: int) -> range:
    """The tap channels that carry input channel ``channel`` of its layer (``width`` of them):
    the channel itself, or on a flat tap (``size`` elements) all of the channel's elements."""
    if not tap.flat:
        return range(channel, channel + 1)
    if tap.channel_dim == 1 or width == size:
        per = size // width
        return range(channel * per, (channel + 1) * per)
    return range(channel, size, width)  # channels last


def _add_elements(pairs: dict[tuple[int, int], None], tap: Tap, reads: list[tuple[int, int]],
                  channel_of_root: dict[int, int], position: dict[int, int], width: int,
                  size: int, name: str, shared: dict[tuple[str, int], list[int]]) -> None:
    """Add one flat-tap element per root unit (``reads``: (flat element, root)), after checking
    that each element lies in the input channel torch-pruning maps its unit to; ``shared``
    collects the positions each input channel of the layer reads."""
    if not tap.flat or size % width:
        raise ValueError(f"internal: '{name}' needs a flat tap of a multiple of {width} elements")
    for element, r in reads:
        if r not in position:
            continue
        channel = element // (size // width) if tap.channel_dim == 1 else element % width
        if channel_of_root.get(r, channel) != channel:
            raise UnscorableGroup(f"'{name}' reads its units through a reshape whose element "
                                  "order fxgndi cannot follow (unit and channel disagree)")
        pairs[(element, position[r])] = None
        shared.setdefault((name, channel), []).append(position[r])


def group_tangents(tangents: dict[str, torch.Tensor], plan: GroupPlan) -> torch.Tensor:
    """The tangent [B, size, K] of removing each root channel: the sum of the tangents of every
    tap channel that carries it (linearity: one alpha drives them all), before any norm.

    ``tangents`` maps tap names to [B, C, K] channel tangents (K outputs, or R projections).

    Example:
        >>> t = {"a": torch.ones(1, 2, 3), "b": torch.ones(1, 1, 3)}
        >>> plan = GroupPlan(2, [("a", torch.tensor([0, 1]), torch.tensor([0, 1])),
        ...                      ("b", torch.tensor([0]), torch.tensor([0]))])
        >>> group_tangents(t, plan)[..., 0]
        tensor([[2., 1.]])
    """
    first = tangents[plan.entries[0][0]]
    total = first.new_zeros(first.shape[0], plan.size, first.shape[-1])
    for tap, chans, positions in plan.entries:
        t = tangents[tap]
        total.index_add_(1, positions.to(t.device), t.index_select(1, chans.to(t.device)))
    return total


def group_effects(graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                  plans: dict[tuple, GroupPlan], readout: str = "logits", p: float = 2,
                  cotangents: torch.Tensor | None = None, chunk_size: int | None = None
                  ) -> dict[tuple, torch.Tensor]:
    """Per-sample G-NDI [B, size] of every planned group on one batch: the p-norm of each root
    channel's summed tangent (:func:`group_tangents`).

    Exact with ``cotangents=None`` (one VJP per readout output); with Rademacher
    ``cotangents`` [R, B, K] (p = 2) the estimate ``sqrt(mean_r (z_r^T J v)^2)``: projecting
    is linear, so the group's tangents are summed before it as well. The norms are reduced one
    chunk of ``chunk_size`` cotangents at a time, so that only ``B x channels x chunk``
    tangents are held (:func:`fxgndi.gndi.tangents.each_reverse_chunk`).

    Example:
        >>> effects = group_effects(graph, x, None, plans)  # doctest: +SKIP
    """
    if cotangents is not None and p != 2:
        raise ValueError("probes estimate the 2-norm only: use p=2 or the exact mode")
    sums: dict[tuple, torch.Tensor] = {}

    def reduce(tangents: dict[str, torch.Tensor]) -> None:
        for key, plan in plans.items():
            total = group_tangents(tangents, plan).abs()
            part = total.amax(-1) if math.isinf(p) else total.pow(p).sum(-1)
            if key not in sums:
                sums[key] = part
            elif math.isinf(p):
                torch.maximum(sums[key], part, out=sums[key])
            else:
                sums[key] += part

    if plans:
        taps = {tap for plan in plans.values() for tap, _, _ in plan.entries}
        each_reverse_chunk(graph, x, y, reduce, readout, chunk_size, cotangents, taps)
    if cotangents is not None:
        return {key: (v / cotangents.shape[0]).sqrt() for key, v in sums.items()}
    return {key: v if math.isinf(p) else v.pow(1 / p) for key, v in sums.items()}


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
    of ``len(group[0].idxs)``), or None for a group it cannot score, which torch-pruning's
    pruners skip (their contract for importances): one that a layer G-NDI cannot tap reads (an
    LSTM, a layer inside a leaf module) or that nothing reads (its channels are model outputs:
    an unignored classifier). :attr:`skipped` maps the root layer of each such group to the
    reason; :func:`fxgndi.prune` reports them in ``result.skipped``. The intervention sets
    what the consumers read to ``baseline``: ``"zero"`` (what removal does) or
    ``"channel-mean"`` (what removal with compensation does), calibrated on ``data``.

    Scores are computed for every group of a model in one pass over the data and cached by a
    fingerprint of the model (:func:`model_fingerprint`: names, shapes and checksums of every
    parameter and buffer), for the last ``CACHED_MODELS`` models: a copy of an unchanged model
    (each step of a MAC target's ratio search prunes a fresh copy) reuses them; a pruned or
    edited one (even through ``.data``) is scored afresh. The fingerprint is taken once per
    state of a torch-pruning dependency graph (a new graph, or a group pruned through it),
    not once per group: torch-pruning scores every group of a step before it prunes any. An
    edit made between two calls on the same dependency graph with nothing pruned through it
    in between (a hand-written loop) is not seen: call :meth:`clear` after it.

    Args:
        data: batches of ``(inputs, y)`` or ``inputs`` (labels only for the ``loss`` /
            ``margin`` readouts), re-iterable (a DataLoader or a list): read again whenever the
            model changed. For a model with several inputs, ``inputs`` is a tuple (forward's
            positional arguments) or a dict (its keyword arguments):
            :func:`fxgndi.core.streams.split_batch` gives the rule.
        readout: ``"logits"``, ``"probs"``, ``"loss"`` (per-sample cross-entropy) or
            ``"margin"`` (true-class logit minus the best other): the last two are one
            output, so G-NDI on them costs one VJP per batch.
        baseline: ``"zero"``, ``"channel-mean"`` or ``"mean"`` (per position).
        p: the norm of the change of the readout.
        normalizer: as torch-pruning's importances (None, "mean", "max", "sum",
            "standarization", "gaussian", "lamp", "sentinel_<q>", or a callable); None keeps
            the raw effects, on one scale (the readout's) across groups.
        group_reduction: accepted for code written for torch-pruning's importances, which
            score every member of a group (each conv, BatchNorm, ... that loses the channel)
            and reduce the member scores: "mean" (default), "sum", "max", "prod", "first",
            "gate", or None (no reduction: ``[members, channels]``). G-NDI has one score per
            group, not per member: removing a channel removes it from every member at once
            (one alpha drives them all), so the effect is the norm of the members' tangents
            summed *before* the norm, the group's single row. Every reduction of that one row
            is the row itself, so all of them give the same scores ("sum" does not multiply
            by a member count: scores stay on the readout's scale across groups, as global
            pruning needs), and None returns the row as ``[1, channels]``. (A per-consumer
            split, the effect of one consumer no longer reading the channel, is not the
            effect of any pruning torch-pruning does, so it is not offered.)
        consumers: module class -> channel dim of the modules, besides conv / linear layers,
            that read a group's channels as a whole (a torch-pruning customized pruner's
            in-channels, e.g. Swin's patch merging): traced as leaves and tapped.
        **run: run options (:class:`fxgndi.RunOptions`): ``max_batches``, ``max_memory``,
            ``chunk_size``, ``seed``, ``leaf_modules``, ``progress`` (default False), ...
    """

    name = "effect"

    def __init__(self, data: Iterable, *, readout: str = "logits", baseline: str = "zero",
                 p: float = 2, normalizer: Any = None, group_reduction: str | None = "mean",
                 consumers: dict[type, int] | None = None, **run: Unpack[RunKwargs]) -> None:
        check_choice("readout", readout, READOUTS)
        check_choice("baseline", baseline, BASELINES)
        if not (callable(normalizer) or normalizer in NORMALIZERS
                or str(normalizer).startswith("sentinel_")):
            raise ValueError(f"unknown normalizer {normalizer!r}: use one of {NORMALIZERS}, "
                             "'sentinel_<q>' or a callable")
        if group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"unknown group_reduction {group_reduction!r}: use one of "
                             f"{GROUP_REDUCTIONS} (torch-pruning's; all give G-NDI's one score "
                             "per group, None as [1, channels])")
        if p <= 0:
            raise ValueError(f"p must be positive, not {p}")
        self.data = data
        self.group_reduction = group_reduction
        self.readout, self.baseline, self.p = readout, baseline, p
        self.normalizer = normalizer
        self.consumers = dict(consumers or {})
        self.run: RunOptions = run_options(type(self).__name__, run, progress=False)
        self.seconds = 0.0  # time spent scoring (and fingerprinting), over all calls
        self.clear()

    def clear(self) -> None:
        """Forget every cached score: the next call scores its model afresh.

        Example:
            >>> imp = GNDIImportance([torch.randn(2, 3, 8, 8)])
            >>> imp.clear()
        """
        self._scores: OrderedDict[tuple, dict[tuple, torch.Tensor | str]] = OrderedDict()
        self.skipped: dict[str, str] = {}  # root layer -> why None was returned for its group
        self._seen: tuple | None = None  # the dependency graph state last fingerprinted
        self._state: dict[str, Any] = {}  # the intervention graph of one model
        self._state_of: tuple | None = None  # (weakref to that model, its fingerprint)

    def options(self) -> dict[str, Any]:
        """What the scores depend on besides the model and the data (for results' settings).

        Example:
            >>> GNDIImportance([torch.randn(2, 3, 8, 8)], readout="loss").options()["readout"]
            'loss'
        """
        return {"baseline": self.baseline, "readout": self.readout, "p": self.p}

    def batch_effects(self, graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                      plans: dict[tuple, GroupPlan], index: int) -> dict[tuple, torch.Tensor]:
        """Per-sample effects [B, size] of removing each root channel of every planned group,
        on batch number ``index`` of the data."""
        raise NotImplementedError

    def __call__(self, group: Any) -> torch.Tensor | None:
        dg = graph_of(group)
        fingerprint, names = self._fingerprint(dg)
        scores = self._scores.get(fingerprint)
        if scores is None:  # a new model, or pruned, or edited: score every group afresh
            groups = list(dg.get_all_groups(root_module_types=ROOT_TYPES))
            self._build(dg.model, fingerprint, _flat_layers(groups, names))
            plans, reasons = self._all_plans(groups)
            scores = {**self._score(plans), **reasons}
            self._scores[fingerprint] = scores
            while len(self._scores) > CACHED_MODELS:
                self._scores.popitem(last=False)
        self._scores.move_to_end(fingerprint)
        key = _group_key(group, names)
        if key not in scores:  # a group that get_all_groups() does not yield
            self._build(dg.model, fingerprint, _flat_layers([group], names))
            try:
                scores.update(self._score({key: self._plan(group)}))
            except UnscorableGroup as exc:
                scores[key] = str(exc)
        value = scores[key]
        if isinstance(value, str):  # torch-pruning's contract: None skips the group
            self.skipped[key[0]] = value
            return None
        value = value.clone() if self.group_reduction is not None else value[None].clone()
        return normalize(value, self.normalizer)

    def _fingerprint(self, dg: Any) -> tuple[tuple, dict[nn.Module, str]]:
        """The model's fingerprint and module names, taken again only when the dependency
        graph, its model or its pruning history changed since the last call (weak references:
        a freed graph's id, reused by a new one, is not mistaken for it)."""
        model, pruned = dg.model, pruned_groups(dg)
        seen = self._seen
        if seen is not None and seen[0]() is dg and seen[1]() is model and seen[2] == pruned:
            return seen[3], seen[4]
        start = time.perf_counter()
        fingerprint, names = model_fingerprint(model), _names(model)
        self._seen = (weakref.ref(dg), weakref.ref(model), pruned, fingerprint, names)
        self.seconds += time.perf_counter() - start
        return fingerprint, names

    def _build(self, model: nn.Module, fingerprint: tuple, flat: set[str]) -> None:
        """Tap the consumers of ``model`` (those named in ``flat`` with flat taps) and set the
        taps' baselines, unless built already for this model in this state with those taps."""
        if self._state_of is not None and self._state_of[0]() is model \
                and self._state_of[1] == fingerprint:
            if flat <= self._state["flat"]:
                return
            flat = flat | self._state["flat"]  # keep the flat taps the cached plans assumed
        start = time.perf_counter()
        example = first_batch(iter_batches(self.data, device=device_of(model),
                                           arity=input_arity(model)))[:1]
        self.run = replace(self.run, concrete_args=bind_defaults(  # kept for later builds
            model, example, leaf_modules=self.run.leaf_modules,
            concrete_args=self.run.concrete_args))
        gm, taps = tap_consumers(model, leaf_modules=self.run.leaf_modules,
                                 consumers=self.consumers,
                                 concrete_args=self.run.concrete_args, flat=flat)
        graph = intervene(gm, sites=[t.name for t in taps], granularity="channel",
                          output=self.run.output)
        for site, tap in zip(graph.sites, taps):
            site.channel_dim = tap.site_dim  # a Linear reading NHWC has channels last
        device = device_of(model)
        mark_folded(gm, taps, first_batch(iter_batches(self.data, device=device,
                                                       arity=graph.arity))[:2])
        with eval_mode(graph):
            if self.baseline == "zero":  # shapes are per sample: one sample records them
                graph.describe(first_batch(iter_batches(self.data, device=device,
                                                        arity=graph.arity))[:1])
            else:
                means = calibrate(graph, self.data, kind=self.baseline,
                                  max_batches=self.run.max_batches)
                for name, value in means.items():
                    graph.set_baseline(name, value)
        taps_of: dict[str, list[Tap]] = {}
        for tap in taps:
            taps_of.setdefault(tap.module, []).append(tap)
        self._state = {"graph": graph, "device": device, "taps_of": taps_of,
                       "names": _names(model), "flat": set(flat),
                       "channels": {s.name: s.channels for s in graph.sites}}
        self._state_of = (weakref.ref(model), fingerprint)
        self._new_model()
        self.seconds += time.perf_counter() - start

    def _new_model(self) -> None:
        """Hook for subclasses: a new intervention graph was built."""

    def _all_plans(self, groups: Iterable[Any]
                   ) -> tuple[dict[tuple, GroupPlan], dict[tuple, str]]:
        """The plans of ``groups`` (every group torch-pruning can form), and why the others
        cannot be scored (the classifier's outputs, a group an LSTM reads)."""
        plans, reasons = {}, {}
        for group in groups:
            key = _group_key(group, self._state["names"])
            try:
                plans[key] = self._plan(group)
            except UnscorableGroup as exc:
                reasons[key] = str(exc)
        return plans, reasons

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
                               why=f"readout '{self.readout}'", arity=graph.arity)
        with eval_mode(graph), torch.no_grad(), self.run.heap():
            for index, (x, y) in enumerate(tqdm(
                    batches, desc=f"{self.name} importance", disable=not self.run.progress,
                    total=batch_count(self.data, self.run.max_batches))):
                if y is not None:
                    check_labels(graph(x[:1]), y)
                for key, effects in self.batch_effects(graph, x, y, plans, index).items():
                    moments[key].update(effects)
        self.seconds += time.perf_counter() - start
        out = {}
        for key, m in moments.items():
            values = m.mean.to(torch.float32).cpu()
            check_finite(values, f"the {self.name} importance of the group rooted at "
                         f"'{key[0]}'", fix="check the model's activations on this data")
            out[key] = plans[key].unit_scores(values)
        return out


class GNDIImportance(GroupEffectImportance):
    """First-order G-NDI of each channel of a torch-pruning group, ``E_x || d f / d alpha ||_p``,
    every group of the model at once from one set of reverse passes per batch.

    Args:
        mode: ``"reverse"``: exact, one VJP per readout output (K of them: 1000 for an
            ImageNet head); ``"probe"``: ``probes`` Rademacher projections of the readout
            (``E_z (z^T J v)^2 = ||J v||^2``; p = 2 only), each group's tangents summed before
            the projection; ``"auto"`` (default): probes when the readout has at least
            ``2 * probes`` outputs (they halve the cost at least) and p = 2, else reverse
            (:func:`fxgndi.gndi.tangents.choose_mode`, as :func:`fxgndi.score`): a 10-class
            head stays exact, an ImageNet head takes probes. :attr:`chosen_mode` says which
            ran.
        probes: the number R of projections (default ``DEFAULT_PROBES``, chosen by measurement:
            README, wide heads). The signs are drawn per batch from the run option ``seed``, so
            a run is reproducible.
        Others: as :class:`GroupEffectImportance`. The run option ``max_memory`` bounds one
            step's activations and tangents (``B x consumer channels x chunk``): batches and
            vmap chunks of outputs / probes are split to fit; the scores do not change.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> imp = GNDIImportance([torch.randn(8, 3, 32, 32)])
        >>> dg = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
        >>> group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(64)))
        >>> imp(group).shape, imp.chosen_mode
        (torch.Size([64]), 'reverse')
    """

    name = "gndi"

    def __init__(self, data: Iterable, *, mode: str = "auto", probes: int = DEFAULT_PROBES,
                 **options: Any) -> None:
        if mode == "forward":
            raise ValueError("GNDIImportance scores every channel of the model at once: forward "
                             "mode would cost one JVP per channel; use mode='reverse' (exact) "
                             "or 'probe'")
        check_choice("mode", mode, PRUNE_MODES)
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive integer, not {probes!r}")
        super().__init__(data, **options)
        if mode == "probe" and self.p != 2:
            raise ValueError("probe mode estimates the 2-norm only: use p=2 or mode='reverse'")
        self.mode, self.probes = mode, probes
        self.chosen_mode: str | None = None  # the mode of the last scoring pass
        self._costs: dict[tuple, dict[str, int]] = {}
        self.plan: dict[str, int | None] = {}  # max_memory's split of the last batch

    def options(self) -> dict[str, Any]:
        probes = self.probes if "probe" in (self.mode, self.chosen_mode) else None
        return {**super().options(), "mode": self.mode, "chosen_mode": self.chosen_mode,
                "probes": probes, "seed": self.run.seed if probes else None}

    def _new_model(self) -> None:
        self._costs: dict[tuple, dict[str, int]] = {}  # plan_step's measurements, this graph

    def batch_effects(self, graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                      plans: dict[tuple, GroupPlan], index: int) -> dict[tuple, torch.Tensor]:
        k = readout_width(graph, x, y, self.readout)
        mode = self.chosen_mode = choose_mode(self.mode, k, self.probes, self.p)
        z = probe_signs(self.run.seed, index, self.probes, x.shape[0], k) \
            if mode == "probe" else None
        dtype = next(graph.parameters()).dtype

        def cotangents(n: int | None, lo: int, b: int) -> torch.Tensor | None:
            if z is not None:
                return z[:n, lo:lo + b].to(device=x.device, dtype=dtype)
            if n is None:
                return None  # all K one-hot outputs, made by each_reverse_chunk
            return torch.eye(k, dtype=dtype, device=x.device)[:n, None, :].expand(n, b, k)

        def trial(xs: torch.Tensor, ys: torch.Tensor | None, n: int) -> None:
            group_effects(graph, xs, ys, plans, self.readout, self.p,
                          cotangents(n, 0, xs.shape[0]), n)

        piece, chunk = plan_step(trial, x, y, self.probes if z is not None else k,
                                 self.run.max_memory, self.run.chunk_size,
                                 self._costs.setdefault((tuple(x.shape[1:]), mode), {}))
        self.plan = {"samples_per_step": piece, "chunk": chunk}
        parts = [group_effects(graph, xs, ys, plans, self.readout, self.p,
                               cotangents(None, lo, xs.shape[0]), chunk)
                 for lo, xs, ys in pieces(x, y, piece)]
        return {key: torch.cat([part[key] for part in parts]) for key in plans}


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
                      plans: dict[tuple, GroupPlan], index: int) -> dict[tuple, torch.Tensor]:
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


def model_fingerprint(model: nn.Module) -> tuple:
    """Names, shapes, dtypes, devices and two checksums (the sum, and a position-weighted sum,
    in float64) of every parameter and buffer: equal for a copy of the model, different once
    it is pruned or any value is edited (in place, through ``.data``, or by replacing a
    parameter). One read of the weights; one device synchronisation.

    Example:
        >>> import copy
        >>> net = nn.Linear(3, 2)
        >>> before = model_fingerprint(net)
        >>> model_fingerprint(copy.deepcopy(net)) == before
        True
        >>> net.weight.data[0, 0] += 1  # no version counter sees this
        >>> model_fingerprint(net) == before
        False
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    weights: dict[torch.device, torch.Tensor] = {}
    with torch.no_grad():
        sums = []
        for _, t in tensors:
            v = t.detach().reshape(-1).to(torch.float64)
            w = weights.get(v.device)
            if w is None or w.numel() < v.numel():  # 1, 2, ..., 1021, 1, 2, ...: a
                w = torch.arange(max(v.numel(), 1 << 16), dtype=torch.float64,  # permutation
                                 device=v.device).remainder_(1021).add_(1)  # changes the sum
                weights[v.device] = w
            sums.append(torch.stack([v.sum(), (v * w[:v.numel()]).sum()]))
        values = torch.stack(sums).cpu().tolist() if sums else []
    return tuple((n, tuple(t.shape), str(t.dtype), str(t.device), *v)
                 for (n, t), v in zip(tensors, values))


def _flat_layers(groups: Iterable[Any], names: dict[nn.Module, str]) -> set[str]:
    """The consumers that read a group's units as elements (:func:`element_reads`)."""
    return {names[layer] for group in groups for layer, reads in element_reads(group).items()
            if reads is not None and layer in names}


def _group_key(group: Any, names: dict[nn.Module, str]) -> tuple:
    return (_root_name(group, names), group[0].dep.handler.__name__,
            tuple(int(i) for i in group[0].idxs))


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _root_name(group: Any, names: dict[nn.Module, str]) -> str:
    module = group[0].dep.target.module
    return names.get(module, group[0].dep.target.name)
