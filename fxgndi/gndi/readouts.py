"""Readouts: the model output whose change G-NDI measures, and label checks against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxgndi.core.errors import DataError
from fxgndi.core.names import READOUTS
from fxgndi.core.outputs import class_layout
from fxgndi.fx.intervention import InterventionGraph, intervene  # noqa: F401  (doctests)


def readout(out: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The output whose change G-NDI measures, shape [B, K].

    ``out`` is ``[B, C]`` or dense ``[B, C, *positions]`` (classes in dim 1, as
    ``F.cross_entropy`` reads them). ``logits`` and ``outputs``: the output itself, flattened
    to [B, C * positions] (``outputs`` is for heads that are not softmax classifiers:
    regression, multi-label, embeddings; labels are not checked against it); ``probs``: the
    softmax over classes, flattened; ``loss``: per-sample cross-entropy with integer labels
    (averaged over positions), or, with floating targets of the output's shape, per-sample
    mean squared error, [B, 1]; ``margin``: true-class minus best other class, averaged over
    positions, [B, 1].

    Example:
        >>> readout(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), "margin")
        tensor([[2.]])
        >>> readout(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), "loss").shape
        torch.Size([2, 1])
    """
    batch = out.shape[0]
    if kind in ("logits", "outputs"):
        return out.reshape(batch, -1)
    if kind == "probs":
        return out.softmax(1).reshape(batch, -1)
    if kind not in READOUTS:
        raise ValueError(f"unknown readout {kind!r}: use one of {', '.join(READOUTS)}")
    if y is None:
        raise DataError(f"readout '{kind}' needs labels: pass batches of (x, y)")
    if kind == "loss" and y.is_floating_point():
        if y.shape != out.shape:
            raise DataError(f"readout 'loss' with floating targets is the mean squared error: "
                            f"targets of shape {tuple(y.shape)} do not match the output's "
                            f"{tuple(out.shape)}")
        return (out - y).pow(2).reshape(batch, -1).mean(1, keepdim=True)
    if kind == "loss":
        return F.cross_entropy(out, y, reduction="none").reshape(batch, -1).mean(1, keepdim=True)
    scores = class_layout(out)  # [B, C, P]
    labels = y.reshape(batch, 1, -1)
    true = scores.gather(1, labels)
    taken = F.one_hot(labels[:, 0], scores.shape[1]).movedim(-1, 1).bool()
    others = scores.masked_fill(taken, -math.inf).amax(1, keepdim=True)
    return (true - others).mean(-1)


def readout_width(graph: InterventionGraph, x, y, kind: str) -> int:
    """K, the readout's width for a batch ``x`` (no forward pass when the graph has seen
    inputs of that shape: :meth:`InterventionGraph.output_shape`).

    Example:
        >>> g = intervene(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), sites="conv")
        >>> readout_width(g, torch.randn(2, 1, 8, 8), None, "logits")
        144
    """
    out = torch.zeros((1, *graph.output_shape(x)))
    return readout(out, None if y is None else y[:1], kind).shape[-1]


def check_labels(out: torch.Tensor, y: torch.Tensor | None) -> None:
    """Integer labels must index the output's classes (dim 1): a mismatch means the wrong
    model or data.

    Example:
        >>> check_labels(torch.zeros(2, 3), torch.tensor([0, 5]))
        Traceback (most recent call last):
        ...
        fxgndi.core.errors.DataError: the data has labels up to 5, but the model has 3 outputs: ...
    """
    if y is None or y.dtype.is_floating_point or y.numel() == 0 or out.dim() < 2:
        return
    classes = out.shape[1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"the data has labels up to {hi}, but the model has {classes} outputs: "
                        f"build the model with num_classes={hi + 1} or more (--num-classes), "
                        "or use the data it was trained on")
