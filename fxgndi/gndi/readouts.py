"""Readouts: the model output whose change G-NDI measures, and label checks against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxgndi.core.errors import DataError
from fxgndi.core.names import READOUTS
from fxgndi.fx.intervention import InterventionGraph


def readout(logits: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The output whose change G-NDI measures, shape [B, K].

    ``logits`` [B, K]; ``probs`` softmax [B, K]; ``loss`` per-sample cross-entropy [B, 1];
    ``margin`` true-class logit minus the best other logit [B, 1].

    Example:
        >>> readout(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), "margin")
        tensor([[2.]])
    """
    if kind == "logits":
        return logits
    if kind == "probs":
        return logits.softmax(-1)
    if kind not in READOUTS:
        raise ValueError(f"unknown readout {kind!r}: use one of {READOUTS}")
    if y is None:
        raise DataError(f"readout '{kind}' needs labels: pass batches of (x, y)")
    if kind == "loss":
        return F.cross_entropy(logits, y, reduction="none").unsqueeze(-1)
    true = logits.gather(-1, y.unsqueeze(-1))
    others = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), -math.inf)
    return true - others.amax(-1, keepdim=True)


def readout_width(graph: InterventionGraph, x, y, kind: str) -> int:
    with torch.no_grad():
        return readout(graph(x[:1]), None if y is None else y[:1], kind).shape[-1]


def check_labels(logits: torch.Tensor, y: torch.Tensor | None) -> None:
    """Labels must index the model's outputs: a mismatch means the wrong model or data."""
    if y is None or y.dtype.is_floating_point or y.dim() != 1 or y.numel() == 0:
        return
    classes = logits.shape[-1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"the data has labels up to {hi}, but the model has {classes} outputs: "
                        f"build the model with num_classes={hi + 1} or more (--num-classes), "
                        "or use the data it was trained on")
