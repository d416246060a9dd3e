"""SNIP connection sensitivity (Lee et al., "SNIP: Single-shot Network Pruning based on
Connection Sensitivity", ICLR 2019).

Per weight, ``|g * w|`` with ``g = dL/dw`` (mean cross-entropy), which is the gradient of the
loss w.r.t. a multiplicative mask ``c`` at ``c = 1``. A channel's score is the sum over its
filter's weights; biases are not scored (SNIP masks weights only). The paper divides by the sum
over all weights of the network: that is one positive constant for the whole model, so it is
omitted here (ranks and ratios between layers are unchanged, and a layer's score does not depend
on which other layers are requested).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxgndi.core.streams import call_model, input_arity

from ._common import (Scores, check_finite, eval_mode, batches, logits_of, per_channel,
                      on_device, requiring_grad, resolve_layers)


def snip_scores(model: nn.Module, data: Iterable, layers: Sequence[str] | None = None, *,
                max_batches: int | None = 1, device: torch.device | str | None = None) -> Scores:
    """Per channel, the sum of ``|g * w|`` over its weights; ``g`` is the sum of the per-batch
    gradients over the first ``max_batches`` batches (SNIP uses one batch; ``None`` = all).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
        >>> s = snip_scores(net, data, ["0", "4"])
        >>> s["0"].shape, s["4"].shape
        ((8,), (10,))
    """
    net, dev = on_device(model, device, torch.float32)
    mods = resolve_layers(net, layers)
    weights = [m.weight for m in mods.values()]
    grads = [torch.zeros_like(w) for w in weights]
    with eval_mode(net), requiring_grad(weights), torch.enable_grad():
        for x, y in batches(data, dev, max_batches, arity=input_arity(net)):
            loss = F.cross_entropy(logits_of(call_model(net, x)), y)
            for acc, g in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True)):
                if g is not None:
                    acc += g
    out = {name: per_channel((g * w.detach()).abs())
           for name, w, g in zip(mods, weights, grads)}
    return check_finite("snip", out)
