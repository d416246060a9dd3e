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
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch.nn as nn
from scipy import stats

from fxgndi.core.checks import check_choice
from fxgndi.core.cost import forward_seconds
from fxgndi.core.names import METRICS, VALIDITY_IMPORTANCES
from fxgndi.core.options import RunKwargs, run_options
from fxgndi.core.report import format_table, pyplot, save_figure
from fxgndi.core.streams import first_batch, input_arity, require_reiterable
from fxgndi.fx.analysis import facts
from fxgndi.fx.intervention import InterventionGraph, intervene
from fxgndi.fx.sites import SiteSpec
from fxgndi.fx.trace import bind_defaults
from fxgndi.gndi.criteria import aggregate, score_channels
from fxgndi.gndi.estimate import ablate, score
from fxgndi.gndi.run import check_accepts
from fxgndi.gndi.scores import Scores, Unit

if TYPE_CHECKING:
    from typing_extensions import Unpack

# G-NDI variants are methods too: name -> keyword arguments of fxgndi.score.
GNDI_VARIANTS: dict[str, dict[str, Any]] = {
    "gndi": {},
    "gndi_path": {"steps": 4},
    "gndi_loss": {"readout": "loss"},
    "gndi_margin": {"readout": "margin"},
    "gndi_path_loss": {"steps": 4, "readout": "loss"},
}
assert tuple(GNDI_VARIANTS) == VALIDITY_IMPORTANCES[:len(GNDI_VARIANTS)]
DEFAULT_IMPORTANCES = ("gndi", "gndi_path", "gndi_loss", "magnitude_l1", "magnitude_l2", "snip",
                       "grasp", "synflow", "hrank", "activation_taylor", "random")
# Path integration costs one JVP per channel and step: not a default at channel level.
DEFAULT_CHANNEL_IMPORTANCES = tuple(m for m in DEFAULT_IMPORTANCES if m != "gndi_path")


@dataclass
class Agreement:
    """Agreement of one importance's scores with the truth, and its cost."""

    importance: str
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
        >>> report = validate(model, loader, importances=("gndi", "snip"))  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """

    truth: Scores
    estimates: dict[str, np.ndarray]
    results: list[Agreement]
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The paper's layout (Pearson, Spearman, 95% CI, Kendall) plus the cost columns."""
        channel = self.settings.get("granularity") == "channel"
        headers = ["importance", "Pearson", "Spearman", "95% CI", "Kendall", "seconds",
                   "forward passes"] + (["within-layer Spearman (layers)"] if channel else [])
        rows = []
        for r in self.results:
            row = [r.importance, r.pearson, r.spearman,
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
        """Figure-1 style: Spearman with 95% CI per importance, and score vs truth for G-NDI."""
        plt = pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = [r.importance for r in self.results]
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


def validate(model: nn.Module, data: Iterable, *, importances: Sequence[str] | None = None,
             truth: str = "accuracy", granularity: str = "layer", sites: SiteSpec = "conv",
             baseline: str = "zero", n_channels: int = 300, n_boot: int = 10000,
             aggregate_by: str = "sum", **run: Unpack[RunKwargs]) -> ValidityReport:
    """Rank agreement of each importance measure with the exact effect of ``do(h := b)``.

    Args:
        importances: G-NDI variants (``gndi``, ``gndi_path``, ``gndi_loss``, ``gndi_margin``,
            ``gndi_path_loss``), criteria (``magnitude_l1``, ``magnitude_l2``, ``snip``,
            ``grasp``, ``synflow``, ``hrank``, ``activation_taylor``, ``random``) and
            ``ablation`` (the exact effect itself: the reference, useful for its cost at layer
            level). Default: DEFAULT_IMPORTANCES at layer level, DEFAULT_CHANNEL_IMPORTANCES at
            channel level.
        truth: the metric of the exact effect: ``accuracy`` (drop), ``loss`` (increase),
            ``logit_l2`` or ``kl``.
        granularity: ``layer`` (every site) or ``channel`` (``n_channels`` random channels,
            drawn with the run option ``seed``).
        n_boot: bootstrap resamples of the Spearman confidence interval.
        aggregate_by: how criteria turn channel scores into a layer score, ``sum`` or ``mean``.
        **run: run options (``progress``, ``max_batches``, ``seed``, ...; see
            :class:`fxgndi.RunOptions`).

    Criteria score the output channels of conv/linear layers; a site that is not one (a
    BatchNorm, an activation, a residual branch) takes the scores of the conv/linear layer
    that produces it.

    Example:
        >>> report = validate(model, loader, granularity="channel", truth="logit_l2",
        ...                   baseline="channel-mean")  # doctest: +SKIP
    """
    opts = run_options("validate", run)
    if importances is None:
        importances = DEFAULT_IMPORTANCES if granularity == "layer" \
            else DEFAULT_CHANNEL_IMPORTANCES
    for name in importances:
        check_choice("importance", name, VALIDITY_IMPORTANCES)
    check_choice("truth", truth, METRICS)
    if not isinstance(n_channels, int) or n_channels < 2:
        raise ValueError(f"n_channels must be an integer >= 2 (a rank correlation needs at "
                         f"least two units), not {n_channels!r}")
    require_reiterable(data)
    example = first_batch(data, arity=input_arity(model))
    check_accepts(model, example)
    opts = replace(opts, concrete_args=bind_defaults(
        model, example[:1], leaf_modules=opts.leaf_modules, concrete_args=opts.concrete_args))
    graph = intervene(model, sites, granularity=granularity, baseline=baseline, data=data,
                      example_inputs=example, leaf_modules=opts.leaf_modules,
                      concrete_args=opts.concrete_args, output=opts.output,
                      progress=opts.progress)
    units = _units(graph, n_channels, opts.seed)
    channels = None if granularity == "layer" else [(s, c) for s, c in units]
    common = dict(max_batches=opts.max_batches, progress=opts.progress,
                  max_memory=opts.max_memory, chunk_size=opts.chunk_size)
    # Untimed warm-up: the first functorch transform of a graph pays one-off set-up costs.
    score(graph, [example[:2]], progress=False)
    truth_scores = ablate(graph, data, metric=truth, channels=channels, **common)
    if truth_scores.n_samples < 2:
        warnings.warn(f"validate measured the truth on {truth_scores.n_samples} sample: its "
                      "standard errors are undefined and its ranking is one sample's; pass "
                      "more data", RuntimeWarning, stacklevel=2)
    unit = forward_seconds(model, data, max_batches=opts.max_batches)
    estimates: dict[str, np.ndarray] = {}
    costs: dict[str, float] = {}
    for name in importances:
        if name == "ablation":
            estimates[name], costs[name] = truth_scores.values, truth_scores.seconds
        elif name in GNDI_VARIANTS:
            s = _score_variant(graph, data, name, channels, common)
            estimates[name], costs[name] = _aligned(s, units), s.seconds
        else:
            start = time.perf_counter()
            estimates[name] = _criterion(model, graph, data, name, units, aggregate_by,
                                         opts.max_batches)
            costs[name] = time.perf_counter() - start
    results = [_agreement(m, estimates[m], truth_scores, costs[m] / unit, costs[m], n_boot,
                          opts.seed) for m in importances]
    settings = {"truth": truth, "granularity": granularity, "baseline": baseline,
                "sites": sites if isinstance(sites, (str, list)) else "custom",
                "n_units": len(units), "seed": opts.seed, "n_boot": n_boot,
                "aggregate_by": aggregate_by, "forward_seconds": unit}
    return ValidityReport(truth=truth_scores, estimates=estimates, results=results,
                          settings=settings)


def _units(graph: InterventionGraph, n_channels: int, seed: int) -> list[Unit]:
    if graph.granularity == "layer":
        return [(s.name, None) for s in graph.sites]
    every = [(s.name, c) for s in graph.sites for c in range(s.channels)]
    if n_channels >= len(every):
        return every
    pick = np.sort(np.random.default_rng(seed).choice(len(every), n_channels, replace=False))
    return [every[i] for i in pick]


def _score_variant(graph, data, name, channels, common) -> Scores:
    kw = dict(GNDI_VARIANTS[name])
    if channels is not None and kw.get("steps", 1) > 1:
        # Path points differ per channel: only the sampled channels are worth integrating.
        return score(graph, data, channels=channels, **kw, **common)
    return score(graph, data, **kw, **common)


def _aligned(s: Scores, units: list[Unit]) -> np.ndarray:
    index = {u: i for i, u in enumerate(s.units)}
    return np.array([s.values[index[u]] for u in units])


def _criterion(model, graph, data, criterion, units, aggregate_by, max_batches) -> np.ndarray:
    layer_of = {s.name: producing_layer(graph, s.name) for s in graph.sites}
    layers = sorted(set(layer_of.values()))
    kw = {} if criterion in ("magnitude_l1", "magnitude_l2", "random", "synflow") else \
        {"max_batches": max_batches} if max_batches is not None else {}
    channel_scores = score_channels(criterion, model, data, layers, **kw)
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
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    layer = facts(nodes[next(s.node for s in graph.sites if s.name == site)]).layer
    if layer is None:
        raise ValueError(f"site '{site}' is not produced by a conv or linear layer, so "
                         "weight-based criteria cannot score it: choose conv, linear, bn or act "
                         "sites")
    return layer


def _agreement(importance: str, pred: np.ndarray, truth: Scores, forward_equivalents: float,
               seconds: float, n_boot: int, seed: int) -> Agreement:
    t = truth.values
    pearson = _safe(lambda: stats.pearsonr(pred, t)[0])
    spearman = _safe(lambda: stats.spearmanr(pred, t)[0])
    kendall = _safe(lambda: stats.kendalltau(pred, t)[0])
    ci = spearman_ci(pred, t, n_boot=n_boot, seed=seed)
    within, groups = None, 0
    if truth.granularity == "channel":
        within, groups = within_layer_spearman(pred, t, [s for s, _ in truth.units])
    return Agreement(importance=importance, pearson=pearson, spearman=spearman,
                     spearman_ci=ci, kendall=kendall, seconds=seconds,
                     forward_equivalents=forward_equivalents, within_layer_spearman=within,
                     within_layer_groups=groups)


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
