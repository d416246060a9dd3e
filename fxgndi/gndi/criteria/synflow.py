"""SynFlow, iterative synaptic flow (Tanaka et al., "Pruning neural networks without any data by
iteratively conserving synaptic flow", NeurIPS 2020), one shot, after the reference
implementation (github.com/ganguli-lab/Synaptic-Flow, ``Pruners/pruners.py``, ``SynFlow``).

On a deep copy of the model (the user's weights are never touched): float64, eval mode, every
entry of the state dict replaced by its absolute value (``linearize``: parameters AND buffers,
so BatchNorm running means are linearized too, exactly as the reference does), an all-ones input
of shape ``[1, *input_shape]``, ``R = sum(output)``; per weight ``|w * dR/dw|``, summed over each
output filter. Biases are not scored (the reference scores the prunable weights only). This is
a single scoring round; the paper's iterative pruning schedule is out of scope. Float64 guards
against overflow of ``R`` in deep networks (the reference leaves ``model.double()`` commented
out; several re-implementations enable it).
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ._common import (Scores, check_finite, first_input_shape, logits_of, device_of,
                      per_channel, resolve_layers)


@torch.no_grad()
def _linearize(net: nn.Module) -> None:
    """``abs_()`` every numeric state-dict entry in place (the reference's ``linearize``)."""
    for t in net.state_dict().values():
        if t.dtype != torch.bool and not t.is_complex():
            t.abs_()


def synflow_scores(model: nn.Module, data: Iterable | None = None,
                   layers: Sequence[str] | None = None, *,
                   input_shape: Sequence[int] | None = None,
                   device: torch.device | str | None = None) -> Scores:
    """Per channel, the sum of ``|w * dR/dw|`` on the linearized float64 copy (data-free).

    ``input_shape`` (one sample, no batch dim) wins; otherwise it is read from the first batch
    of ``data``.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> synflow_scores(net, None, ["0"], input_shape=(3, 16, 16))["0"].shape
        (8,)
    """
    if input_shape is None:
        if data is None:
            raise ValueError("synflow needs an input shape: pass input_shape=(C, H, W) or data")
        input_shape = first_input_shape(data)
    resolve_layers(model, layers)  # validate names before copying
    dev = torch.device(device) if device is not None else device_of(model)
    net = copy.deepcopy(model).to(device=dev, dtype=torch.float64).eval()
    _linearize(net)
    mods = resolve_layers(net, layers)
    weights = [m.weight for m in mods.values()]
    for w in weights:
        w.requires_grad_(True)
    with torch.enable_grad():
        ones = torch.ones((1, *input_shape), dtype=torch.float64, device=dev)
        r = logits_of(net(ones)).sum()
        grads = torch.autograd.grad(r, weights, allow_unused=True)
    out = {name: per_channel((w.detach() * g).abs()) if g is not None
           else per_channel(torch.zeros_like(w))
           for name, w, g in zip(mods, weights, grads)}
    return check_finite("synflow", out)
