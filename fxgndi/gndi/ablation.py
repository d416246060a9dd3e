"""Exact ablations: model outputs with ``alpha = 1`` at one unit at a time (batched with
``vmap``), and the metrics of their effect."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn  # noqa: F401  (doctests)
import torch.nn.functional as F

from fxgndi.fx.intervention import InterventionGraph, intervene  # noqa: F401  (doctests)
from fxgndi.gndi.scores import Unit
from fxgndi.gndi.tangents import SAMPLES_PER_CHUNK, one_hot_alphas, transformable_attention


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
        with transformable_attention():
            out = torch.func.vmap(lambda a: graph(x, alphas=a))(alphas)
        yield out


def effect(reference: torch.Tensor, ablated: torch.Tensor, y: torch.Tensor | None,
           metric: str) -> torch.Tensor:
    """Per-sample effect [U, B] of each intervention on the outputs ``ablated`` [U, B, K]; NaN
    where the reference or an intervened output is not finite (so that a discrete metric such
    as accuracy cannot hide it).

    Example:
        >>> ref = torch.tensor([[2.0, 0.0]])
        >>> effect(ref, torch.tensor([[[0.0, 2.0]]]), torch.tensor([0]), "accuracy")
        tensor([[1.]])
    """
    if metric == "logit_l2":
        out = torch.linalg.vector_norm(ablated - reference, dim=-1)
    elif metric == "kl":
        log_p = reference.log_softmax(-1)
        out = (log_p.exp() * (log_p - ablated.log_softmax(-1))).sum(-1)
    elif metric == "accuracy":
        correct = (reference.argmax(-1) == y).to(reference.dtype)
        out = correct - (ablated.argmax(-1) == y).to(reference.dtype)
    else:
        ce = F.cross_entropy(ablated.flatten(0, 1), y.repeat(ablated.shape[0]),
                             reduction="none")
        out = ce.view(ablated.shape[:2]) - F.cross_entropy(reference, y, reduction="none")
    finite = torch.isfinite(ablated).all(-1) & torch.isfinite(reference).all(-1)
    return out.masked_fill(~finite, float("nan"))
