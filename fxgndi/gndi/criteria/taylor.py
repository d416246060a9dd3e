"""Taylor first-order criterion on activations (Molchanov et al., "Pruning Convolutional Neural
Networks for Resource Efficient Inference", ICLR 2017).

For each sample and output channel: ``| mean over spatial positions of (a * dC/da) |``, with
``a`` the layer's output activation and ``C`` the cross-entropy of that sample; averaged over all
samples seen. Per-sample gradients come from the SUMMED batch loss: in eval mode samples do not
interact, so ``d(sum_n C_n)/da_n = dC_n/da_n``, whereas the batch-mean loss would scale every
gradient by ``1/B`` (and make scores depend on the batch size). Biases play no separate role.
The paper's layer-wise L2 normalisation (its Sec. 2.2.1, for a global ranking across layers)
is off by default, because it erases the differences between layers; ``normalize=True`` applies
it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxgndi.core.streams import call_model, input_arity

from ._common import (Scores, channels_first, check_calls, check_finite, eval_mode,
                      forward_hooks, batches, logits_of, on_device, resolve_layers)


def taylor_scores(model: nn.Module, data: Iterable, layers: Sequence[str] | None = None, *,
                  max_batches: int | None = None, normalize: bool = False,
                  device: torch.device | str | None = None) -> Scores:
    """Per channel, the sample mean of ``|spatial mean of a * dC/da|``.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
        >>> taylor_scores(net, data, ["0", "4"])["4"].shape
        (10,)
    """
    net, dev = on_device(model, device, torch.float32)
    mods = resolve_layers(net, layers)
    sums = {name: torch.zeros(m.weight.shape[0], dtype=torch.float64) for name, m in mods.items()}
    acts: dict[str, list[torch.Tensor]] = {name: [] for name in mods}
    seen = 0

    def make_hook(name: str, module: nn.Module):
        def hook(out: torch.Tensor) -> torch.Tensor:
            # A private copy: an in-place op downstream (VGG's ReLU(inplace=True)) would
            # otherwise overwrite the activation whose gradient we need.
            a = out.clone()
            if not a.requires_grad:
                a.requires_grad_(True)
            acts[name].append(a)
            return a
        return hook

    with eval_mode(net), torch.enable_grad(), forward_hooks(net, mods, make_hook):
        for x, y in batches(data, dev, max_batches, arity=input_arity(net)):
            for v in acts.values():
                v.clear()
            loss = F.cross_entropy(logits_of(call_model(net, x)), y, reduction="sum")
            check_calls("taylor", {name: len(v) for name, v in acts.items()})
            tensors = [acts[name][0] for name in mods]
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for (name, m), a, g in zip(mods.items(), tensors, grads):
                if g is None:
                    continue  # the layer does not reach the output: score 0
                prod = channels_first(m, a.detach() * g)
                sums[name] += prod.reshape(*prod.shape[:2], -1).mean(2).abs().sum(0).double().cpu()
            seen += x.shape[0]
        for v in acts.values():
            v.clear()
    out = {name: (s / seen).numpy() for name, s in sums.items()}
    if normalize:
        out = {name: s / max(np.linalg.norm(s), np.finfo(float).tiny) for name, s in out.items()}
    return check_finite("taylor", out)
