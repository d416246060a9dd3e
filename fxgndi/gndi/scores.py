"""The result of scoring or ablating: one value per site (or per site channel)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxgndi.core.names import METRIC_EFFECTS
from fxgndi.core.report import format_table, pyplot, save_figure

Unit = tuple[str, "int | None"]


def unit_names(units: list[Unit]) -> list[str]:
    """``site`` or ``site[channel]`` for every unit.

    Example:
        >>> unit_names([("conv1", None), ("conv1", 3)])
        ['conv1', 'conv1[3]']
    """
    return [s if c is None else f"{s}[{c}]" for s, c in units]


@dataclass
class Scores:
    """Importances (or ablation effects) with standard errors.

    Attributes:
        units: ``(site, None)`` at layer granularity, ``(site, channel)`` at channel granularity.
        values: E_x of the per-sample quantity, one per unit (float64).
        stderr: standard error of each value over samples.
        n_samples: number of samples averaged.
        importance: what produced it, ``"gndi"`` or ``"ablation"``.
        seconds: wall time of the computation.
        meta: settings (readout, p, steps, mode, baseline, metric, ...).

    Example:
        >>> s = Scores([("a", None), ("b", None)], np.array([1.0, 3.0]), np.zeros(2), 8,
        ...            importance="gndi")
        >>> s.top(1)
        [('b', 3.0)]
    """

    units: list[Unit]
    values: np.ndarray
    stderr: np.ndarray
    n_samples: int
    importance: str
    seconds: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """``site`` or ``site[channel]`` for every unit."""
        return unit_names(self.units)

    @property
    def sites(self) -> list[str]:
        """Site names in order, each once."""
        return list(dict.fromkeys(s for s, _ in self.units))

    @property
    def granularity(self) -> str:
        return "layer" if all(c is None for _, c in self.units) else "channel"

    def __getitem__(self, name: str) -> float | np.ndarray:
        """A layer's value, or a site's vector of channel values.

        Example:
            >>> Scores([("a", 0), ("a", 1)], np.array([1.0, 2.0]), np.zeros(2), 4,
            ...        importance="x")["a"]
            array([1., 2.])
        """
        idx = [i for i, (s, _) in enumerate(self.units) if s == name]
        if not idx:
            raise KeyError(f"no site '{name}'; sites: {', '.join(self.sites)}")
        if len(idx) == 1 and self.units[idx[0]][1] is None:
            return float(self.values[idx[0]])
        return self.values[idx]

    def by_site(self) -> dict[str, np.ndarray]:
        """Site name -> vector of its units' values (length 1 at layer granularity)."""
        out: dict[str, list[float]] = {}
        for (site, _), v in zip(self.units, self.values):
            out.setdefault(site, []).append(float(v))
        return {k: np.asarray(v) for k, v in out.items()}

    def top(self, k: int = 10, *, largest: bool = True) -> list[tuple[str, float]]:
        """The ``k`` most (or least) important units as ``(name, value)``."""
        order = np.argsort(-self.values if largest else self.values, kind="stable")[:k]
        return [(self.names[i], float(self.values[i])) for i in order]

    def table(self, k: int | None = None) -> str:
        """A table of units with value and standard error (all, or the top ``k``)."""
        order = range(len(self.units)) if k is None else [
            self.names.index(n) for n, _ in self.top(k)]
        rows = [(self.names[i], self.values[i], self.stderr[i]) for i in order]
        title = f"{self.importance} ({self.n_samples} samples, {self.seconds:.2f} s)"
        return title + "\n" + format_table(rows, ["unit", "value", "stderr"])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "importance": self.importance, "granularity": self.granularity,
            "n_samples": self.n_samples, "seconds": self.seconds, "meta": self.meta,
            "units": [{"site": s, "channel": c, "value": float(v), "stderr": float(e)}
                      for (s, c), v, e in zip(self.units, self.values, self.stderr)],
        }

    @property
    def quantity(self) -> str:
        """What the values measure: the ablation's effect (``"accuracy drop"``, ``"loss
        increase"``, ``"logit L2 change"``, ``"KL(original || ablated)"``), or G-NDI with its
        readout and norm.

        Example:
            >>> s = Scores([], np.zeros(0), np.zeros(0), 0, "ablation", meta={"metric": "loss"})
            >>> s.quantity
            'loss increase'
        """
        if "metric" in self.meta:
            return METRIC_EFFECTS.get(self.meta["metric"], self.meta["metric"])
        if self.importance == "gndi" and "readout" in self.meta:
            return f"G-NDI ({self.meta['readout']}, p={self.meta.get('p', 2):g})"
        return self.importance

    def plot(self, path: str | os.PathLike, *, k: int = 40) -> None:
        """Bar chart of the values (the top ``k`` at channel granularity) with error bars."""
        plt = pyplot()
        if self.granularity == "layer":
            names, vals, errs = self.names, self.values, self.stderr
        else:
            idx = [self.names.index(n) for n, _ in self.top(k)]
            names = [self.names[i] for i in idx]
            vals, errs = self.values[idx], self.stderr[idx]
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 4))
        ax.bar(range(len(names)), vals, yerr=errs, color="#3b6ea5")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylabel(self.quantity)
        ax.set_title(f"{self.importance}: {self.granularity} importance")
        save_figure(fig, path)
