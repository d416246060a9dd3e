"""Filter-norm magnitude criterion (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

A filter's importance is the L1 norm of its weights (the paper's "sum of absolute kernel
weights"); the L2 variant is the Euclidean norm. Biases are not included (as in the paper).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ._common import Scores, check_finite, resolve_layers


def magnitude_scores(model: nn.Module, data: Iterable | None = None,
                     layers: Sequence[str] | None = None, *, p: int = 1,
                     device: torch.device | str | None = None) -> Scores:
    """``p``-norm (1 or 2) of each output filter's weights. ``data`` and ``device`` are ignored.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
        >>> magnitude_scores(net, None, ["0"], p=2)["0"].shape
        (8,)
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    out = {}
    for name, m in resolve_layers(model, layers).items():
        w = m.weight.detach().reshape(m.weight.shape[0], -1).double()
        out[name] = torch.linalg.vector_norm(w, ord=p, dim=1).cpu().numpy()
    return check_finite(f"magnitude_l{p}", out)


def magnitude_l1_scores(model: nn.Module, data: Iterable | None = None,
                        layers: Sequence[str] | None = None, **kw) -> Scores:
    """L1 norm of each output filter (Li et al. 2017).

    Example:
        >>> import numpy as np, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> bool(np.allclose(magnitude_l1_scores(net, None, ["0"])["0"],
        ...                  net[0].weight.detach().abs().sum(1).numpy()))
        True
    """
    return magnitude_scores(model, data, layers, p=1, **kw)


def magnitude_l2_scores(model: nn.Module, data: Iterable | None = None,
                        layers: Sequence[str] | None = None, **kw) -> Scores:
    """L2 norm of each output filter.

    Example:
        >>> import torch.nn as nn
        >>> magnitude_l2_scores(nn.Sequential(nn.Linear(4, 3)), None, ["0"])["0"].shape
        (3,)
    """
    return magnitude_scores(model, data, layers, p=2, **kw)
