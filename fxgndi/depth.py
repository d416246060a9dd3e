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
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .cost import count_macs_params, example_inputs as example_of, forward_seconds
from .errors import FxgndiError
from .estimate import ablate, score
from .graph import intervene, trace
from .prune import PruneResult
from .recalibrate import recalibrate_bn as recalibrate_statistics
from .report import format_table
from .runtime import device_of, eval_mode
from .sites import describe_nodes
from .streams import iter_batches
from .train import train_classifier

CRITERIA = ("gndi", "ablation", "random")
TARGETS = ("macs", "params", "latency")
BASELINES = ("zero", "channel-mean")
_BUFFER_PREFIX = "fxgndi_depth_mean_"


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


@dataclass
class DepthPruneResult(PruneResult):
    """A depth-pruned model (a torch.fx GraphModule) and what was removed, in order.

    Attributes (beside :class:`PruneResult`'s):
        removed: the removed blocks' names, in removal order.
        history: one dict per removal: block, its score when removed, MAC and parameter
            reduction after it (and latency reduction for ``target="latency"``).
        skipped: blocks that were never candidates -> why.
        latency_before, latency_after: seconds of one forward pass on ``example_inputs``
            (measured for ``target="latency"``; NaN otherwise).

    Example:
        >>> r = DepthPruneResult(nn.Identity(), 10, 6, 4, 2, {}, {}, 0.0, removed=["b"])
        >>> r.macs_reduction
        0.4
    """

    removed: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    latency_before: float = float("nan")
    latency_after: float = float("nan")

    def table(self) -> str:
        """A summary table and the removal order with each block's score.

        Example:
            >>> r = DepthPruneResult(nn.Identity(), 10, 6, 4, 2, {}, {}, 0.0)
            >>> "MACs" in r.table()
            True
        """
        rows = [("MACs", self.macs_before, self.macs_after, self.macs_after / self.macs_before),
                ("params", self.params_before, self.params_after,
                 self.params_after / self.params_before)]
        if not math.isnan(self.latency_before):
            rows.append(("latency (ms)", 1e3 * self.latency_before, 1e3 * self.latency_after,
                         self.latency_after / self.latency_before))
        summary = format_table(rows, ["", "before", "after", "kept"], floatfmt=".3f")
        steps = format_table([(i + 1, h["block"], h["score"], h["macs_reduction"],
                               h["params_reduction"]) for i, h in enumerate(self.history)],
                             ["step", "removed block", "score", "MACs removed",
                              "params removed"], floatfmt=".4g")
        head = (f"removed {len(self.removed)} residual branch(es) by "
                f"{self.settings.get('criterion', '?')} "
                f"({'greedy' if self.settings.get('greedy') else 'one scoring'}, baseline "
                f"{self.settings.get('baseline', '?')}) in {self.seconds:.1f} s")
        parts = [head, summary, "", steps]
        if self.skipped:
            parts += ["", format_table(sorted(self.skipped.items()),
                                       ["not a candidate", "why"])]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (everything but the model).

        Example:
            >>> DepthPruneResult(nn.Identity(), 10, 6, 4, 2, {}, {}, 0.0).to_dict()["removed"]
            []
        """
        out = super().to_dict()
        out.update(removed=self.removed, history=self.history, skipped=self.skipped,
                   latency_before=self.latency_before, latency_after=self.latency_after)
        return out


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
                target: str | None = None, sparsity: float | None = None,
                criterion: str = "gndi", baseline: str = "zero", greedy: bool = True,
                readout: str = "logits", steps: int = 4, metric: str = "logit_l2",
                example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
                recalibrate_bn: bool = False, finetune: dict[str, Any] | None = None,
                inplace: bool = False,
                max_batches: int | None = None, max_memory: int | str | None = None,
                seed: int = 0, progress: bool = False) -> DepthPruneResult:
    """Remove the ``n_blocks`` least important residual branches, or as many as it takes to cut
    ``sparsity`` of the ``target`` (MACs, parameters or measured latency).

    Args:
        model: a torch.fx-traceable model with residual adds; never modified (its parameters
            are shared with the result only when ``inplace=True``).
        data: ``(x, y)`` batches (or ``x``) for scoring, the channel means, and fine-tuning.
        n_blocks: how many blocks to remove; or give ``target`` and ``sparsity`` instead.
        target, sparsity: remove blocks until at least ``sparsity`` of ``"macs"``,
            ``"params"`` or ``"latency"`` (one forward pass on ``example_inputs``) is gone.
        criterion: ``"gndi"`` (on ``readout``), ``"ablation"`` (the exact effect, by
            ``metric``) or ``"random"``.
        steps: G-NDI's path integration: ``steps`` midpoints between the model and the removal
            (1 = the paper's first-order estimate). Removing a whole branch is a large
            intervention, where first order ranks poorly (layer-level Spearman 0.73 against
            0.97 for m = 4 in benchmarks/validity.py); with a few dozen blocks at most,
            m = 4 costs 4 JVPs per block and batch.
        baseline: ``"zero"`` (the branch is dropped) or ``"channel-mean"`` (the branch is
            replaced by its per-channel mean on ``data``, a constant add), so the pruned model
            computes exactly the intervention that was scored.
        greedy: re-score the pruned model after each removal (a block's importance changes once
            its neighbours are gone); False ranks once.
        recalibrate_bn: after the removals, re-estimate every BatchNorm's running statistics
            on ``data`` (:func:`fxgndi.recalibrate.recalibrate_bn`, no weight changes): the
            layers after a removed branch see other statistics than they were trained on.
        finetune: ``dict(epochs=..., lr=...)`` for :func:`fxgndi.train.train_classifier`.
        inplace: share the model's parameters with the result instead of copying them (then
            fine-tuning changes the model's weights).
        max_memory: the scoring's memory budget (as :func:`fxgndi.score`), e.g. ``"4GB"``:
            path integration over many blocks of a large model needs it.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> data = [torch.randn(4, 3, 32, 32)]
        >>> r = prune_depth(model, data, n_blocks=2)
        >>> len(r.removed), r.macs_reduction > 0
        (2, True)
    """
    start = time.perf_counter()
    _check_arguments(n_blocks, target, sparsity, criterion, baseline, finetune)
    example = example_of(data, example_inputs, device_of(model))
    calibration = data if max_batches is None else list(iter_batches(data,
                                                                     max_batches=max_batches))
    gm = trace(model if inplace else copy.deepcopy(model))
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
    measure = _Measure(target, example, macs0, params0)
    done = _stop_rule(n_blocks, sparsity, measure, gm, candidates)
    latency0 = measure.before if target == "latency" else float("nan")
    generator = torch.Generator().manual_seed(seed)
    removed: list[str] = []
    history: list[dict[str, Any]] = []
    ranking: dict[str, float] = {}
    while not done(removed):
        if greedy or not ranking:
            ranking = _score_blocks(gm, data, calibration, candidates, criterion, baseline,
                                    readout, steps, metric, max_batches, max_memory, generator,
                                    progress)
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
    if recalibrate_bn:
        recalibrate_statistics(gm, data, max_batches=max_batches)
    if finetune:
        with eval_mode(gm):
            train_classifier(gm, data, **{"progress": progress, **finetune})
    macs1, params1 = count_macs_params(gm, example)
    latency1 = measure.seconds(gm) if target == "latency" else float("nan")
    settings = {"criterion": criterion, "baseline": baseline, "greedy": greedy,
                "n_blocks": n_blocks, "target": target, "sparsity": sparsity,
                "readout": readout, "steps": steps, "metric": metric,
                "recalibrate_bn": recalibrate_bn, "finetune": finetune}
    return DepthPruneResult(gm, int(macs0), int(macs1), int(params0), int(params1), {}, {},
                            float("nan"), settings=settings,
                            seconds=time.perf_counter() - start, removed=removed,
                            history=history, skipped=skipped, latency_before=latency0,
                            latency_after=latency1)


def _blocks_of(gm: fx.GraphModule) -> list[ResidualBlock]:
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks = []
    for site in describe_nodes(gm):
        if site.kind != "block":
            continue
        branch = nodes[site.node]
        add = next(u for u in branch.users if _adds(u, branch))
        skip = add.args[1] if add.args[0] is branch else add.args[0]
        reason = _not_removable(branch, skip, add)
        blocks.append(ResidualBlock(site.name, add.name, branch.name, skip.name, reason is None,
                                    reason))
    return blocks


def _adds(node: fx.Node, branch: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and len(node.args) >= 2
            and branch in node.args[:2] and all(isinstance(a, fx.Node) for a in node.args[:2])
            and getattr(node.target, "__name__", node.target) in ("add", "iadd", "add_"))


def _not_removable(branch: fx.Node, skip: fx.Node, add: fx.Node) -> str | None:
    if not _feeds(skip, branch):
        return (f"projection shortcut ({skip.target}): the block changes shape, so it "
                "cannot become an identity")
    shapes = [_shape(n) for n in (branch, skip, add)]
    if None in shapes or len(set(shapes)) != 1:
        return f"branch, skip and output shapes differ ({shapes}): removal would change a shape"
    return None


def _feeds(source: fx.Node, target: fx.Node) -> bool:
    """Whether ``source`` is an ancestor of ``target`` in the graph."""
    stack, seen = [target], set()
    while stack:
        node = stack.pop()
        if node is source:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return False


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None


def _propagate_shapes(gm: fx.GraphModule, example: Any) -> None:
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _score_blocks(gm: fx.GraphModule, data: Iterable, calibration: Iterable,
                  candidates: dict[str, ResidualBlock], criterion: str, baseline: str,
                  readout: str, steps: int, metric: str, max_batches: int | None,
                  max_memory: int | str | None, generator: torch.Generator, progress: bool
                  ) -> dict[str, float]:
    """Block name -> importance of removing its branch from the current model."""
    live = {b.branch: b.name for b in candidates.values() if _alive(gm, b)}
    if criterion == "random":
        return dict(zip(live.values(), torch.rand(len(live), generator=generator).tolist()))
    graph = intervene(gm, sites=lambda n: n.name in live, baseline=baseline,
                      data=calibration if baseline != "zero" else None)
    if criterion == "gndi":
        scores = score(graph, data, steps=steps, readout=readout, max_batches=max_batches,
                       max_memory=max_memory, progress=progress)
    else:
        scores = ablate(graph, data, metric=metric, max_batches=max_batches,
                        max_memory=max_memory, progress=progress)
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

    def __init__(self, target: str | None, example: Any, macs0: float, params0: float) -> None:
        self.target, self.example = target, example
        self.before = {"macs": macs0, "params": params0}.get(target or "", float("nan"))

    def seconds(self, model: nn.Module) -> float:
        """One forward pass on the example (best of 5)."""
        return forward_seconds(model, [self.example], repeat=5)

    def __call__(self, model: nn.Module) -> float:
        if self.target == "latency":
            return 1 - self.seconds(model) / self.before
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
        measure.before = measure.seconds(gm)
    everything = copy.deepcopy(gm)
    for i, block in enumerate(candidates.values()):
        _remove_branch(everything, block, None, i)
    most = measure(everything)
    if most < sparsity:
        raise FxgndiError(
            f"removing all {n_candidates} removable blocks cuts only {most:.1%} of the "
            f"{measure.target}, short of sparsity={sparsity}: lower the sparsity, or combine "
            "with channel pruning (fxgndi.prune) for the rest")
    return lambda removed: bool(removed) and measure(gm) >= sparsity


def _check_arguments(n_blocks: int | None, target: str | None, sparsity: float | None,
                     criterion: str, baseline: str, finetune: Any) -> None:
    if (n_blocks is None) == (target is None):
        raise ValueError("give either n_blocks=k or target=('macs'|'params'|'latency') with "
                         "sparsity=fraction, not both or neither")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise ValueError(f"n_blocks must be a positive integer, not {n_blocks!r}")
    if target is not None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
        if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), the fraction of {target} to remove, "
                             f"not {sparsity!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}")
    if finetune is not None and (not isinstance(finetune, dict) or "epochs" not in finetune):
        raise ValueError("finetune must be None or a dict with at least 'epochs', e.g. "
                         "finetune=dict(epochs=1, lr=1e-3)")
