"""Width pruning with torch-pruning, ranked by G-NDI or by torch-pruning's own criteria.

``prune`` removes channels (whole torch-pruning groups of coupled channels) from a copy of the
model until a channel, parameter or MAC budget is met, then repairs it
(:mod:`fxgndi.pruning.repair`).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from fxgndi.core.checks import check_choice, check_count, check_fraction
from fxgndi.core.cost import count_macs_params
from fxgndi.core.errors import FxgndiError, UntraceableModelError
from fxgndi.core.layers import BATCHNORMS, LAYERS, in_width, out_width
from fxgndi.core.names import PRUNE_IMPORTANCES, PRUNE_TARGETS
from fxgndi.core.options import RunKwargs, RunOptions, run_options
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import call_hooked, call_model, example_input, input_arity, iter_batches
from fxgndi.fx.analysis import analyze, facts
from fxgndi.fx.trace import bind_defaults, trace
from fxgndi.fx.widths import (StaticWidth, forward_failure, shape_widths, static_widths,
                              update_widths)
from fxgndi.pruning import architectures
from fxgndi.pruning._tp import (RoundLayer, channel_groups, graph_of, make_pruner, prune_group,
                                prunes_inputs, prunes_outputs, runaway_roots)
from fxgndi.pruning.compensate import compensate_group, consumer_input_means
from fxgndi.deploy.latency import READINGS, Latency, confirmed, latency_target
from fxgndi.pruning.allocation import time_allocation
from fxgndi.pruning.kernels import KernelTimer
from fxgndi.pruning.latency import PerLatency, layer_latencies
from fxgndi.pruning.importance import (AblationImportance, GNDIImportance,
                                       GroupEffectImportance, check_importance_length)
from fxgndi.pruning.repair import Repair, as_repair, repair_model
from fxgndi.pruning.rounding import AutoRound, Rounder, auto_round
from fxgndi.pruning.result import PruneResult
from fxgndi.pruning.ties import Ties

if TYPE_CHECKING:
    from typing_extensions import Unpack

IMPORTANCES = PRUNE_IMPORTANCES
ALLOCATIONS = ("uniform", "time")
TARGETS = PRUNE_TARGETS
_TRACKED = (*LAYERS, *BATCHNORMS)
_MAX_RATIO = 0.95  # torch-pruning refuses to empty a layer; the search stays below
_UNROUND_TRIES = 4  # finer rounding of the groups that step, one search each, before none
_LATENCY_AIM = 0.5  # a latency reading within this part of the tolerance is accepted at once
_NEAR_MISSES = 3  # readings within the tolerance but not the aim, before the closest is taken
_WIDTH_TRIES = 8  # prunes again with the layers of a failing forward kept, at most this often
_UNTRACED = "(static widths)"  # the skipped entry of a model torch.fx could not trace


def prune(model: nn.Module, data: Iterable, *, sparsity: float = 0.5,
          target: str | Latency = "channels",
          importance: str | tp.importance.Importance = "gndi",
          ignored_layers: str | Sequence[nn.Module | str] | None = "auto",
          round_to: int | str | AutoRound | None = "auto", global_pruning: bool = False,
          allocate: str | Latency = "time",
          iterative_steps: int = 1,
          tolerance: float | None = None, repair: Repair | dict[str, Any] | bool = True,
          inplace: bool = False, **run: Unpack[RunKwargs]) -> PruneResult:
    """Prune ``model``'s channels with torch-pruning, ranking them by ``importance``.

    Args:
        model: any model torch-pruning can trace; never modified unless ``inplace=True``.
        data: ``(x, y)`` batches: scoring for gndi / ablation / weight_taylor / hessian, the
            means for ``compensate``, the BatchNorm statistics and the fine-tuning set.
        sparsity: in (0, 1): the fraction of ``target`` to remove.
        target: ``"channels"`` (torch-pruning's per-channel ratio), ``"params"``, ``"macs"``
            or ``"latency"`` / a :class:`fxgndi.Latency` (the runtime, batch size and threads it
            is measured on; ``"latency"``: eager, batch 1): the channel ratio is searched by
            bisection until the removed fraction is within ``tolerance``, absolute, of
            ``sparsity`` (default 0.02; 0.05 for latency, which is measured: a latency reading
            within twice the tolerance is taken three times and their median decides; one within
            half the tolerance is accepted at once, else the closest of three within it; and
            ``settings["latency"]`` is one final reading of three times the rounds). With a
            latency target and ``global_pruning=True`` every group's scores are divided by the
            latency one of its channels costs (:mod:`fxgndi.pruning.latency`).
        importance: ``"gndi"`` (:class:`GNDIImportance`), ``"ablation"``
            (:class:`AblationImportance`), torch-pruning's ``"l1"``, ``"l2"``,
            ``"weight_taylor"``, ``"hessian"``, ``"lamp"``, ``"bn"``, ``"fpgm"``,
            ``"random"``, or any ``torch_pruning.importance.Importance`` (e.g.
            ``GNDIImportance(data, readout="loss")``: used as it is). The named gndi /
            ablation score the intervention that is applied: the ``"channel-mean"`` baseline
            with ``compensate``, ``"zero"`` otherwise.
        ignored_layers: ``"auto"`` (keep the width of the layers producing the model output:
            the classifier), None, or modules / module names of ``model`` to keep.
        round_to: ``"auto"`` (default: each group's kept width is rounded to the nearest multiple
            of 8, or of 16 or 32 where a short measurement of its kernels on the model's device
            and the target's runtime finds that faster per kept channel: see
            :mod:`fxgndi.pruning.rounding`; timings cached in ``~/.cache/fxgndi``), an
            :class:`~fxgndi.pruning.rounding.AutoRound` (its candidates, the runtime and batch
            it measures on, ...), an integer (every kept width a multiple of it, as
            torch-pruning's ``round_to``) or None (no rounding). A budget is still met
            (where rounded groups step past it together, some of them are pruned at a
            slightly higher ratio: ``settings["layer_ratios"]``).
            ``settings["rounded"]`` names the layers rounded and their multiple.
        allocate: how a MAC or latency target is spread over the groups of local pruning:
            ``"time"`` (default) tilts it toward the groups whose channels cost the most time
            per MAC (depthwise convs, norms, activations), by the least tilt at which the
            model's predicted time falls as fast as its MACs (a latency target then halves the
            time removing far fewer MACs), timed where ``round_to="auto"`` times (its
            ``AutoRound.latency``, else the latency target's, else eager at batch 1; cached
            with its timings); a :class:`fxgndi.Latency` times there; ``"uniform"``: every
            group loses the same fraction of its channels. Not used for the channel and
            parameter targets or with ``global_pruning`` (:mod:`fxgndi.pruning.allocation`;
            ``settings["allocation"]`` has the tilt and each group's weight).
        global_pruning, iterative_steps: as torch-pruning's ``BasePruner``.
        repair: what is done after removal so the pruned model computes what the dense one
            did: True (default: :class:`fxgndi.Repair`'s defaults, least-squares refits of the
            consumers on ``data`` then BatchNorm recalibration), False (nothing: the model as
            torch-pruning leaves it), a :class:`fxgndi.Repair`, or a dict of its fields
            (``reconstruct``, ``recalibrate_bn``, ``compensate``, ``finetune``, ``ridge``).
            ``settings["repair_ran"]`` says what ran.
        inplace: prune ``model`` itself.
        **run: run options (:class:`fxgndi.RunOptions`): ``example_inputs`` (the batch to
            trace with and count MACs on; default the first sample of ``data``),
            ``max_batches`` (for scoring and means), ``seed`` (``"random"`` importance and
            anything else random), ``progress`` (default False), ...

    Channel shuffles (ShuffleNetV2), windowed attention (Swin V1 / V2), partition attention
    (MaxViT), ``nn.MultiheadAttention`` (ViT), frozen BatchNorms (torchvision's
    ``FrozenBatchNorm2d``, detection backbones) and RMS norms (``nn.RMSNorm``) are recognised
    from the model's modules and handled by :mod:`fxgndi.pruning.architectures` (named in
    ``settings["architectures"]``).

    Widths the model's code holds (:mod:`fxgndi.fx.widths`): one held in an attribute is
    updated (``settings["updated_widths"]``); a literal one, or a size read off another
    tensor's shape (``B, N, C = x.shape`` then ``out.reshape(B, N, C)``), keeps the widths of
    the layers involved. The returned model always runs on ``example_inputs``: where a pruned
    forward still fails, the layers (and parameters) feeding the failing node, in every
    instance of the module class that made the call, keep their widths and pruning runs again.
    Every kept width is in ``result.skipped`` with its reason.

    Example:
        >>> import torchvision
        >>> from fxgndi.app.data import load_data
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> data = load_data("digits", split="train", limit=64)
        >>> r = prune(model, data, sparsity=0.5, target="macs")
        >>> print(r.table())  # doctest: +SKIP
    """
    start = time.perf_counter()
    opts = run_options("prune", run, progress=False)
    fixes = as_repair(repair)
    target, latency = latency_target(target)
    tolerance = (0.05 if latency is not None else 0.02) if tolerance is None else tolerance
    _check_arguments(sparsity, target, importance, iterative_steps, tolerance, allocate)
    Ties(model, compensate=fixes.compensate)  # refuses, before any work, ties it cannot keep
    auto = auto_round(round_to)
    if auto is None:
        check_count("round_to", round_to, allow_none=True,
                    meaning=" (channel counts are kept multiples of it), 'auto' or None")
    device = device_of(model)
    example = example_input(data, opts.example_inputs, device, arity=input_arity(model))
    opts = replace(opts, concrete_args=bind_defaults(
        model, example, leaf_modules=opts.leaf_modules, concrete_args=opts.concrete_args))
    rounder = None if auto is None else Rounder(model, example, auto,
                                                auto.latency or latency or Latency())
    plan = architectures.plan_for(model)
    base = _make_importance(importance, data, fixes.compensate, opts, plan)
    scorer = base
    if latency is not None and global_pruning:
        scorer = PerLatency(base, layer_latencies(model, example, latency))
    macs0, params0 = count_macs_params(model, example)
    channels0 = _out_channels(model)
    ignored_names = _ignored_names(model, ignored_layers, example, opts)
    # The modules an architecture's own pruner handles are opaque to the width passes: that
    # pruner keeps the widths inside consistent (windowed / partition attention, ...).
    width_leaves = (*opts.leaf_modules, *plan.customized_pruners)
    widths, skipped = _static_widths(model, example, opts, width_leaves)
    kept_params: list[str] = []  # parameters whose torch-pruning groups keep their widths
    ignored_names += [name for name in skipped if name != _UNTRACED and name not in ignored_names]

    layer_ratios: dict[str, float] = {}  # groups (by root layer) pruned at their own ratio
    allocation = None
    if allocate != "uniform" and not global_pruning and (target == "macs" or latency is not None):
        timer = rounder.timer if rounder is not None and not isinstance(allocate, Latency) \
            else KernelTimer(replace(allocate if isinstance(allocate, Latency)
                                     else latency or Latency(), warmup=1))
        allocation = time_allocation(model, example, timer, lambda work, recorder: _prune_once(
            work, data, example, recorder, 0.5, global_pruning=False, iterative_steps=1,
            round_to=None, ignored=[work.get_submodule(n) for n in ignored_names],
            compensate=False, max_batches=opts.max_batches, seed=opts.seed, widths=widths,
            kept_params=kept_params), sparsity)

    def run_once(ratio: float, target_model: nn.Module | None = None, *,
                 between: bool = False, own: dict[str, float] | None = None
                 ) -> tuple[nn.Module, tuple]:
        work = target_model if target_model is not None else copy.deepcopy(model)
        own = layer_ratios if own is None else own
        if allocation is not None:  # each group at its share of the search's ratio
            own = {n: min(_MAX_RATIO, r) for n, r in {
                **allocation.ratios(ratio),
                **{n: allocation.ratio(n, r) for n, r in own.items()}}.items()}
        kept = _prune_once(work, data, example, scorer, ratio, global_pruning=global_pruning,
                           layer_ratios={work.get_submodule(n): r for n, r in own.items()},
                           iterative_steps=iterative_steps,
                           round_to=round_to if rounder is None else rounder.callback(work),
                           ignored=[work.get_submodule(n) for n in ignored_names],
                           compensate=fixes.compensate, max_batches=opts.max_batches,
                           seed=opts.seed, widths=widths, kept_params=kept_params,
                           between_steps=repair_between if between else None)
        return work, kept

    # Iterative pruning repairs between its steps (each step then scores a repaired model).
    # The widths of local pruning do not depend on the scores, so its ratio search runs without
    # and the found ratio is pruned once more with it; global pruning searches with it.
    step_fixes = replace(fixes, finetune=None)

    def repair_step(work: nn.Module, kept_outputs: dict[str, list[int]]) -> None:
        update_widths(work, list(widths))
        repair_model(work, data, step_fixes, dense=dense, kept_outputs=kept_outputs,
                     max_batches=opts.max_batches, max_memory=opts.max_memory)

    repairs = iterative_steps > 1 and (fixes.reconstruct or bool(fixes.recalibrate_bn))
    repair_between = repair_step if repairs else None

    # The least-squares repair fits the pruned layers to the dense ones, and the final latency
    # is timed against them: keep the dense model.
    dense = copy.deepcopy(model) if inplace and (fixes.reconstruct or latency is not None) \
        else model

    def search_and_prune() -> tuple[float, nn.Module, _Pruned]:
        """Prunes a copy (the model itself only once a copy runs)."""
        nonlocal layer_ratios
        layer_ratios = {}
        if target == "channels":
            return sparsity, *run_once(sparsity, between=repair_between is not None)
        if latency is not None:  # timed against the dense model, in alternation
            measure = confirmed(lambda m: 1 - latency.ratio(m, model, example), sparsity,
                                near=2 * tolerance)
        else:
            measure = _reduction_measure(target, macs0 if target == "macs" else params0,
                                         example)
        search_between = repair_between is not None and global_pruning
        aim = tolerance * _LATENCY_AIM if latency is not None else None
        search = lambda: _search_ratio(  # noqa: E731
            lambda r: run_once(r, between=search_between), measure, sparsity, tolerance, target,
            aim)
        for attempt in range(_UNROUND_TRIES + 1):
            try:
                ratio, (pruned, kept) = search()
                break
            except _Unreachable as exc:
                if rounder is None or not rounder.chosen:
                    raise
                # Rounded groups step their widths (and the MACs) past the target together
                # where the search brackets it (groups of one width cross a multiple at the
                # same ratio). First some of them take the bracket's upper ratio and the rest
                # its lower one; failing that, they are rounded more finely and the search runs
                # again; after _UNROUND_TRIES, nothing is rounded (the budget comes first, and
                # settings say so).
                below, above = (run_once(r)[1].outputs for r in exc.bracket)
                jumped = [n for n in below if len(below[n]) - len(above.get(n, [])) > 1]
                split = None if global_pruning else _split_bracket(
                    run_once, measure, exc.bracket, jumped, sparsity, tolerance)
                if split is not None:
                    ratio, layer_ratios, (pruned, kept) = split
                    break
                if attempt == _UNROUND_TRIES - 1 or not rounder.unround(set(jumped)):
                    rounder.enabled = False
        if repair_between is not None and not search_between:
            pruned, kept = run_once(ratio, between=True)
        return ratio, pruned, kept

    # A width the code holds that neither torch-pruning nor static_widths follows fails the
    # pruned forward: the layers feeding the failing node keep their widths and pruning runs
    # again.
    for _ in range(_WIDTH_TRIES + 1):
        ratio, pruned, kept = search_and_prune()
        if _UNTRACED in skipped:
            break
        failure = forward_failure(pruned, model, example, leaf_modules=width_leaves,
                                  concrete_args=opts.concrete_args)
        new = [n for n in failure.layers if n not in ignored_names] if failure else []
        new_params = [n for n in failure.parameters if n not in kept_params] if failure else []
        if not new and not new_params:
            break
        kept_params += new_params
        for name in new + new_params:
            skipped.setdefault(name, f"keeps its width: with it pruned, node {failure.node} of "
                                     f"the forward fails ({failure.error[:160]}); a width the "
                                     "code holds that neither torch-pruning nor fxgndi follows")
        ignored_names += new
    _check_runs(pruned, example, untraceable=_UNTRACED in skipped)
    if inplace:
        pruned, kept = run_once(ratio, model, between=repair_between is not None)
    if rounder is not None:
        rounder.timer.save()
    if sparsity > 0 and all(len(kept[0].get(n, ())) == c for n, c in channels0.items()):
        why = {**skipped, **kept.skipped}
        warnings.warn(
            f"prune removed no channel from {type(model).__name__}: torch-pruning found no "
            "group it could prune outside ignored_layers"
            + (f" ({len(why)} skipped, see result.skipped: e.g. {next(iter(why))!r})"
               if why else "")
            + ". Fix: check ignored_layers and result.skipped; layers torch-pruning does not "
            "know need a custom pruner (torch-pruning's customized_pruners)",
            RuntimeWarning, stacklevel=2)
    ran = repair_model(pruned, data, fixes, dense=dense, kept_outputs=kept[0],
                       max_batches=opts.max_batches, max_memory=opts.max_memory,
                       progress=opts.progress)
    macs1, params1 = count_macs_params(pruned, example)
    channels1 = _out_channels(pruned)
    settings = {"importance": importance if isinstance(importance, str)
                else type(importance).__name__, "target": target, "sparsity": sparsity,
                "global_pruning": global_pruning, "iterative_steps": iterative_steps,
                "round_to": "auto" if rounder is not None else round_to,
                "rounded": rounder.chosen if rounder is not None else {},
                "layer_ratios": dict(layer_ratios),
                "allocation": {"tilt": allocation.tilt, "weights": allocation.weights}
                if allocation is not None else None,
                **({"rounding_dropped": "round_to='auto' made the target unreachable within "
                    "the tolerance; pruned without rounding"}
                   if rounder is not None and not rounder.enabled else {}),
                "repair": fixes.to_dict(), "repair_ran": ran,
                "ignored_layers": ignored_names, "importance_options": {},
                "updated_widths": sorted({f"{w.owner}.{w.attribute}".lstrip(".")
                                          for w in widths if w.attribute}),
                "architectures": plan.families}
    if latency is not None:
        final = replace(latency, repeat=latency.repeat * READINGS)
        settings["latency"] = {**asdict(latency),
                               **final.compare(pruned, dense, example)._asdict()}
    if isinstance(base, GroupEffectImportance):
        settings["importance_options"].update(base.options())
        settings["scoring_seconds"] = base.seconds
    return PruneResult(model=pruned, macs_before=int(macs0), macs_after=int(macs1),
                       params_before=int(params0), params_after=int(params1),
                       settings=settings, seconds=time.perf_counter() - start,
                       skipped={**skipped, **kept.skipped},
                       channels={n: (channels0[n], channels1.get(n, 0)) for n in channels0},
                       kept=kept[0], kept_inputs=kept[1], pruning_ratio=ratio)


def _split_bracket(run: Callable[..., tuple[nn.Module, tuple]],
                   measure: Callable[[nn.Module], float], bracket: tuple[float, float],
                   layers: list[str], sparsity: float, tolerance: float
                   ) -> tuple[float, dict[str, float], tuple[nn.Module, tuple]] | None:
    """The groups of ``layers`` (those whose width steps between the bracket's ratios), the
    first ``k`` of them at the upper ratio and the rest at the lower one, for the ``k``
    (bisected: the removed fraction grows with it) that meets the target within
    ``tolerance``; None where one group's step alone jumps past it."""
    lo, hi = bracket
    few, many = 0, len(layers)
    while many - few > 1:
        k = (few + many) // 2
        own = dict.fromkeys(layers[:k], hi)
        outcome = run(lo, own=own)
        removed = measure(outcome[0])
        if abs(removed - sparsity) <= tolerance:
            return lo, own, outcome
        few, many = (k, many) if removed < sparsity else (few, k)
    return None


def make_importance(name: str, data: Iterable | None = None, **options: Any
                    ) -> tp.importance.Importance:
    """A torch-pruning importance by name (see ``IMPORTANCES``); gndi / ablation need ``data``.

    Example:
        >>> type(make_importance("l1")).__name__
        'GroupMagnitudeImportance'
    """
    check_choice("importance", name, IMPORTANCES)
    if name in ("gndi", "ablation"):
        if data is None:
            raise ValueError(f"importance '{name}' scores on data: pass data=loader")
        return (GNDIImportance if name == "gndi" else AblationImportance)(data, **options)
    factories: dict[str, Callable[..., tp.importance.Importance]] = {
        "l1": lambda **o: tp.importance.GroupMagnitudeImportance(p=1, **o),
        "l2": lambda **o: tp.importance.GroupMagnitudeImportance(p=2, **o),
        "weight_taylor": tp.importance.GroupTaylorImportance,
        "hessian": tp.importance.GroupHessianImportance,
        "lamp": tp.importance.LAMPImportance,
        "bn": tp.importance.BNScaleImportance,
        "fpgm": tp.importance.FPGMImportance,
        "random": tp.importance.RandomImportance,
    }
    return factories[name](**options)


def output_layers(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                  concrete_args: dict[str, Any] | None = None) -> list[str]:
    """Names of the conv / linear layers whose outputs reach the model output through no other
    conv / linear layer (the classifier). Found on the torch.fx graph; for an untraceable model,
    the last conv / linear layer that runs.

    Example:
        >>> output_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)),
        ...               torch.zeros(1, 2))
        ['2']
    """
    try:
        gm = trace(model, concrete_args=concrete_args)
    except UntraceableModelError:
        return [_last_layer_run(model, example_inputs)]
    output = next(n for n in analyze(gm).graph.nodes if n.op == "output")
    return sorted(facts(output).layers)


def _prune_once(model: nn.Module, data: Iterable, example: Any,
                importance: tp.importance.Importance, ratio: float, *, global_pruning: bool,
                layer_ratios: dict[nn.Module, float] | None = None,
                iterative_steps: int, round_to: int | RoundLayer | None, ignored: list[nn.Module],
                compensate: bool, max_batches: int | None, seed: int,
                widths: Sequence[StaticWidth] = (), kept_params: Sequence[str] = (),
                between_steps: Callable[[nn.Module, dict[str, list[int]]], Any] | None = None
                ) -> _Pruned:
    """Prune ``model`` in place; returns the original indices of the kept outputs and inputs,
    and the groups the importance did not score. ``between_steps(model, kept_outputs)`` runs
    after every iterative step but the last (the repair, so that the next step scores a
    repaired model)."""
    parameters = dict(model.named_parameters())
    names = {m: n for n, m in model.named_modules()}  # pruning changes the modules in place
    checked = _CheckedImportance(importance, names,
                                 {id(parameters[n]): n for n in kept_params if n in parameters})
    tracker = _ChannelTracker(model)
    plan = architectures.plan_for(model)
    ties = Ties(model, compensate=compensate)
    with eval_mode(model), torch.random.fork_rng(devices=_cuda(model)), \
            torch.enable_grad(), _biasless_group_norms(model):
        torch.manual_seed(seed)
        try:
            with architectures.tracing(model, plan):
                pruner = make_pruner(
                    model, example, importance=checked, global_pruning=global_pruning,
                    pruning_ratio=ratio, pruning_ratio_dict=layer_ratios or None,
                    iterative_steps=iterative_steps,
                    ignored_layers=ignored, round_to=round_to, **plan.pruner_options())
            pruner.ignored_layers.extend(
                architectures.unprunable_layers(pruner.DG, pruner.root_module_types))
            checked.pruner = pruner
        except Exception as exc:  # torch-pruning raises bare errors from deep inside
            raise FxgndiError(
                f"torch-pruning {tp.__version__} could not build the dependency graph of "
                f"{type(model).__name__}: {type(exc).__name__}: {exc}. Fix: put the layers "
                "around the unsupported operation (often a reshape, e.g. a channel shuffle) "
                "in ignored_layers, or try another example_inputs size") from exc
        ties.couple(pruner.DG)
        for step in range(iterative_steps):
            _prepare_gradients(importance, model, data, max_batches)
            means = consumer_input_means(model, data, max_batches=max_batches) \
                if compensate else None
            for group in pruner.step(interactive=True):
                if means is not None:
                    compensate_group(group, means)
                tracker.update(group)
                prune_group(group)
                ties.retie()
            for p in model.parameters():
                p.grad = None
            if between_steps is not None and step < iterative_steps - 1:
                with torch.no_grad():
                    between_steps(model, tracker.kept()[0])
    for fix in plan.after:
        fix(model)
    update_widths(model, list(widths))
    runaways = {names[m]: "keeps its width: torch-pruning's group of it ran away while it was "
                "built (index maps through concats, splits or reshapes that do not close)"
                for m in runaway_roots(pruner.DG) if m in names}
    return _Pruned(*tracker.kept(), skipped={**runaways, **checked.skipped})


@contextmanager
def _biasless_group_norms(model: nn.Module) -> Iterator[None]:
    """torch-pruning (1.6) prunes an affine GroupNorm's ``bias`` even when it is None (timm's
    ``GroupNorm1NoBias``) and fails: a zero bias, which changes nothing, stands in meanwhile."""
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm) and m.affine
             and m.bias is None and isinstance(m.weight, nn.Parameter)]
    for m in norms:
        m.bias = nn.Parameter(torch.zeros_like(m.weight), requires_grad=False)
    try:
        yield
    finally:
        for m in norms:
            m.bias = None


class _Pruned(NamedTuple):
    """What one pruning run did: original indices of the kept outputs and inputs per layer, and
    the root layers of the groups the importance returned None for (why)."""

    outputs: dict[str, list[int]]
    inputs: dict[str, list[int]]
    skipped: dict[str, str]


class _CheckedImportance(tp.importance.Importance):
    """Wraps an importance, checks each returned vector (torch-pruning does not) and records
    the groups it returned None for (torch-pruning skips them): root layer -> why."""

    def __init__(self, inner: tp.importance.Importance, names: dict[nn.Module, str],
                 kept: dict[int, str] | None = None) -> None:
        self.inner, self.names, self.kept = inner, names, kept or {}
        self.pruner: Any = None  # set once built: its channel slices are checked
        self.skipped: dict[str, str] = {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        kept = next((self.kept[id(dep.target.module)] for dep, _ in group
                     if id(dep.target.module) in self.kept), None)
        if kept is not None:  # a parameter the forward needs at its width (see prune)
            root = group[0].dep.target.module
            self.skipped.setdefault(self.names.get(root, group[0].dep.target.name),
                                    f"keeps its width: its group prunes {kept}, which the "
                                    "pruned forward needs at its width")
            return None
        scores = self.inner(group)
        check_importance_length(scores, group, type(self.inner).__name__)
        slices = channel_groups(self.pruner, group) if self.pruner is not None else 1
        if scores is not None and len(scores) % slices:
            # torch-pruning averages the scores over the slices of a grouped conv in the group;
            # where a concat puts that conv on part of the group's channels the slices do not
            # divide them, and its pruner would fail: the group is skipped.
            root = group[0].dep.target.module
            self.skipped[self.names.get(root, group[0].dep.target.name)] = (
                f"keeps its width: torch-pruning splits its group's {len(scores)} channels "
                f"into {slices} equal slices (a grouped conv or GroupNorm reads part of them, "
                "after a concat), which do not divide them")
            return None
        if scores is None:
            root = group[0].dep.target.module
            name = self.names.get(root, group[0].dep.target.name)
            why = getattr(self.inner, "skipped", {}).get(name, "")
            self.skipped[name] = (f"keeps its width: {type(self.inner).__name__} did not score "
                                  f"its group{': ' + why if why else ''}")
        return scores


class _ChannelTracker:
    """Original indices of the out-channels of each conv / linear / BatchNorm layer, and of the
    inputs of each conv / linear layer, that are still there."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules() if isinstance(m, _TRACKED)}
        self.outputs = {m: list(range(out_width(m))) for m in self.names}
        self.inputs = {m: list(range(in_width(m))) for m in self.names if isinstance(m, LAYERS)}

    def update(self, group: Any) -> None:
        dg = graph_of(group)
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            gone = {int(i) for i in item.idxs}
            if layer in self.outputs and prunes_outputs(dg, handler):
                self.outputs[layer] = [c for k, c in enumerate(self.outputs[layer])
                                       if k not in gone]
            elif layer in self.inputs and prunes_inputs(dg, handler):
                self.inputs[layer] = [c for k, c in enumerate(self.inputs[layer])
                                      if k not in gone]

    def kept(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        return ({self.names[m]: idx for m, idx in self.outputs.items()},
                {self.names[m]: idx for m, idx in self.inputs.items()})


def _prepare_gradients(importance: tp.importance.Importance, model: nn.Module, data: Iterable,
                       max_batches: int | None) -> None:
    """Taylor needs mean loss gradients, Hessian (OBD) mean squared per-sample gradients.

    The squares are accumulated here: torch-pruning 1.6.0's ``accumulate_grad`` keys its
    running sums by parameter but tests membership by name, so it keeps only the last sample.
    """
    if not isinstance(importance, (tp.importance.GroupTaylorImportance,
                                   tp.importance.GroupHessianImportance)):
        return
    hessian = isinstance(importance, tp.importance.GroupHessianImportance)
    params = [p for p in model.parameters() if p.requires_grad]
    totals = [torch.zeros_like(p) for p in params]
    count = 0
    with eval_mode(model), torch.enable_grad():
        for x, y in iter_batches(data, device=device_of(model), max_batches=max_batches,
                                 need_labels=True, why=f"importance '{type(importance).__name__}'",
                                 arity=input_arity(model)):
            pieces = [(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])] if hessian \
                else [(x, y)]
            for xs, ys in pieces:
                out = call_model(model, xs)
                grads = torch.autograd.grad(F.cross_entropy(out, ys, reduction="sum"),
                                            params, allow_unused=True)
                for t, g in zip(totals, grads):
                    if g is not None:
                        t.add_(g.pow(2) if hessian else g)
            count += len(x)
    for p, t in zip(params, totals):
        p.grad = t / count
    if hessian:
        importance.zero_grad()


def _search_ratio(run: Callable[[float], tuple[nn.Module, tuple]],
                  measure: Callable[[nn.Module], float], sparsity: float, tolerance: float,
                  target: str, aim: float | None = None) -> tuple[float, tuple[nn.Module, tuple]]:
    """Bisection on the channel ratio until the removed fraction is within ``tolerance``.

    A noisy measure (latency) gives an ``aim`` inside the tolerance: a reading within it is
    accepted at once; after ``_NEAR_MISSES`` readings within the tolerance only, the closest
    of all is. A true value near the tolerance's edge then does not land outside it on the
    next reading."""
    aim = tolerance if aim is None else aim
    guess = min(_MAX_RATIO, 1 - math.sqrt(1 - sparsity))  # both scale with width squared
    lo, hi, ratio = 0.0, _MAX_RATIO, guess
    best: tuple[float, float, tuple[nn.Module, tuple]] | None = None
    near_misses = 0
    for _ in range(24):
        outcome = run(ratio)
        removed = measure(outcome[0])
        if best is None or abs(removed - sparsity) < abs(best[1] - sparsity):
            best = (ratio, removed, outcome)
        if abs(removed - sparsity) <= aim:
            return ratio, outcome
        near_misses += abs(removed - sparsity) <= tolerance
        if near_misses >= _NEAR_MISSES:
            return best[0], best[2]
        lo, hi = (ratio, hi) if removed < sparsity else (lo, ratio)
        if hi - lo < 1e-4:
            break
        ratio = (lo + hi) / 2
    assert best is not None
    if abs(best[1] - sparsity) <= tolerance:
        return best[0], best[2]
    raise _Unreachable(
        (lo, hi),
        f"target {target}={sparsity} is unreachable within {tolerance}: the closest was "
        f"{best[1]:.4f} of the {target} removed at channel ratio {best[0]:.4f}. Fix: ask for "
        "a sparsity nearer that, pass tolerance=..., drop round_to, or ignore fewer layers")


class _Unreachable(FxgndiError):
    """The ratio search's target lies in a step of the removed fraction between ``bracket``."""

    def __init__(self, bracket: tuple[float, float], message: str) -> None:
        super().__init__(message)
        self.bracket = bracket


def _reduction_measure(target: str, before: float, example: Any
                       ) -> Callable[[nn.Module], float]:
    index = 0 if target == "macs" else 1
    return lambda m: 1 - count_macs_params(m, example)[index] / before


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {n: out_width(m) for n, m in model.named_modules() if isinstance(m, LAYERS)}


def _ignored_names(model: nn.Module, spec: Any, example: Any, opts: RunOptions) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"ignored_layers must be 'auto', None or a list of modules / names "
                             f"of the model, not {spec!r}")
        return output_layers(model, example, opts.concrete_args)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for entry in spec:
        if isinstance(entry, str):
            model.get_submodule(entry)  # raises AttributeError naming the missing module
            out.append(entry)
        elif isinstance(entry, nn.Module) and entry in names:
            out.append(names[entry])
        else:
            raise ValueError(f"ignored layer {entry!r} is not a module of this model: pass "
                             "modules of the model being pruned, or their names")
    return out


def _last_layer_run(model: nn.Module, example: Any) -> str:
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    call_hooked(model, example, {m: lambda mod, a, o: order.append(names[mod])
                                 for m in model.modules() if isinstance(m, LAYERS)})
    if not order:
        raise FxgndiError("the model has no conv or linear layer to prune")
    return order[-1]


def _make_importance(importance: Any, data: Iterable, compensate: bool, opts: Any,
                     plan: architectures.ArchitecturePlan) -> tp.importance.Importance:
    if isinstance(importance, tp.importance.Importance):
        return importance
    if importance in ("gndi", "ablation"):
        return make_importance(importance, data,
                               baseline="channel-mean" if compensate else "zero",
                               consumers=plan.consumers, max_batches=opts.max_batches,
                               progress=opts.progress, chunk_size=opts.chunk_size,
                               max_memory=opts.max_memory, seed=opts.seed,
                               leaf_modules=opts.leaf_modules,
                               concrete_args=opts.concrete_args, output=opts.output)
    return make_importance(importance)


def _static_widths(model: nn.Module, example: Any, opts: RunOptions,
                   leaf_modules: Sequence[str | type]
                   ) -> tuple[list[StaticWidth], dict[str, str]]:
    """The widths the model's code holds (:mod:`fxgndi.fx.widths`) and the layers that must keep
    theirs because a literal holds it; none for a model torch.fx cannot trace (then the final
    forward check is what catches a stale width)."""
    try:
        widths = static_widths(model, example, leaf_modules=leaf_modules,
                               concrete_args=opts.concrete_args)
        read = shape_widths(model, example, leaf_modules=leaf_modules,
                            concrete_args=opts.concrete_args)
    except (UntraceableModelError, RuntimeError, TypeError) as exc:
        why = (f"untraceable ({type(exc).__name__}): widths its code holds were not looked "
               "for; pass concrete_args= (forward flags) or leaf_modules=")
        return [], {_UNTRACED: why}
    skipped = {w.layer: (f"keeps its width: {w.node} reshapes with the literal {w.value}, "
                         f"which counts its {w.value // w.per_channel} channels; hold it in a "
                         "module attribute (self.width = ...) for fxgndi to update it")
               for w in widths if w.attribute is None}
    for r in read:
        for layer in r.layers:
            skipped.setdefault(layer, f"keeps its width: {r.node} reshapes with a size read off "
                               f"the channels of {r.source} (its shape), which pruning "
                               f"{', '.join(r.layers)} apart would leave stale")
    return widths, skipped


def _check_runs(model: nn.Module, example: Any, untraceable: bool = False) -> None:
    """A returned model always runs: its forward on the example input, or a clear error."""
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example)
    except Exception as exc:
        raise FxgndiError(
            f"the pruned {type(model).__name__} fails its forward on example_inputs "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}); its code holds a shape that "
            "pruning changed (a reshape or view with a fixed width?). Fix: "
            + ("pass concrete_args= for the forward's flags (or leaf_modules=) so that torch.fx "
               "can trace the model and fxgndi update that width; or " if untraceable else "")
            + "hold that width in a module attribute, or add the layer feeding that reshape to "
            "ignored_layers") from exc


def _check_arguments(sparsity: float, target: str, importance: Any, steps: int,
                     tolerance: float, allocate: Any) -> None:
    check_fraction("sparsity", sparsity, f", the fraction of {target} to remove (e.g. "
                   "sparsity=0.5 removes half)")
    check_choice("target", target, TARGETS)
    if isinstance(importance, str):
        check_choice("importance", importance, IMPORTANCES)
    elif not isinstance(importance, tp.importance.Importance):
        raise TypeError(f"importance must be a name or a torch_pruning.importance.Importance, "
                        f"not {type(importance).__name__}")
    if steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, not {steps}")
    check_fraction("tolerance", tolerance)
    if not isinstance(allocate, Latency):
        check_choice("allocate", allocate, ALLOCATIONS)


def _cuda(model: nn.Module) -> list[torch.device]:
    device = device_of(model)
    return [device] if device.type == "cuda" else []
