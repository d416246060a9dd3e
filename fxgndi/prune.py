"""Structured pruning with torch-pruning, ranked by G-NDI or by torch-pruning's own criteria.

``prune`` removes channels (whole torch-pruning groups of coupled channels) from a copy of the
model until a channel, parameter or MAC budget is met; optionally folds the removed channels'
mean activations into their consumers' biases (``compensate``) and fine-tunes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from . import architectures
from .errors import FxgndiError, UntraceableModelError
from .graph import trace
from .compensate import compensate_group, consumer_input_means
from .recalibrate import recalibrate_bn as recalibrate_statistics
from .importance import GNDIImportance, check_importance_length
from .report import format_table
from .runtime import device_of, eval_mode
from .streams import first_batch, iter_batches
from .train import train_classifier

IMPORTANCES = ("gndi", "ablation", "l1", "l2", "taylor", "hessian", "lamp", "bn", "fpgm",
               "random")
TARGETS = ("channels", "params", "macs")
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_TRACKED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
_MAX_RATIO = 0.95  # torch-pruning refuses to empty a layer; the search stays below


@dataclass
class PruneResult:
    """A pruned model and what pruning did to it.

    Attributes:
        model: the pruned model (a copy of the input unless ``inplace=True``).
        macs_before, macs_after, params_before, params_after: torch-pruning's counts on
            ``example_inputs``.
        channels: layer name -> (out channels before, after), conv and linear layers.
        kept: layer name -> original indices of the kept out-channels (conv, linear, BatchNorm).
        kept_inputs: layer name -> original indices of the kept input channels (conv) or
            features (linear).
        pruning_ratio: torch-pruning's per-channel ratio that met the target.
        settings: the arguments that produced it.
        seconds: wall time of the whole call (scoring, search, compensation, fine-tuning).

    Example:
        >>> r = PruneResult(nn.Linear(2, 2), 10, 5, 6, 3, {"0": (4, 2)}, {}, 0.5)
        >>> r.macs_reduction
        0.5
    """

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channels: dict[str, tuple[int, int]]
    kept: dict[str, list[int]]
    pruning_ratio: float
    kept_inputs: dict[str, list[int]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = float("nan")

    @property
    def macs_reduction(self) -> float:
        """Fraction of MACs removed."""
        return 1 - self.macs_after / self.macs_before

    @property
    def params_reduction(self) -> float:
        """Fraction of parameters removed."""
        return 1 - self.params_after / self.params_before

    @property
    def channels_reduction(self) -> float:
        """Fraction of conv / linear output channels removed."""
        before = sum(b for b, _ in self.channels.values())
        return 1 - sum(a for _, a in self.channels.values()) / before

    def table(self) -> str:
        """A summary table (MACs, params, channels) and a per-layer table of channels.

        Example:
            >>> print(PruneResult(nn.Linear(2, 2), 10, 5, 6, 3, {"0": (4, 2)}, {}, 0.5).table())
            ... # doctest: +SKIP
        """
        before_ch = sum(b for b, _ in self.channels.values())
        after_ch = sum(a for _, a in self.channels.values())
        summary = format_table(
            [("MACs", self.macs_before, self.macs_after, self.macs_after / self.macs_before),
             ("params", self.params_before, self.params_after,
              self.params_after / self.params_before),
             ("channels", before_ch, after_ch, after_ch / before_ch)],
            ["", "before", "after", "kept"], floatfmt=".3f")
        layers = format_table([(n, b, a, a / b) for n, (b, a) in self.channels.items()],
                              ["layer", "channels before", "after", "kept"], floatfmt=".3f")
        head = (f"pruned with {self.settings.get('importance', '?')} to "
                f"{self.settings.get('target', '?')} sparsity "
                f"{self.settings.get('sparsity', float('nan')):.3g} (channel ratio "
                f"{self.pruning_ratio:.3f}) in {self.seconds:.1f} s")
        return f"{head}\n{summary}\n\n{layers}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (everything but the model).

        Example:
            >>> PruneResult(nn.Linear(2, 2), 10, 5, 6, 3, {}, {}, 0.5).to_dict()["macs_after"]
            5
        """
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_reduction": self.macs_reduction,
                "params_reduction": self.params_reduction,
                "pruning_ratio": self.pruning_ratio, "seconds": self.seconds,
                "channels": {n: list(v) for n, v in self.channels.items()},
                "kept": self.kept, "kept_inputs": self.kept_inputs,
                "settings": self.settings}


def prune(model: nn.Module, data: Iterable, *,
          example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
          sparsity: float = 0.5, target: str = "channels",
          importance: str | tp.importance.Importance = "gndi", global_pruning: bool = False,
          iterative_steps: int = 1, round_to: int | None = None,
          ignored_layers: str | Sequence[nn.Module | str] | None = "auto",
          compensate: bool = False, recalibrate_bn: bool = False,
          finetune: dict[str, Any] | None = None,
          inplace: bool = False, importance_options: dict[str, Any] | None = None,
          max_batches: int | None = None, tolerance: float = 0.02, seed: int = 0,
          progress: bool = False) -> PruneResult:
    """Prune ``model``'s channels with torch-pruning, ranking them by ``importance``.

    Args:
        model: any model torch-pruning can trace; never modified unless ``inplace=True``.
        data: ``(x, y)`` batches: scoring for gndi / ablation / taylor / hessian, the means for
            ``compensate``, and the fine-tuning set.
        example_inputs: one input batch for tracing and counting MACs (default: the first
            sample of ``data``).
        sparsity: in (0, 1): the fraction of ``target`` to remove.
        target: ``"channels"`` (torch-pruning's per-channel ratio), ``"params"`` or ``"macs"``
            (the channel ratio is searched by bisection until the removed fraction is within
            ``tolerance``, absolute, of ``sparsity``).
        importance: ``"gndi"``, ``"ablation"`` (fxgndi's :class:`GNDIImportance`), ``"l1"``,
            ``"l2"``, ``"taylor"``, ``"hessian"``, ``"lamp"``, ``"bn"``, ``"fpgm"``,
            ``"random"`` (torch-pruning's), or any ``torch_pruning.importance.Importance``.
        importance_options: keyword arguments for the named importance's constructor, e.g.
            ``{"baseline": "channel-mean", "readout": "loss"}`` for gndi. gndi / ablation
            default to the ``"channel-mean"`` baseline when ``compensate`` and ``"zero"``
            otherwise, so that the score measures the intervention that is applied.
        global_pruning, iterative_steps, round_to: as torch-pruning's ``BasePruner``.
        ignored_layers: ``"auto"`` (keep the width of the layers producing the model output:
            the classifier), None, or modules / module names of ``model`` to keep.
        compensate: fold each removed channel's mean input to every consumer (over ``data``,
            before pruning) into that consumer's bias, adding one if needed, so the pruned
            model computes ``do(read_c := E[read_c])`` instead of reading 0. Exact for linear
            layers and 1x1 or unpadded convs. Behind a zero-padded conv the shift differs at
            the borders and the bias gets its spatial mean: small maps (a 32 px ResNet's last
            stages) lose much of the benefit (see :func:`fold_into_bias`).
        recalibrate_bn: after pruning, re-estimate every BatchNorm's running mean and variance
            on ``data`` (:func:`fxgndi.recalibrate.recalibrate_bn`; no weight changes): the
            removed channels change what downstream BatchNorms see. Before ``finetune``.
        finetune: ``dict(epochs=..., lr=..., ...)`` for :func:`fxgndi.train.train_classifier`
            on ``data`` after pruning (None: no fine-tuning).
        inplace: prune ``model`` itself.
        max_batches: read at most this many batches of ``data`` for scoring and means.
        seed: seeds ``"random"`` importance (and anything else random in pruning).

    Channel shuffles (ShuffleNetV2), windowed attention (Swin V1 / V2), partition attention
    (MaxViT) and ``nn.MultiheadAttention`` (ViT) are recognised from the model's modules and
    handled by :mod:`fxgndi.architectures` (named in ``settings["architectures"]``).

    Example:
        >>> import torchvision
        >>> from fxgndi.data import load_data
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> data = load_data("digits", split="train", limit=64)
        >>> r = prune(model, data, sparsity=0.5, target="macs")
        >>> print(r.table())  # doctest: +SKIP
    """
    start = time.perf_counter()
    _check_arguments(sparsity, target, importance, iterative_steps, tolerance, finetune)
    device = device_of(model)
    example = _example_inputs(data, example_inputs, device)
    plan = architectures.plan_for(model)
    scorer = _make_importance(importance, data, compensate, importance_options, max_batches,
                              progress, plan)
    macs0, params0 = _count(model, example)
    channels0 = _out_channels(model)
    ignored_names = _ignored_names(model, ignored_layers, example)

    def run(ratio: float, target_model: nn.Module | None = None) -> tuple[nn.Module, tuple]:
        work = target_model if target_model is not None else copy.deepcopy(model)
        kept = _prune_once(work, data, example, scorer, ratio, global_pruning=global_pruning,
                           iterative_steps=iterative_steps, round_to=round_to,
                           ignored=[work.get_submodule(n) for n in ignored_names],
                           compensate=compensate, max_batches=max_batches, seed=seed)
        return work, kept

    if target == "channels":
        ratio = sparsity
        pruned, kept = run(ratio, model if inplace else None)
    else:
        measure = _reduction_measure(target, macs0 if target == "macs" else params0, example)
        ratio, (pruned, kept) = _search_ratio(run, measure, sparsity, tolerance, target)
        if inplace:
            pruned, kept = run(ratio, model)
    if recalibrate_bn:
        recalibrate_statistics(pruned, data, max_batches=max_batches)
    if finetune:
        options = {"progress": progress, **finetune}
        with eval_mode(pruned):
            train_classifier(pruned, data, **options)
    macs1, params1 = _count(pruned, example)
    channels1 = _out_channels(pruned)
    settings = {"importance": importance if isinstance(importance, str)
                else type(importance).__name__, "target": target, "sparsity": sparsity,
                "global_pruning": global_pruning, "iterative_steps": iterative_steps,
                "round_to": round_to, "compensate": compensate,
                "recalibrate_bn": recalibrate_bn, "finetune": finetune,
                "ignored_layers": ignored_names,
                "importance_options": dict(importance_options or {}),
                "architectures": plan.families}
    if isinstance(scorer, GNDIImportance):
        settings["importance_options"].update(baseline=scorer.baseline, readout=scorer.readout,
                                              p=scorer.p)
        settings["scoring_seconds"] = scorer.seconds
    return PruneResult(pruned, int(macs0), int(macs1), int(params0), int(params1),
                       {n: (channels0[n], channels1.get(n, 0)) for n in channels0}, kept[0],
                       ratio, kept[1], settings, time.perf_counter() - start)


def make_importance(name: str, data: Iterable | None = None, **options: Any
                    ) -> tp.importance.Importance:
    """A torch-pruning importance by name (see ``IMPORTANCES``); gndi / ablation need ``data``.

    Example:
        >>> type(make_importance("l1")).__name__
        'GroupMagnitudeImportance'
    """
    if name in ("gndi", "ablation"):
        if data is None:
            raise ValueError(f"importance '{name}' scores on data: pass data=loader")
        return GNDIImportance(data, method=name, **options)
    factories: dict[str, Callable[..., tp.importance.Importance]] = {
        "l1": lambda **o: tp.importance.GroupMagnitudeImportance(p=1, **o),
        "l2": lambda **o: tp.importance.GroupMagnitudeImportance(p=2, **o),
        "taylor": tp.importance.GroupTaylorImportance,
        "hessian": tp.importance.GroupHessianImportance,
        "lamp": tp.importance.LAMPImportance,
        "bn": tp.importance.BNScaleImportance,
        "fpgm": tp.importance.FPGMImportance,
        "random": tp.importance.RandomImportance,
    }
    if name not in factories:
        raise ValueError(f"unknown importance {name!r}: use one of {', '.join(IMPORTANCES)} or "
                         "a torch_pruning.importance.Importance")
    return factories[name](**options)


def output_layers(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
                  ) -> list[str]:
    """Names of the conv / linear layers whose outputs reach the model output through no other
    conv / linear layer (the classifier). Found on the torch.fx graph; for an untraceable model,
    the last conv / linear layer that runs.

    Example:
        >>> output_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)),
        ...               torch.zeros(1, 2))
        ['2']
    """
    try:
        gm = trace(model)
    except UntraceableModelError:
        return [_last_layer_run(model, example_inputs)]
    modules = dict(gm.named_modules())
    found: list[str] = []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    stack, seen = list(output.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules[node.target], _LAYERS):
            found.append(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return sorted(set(found))


def _prune_once(model: nn.Module, data: Iterable, example: Any,
                importance: tp.importance.Importance, ratio: float, *, global_pruning: bool,
                iterative_steps: int, round_to: int | None, ignored: list[nn.Module],
                compensate: bool, max_batches: int | None, seed: int
                ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Prune ``model`` in place; returns the original indices of the kept outputs and inputs."""
    checked = _CheckedImportance(importance)
    tracker = _ChannelTracker(model)
    plan = architectures.plan_for(model)
    with eval_mode(model), torch.random.fork_rng(devices=_cuda(model)), \
            torch.enable_grad():
        torch.manual_seed(seed)
        try:
            with architectures.tracing(model, plan):
                pruner = tp.pruner.BasePruner(
                    model, example, importance=checked, global_pruning=global_pruning,
                    pruning_ratio=ratio, iterative_steps=iterative_steps,
                    ignored_layers=ignored, round_to=round_to, **plan.pruner_options())
            pruner.ignored_layers.extend(
                architectures.unprunable_layers(pruner.DG, pruner.root_module_types))
        except Exception as exc:  # torch-pruning raises bare errors from deep inside
            raise FxgndiError(
                f"torch-pruning {tp.__version__} could not build the dependency graph of "
                f"{type(model).__name__}: {type(exc).__name__}: {exc}. Fix: put the layers "
                "around the unsupported operation (often a reshape, e.g. a channel shuffle) "
                "in ignored_layers, or try another example_inputs size") from exc
        for _ in range(iterative_steps):
            _prepare_gradients(importance, model, data, max_batches)
            means = consumer_input_means(model, data, max_batches=max_batches) \
                if compensate else None
            for group in pruner.step(interactive=True):
                if means is not None:
                    compensate_group(group, means)
                tracker.update(group)
                group.prune()
            for p in model.parameters():
                p.grad = None
    for fix in plan.after:
        fix(model)
    return tracker.kept()


class _CheckedImportance(tp.importance.Importance):
    """Wraps an importance and checks each returned vector (torch-pruning does not)."""

    def __init__(self, inner: tp.importance.Importance) -> None:
        self.inner = inner

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = self.inner(group)
        check_importance_length(scores, group, type(self.inner).__name__)
        return scores


class _ChannelTracker:
    """Original indices of the out-channels of each conv / linear / BatchNorm layer, and of the
    inputs of each conv / linear layer, that are still there."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules() if isinstance(m, _TRACKED)}
        self.outputs = {m: list(range(_width(m))) for m in self.names}
        self.inputs = {m: list(range(_fan_in(m))) for m in self.names if isinstance(m, _LAYERS)}

    def update(self, group: Any) -> None:
        dg = group._DG
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            gone = {int(i) for i in item.idxs}
            if layer in self.outputs and dg.is_out_channel_pruning_fn(handler):
                self.outputs[layer] = [c for k, c in enumerate(self.outputs[layer])
                                       if k not in gone]
            elif layer in self.inputs and dg.is_in_channel_pruning_fn(handler):
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
                                 need_labels=True, why=f"importance '{type(importance).__name__}'"):
            pieces = [(x[i:i + 1], y[i:i + 1]) for i in range(len(x))] if hessian else [(x, y)]
            for xs, ys in pieces:
                grads = torch.autograd.grad(F.cross_entropy(model(xs), ys, reduction="sum"),
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
                  target: str) -> tuple[float, tuple[nn.Module, tuple]]:
    """Bisection on the channel ratio until the removed fraction is within ``tolerance``."""
    guess = min(_MAX_RATIO, 1 - math.sqrt(1 - sparsity))  # both scale with width squared
    lo, hi, ratio = 0.0, _MAX_RATIO, guess
    best: tuple[float, float, tuple[nn.Module, tuple]] | None = None
    for _ in range(24):
        outcome = run(ratio)
        removed = measure(outcome[0])
        if best is None or abs(removed - sparsity) < abs(best[1] - sparsity):
            best = (ratio, removed, outcome)
        if abs(removed - sparsity) <= tolerance:
            return ratio, outcome
        lo, hi = (ratio, hi) if removed < sparsity else (lo, ratio)
        if hi - lo < 1e-4:
            break
        ratio = (lo + hi) / 2
    assert best is not None
    raise FxgndiError(
        f"target {target}={sparsity} is unreachable within {tolerance}: the closest was "
        f"{best[1]:.4f} of the {target} removed at channel ratio {best[0]:.4f}. Fix: ask for "
        "a sparsity nearer that, pass tolerance=..., drop round_to, or ignore fewer layers")


def _reduction_measure(target: str, before: float, example: Any
                       ) -> Callable[[nn.Module], float]:
    index = 0 if target == "macs" else 1
    return lambda m: 1 - _count(m, example)[index] / before


def _count(model: nn.Module, example: Any) -> tuple[float, float]:
    with eval_mode(model), torch.no_grad():
        return tp.utils.count_ops_and_params(model, example)


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {n: _width(m) for n, m in model.named_modules() if isinstance(m, _LAYERS)}


def _fan_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _width(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels
    return layer.num_features


def _ignored_names(model: nn.Module, spec: Any, example: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"ignored_layers must be 'auto', None or a list of modules / names "
                             f"of the model, not {spec!r}")
        return output_layers(model, example)
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
    handles = [m.register_forward_hook(lambda mod, a, o: order.append(names[mod]))
               for m in model.modules() if isinstance(m, _LAYERS)]
    try:
        with eval_mode(model), torch.no_grad():
            model(*example) if isinstance(example, (tuple, list)) else model(example)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise FxgndiError("the model has no conv or linear layer to prune")
    return order[-1]


def _example_inputs(data: Iterable, example: Any, device: torch.device) -> Any:
    if example is None:
        return first_batch(iter_batches(data, device=device))[:1]
    if isinstance(example, torch.Tensor):
        return example.to(device)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in example]


def _make_importance(importance: Any, data: Iterable, compensate: bool,
                     options: dict[str, Any] | None, max_batches: int | None,
                     progress: bool, plan: architectures.ArchitecturePlan | None = None
                     ) -> tp.importance.Importance:
    if isinstance(importance, tp.importance.Importance):
        if options:
            raise ValueError("importance_options configure a named importance; an Importance "
                             "object is used as it is")
        return importance
    options = dict(options or {})
    if importance in ("gndi", "ablation"):
        options.setdefault("baseline", "channel-mean" if compensate else "zero")
        options.setdefault("max_batches", max_batches)
        options.setdefault("progress", progress)
        if plan is not None and plan.consumers:
            options.setdefault("consumers", plan.consumers)
    return make_importance(importance, data, **options)


def _check_arguments(sparsity: float, target: str, importance: Any, steps: int,
                     tolerance: float, finetune: Any) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), the fraction of {target} to remove, not "
                         f"{sparsity!r}: e.g. sparsity=0.5 removes half")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if isinstance(importance, str) and importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}: use one of "
                         f"{', '.join(IMPORTANCES)} or a torch_pruning.importance.Importance")
    if not isinstance(importance, (str, tp.importance.Importance)):
        raise TypeError(f"importance must be a name or a torch_pruning.importance.Importance, "
                        f"not {type(importance).__name__}")
    if steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, not {steps}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), not {tolerance}")
    if finetune is not None and (not isinstance(finetune, dict) or "epochs" not in finetune):
        raise ValueError("finetune must be None or a dict with at least 'epochs', e.g. "
                         "finetune=dict(epochs=2, lr=1e-3)")


def _cuda(model: nn.Module) -> list[torch.device]:
    device = device_of(model)
    return [device] if device.type == "cuda" else []
