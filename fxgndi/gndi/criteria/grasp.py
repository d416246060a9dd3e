"""GraSP, gradient signal preservation (Wang et al., "Picking Winning Tickets Before Training by
Preserving Gradient Flow", ICLR 2020), after the reference implementation
(github.com/alecwangcq/GraSP, ``pruner/GraSP.py``, function ``GraSP``).

The reference scores each weight with ``S = -w * (H g)`` (H: Hessian of the loss, g: its
gradient, both restricted to the conv/linear weights, logits divided by a temperature T=200) and
REMOVES the weights with the HIGHEST ``S`` (``keep = S <= threshold``). The importance returned
here is therefore ``-S = w * (H g)``, summed over each output filter (higher = keep); it can be
negative. Biases are not scored (as in the reference), and the reference's global normalisation
``S / |sum S|`` (one positive constant) is omitted.

Choices that differ from the reference: the model is scored as given, in eval mode (the
reference re-initialises Linear layers with Xavier and runs in train mode, since it prunes at
initialisation), and ``data`` decides the samples (the reference draws 25 per class and splits
them in two batches).
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxgndi.core.streams import call_model, input_arity

from ._common import (CHANNEL_LAYERS, Scores, check_finite, eval_mode, batches, logits_of,
                      per_channel, on_device, requiring_grad, resolve_layers)


class _Hardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``: the same function as ``nn.Hardsigmoid`` (same gradient almost
    everywhere), but with a double backward, which ``aten::hardsigmoid_backward`` lacks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


def _twice_differentiable(net: nn.Module, is_user_model: bool) -> nn.Module:
    """``net`` with its ``nn.Hardsigmoid`` modules (MobileNetV3's squeeze-excitation) swapped for
    ``_Hardsigmoid``; works on a deep copy when ``net`` is the user's model."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Hardsigmoid)]
    if not names:
        return net
    if is_user_model:
        net = copy.deepcopy(net)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, _Hardsigmoid())
    return net


def _hvp_weights(net: nn.Module) -> list[torch.Tensor]:
    """All conv/linear weights of ``net`` (each tensor once): the space of the Hessian."""
    seen: dict[int, torch.Tensor] = {}
    for m in net.modules():
        if isinstance(m, CHANNEL_LAYERS):
            seen.setdefault(id(m.weight), m.weight)
    return list(seen.values())


def grasp_scores(model: nn.Module, data: Iterable, layers: Sequence[str] | None = None, *,
                 temperature: float = 200.0, max_batches: int | None = None,
                 device: torch.device | str | None = None) -> Scores:
    """Per channel, the sum of ``w * (H g)`` over its weights (``-S`` of the reference).

    Pass 1 accumulates ``g = sum_b dL_b/dw`` (logits / T); pass 2, over the same batches, adds
    up the Hessian-vector products ``H_b g = d(g . dL_b/dw)/dw``. Gradients flow through the
    whole network; only conv/linear weights span the Hessian, as in the reference. The batches
    used are kept in memory between the two passes. ``nn.Hardsigmoid`` modules are replaced by
    an equal function with a double backward (on a copy), and attention runs on the math
    kernel; a functional op without a double backward raises torch's RuntimeError.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
        >>> grasp_scores(net, data, ["0"])["0"].shape
        (8,)
    """
    resolve_layers(model, layers)  # validate names before any copy
    net, dev = on_device(model, device, torch.float32)
    net = _twice_differentiable(net, is_user_model=net is model)
    mods = resolve_layers(net, layers)
    weights = _hvp_weights(net)
    held = list(batches(data, dev, max_batches, arity=input_arity(net)))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(call_model(net, x)) / temperature, y)

    # The math SDPA kernel: the fused CPU/flash kernels have no double backward.
    with eval_mode(net), requiring_grad(weights), torch.enable_grad(), \
            sdpa_kernel(SDPBackend.MATH):
        g = [torch.zeros_like(w) for w in weights]
        for x, y in held:
            for acc, gb in zip(g, torch.autograd.grad(loss_of(x, y), weights, allow_unused=True)):
                if gb is not None:
                    acc += gb
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in held:
            grad_f = torch.autograd.grad(loss_of(x, y), weights, create_graph=True,
                                         allow_unused=True)
            z = sum((gi * fi).sum() for gi, fi in zip(g, grad_f) if fi is not None)
            if not isinstance(z, torch.Tensor) or not z.requires_grad:
                continue  # the loss is (piecewise) linear in every weight: H g = 0
            for acc, h in zip(hg, torch.autograd.grad(z, weights, allow_unused=True)):
                if h is not None:
                    acc += h
    index = {id(w): i for i, w in enumerate(weights)}
    out = {name: per_channel(m.weight.detach() * hg[index[id(m.weight)]])
           for name, m in mods.items()}
    return check_finite("grasp", out)
