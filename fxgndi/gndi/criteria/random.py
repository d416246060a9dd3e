"""Random baseline: uniform scores in [0, 1), reproducible with a seed.

Each layer draws from its own stream, seeded by ``(seed, crc32(layer name))``, so a layer's
scores do not depend on which other layers are requested or in which order.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._common import Scores, resolve_layers


def random_scores(model: nn.Module, data: Iterable | None = None,
                  layers: Sequence[str] | None = None, *, seed: int = 0,
                  device: torch.device | str | None = None) -> Scores:
    """Uniform random importance per channel; ``data`` and ``device`` are ignored.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> a, b = random_scores(net, None, ["0"]), random_scores(net, None, ["0"])
        >>> bool((a["0"] == b["0"]).all())
        True
    """
    out = {}
    for name, m in resolve_layers(model, layers).items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[name] = rng.random(m.weight.shape[0], dtype=np.float64)
    return out
