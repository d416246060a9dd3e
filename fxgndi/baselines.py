"""Baselines ``b`` for ``do(h := b)``: zero, mean, per-channel mean, or user tensors."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .graph import InterventionGraph, observe
from .runtime import eval_mode
from .streams import iter_batches

BASELINES = ("zero", "mean", "channel-mean")


def apply_baseline(graph: InterventionGraph, baseline: Any, data: Iterable | None = None, *,
                   progress: bool = False) -> None:
    """Set every site's baseline of ``graph`` from a name, a tensor or a mapping.

    ``"mean"`` and ``"channel-mean"`` are calibrated on ``data`` (streaming); a tensor applies
    to every site; a mapping gives one tensor per site name (others stay zero).

    Example:
        >>> import torch.nn as nn
        >>> from fxgndi import intervene
        >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
        >>> apply_baseline(g, "channel-mean", [torch.ones(4, 2)])
    """
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}: use one of {BASELINES}, a tensor, "
                             "or a mapping site name -> tensor")
        if baseline == "zero":
            for name in graph.site_names:
                graph.set_baseline(name, None)
            return
        if data is None:
            raise ValueError(f"baseline {baseline!r} needs calibration data: pass data=loader")
        for name, value in calibrate(graph, data, kind=baseline, progress=progress).items():
            graph.set_baseline(name, value)
        return
    if isinstance(baseline, torch.Tensor):
        for name in graph.site_names:
            graph.set_baseline(name, baseline)
        return
    if isinstance(baseline, Mapping):
        for name, value in baseline.items():
            graph.set_baseline(name, None if value is None else torch.as_tensor(value))
        return
    raise TypeError(f"baseline must be a name {BASELINES}, a tensor or a mapping, "
                    f"not {type(baseline).__name__}")


def calibrate(graph: InterventionGraph, data: Iterable, *, kind: str = "channel-mean",
              max_batches: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Streaming mean activation of every site over ``data`` (also records site shapes).

    ``kind="mean"`` keeps the full per-position mean, shape [1, *site.shape]; ``"channel-mean"``
    averages over everything but the channel dim and broadcasts over the rest.

    Example:
        >>> import torch.nn as nn
        >>> from fxgndi import intervene
        >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
        >>> calibrate(g, [torch.ones(4, 2)], kind="mean")["0"].shape
        torch.Size([1, 3])
    """
    if kind not in ("mean", "channel-mean"):
        raise ValueError(f"calibrate computes 'mean' or 'channel-mean', not {kind!r}")
    device = next((p.device for p in graph.parameters()), None)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    batches = iter_batches(data, device=device, max_batches=max_batches)
    with eval_mode(graph), torch.no_grad():
        for i, (x, _) in enumerate(tqdm(batches, desc="calibrate", disable=not progress)):
            with observe(graph) as seen:
                graph(x)
            if i == 0:
                graph.record_shapes(seen)
            for site in graph.sites:
                h = seen[site.name].to(torch.float64)
                if kind == "mean":
                    s, n = h.sum(0, keepdim=True), h.shape[0]
                else:
                    dim = site.resolved_channel_dim() % h.dim()
                    other = [d for d in range(h.dim()) if d != dim]
                    s, n = h.sum(other, keepdim=True), h.numel() // h.shape[dim]
                sums[site.name] = sums[site.name] + s if site.name in sums else s
                counts[site.name] = counts.get(site.name, 0) + n
    return {name: (sums[name] / counts[name]).to(seen[name].dtype) for name in sums}
