"""What pruning returns: the pruned model and what was done to it, width or depth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn as nn

from fxgndi.core.report import format_table


@dataclass
class PruningResult:
    """The part every pruning result has: the model, its costs before and after, the settings.

    Attributes:
        model: the pruned model (a copy of the input unless ``inplace=True``).
        macs_before, macs_after, params_before, params_after: torch-pruning's counts on the
            example input.
        settings: the arguments that produced it, and what ran (repair steps, importance).
        seconds: wall time of the whole call (scoring, search, repair, fine-tuning).
        skipped: what was not pruned (a layer's width, a block) -> why.

    Example:
        >>> r = PruningResult(model=nn.Linear(2, 2), macs_before=10, macs_after=5,
        ...                   params_before=6, params_after=3)
        >>> r.macs_reduction, r.params_reduction
        (0.5, 0.5)
    """

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = float("nan")
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def macs_reduction(self) -> float:
        """Fraction of MACs removed."""
        return 1 - self.macs_after / self.macs_before

    @property
    def params_reduction(self) -> float:
        """Fraction of parameters removed."""
        return 1 - self.params_after / self.params_before

    def summary_rows(self) -> list[tuple]:
        """``(what, before, after, kept)`` rows for MACs and parameters."""
        return [("MACs", self.macs_before, self.macs_after, self.macs_after / self.macs_before),
                ("params", self.params_before, self.params_after,
                 self.params_after / self.params_before)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (everything but the model).

        Example:
            >>> PruningResult(model=nn.Identity(), macs_before=4, macs_after=2, params_before=2,
            ...               params_after=1).to_dict()["macs_reduction"]
            0.5
        """
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        out.update(macs_reduction=self.macs_reduction, params_reduction=self.params_reduction)
        return out


@dataclass
class PruneResult(PruningResult):
    """A width-pruned model (channels removed by torch-pruning) and what pruning did to it.

    Attributes (beside :class:`PruningResult`'s):
        channels: layer name -> (out channels before, after), conv and linear layers.
        kept: layer name -> original indices of the kept out-channels (conv, linear, BatchNorm).
        kept_inputs: layer name -> original indices of the kept input channels (conv) or
            features (linear).
        pruning_ratio: torch-pruning's per-channel ratio that met the target.

    Example:
        >>> r = PruneResult(model=nn.Linear(2, 2), macs_before=10, macs_after=5, params_before=6,
        ...                 params_after=3, channels={"0": (4, 2)}, pruning_ratio=0.5)
        >>> r.macs_reduction, r.channels_reduction
        (0.5, 0.5)
    """

    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    kept_inputs: dict[str, list[int]] = field(default_factory=dict)
    pruning_ratio: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (everything but the model); channel pairs as lists."""
        out = super().to_dict()
        out["channels"] = {n: list(v) for n, v in self.channels.items()}
        return out

    @property
    def channels_reduction(self) -> float:
        """Fraction of conv / linear output channels removed."""
        before = sum(b for b, _ in self.channels.values())
        return 1 - sum(a for _, a in self.channels.values()) / before

    def table(self) -> str:
        """A summary table (MACs, params, channels) and a per-layer table of channels.

        Example:
            >>> r = PruneResult(model=nn.Linear(2, 2), macs_before=10, macs_after=5,
            ...                 params_before=6, params_after=3, channels={"0": (4, 2)})
            >>> "channels" in r.table()
            True
        """
        before_ch = sum(b for b, _ in self.channels.values())
        after_ch = sum(a for _, a in self.channels.values())
        rows = self.summary_rows() + [("channels", before_ch, after_ch,
                                       after_ch / before_ch if before_ch else float("nan"))]
        summary = format_table(rows, ["", "before", "after", "kept"], floatfmt=".3f")
        layers = format_table([(n, b, a, a / b) for n, (b, a) in self.channels.items()],
                              ["layer", "channels before", "after", "kept"], floatfmt=".3f")
        head = (f"pruned with {self.settings.get('importance', '?')} to "
                f"{self.settings.get('target', '?')} sparsity "
                f"{self.settings.get('sparsity', float('nan')):.3g} (channel ratio "
                f"{self.pruning_ratio:.3f}) in {self.seconds:.1f} s")
        skipped = "" if not self.skipped else "\n\n" + format_table(
            sorted(self.skipped.items()), ["kept whole", "why"])
        return f"{head}\n{summary}\n\n{layers}{skipped}"


@dataclass
class DepthPruneResult(PruningResult):
    """A depth-pruned model (a torch.fx GraphModule) and what was removed, in order.

    Attributes (beside :class:`PruningResult`'s):
        removed: the removed blocks' names, in removal order.
        history: one dict per removal: block, its score when removed, MAC and parameter
            reduction after it (and latency reduction for ``target="latency"``).
        latency_before, latency_after: seconds of one forward pass on the example input
            (measured for ``target="latency"``; NaN otherwise).

    Example:
        >>> r = DepthPruneResult(model=nn.Identity(), macs_before=10, macs_after=6,
        ...                      params_before=4, params_after=2, removed=["b"])
        >>> r.macs_reduction, "MACs" in r.table()
        (0.4, True)
    """

    removed: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    latency_before: float = float("nan")
    latency_after: float = float("nan")

    def table(self) -> str:
        """A summary table and the removal order with each block's score."""
        rows = self.summary_rows()
        if not math.isnan(self.latency_before):
            rows.append(("latency (ms)", 1e3 * self.latency_before, 1e3 * self.latency_after,
                         self.latency_after / self.latency_before))
        summary = format_table(rows, ["", "before", "after", "kept"], floatfmt=".3f")
        steps = format_table([(i + 1, h["block"], h["score"], h["macs_reduction"],
                               h["params_reduction"]) for i, h in enumerate(self.history)],
                             ["step", "removed block", "score", "MACs removed",
                              "params removed"], floatfmt=".4g")
        head = (f"removed {len(self.removed)} residual branch(es) by "
                f"{self.settings.get('importance', '?')} "
                f"({'greedy' if self.settings.get('greedy') else 'one scoring'}, baseline "
                f"{self.settings.get('baseline', '?')}) in {self.seconds:.1f} s")
        parts = [head, summary, "", steps]
        if self.skipped:
            parts += ["", format_table(sorted(self.skipped.items()),
                                       ["not a candidate", "why"])]
        return "\n".join(parts)
