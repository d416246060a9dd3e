"""Causal validity: how well each importance measure ranks the exact effect of an ablation.

The truth is always the exact effect of the same intervention (same sites, same baseline) that
G-NDI linearises. Every method reports Pearson, Spearman with a percentile-bootstrap 95% CI,
Kendall's tau, and what it cost (seconds, and forward-pass equivalents on the same data). At
channel granularity the mean within-layer Spearman is reported too, so that pooling channels of
layers with very different scales cannot inflate the result.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch.fx as fx
import torch.nn as nn
from scipy import stats

from .cost import forward_seconds
from .criteria import CRITERIA, aggregate, score_channels
from .estimate import METRICS, ablate, check_accepts, score
from .graph import InterventionGraph, intervene
from .report import format_table, pyplot, save_figure
from .scores import Scores, Unit
from .sites import SiteSpec
from .streams import first_batch, require_reiterable

# G-NDI variants are methods too: name -> keyword arguments of fxgndi.score.
GNDI_VARIANTS: dict[str, dict[str, Any]] = {
    "gndi": {},
    "gndi_path": {"steps": 4},
    "gndi_loss": {"readout": "loss"},
    "gndi_margin": {"readout": "margin"},
    "gndi_path_loss": {"steps": 4, "readout": "loss"},
}
DEFAULT_METHODS = ("gndi", "gndi_path", "gndi_loss", "magnitude_l1", "magnitude_l2", "snip",
                   "grasp", "synflow", "hrank", "taylor", "random")
# Path integration costs one JVP per channel and step: not a default at channel level.
DEFAULT_CHANNEL_METHODS = tuple(m for m in DEFAULT_METHODS if m != "gndi_path")


@dataclass
class MethodResult:
    """Agreement of one method's scores with the truth, and its cost."""

    method: str
    pearson: float
    spearman: float
    spearman_ci: tuple[float, float]
    kendall: float
    seconds: float
    forward_equivalents: float
    within_layer_spearman: float | None = None
    within_layer_groups: int = 0


@dataclass
class ValidityReport:
    """Per-method agreement with the exact effect of the same intervention.

    Example:
        >>> report = validate(model, loader, methods=("gndi", "snip"))  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """

    truth: Scores
    estimates: dict[str, np.ndarray]
    results: list[MethodResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The paper's layout (Pearson, Spearman, 95% CI, Kendall) plus the cost columns."""
        channel = self.settings.get("granularity") == "channel"
        headers = ["method", "Pearson", "Spearman", "95% CI", "Kendall", "seconds",
                   "forward passes"] + (["within-layer Spearman (layers)"] if channel else [])
        rows = []
        for r in self.results:
            row = [r.method, r.pearson, r.spearman,
                   f"[{r.spearman_ci[0]:.3f}, {r.spearman_ci[1]:.3f}]", r.kendall, r.seconds,
                   r.forward_equivalents]
            if channel:
                row.append(f"{r.within_layer_spearman:.3f} ({r.within_layer_groups})")
            rows.append(row)
        s = self.settings
        title = (f"truth: {s['truth']} under do(h := {s['baseline']}) at {s['granularity']} "
                 f"level, {len(self.truth.units)} units, {self.truth.n_samples} samples")
        return title + "\n" + format_table(rows, headers, floatfmt=".3f")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (settings, per-method results, truth and estimates)."""
        return {"settings": self.settings, "results": [asdict(r) for r in self.results],
                "units": [list(u) for u in self.truth.units],
                "truth": self.truth.values.tolist(),
                "estimates": {k: v.tolist() for k, v in self.estimates.items()}}

    def plot(self, path: str | os.PathLike) -> None:
        """Figure-1 style: Spearman with 95% CI per method, and score vs truth for G-NDI."""
        plt = pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = [r.method for r in self.results]
        rho = np.array([r.spearman for r in self.results])
        lo = rho - np.array([r.spearman_ci[0] for r in self.results])
        hi = np.array([r.spearman_ci[1] for r in self.results]) - rho
        colors = ["#c0392b" if n.startswith("gndi") else "#7f8c8d" for n in names]
        left.bar(range(len(names)), rho, yerr=[lo, hi], color=colors, capsize=3)
        left.axhline(0, color="black", linewidth=0.8)
        left.set_xticks(range(len(names)), names, rotation=60, ha="right")
        left.set_ylabel("Spearman rho (95% CI)")
        left.set_title(f"Causal validity vs exact {self.settings['truth']}")
        best = next((n for n in names if n.startswith("gndi")), names[0])
        right.scatter(self.estimates[best], self.truth.values, s=10, alpha=0.7)
        right.set_xlabel(f"{best} score")
        right.set_ylabel(f"exact {self.settings['truth']}")
        right.set_title(f"{best}: score vs truth")
        save_figure(fig, path)


def validate(model: nn.Module, data: Iterable, *, methods: Sequence[str] | None = None,
             truth: str = "accuracy", granularity: str = "layer", sites: SiteSpec = "conv",
             baseline: str = "zero", n_channels: int = 300, seed: int = 0,
             n_boot: int = 10000, aggregate_by: str = "sum", progress: bool = True,
             max_batches: int | None = None) -> ValidityReport:
    """Rank agreement of each importance measure with the exact effect of ``do(h := b)``.

    Args:
        methods: G-NDI variants (``gndi``, ``gndi_path``, ``gndi_loss``, ``gndi_margin``,
            ``gndi_path_loss``), criteria (``magnitude_l1``, ``magnitude_l2``, ``snip``,
            ``grasp``, ``synflow``, ``hrank``, ``taylor``, ``random``) and ``ablation`` (the
            exact effect itself: the reference, useful for its cost at layer level). Default:
            DEFAULT_METHODS at layer level, DEFAULT_CHANNEL_METHODS at channel level.
        truth: ``accuracy`` (drop), ``loss`` (increase), ``logit_l2`` or ``kl``.
        granularity: ``layer`` (every site) or ``channel`` (``n_channels`` random channels).
        aggregate_by: how criteria turn channel scores into a layer score, ``sum`` or ``mean``.

    Criteria score the output channels of conv/linear layers; a site that is not one (a
    BatchNorm, an activation, a residual branch) takes the scores of the conv/linear layer
    that produces it.

    Example:
        >>> report = validate(model, loader, granularity="channel", truth="logit_l2",
        ...                   baseline="channel-mean")  # doctest: +SKIP
    """
    if methods is None:
        methods = DEFAULT_METHODS if granularity == "layer" else DEFAULT_CHANNEL_METHODS
    unknown = [m for m in methods if m not in GNDI_VARIANTS and m not in CRITERIA
               and m != "ablation"]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {list(GNDI_VARIANTS)}, "
                         f"{list(CRITERIA)} or 'ablation'")
    if truth not in METRICS:
        raise ValueError(f"unknown truth {truth!r}: use one of {METRICS}")
    require_reiterable(data)
    check_accepts(model, first_batch(data))
    graph = intervene(model, sites, granularity=granularity, baseline=baseline, data=data,
                      example_inputs=first_batch(data), progress=progress)
    units = _units(graph, n_channels, seed)
    channels = None if granularity == "layer" else [(s, c) for s, c in units]
    common = dict(max_batches=max_batches, progress=progress)
    # Untimed warm-up: the first functorch transform of a graph pays one-off set-up costs.
    score(graph, [first_batch(data)[:2]], progress=False)
    truth_scores = ablate(graph, data, metric=truth, channels=channels, **common)
    unit = forward_seconds(model, data, max_batches=max_batches)
    estimates: dict[str, np.ndarray] = {}
    costs: dict[str, float] = {}
    for method in methods:
        if method == "ablation":
            estimates[method], costs[method] = truth_scores.values, truth_scores.seconds
        elif method in GNDI_VARIANTS:
            s = _score_variant(model, graph, data, method, channels, baseline, common)
            estimates[method], costs[method] = _aligned(s, units), s.seconds
        else:
            start = time.perf_counter()
            estimates[method] = _criterion(model, graph, data, method, units, aggregate_by,
                                           max_batches)
            costs[method] = time.perf_counter() - start
    results = [_agreement(m, estimates[m], truth_scores, costs[m] / unit, costs[m], n_boot,
                          seed) for m in methods]
    settings = {"truth": truth, "granularity": granularity, "baseline": baseline,
                "sites": sites if isinstance(sites, (str, list)) else "custom",
                "n_units": len(units), "seed": seed, "n_boot": n_boot,
                "aggregate_by": aggregate_by, "forward_seconds": unit}
    return ValidityReport(truth_scores, estimates, results, settings)


def _units(graph: InterventionGraph, n_channels: int, seed: int) -> list[Unit]:
    if graph.granularity == "layer":
        return [(s.name, None) for s in graph.sites]
    every = [(s.name, c) for s in graph.sites for c in range(s.channels)]
    if n_channels >= len(every):
        return every
    pick = np.sort(np.random.default_rng(seed).choice(len(every), n_channels, replace=False))
    return [every[i] for i in pick]


def _score_variant(model, graph, data, method, channels, baseline, common) -> Scores:
    kw = dict(GNDI_VARIANTS[method])
    if channels is not None and kw.get("steps", 1) > 1:
        # Path points differ per channel: only the sampled channels are worth integrating.
        return score(graph, data, channels=channels, **kw, **common)
    return score(graph, data, **kw, **common)


def _aligned(s: Scores, units: list[Unit]) -> np.ndarray:
    index = {u: i for i, u in enumerate(s.units)}
    return np.array([s.values[index[u]] for u in units])


def _criterion(model, graph, data, method, units, aggregate_by, max_batches) -> np.ndarray:
    layer_of = {s.name: producing_layer(graph, s.name) for s in graph.sites}
    layers = sorted(set(layer_of.values()))
    kw = {} if method in ("magnitude_l1", "magnitude_l2", "random", "synflow") else \
        {"max_batches": max_batches} if max_batches is not None else {}
    channel_scores = score_channels(method, model, data, layers, **kw)
    if units[0][1] is None:
        per_layer = aggregate(channel_scores, how=aggregate_by)
        return np.array([per_layer[layer_of[s]] for s, _ in units])
    return np.array([channel_scores[layer_of[s]][c] for s, c in units])


def producing_layer(graph: InterventionGraph, site: str) -> str:
    """The conv/linear module whose output channels a site's channels are.

    A conv or linear site is its own layer; a BatchNorm, activation or residual-branch site
    walks back through the graph to the nearest conv/linear module.

    Example:
        >>> g = intervene(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), sites="bn")
        >>> producing_layer(g, "1")
        '0'
    """
    modules = dict(graph.gm.named_modules())
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    node = nodes[next(s.node for s in graph.sites if s.name == site)]
    layer_types = (nn.Linear, nn.modules.conv._ConvNd)
    for _ in range(64):
        if node.op == "call_module" and isinstance(modules[node.target], layer_types):
            return node.target
        parents = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if not parents:
            break
        node = parents[0]
    raise ValueError(f"site '{site}' is not produced by a conv or linear layer, so weight-based "
                     "criteria cannot score it: choose conv, linear, bn or act sites")


def _agreement(method: str, pred: np.ndarray, truth: Scores, forward_equivalents: float,
               seconds: float, n_boot: int, seed: int) -> MethodResult:
    t = truth.values
    pearson = _safe(lambda: stats.pearsonr(pred, t)[0])
    spearman = _safe(lambda: stats.spearmanr(pred, t)[0])
    kendall = _safe(lambda: stats.kendalltau(pred, t)[0])
    ci = spearman_ci(pred, t, n_boot=n_boot, seed=seed)
    within, groups = None, 0
    if truth.granularity == "channel":
        within, groups = within_layer_spearman(pred, t, [s for s, _ in truth.units])
    return MethodResult(method, pearson, spearman, ci, kendall, seconds, forward_equivalents,
                        within, groups)


def spearman_ci(a: np.ndarray, b: np.ndarray, *, n_boot: int = 10000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of Spearman's rho over paired units.

    Example:
        >>> lo, hi = spearman_ci(np.arange(20.0), np.arange(20.0) ** 2, n_boot=200)
        >>> round(lo, 3), round(hi, 3)
        (1.0, 1.0)
    """
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return (float("nan"), float("nan"))

    def rho(x, y, axis=-1):
        rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
        rx = rx - rx.mean(axis, keepdims=True)
        ry = ry - ry.mean(axis, keepdims=True)
        den = np.sqrt((rx * rx).sum(axis) * (ry * ry).sum(axis))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rx * ry).sum(axis) / den

    res = stats.bootstrap((a, b), rho, paired=True, vectorized=True, n_resamples=n_boot,
                          confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def within_layer_spearman(pred: np.ndarray, truth: np.ndarray,
                          groups: Sequence[str]) -> tuple[float, int]:
    """Mean Spearman over the groups (layers) that hold at least 3 units with varying values,
    and how many groups qualified (a method that ties whole layers counts few of them).

    Example:
        >>> within_layer_spearman(np.array([1, 2, 3, 3, 2, 1.]), np.arange(6.), list("aaabbb"))
        (0.0, 2)
    """
    values = []
    groups = np.asarray(groups)
    for g in dict.fromkeys(groups):
        idx = groups == g
        if idx.sum() >= 3 and np.ptp(pred[idx]) > 0 and np.ptp(truth[idx]) > 0:
            values.append(stats.spearmanr(pred[idx], truth[idx])[0])
    return (float(np.mean(values)) if values else float("nan")), len(values)


def _safe(fn) -> float:
    with np.errstate(all="ignore"):
        try:
            return float(fn())
        except ValueError:
            return float("nan")
