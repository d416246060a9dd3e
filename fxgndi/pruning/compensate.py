"""Compensation: fold removed channels' mean inputs into their consumers' biases.

After pruning, a consumer reads 0 where a removed channel was; folding that channel's mean
input through the consumer's weights into its bias makes the applied intervention
``do(read_c := E[read_c])`` instead (exact for linear layers and for convs where zero padding
does not reach, padding-aware otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from fxgndi.core.errors import FxgndiError
from fxgndi.core.layers import CONVS, LAYERS, input_channel_dim
from fxgndi.core.moments import RunningMean
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import call_model, input_arity, iter_batches
from fxgndi.pruning._tp import consumer_items


@dataclass
class InputMean:
    """The mean input of a conv (per channel) or linear layer (per feature) over the data.

    ``size`` is the spatial size of a conv's input (``()`` for a linear layer): where zero
    padding reaches, a constant input channel does not add a constant to the output.

    Example:
        >>> InputMean(torch.zeros(3), (8, 8)).values.shape
        torch.Size([3])
    """

    values: torch.Tensor
    size: tuple[int, ...] = ()


def compensate_group(group: Any, means: dict[nn.Module, InputMean]) -> None:
    """Fold the mean input of each removed channel into its consumers' biases, then drop those
    channels from ``means`` (kept aligned with each consumer's remaining inputs).

    Call it just before ``group.prune()``, with means taken before the pruning step.

    Example:
        >>> compensate_group(group, consumer_input_means(model, data))  # doctest: +SKIP
    """
    for layer, idxs, _ in consumer_items(group):
        if not isinstance(layer, LAYERS):
            raise FxgndiError(f"compensate folds into conv and linear layers, but {layer} "
                              "reads pruned channels: use compensate=False")
        stats = means.get(layer)
        if stats is None or not idxs:  # a layer the data never reached
            continue
        index = torch.tensor(idxs, dtype=torch.long, device=stats.values.device)
        fold_into_bias(layer, index, stats.values.index_select(0, index), stats.size)
        keep = torch.ones(stats.values.numel(), dtype=torch.bool, device=index.device)
        keep[index] = False
        stats.values = stats.values[keep]


def fold_into_bias(layer: nn.Module, channels: torch.Tensor, values: torch.Tensor,
                   size: Sequence[int] | None = None) -> None:
    """Add to ``layer``'s bias what its input ``channels`` contribute when they hold ``values``.

    Linear: ``W[:, c] @ v``, exact. Conv: the layer is run on an input of spatial ``size`` that
    is ``v`` in those channels and 0 elsewhere, and the spatial mean of its output is folded:
    exact where that output is constant (1x1 kernels, no zero padding), the best constant
    otherwise (zero padding makes the borders see less of ``v``). Without ``size``, the
    contribution away from the borders (the kernel's sum).

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> fold_into_bias(lin, torch.tensor([1]), torch.tensor([3.0]))
        >>> torch.allclose(lin.bias, 3 * lin.weight[:, 1])
        True
    """
    weight = layer.weight.detach()
    values = values.to(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, nn.Linear):
        shift = weight[:, channels] @ values
    elif isinstance(layer, CONVS) and not layer.transposed:
        if size:
            x = weight.new_zeros(1, layer.in_channels, *size)
            x[0, channels] = values.view(-1, *[1] * len(size))
            with torch.no_grad():
                out = layer._conv_forward(x, weight, None)
            shift = out.flatten(2).mean(-1)[0]
        else:
            per_in, per_out = weight.shape[1], layer.out_channels // layer.groups
            spatial = weight.flatten(2).sum(-1)  # [out, in / groups]
            shift = weight.new_zeros(layer.out_channels)
            for c, v in zip(channels.tolist(), values):
                outs = slice(c // per_in * per_out, (c // per_in + 1) * per_out)
                shift[outs] += spatial[outs, c % per_in] * v
    else:
        raise FxgndiError(f"compensate folds into conv and linear layers, not {layer}: use "
                          "compensate=False for models whose pruned channels feed it")
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift))
    with torch.no_grad():
        layer.bias.add_(shift)


def consumer_input_means(model: nn.Module, data: Iterable, *, max_batches: int | None = None
                         ) -> dict[nn.Module, InputMean]:
    """Mean input of every conv (per channel) and linear layer (per feature) over ``data``.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> consumer_input_means(lin, [torch.tensor([[1.0, 3.0]])])[lin].values
        tensor([1., 3.])
    """
    means: dict[nn.Module, RunningMean] = {}
    sizes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(layer, args):
        h = args[0]
        means.setdefault(layer, RunningMean(input_channel_dim(layer))).update(h)
        sizes.setdefault(layer, tuple(h.shape[2:]) if isinstance(layer, CONVS) else ())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, LAYERS)]
    try:
        with eval_mode(model), torch.no_grad():
            for x, _ in iter_batches(data, device=device_of(model), max_batches=max_batches,
                                     arity=input_arity(model)):
                call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return {m: InputMean(mean.value.flatten().to(m.weight.dtype), sizes[m])
            for m, mean in means.items()}
