"""Depth pruning: remove whole residual branches, least causally important first.

A residual block computes ``out = skip + branch(x)``. Removing the branch applies the
intervention ``do(branch := b)`` for good: with ``b = 0`` the add becomes ``out = skip`` and
every layer that only fed the branch disappears; with ``b`` = the branch's per-channel mean the
add becomes ``out = skip + mean`` (a constant buffer). Blocks are ranked by the G-NDI of that
same intervention (``sites="block"``), by its exact ablation, or at random; ``greedy`` re-scores
the pruned model after every removal. The result is a torch.fx GraphModule that owns only the
layers it still runs.
"""

from __future__ import annotations

import copy
import operator
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from fxgndi.core.checks import check_choice, check_fraction
from fxgndi.core.cost import count_macs_params
from fxgndi.core.errors import FxgndiError
from fxgndi.core.names import DEPTH_BASELINES, DEPTH_IMPORTANCES, DEPTH_TARGETS
from fxgndi.core.options import RunKwargs, run_options
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import example_input, input_arity, iter_batches
from fxgndi.fx.analysis import analyze, facts, feeds
from fxgndi.fx.intervention import intervene
from fxgndi.fx.sites import describe_nodes
from fxgndi.fx.trace import bind_defaults, trace
from fxgndi.deploy.latency import Latency, confirmed, latency_target
from fxgndi.gndi.estimate import ablate, score
from fxgndi.pruning.repair import Repair, as_repair, repair_model
from fxgndi.pruning.result import DepthPruneResult

if TYPE_CHECKING:
    from typing_extensions import Unpack

IMPORTANCES = DEPTH_IMPORTANCES
TARGETS = DEPTH_TARGETS
BASELINES = DEPTH_BASELINES
_BUFFER_PREFIX = "fxgndi_depth_mean_"
_NEAR = 0.05  # a latency reading this close to the sparsity is confirmed before it stops


@dataclass
class ResidualBlock:
    """One residual add ``out = skip + branch`` of a traced model.

    Attributes:
        name: the block's site name (the module performing the add, as ``sites="block"``).
        add: name of the fx node of the add; ``branch`` / ``skip``: names of its two inputs.
        candidate: whether removing the branch keeps every shape (an identity skip).
        reason: why it is not a candidate (None when it is).

    Example:
        >>> ResidualBlock("layer1.0", "add", "layer1_0_bn2", "maxpool", True).candidate
        True
    """

    name: str
    add: str
    branch: str
    skip: str
    candidate: bool
    reason: str | None = None


def residual_blocks(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
                    ) -> list[ResidualBlock]:
    """Every residual add of ``model``, with whether its branch can be removed and why not.

    A block is a candidate when its skip is an identity path (the skip feeds the branch) and the
    branch has the add's output shape; a projection shortcut (a downsampling block) is not: the
    block changes shape, so it cannot become an identity.

    Example:
        >>> import torchvision
        >>> blocks = residual_blocks(torchvision.models.resnet18(num_classes=10),
        ...                          torch.randn(1, 3, 32, 32))
        >>> [(b.name, b.candidate) for b in blocks][:3]
        [('layer1.0', True), ('layer1.1', True), ('layer2.0', False)]
    """
    gm = trace(model)
    _propagate_shapes(gm, example_inputs)
    return _blocks_of(gm)


def prune_depth(model: nn.Module, data: Iterable, *, n_blocks: int | None = None,
                target: str | Latency | None = None, sparsity: float | None = None,
                importance: str = "gndi", baseline: str = "zero", greedy: bool = True,
                readout: str = "logits", steps: int = 4, metric: str = "logit_l2",
                repair: Repair | dict[str, Any] | bool = True, inplace: bool = False,
                **run: Unpack[RunKwargs]) -> DepthPruneResult:
    """Remove the ``n_blocks`` least important residual branches, or as many as it takes to cut
    ``sparsity`` of the ``target`` (MACs, parameters or measured latency).

    Args:
        model: a torch.fx-traceable model with residual adds; never modified (its parameters
            are shared with the result only when ``inplace=True``).
        data: ``(x, y)`` batches (or ``x``) for scoring, the channel means, and repair.
        n_blocks: how many blocks to remove; or give ``target`` and ``sparsity`` instead.
        target, sparsity: remove blocks until at least ``sparsity`` of ``"macs"``,
            ``"params"`` or ``"latency"`` (one call on the example input, eagerly; or a
            :class:`fxgndi.Latency` for another runtime or batch size) is gone.
        importance: ``"gndi"`` (on ``readout``), ``"ablation"`` (the exact effect, by
            ``metric``) or ``"random"``.
        baseline: ``"zero"`` (the branch is dropped) or ``"channel-mean"`` (the branch is
            replaced by its per-channel mean on ``data``, a constant add), so the pruned model
            computes exactly the intervention that was scored.
        greedy: re-score the pruned model after each removal (a block's importance changes once
            its neighbours are gone); False ranks once.
        steps: G-NDI's path integration: ``steps`` midpoints between the model and the removal
            (1 = the paper's first-order estimate). Removing a whole branch is a large
            intervention, where first order ranks poorly (README, layer-level validity); with
            a few dozen blocks at most, m = 4 costs 4 JVPs per block and batch.
        repair: True (default: :class:`fxgndi.Repair`'s defaults), False (none), a
            :class:`fxgndi.Repair` or a dict of its fields: ``recalibrate_bn`` (re-estimate
            every BatchNorm's statistics: the layers after a removed branch see other
            statistics than they were trained on), ``finetune`` (``dict(epochs=..., lr=...)``;
            with ``inplace=True`` it changes the model's weights). ``compensate`` is the
            ``"channel-mean"`` baseline here; ``reconstruct`` refits nothing (no layer loses
            input channels). ``settings["repair_ran"]`` says what ran.
        inplace: share the model's parameters with the result instead of copying them.
        **run: run options (:class:`fxgndi.RunOptions`): ``example_inputs``, ``max_batches``,
            ``max_memory`` (the scoring's budget, e.g. ``"4GB"``: path integration over many
            blocks of a large model needs it), ``seed``, ``progress`` (default False), ...

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> data = [torch.randn(4, 3, 32, 32)]
        >>> r = prune_depth(model, data, n_blocks=2)
        >>> len(r.removed), r.macs_reduction > 0
        (2, True)
    """
    start = time.perf_counter()
    opts = run_options("prune_depth", run, progress=False)
    target, latency = latency_target(target)
    fixes = as_repair(repair)
    _check_arguments(n_blocks, target, sparsity, importance, baseline, fixes)
    arity = input_arity(model)
    example = example_input(data, opts.example_inputs, device_of(model), arity=arity)
    opts = replace(opts, concrete_args=bind_defaults(
        model, example, leaf_modules=opts.leaf_modules, concrete_args=opts.concrete_args))
    calibration = data if opts.max_batches is None else \
        list(iter_batches(data, max_batches=opts.max_batches, arity=arity))
    gm = trace(model if inplace else copy.deepcopy(model), leaf_modules=opts.leaf_modules,
               concrete_args=opts.concrete_args)
    _propagate_shapes(gm, example)
    blocks = _blocks_of(gm)
    candidates = {b.name: b for b in blocks if b.candidate}
    skipped = {b.name: str(b.reason) for b in blocks if not b.candidate}
    if not candidates:
        found = f"its residual adds are not removable: {skipped}" if skipped else \
            "it has no residual add"
        raise FxgndiError(f"{type(model).__name__} has no residual block to remove: {found}. "
                          "Depth pruning needs blocks of the form out = x + branch(x); use "
                          "fxgndi.prune for channel pruning instead")
    macs0, params0 = count_macs_params(gm, example)
    measure = _Measure(target, example, macs0, params0, latency)
    done = _stop_rule(n_blocks, sparsity, measure, gm, candidates)
    generator = torch.Generator().manual_seed(opts.seed)
    scoring = dict(readout=readout, steps=steps, metric=metric, max_batches=opts.max_batches,
                   max_memory=opts.max_memory, progress=opts.progress, output=opts.output)
    removed: list[str] = []
    history: list[dict[str, Any]] = []
    ranking: dict[str, float] = {}
    while not done(removed):
        if greedy or not ranking:
            ranking = _score_blocks(gm, data, calibration, candidates, importance, baseline,
                                    generator, scoring)
        alive = [n for n in ranking if n not in removed and _alive(gm, candidates[n])]
        if not alive:
            raise FxgndiError("no removable block is left (nested blocks went with their "
                              "parent branch): ask for fewer blocks or a smaller sparsity")
        name = min(alive, key=ranking.__getitem__)
        mean = _branch_mean(gm, calibration, candidates[name]) \
            if baseline == "channel-mean" else None
        _remove_branch(gm, candidates[name], mean, len(removed))
        removed.append(name)
        macs, params = count_macs_params(gm, example)
        step = {"block": name, "score": ranking[name], "macs_reduction": 1 - macs / macs0,
                "params_reduction": 1 - params / params0}
        if target == "latency":
            step["latency_reduction"] = measure(gm)
        history.append(step)
    ran = repair_model(gm, data, fixes, max_batches=opts.max_batches, progress=opts.progress)
    macs1, params1 = count_macs_params(gm, example)
    latency0 = latency1 = float("nan")
    if latency is not None:
        timing = latency.compare(gm, measure.reference, example)
        latency0, latency1 = timing.before, timing.after
    settings = {"importance": importance, "baseline": baseline, "greedy": greedy,
                "n_blocks": n_blocks, "target": target, "sparsity": sparsity,
                "readout": readout, "steps": steps, "metric": metric,
                "repair": fixes.to_dict(), "repair_ran": ran}
    return DepthPruneResult(model=gm, macs_before=int(macs0), macs_after=int(macs1),
                            params_before=int(params0), params_after=int(params1),
                            settings=settings, seconds=time.perf_counter() - start,
                            removed=removed, history=history, skipped=skipped,
                            latency_before=latency0, latency_after=latency1)


def _blocks_of(gm: fx.GraphModule) -> list[ResidualBlock]:
    nodes = {n.name: n for n in gm.graph.nodes}
    add_of = {}
    for node in analyze(gm).graph.nodes:
        if facts(node).residual is not None:
            add_of.setdefault(facts(node).residual[0], node)
    blocks = []
    for site in describe_nodes(gm):
        if site.kind != "block":
            continue
        branch = nodes[site.node]
        add = add_of[branch.name]
        skip = nodes[facts(add).residual[1]]
        reason = _not_removable(branch, skip, add)
        blocks.append(ResidualBlock(site.name, add.name, branch.name, skip.name, reason is None,
                                    reason))
    return blocks


def _not_removable(branch: fx.Node, skip: fx.Node, add: fx.Node) -> str | None:
    if not feeds(skip, branch):
        return (f"projection shortcut ({skip.target}): the block changes shape, so it "
                "cannot become an identity")
    shapes = [_shape(n) for n in (branch, skip, add)]
    if None in shapes or len(set(shapes)) != 1:
        return f"branch, skip and output shapes differ ({shapes}): removal would change a shape"
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None


def _propagate_shapes(gm: fx.GraphModule, example: Any) -> None:
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _score_blocks(gm: fx.GraphModule, data: Iterable, calibration: Iterable,
                  candidates: dict[str, ResidualBlock], importance: str, baseline: str,
                  generator: torch.Generator, scoring: dict[str, Any]) -> dict[str, float]:
    """Block name -> importance of removing its branch from the current model."""
    live = {b.branch: b.name for b in candidates.values() if _alive(gm, b)}
    if importance == "random":
        return dict(zip(live.values(), torch.rand(len(live), generator=generator).tolist()))
    graph = intervene(gm, sites=lambda n: n.name in live, baseline=baseline,
                      data=calibration if baseline != "zero" else None,
                      output=scoring["output"])
    common = {k: scoring[k] for k in ("max_batches", "max_memory", "progress")}
    if importance == "gndi":
        scores = score(graph, data, steps=scoring["steps"], readout=scoring["readout"],
                       **common)
    else:
        scores = ablate(graph, data, metric=scoring["metric"], **common)
    by_site = dict(zip(scores.names, scores.values.tolist()))
    return {live[s.node]: by_site[s.name] for s in graph.sites}


def _branch_mean(gm: fx.GraphModule, calibration: Iterable, block: ResidualBlock
                 ) -> torch.Tensor:
    """The branch's per-channel mean (the calibration that scoring used)."""
    graph = intervene(gm, sites=lambda n: n.name == block.branch, baseline="channel-mean",
                      data=calibration)
    return graph.node(graph.site_names[0]).baseline.detach().clone()


def _remove_branch(gm: fx.GraphModule, block: ResidualBlock, mean: torch.Tensor | None,
                   index: int) -> None:
    """Rewrite ``skip + branch`` as ``skip`` (zero) or ``skip + mean``; drop the dead layers."""
    nodes = {n.name: n for n in gm.graph.nodes}
    add, branch = nodes[block.add], nodes[block.branch]
    # The skip is read now: it may be an earlier block's add, rewired when that block went.
    skip = add.args[1] if add.args[0] is branch else add.args[0]
    replacement = skip
    if mean is not None:
        buffer = f"{_BUFFER_PREFIX}{index}"
        gm.register_buffer(buffer, mean)
        with gm.graph.inserting_before(add):
            constant = gm.graph.get_attr(buffer)
            replacement = gm.graph.call_function(operator.add, (skip, constant))
    add.replace_all_uses_with(replacement)
    gm.graph.erase_node(add)
    if mean is None:
        _no_inplace_users(gm, skip)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _no_inplace_users(gm: fx.GraphModule, node: fx.Node) -> None:
    """Make in-place consumers of ``node`` out-of-place.

    They used to write into the add's fresh output; now they would write into the skip tensor,
    which other nodes (and autograd, during fine-tuning) still read.
    """
    for user in node.users:
        if user.op == "call_module":
            module = gm.get_submodule(str(user.target))
            if getattr(module, "inplace", False):
                module.inplace = False  # shared modules (ResNet's relu) lose it everywhere: safe
        elif user.kwargs.get("inplace"):
            user.kwargs = {**user.kwargs, "inplace": False}
        elif user.args and user.args[0] is node:
            if user.op == "call_method" and str(user.target).endswith("_"):
                user.target = str(user.target)[:-1]
            elif user.target is operator.iadd:
                user.target = operator.add


def _alive(gm: fx.GraphModule, block: ResidualBlock) -> bool:
    return any(n.name == block.add for n in gm.graph.nodes)


class _Measure:
    """The fraction of the target removed from a model (MACs, params, or latency)."""

    def __init__(self, target: str | None, example: Any, macs0: float, params0: float,
                 latency: Latency | None = None) -> None:
        self.target, self.example, self.latency = target, example, latency
        self.before = {"macs": macs0, "params": params0}.get(target or "", float("nan"))
        self.reference: nn.Module | None = None  # the dense model, for latency

    def __call__(self, model: nn.Module) -> float:
        if self.target == "latency":  # timed against the dense model, in alternation
            return 1 - self.latency.ratio(model, self.reference, self.example)
        macs, params = count_macs_params(model, self.example)
        return 1 - (macs if self.target == "macs" else params) / self.before


def _stop_rule(n_blocks: int | None, sparsity: float | None, measure: _Measure,
               gm: fx.GraphModule, candidates: dict[str, ResidualBlock]
               ) -> Callable[[list[str]], bool]:
    """When to stop removing; fails up front when the request cannot be met."""
    n_candidates = len(candidates)
    if n_blocks is not None:
        if n_blocks > n_candidates:
            raise FxgndiError(f"n_blocks={n_blocks} but the model has only {n_candidates} "
                              f"removable residual blocks ({', '.join(candidates)})")
        return lambda removed: len(removed) >= n_blocks
    if measure.target == "latency":
        measure.reference = copy.deepcopy(gm)
    everything = copy.deepcopy(gm)
    for i, block in enumerate(candidates.values()):
        _remove_branch(everything, block, None, i)
    most = measure(everything)
    if most < sparsity:
        raise FxgndiError(
            f"removing all {n_candidates} removable blocks cuts only {most:.1%} of the "
            f"{measure.target}, short of sparsity={sparsity}: lower the sparsity, or combine "
            "with channel pruning (fxgndi.prune) for the rest")
    reached = confirmed(measure, sparsity, near=_NEAR) if measure.target == "latency" \
        else measure
    return lambda removed: bool(removed) and reached(gm) >= sparsity


def _check_arguments(n_blocks: int | None, target: str | None, sparsity: float | None,
                     importance: str, baseline: str, fixes: Repair) -> None:
    if (n_blocks is None) == (target is None):
        raise ValueError("give either n_blocks=k or target=('macs'|'params'|'latency') with "
                         "sparsity=fraction, not both or neither")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise ValueError(f"n_blocks must be a positive integer, not {n_blocks!r}")
    if target is not None:
        check_choice("target", target, TARGETS)
        check_fraction("sparsity", sparsity, f", the fraction of {target} to remove")
    check_choice("importance", importance, IMPORTANCES)
    check_choice("baseline", baseline, BASELINES)
    if fixes.compensate:
        raise ValueError("depth pruning has no compensate step: baseline='channel-mean' "
                         "replaces a removed branch by its mean")
