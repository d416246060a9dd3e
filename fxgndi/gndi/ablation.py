"""Exact ablations: model outputs with ``alpha = 1`` at one unit at a time (batched with
``vmap``), and the metrics of their effect."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn  # noqa: F401  (doctests)
import torch.nn.functional as F

from fxgndi.core.outputs import class_layout
from fxgndi.fx.intervention import InterventionGraph, intervene  # noqa: F401  (doctests)
from fxgndi.gndi.scores import Unit
from fxgndi.gndi.tangents import SAMPLES_PER_CHUNK, one_hot_alphas, transformable_kernels


def ablated_outputs(graph: InterventionGraph, x: torch.Tensor, units: Sequence[Unit],
                    chunk_size: int | None = None) -> Iterable[torch.Tensor]:
    """Model outputs with ``alpha_u = 1`` for each unit in turn, as chunks of [U, B, K].

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), sites="linear")
        >>> next(iter(ablated_outputs(g, torch.randn(4, 3), [("0", None), ("1", None)]))).shape
        torch.Size([2, 4, 2])
    """
    chunk = chunk_size or max(1, SAMPLES_PER_CHUNK // x.shape[0])
    for lo in range(0, len(units), chunk):
        alphas = one_hot_alphas(graph, x, units[lo:lo + chunk])
        with transformable_kernels(graph):
            out = torch.func.vmap(lambda a: graph(x, alphas=a))(alphas)
        yield out


def effect(reference: torch.Tensor, ablated: torch.Tensor, y: torch.Tensor | None,
           metric: str) -> torch.Tensor:
    """Per-sample effect [U, B] of each intervention on the outputs ``ablated`` [U, B, ...]
    against ``reference`` [B, ...] (classes in dim 1 of an output; dense outputs are averaged
    over positions); NaN where the reference or an intervened output is not finite (so that a
    discrete metric such as accuracy cannot hide it).

    Example:
        >>> ref = torch.tensor([[2.0, 0.0]])
        >>> effect(ref, torch.tensor([[[0.0, 2.0]]]), torch.tensor([0]), "accuracy")
        tensor([[1.]])
    """
    units, batch = ablated.shape[:2]
    ref = class_layout(reference)  # [B, C, P]
    abl = class_layout(ablated.reshape(units * batch, *ablated.shape[2:])).view(
        units, batch, *ref.shape[1:])
    if metric == "logit_l2":
        out = torch.linalg.vector_norm((abl - ref).flatten(2), dim=-1)
    elif metric == "kl":
        log_p = ref.log_softmax(1)
        out = (log_p.exp() * (log_p - abl.log_softmax(2))).sum(2).mean(-1)
    else:
        labels = y.reshape(batch, -1)  # [B, P]
        if metric == "accuracy":
            correct = (ref.argmax(1) == labels).to(ref.dtype).mean(-1)
            out = correct - (abl.argmax(2) == labels).to(ref.dtype).mean(-1)
        else:
            ce = F.cross_entropy(abl.flatten(0, 1), labels.repeat(units, 1), reduction="none")
            out = ce.view(units, batch, -1).mean(-1) - F.cross_entropy(
                ref, labels, reduction="none").mean(-1)
    finite = torch.isfinite(ablated.flatten(2)).all(-1) & \
        torch.isfinite(reference.flatten(1)).all(-1)
    return out.masked_fill(~finite, float("nan"))
