"""Classic pruning criteria, for comparison with G-NDI.

Each criterion scores the OUTPUT channels of named conv/linear layers (``nn.Conv1d/2d/3d``,
``nn.Linear``, names as in ``model.named_modules()``) and returns ``{layer: float64 vector of
length out_channels}`` where HIGHER = MORE IMPORTANT (keep). All of them leave the user's model
unchanged (no ``.grad``, same weights, same ``training`` flags) and score in eval mode.

=================  ==========================================================================
key                criterion
=================  ==========================================================================
magnitude_l1       L1 norm of each filter (Li et al. 2017)
magnitude_l2       L2 norm of each filter
snip               sum over the filter of ``|g * w|`` (Lee et al. 2019)
grasp              sum over the filter of ``w * (H g)``: ``-S`` of GraSP (Wang et al. 2020)
synflow            sum over the filter of ``|w * dR/dw|``, data-free, float64 (Tanaka 2020)
hrank              mean rank of the channel's feature maps (Lin et al. 2020)
activation_taylor  mean ``|spatial mean of a * dC/da|`` (Molchanov et al. 2017)
random             seeded uniform scores
=================  ==========================================================================
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch.nn as nn

from fxgndi.core.checks import check_choice
from fxgndi.core.names import CRITERIA as CRITERIA_NAMES
from ._common import Scores, resolve_layers, scorable_layers
from .grasp import grasp_scores
from .hrank import hrank_scores
from .magnitude import magnitude_l1_scores, magnitude_l2_scores, magnitude_scores
from .random import random_scores
from .snip import snip_scores
from .synflow import synflow_scores
from .taylor import taylor_scores

# Keys in the order of fxgndi.core.names.CRITERIA (the CLI's and validate's vocabulary).
CRITERIA: dict[str, Callable[..., Scores]] = {
    "magnitude_l1": magnitude_l1_scores,
    "magnitude_l2": magnitude_l2_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
    "synflow": synflow_scores,
    "hrank": hrank_scores,
    "activation_taylor": taylor_scores,
    "random": random_scores,
}
assert tuple(CRITERIA) == CRITERIA_NAMES, "fxgndi.core.names.CRITERIA is the vocabulary"

__all__ = [
    "CRITERIA", "score_channels", "aggregate", "scorable_layers", "magnitude_scores",
    "magnitude_l1_scores", "magnitude_l2_scores", "snip_scores", "grasp_scores",
    "synflow_scores", "hrank_scores", "taylor_scores", "random_scores",
]


def score_channels(criterion: str, model: nn.Module, data: Iterable | None,
                   layers: Sequence[str] | None, **kw) -> Scores:
    """Score the output channels of ``layers`` with the criterion ``method`` (a key of
    ``CRITERIA``); extra keywords go to the criterion (``max_batches=``, ``device=``,
    ``seed=``, ``input_shape=``, ...). ``layers=None`` scores every conv/linear layer.

    Raises ``ValueError`` for an unknown criterion, and for an unknown or non-conv/linear layer
    name (naming it and listing the valid ones).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
        >>> sorted(score_channels("snip", net, data, ["0", "4"]))
        ['0', '4']
    """
    check_choice("criterion", criterion, tuple(CRITERIA))
    resolve_layers(model, layers)
    return CRITERIA[criterion](model, data, layers, **kw)


def aggregate(channel_scores: Scores, how: str = "sum") -> dict[str, float]:
    """Layer importance from channel scores.

    ``how="sum"``: a layer's importance under a criterion is the total of its channels' scores
    (what removing the whole layer would lose, for additive per-weight criteria such as SNIP,
    GraSP, SynFlow). ``how="mean"``: the mean over channels, which removes the bias towards wide
    layers (and is the natural reading of HRank's average rank and of random scores).

    Example:
        >>> import numpy as np
        >>> aggregate({"a": np.array([1.0, 3.0])}, "mean")
        {'a': 2.0}
    """
    if how not in ("sum", "mean"):
        raise ValueError(f"how must be 'sum' or 'mean', got {how!r}")
    reduce = np.sum if how == "sum" else np.mean
    return {name: float(reduce(np.asarray(s, dtype=np.float64)))
            for name, s in channel_scores.items()}
