"""What fxgndi calls a *layer*: a conv or linear module, whose weights read input channels and
write output channels. One definition for sites, criteria, pruning, repair and the graph
analyses."""

from __future__ import annotations

import torch.nn as nn

LAYERS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
CONVS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
BATCHNORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
NORMS: tuple[type[nn.Module], ...] = (*BATCHNORMS, nn.LayerNorm, nn.GroupNorm)


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a conv or linear layer.

    Example:
        >>> is_layer(nn.Conv2d(1, 2, 3)), is_layer(nn.ReLU())
        (True, False)
    """
    return isinstance(module, LAYERS)


def out_width(module: nn.Module) -> int:
    """Output channels of a conv, features of a linear layer, channels of a norm (BatchNorm,
    GroupNorm, the last dim of a LayerNorm).

    Example:
        >>> out_width(nn.Linear(3, 5)), out_width(nn.BatchNorm2d(7)), out_width(nn.LayerNorm(4))
        (5, 7, 4)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, CONVS):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return module.num_features


def in_width(module: nn.Module) -> int:
    """Input channels of a conv, input features of a linear layer.

    Example:
        >>> in_width(nn.Linear(3, 5)), in_width(nn.Conv2d(2, 4, 1))
        (3, 2)
    """
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def input_channel_dim(module: nn.Module) -> int:
    """The dim of a layer's input that holds channels: 1 for convs (NCHW), -1 for linear
    layers (features last).

    Example:
        >>> input_channel_dim(nn.Conv2d(1, 2, 3)), input_channel_dim(nn.Linear(2, 2))
        (1, -1)
    """
    return 1 if isinstance(module, CONVS) else -1


def tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """The parameters that several modules hold (tied weights, ``c.weight = b.weight``): per
    parameter, the ``(module name, attribute)`` of each holder, in module order. A module
    called twice is one holder, not a tie.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> net[2].weight = net[0].weight
        >>> tied_parameters(net)
        [[('0', 'weight'), ('2', 'weight')]]
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append((name, attr))
    return [h for h in holders.values() if len(h) > 1]
