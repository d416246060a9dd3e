"""Tied parameters (one ``nn.Parameter`` held by several layers, ``c.weight = b.weight``) kept
tied through width pruning.

torch-pruning's dependency graph follows the data flow only, so it would prune each holder of a
tied weight on its own, replace each one's parameter by a new one, and untie them. Here every
dimension of a tied parameter couples the channels its holders prune along it (for a tied
linear weight: ``b``'s outputs with ``c``'s outputs, ``b``'s inputs with ``c``'s inputs), so
that one torch-pruning group removes the same channels from all holders, and after each group
is removed the holders get back one shared parameter.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    >>> net[2].weight = net[0].weight
    >>> [[name for name, _, _ in holders] for holders in Ties(net).sets]
    [['0', '2']]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fxgndi.core.errors import FxgndiError
from fxgndi.core.layers import BATCHNORMS, CONVS, is_layer, tied_parameters
from fxgndi.pruning._tp import couple

_OUT, _IN = True, False  # what ``couple`` calls output and input channels


def channel_dims(module: nn.Module, attr: str) -> dict[int, bool] | None:
    """Which channels each dim of ``module``'s parameter ``attr`` indexes (``True``: output
    channels, ``False``: input channels), for the layers whose ties fxgndi keeps: linear,
    conv and transposed conv with ``groups=1``, BatchNorm. None for any other.

    Example:
        >>> channel_dims(nn.Linear(3, 5), "weight"), channel_dims(nn.Linear(3, 5), "bias")
        ({0: True, 1: False}, {0: True})
        >>> channel_dims(nn.ConvTranspose2d(3, 5, 1), "weight")
        {0: False, 1: True}
    """
    if isinstance(module, CONVS) and module.groups != 1:
        return None
    if attr == "bias" and isinstance(module, (nn.Linear, *CONVS, *BATCHNORMS)):
        return {0: _OUT}
    if attr != "weight":
        return None
    if isinstance(module, BATCHNORMS):
        return {0: _OUT}
    if isinstance(module, nn.Linear):
        return {0: _OUT, 1: _IN}
    if isinstance(module, CONVS):
        return {0: _IN, 1: _OUT} if module.transposed else {0: _OUT, 1: _IN}
    return None


class Ties:
    """The tied parameters of ``model``, each as its holders ``(module name, module,
    attribute)``; raises FxgndiError, before any work, for a tie fxgndi cannot keep (see
    :func:`channel_dims`), and for a tied conv / linear bias when ``compensate`` is on (each
    holder's bias would need its own correction).

    Example:
        >>> Ties(nn.Linear(2, 2)).sets
        []
    """

    def __init__(self, model: nn.Module, *, compensate: bool = False) -> None:
        self.sets: list[list[tuple[str, nn.Module, str]]] = []
        for holders in tied_parameters(model):
            held = [(name, model.get_submodule(name), attr) for name, attr in holders]
            unsupported = [f"{_label(name, attr)} ({type(m).__name__})"
                           for name, m, attr in held if channel_dims(m, attr) is None]
            if unsupported:
                (n0, a0), (n1, a1) = holders[0], holders[-1]
                raise FxgndiError(
                    f"{' and '.join(repr(_label(n, a)) for n, a in holders)} are one tied "
                    "parameter, and fxgndi keeps ties only between linear, conv (groups=1) and "
                    f"BatchNorm layers, not {', '.join(unsupported)}. Fix: untie them before "
                    f"pruning (e.g. model.{_label(n1, a1)} = "
                    f"nn.Parameter(model.{_label(n0, a0)}.detach().clone()))")
            biases = [_label(n, a) for n, m, a in held if a == "bias" and is_layer(m)]
            if compensate and biases:
                raise FxgndiError(
                    f"{' and '.join(repr(_label(n, a)) for n, a in holders)} are one tied "
                    f"parameter, and compensate would fold a different correction into each "
                    f"holder of the tied bias {biases[0]!r}. Fix: untie the biases, or "
                    "prune with repair={'compensate': False}")
            self.sets.append(held)

    def couple(self, dg: Any) -> None:
        """Couple, in torch-pruning's dependency graph ``dg``, the channels each dim of every
        tied parameter indexes in its holders."""
        for (name0, first, attr0), *others in self.sets:
            for dim, outputs in channel_dims(first, attr0).items():  # type: ignore[union-attr]
                for name, other, attr in others:
                    try:
                        couple(dg, first, outputs, other, channel_dims(other, attr)[dim])
                    except ValueError as exc:
                        raise FxgndiError(
                            f"{_label(name0, attr0)!r} and {_label(name, attr)!r} are one "
                            f"tied parameter, but {exc}, so torch-pruning cannot keep them "
                            "tied. Fix: untie them before pruning") from exc

    def retie(self) -> None:
        """Give the holders of each tied parameter back one shared parameter, after pruning
        (which replaced each holder's parameter by an equal, pruned copy)."""
        for (name0, first, attr0), *others in self.sets:
            kept = getattr(first, attr0)
            for name, other, attr in others:
                mine = getattr(other, attr)
                if mine is kept:
                    continue
                if mine.shape != kept.shape or not torch.equal(mine, kept):
                    raise FxgndiError(
                        f"pruning left the tied {_label(name0, attr0)!r} {tuple(kept.shape)} "
                        f"and {_label(name, attr)!r} {tuple(mine.shape)} different "
                        "(torch-pruning pruned them apart). Fix: untie them before pruning")
                setattr(other, attr, kept)


def _label(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr
