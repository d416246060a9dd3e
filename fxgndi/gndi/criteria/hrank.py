"""HRank, average feature-map rank (Lin et al., "HRank: Filter Pruning using High-Rank Feature
Map Information", CVPR 2020), after the reference ``rank_generation.py`` (github.com/lmbxmu/HRank).

A channel's score is the matrix rank (``torch.linalg.matrix_rank``, default tolerance) of its
feature map, averaged over the samples of the first ``max_batches`` batches (5 by default).
Feature maps are read at the scored layer's own output through a forward hook. (The reference
hooks the ReLU that follows conv+BN; a layer's output is what this library scores, and ranking
after ReLU would need an activation module used once per block, which torchvision's ResNet does
not have.)

Map shapes: conv2d ``[H, W]`` is used as is; conv3d ``[D, H, W]`` as a ``[D*H, W]`` matrix; a
conv1d map ``[L]`` or a Linear token map ``[T]`` as a ``1 x L`` row (rank 1 if nonzero, else 0);
a Linear layer with 2-D output ``[B, C]`` gives a scalar per channel: rank 1 if nonzero, else 0.
For a Linear output ``[B, ..., C]`` the channel is the last dim (Swin's ``[B, H, W, C]`` gives
``[H, W]`` maps).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from fxgndi.core.streams import call_model, input_arity

from ._common import (Scores, channels_first, check_calls, check_finite, eval_mode,
                      forward_hooks, batches, on_device, resolve_layers)


def feature_matrices(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Reshape a layer output to ``[B, C, M, N]``: one matrix per sample and channel.

    Example:
        >>> feature_matrices(torch.nn.Linear(3, 5), torch.zeros(2, 5)).shape
        torch.Size([2, 5, 1, 1])
    """
    t = channels_first(module, out)
    b, c = t.shape[:2]
    spatial = t.shape[2:]
    if len(spatial) == 0:
        return t.reshape(b, c, 1, 1)
    if len(spatial) == 1:
        return t.reshape(b, c, 1, spatial[0])
    return t.reshape(b, c, -1, spatial[-1])


def hrank_scores(model: nn.Module, data: Iterable, layers: Sequence[str] | None = None, *,
                 max_batches: int | None = 5,
                 device: torch.device | str | None = None) -> Scores:
    """Per channel, the mean matrix rank of its feature map over the samples seen.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
        >>> hrank_scores(net, data, ["0"])["0"].tolist()
        [14.0, 14.0, 14.0, 14.0, 14.0, 14.0, 14.0, 14.0]
    """
    net, dev = on_device(model, device, torch.float32)
    mods = resolve_layers(net, layers)
    sums = {name: torch.zeros(m.weight.shape[0], dtype=torch.float64) for name, m in mods.items()}
    calls = dict.fromkeys(mods, 0)
    seen = 0

    def make_hook(name: str, module: nn.Module):
        def hook(out: torch.Tensor) -> None:
            # Ranks are taken inside the hook, before any in-place op downstream alters `out`.
            ranks = torch.linalg.matrix_rank(feature_matrices(module, out.detach().float()))
            sums[name] += ranks.sum(0).double().cpu()
            calls[name] += 1
        return hook

    with eval_mode(net), torch.no_grad(), forward_hooks(net, mods, make_hook):
        for x, _ in batches(data, dev, max_batches, arity=input_arity(net), labels=False):
            calls.update(dict.fromkeys(calls, 0))
            call_model(net, x)
            check_calls("hrank", calls)
            seen += x.shape[0]
    return check_finite("hrank", {name: (s / seen).numpy() for name, s in sums.items()})
