"""Where and how a model runs: eval mode without losing flags, devices, safe copies."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Example:
        >>> m = nn.Sequential(nn.Dropout()).train()
        >>> with eval_mode(m): m.training
        False
        >>> m.training
        True
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def device_of(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (or buffer); CPU when it has none.

    Example:
        >>> device_of(nn.Linear(2, 2))
        device(type='cpu')
    """
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def on_device(model: nn.Module, device: torch.device | str | None,
              dtype: torch.dtype | None = None) -> tuple[nn.Module, torch.device]:
    """``(model, device)``: the model itself when it already lives on ``device`` (in ``dtype``),
    else a deep copy moved there: the user's model is never moved or cast.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> on_device(net, None)[0] is net
        True
    """
    dev = torch.device(device) if device is not None else device_of(model)
    tensors = list(model.parameters()) + list(model.buffers())
    same = all(t.device == dev and (dtype is None or not t.is_floating_point()
                                    or t.dtype == dtype) for t in tensors)
    if same:
        return model, dev
    return copy.deepcopy(model).to(device=dev, dtype=dtype), dev


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op torch threads, then restore the caller's setting
    (None: leave it as it is).

    Example:
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1): torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
