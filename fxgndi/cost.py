"""What a computation costs: seconds, and seconds in units of one plain forward pass."""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn as nn

from .runtime import device_of, eval_mode
from .streams import iter_batches


def forward_seconds(model: nn.Module, data: Iterable, *, max_batches: int | None = None,
                    repeat: int = 3) -> float:
    """Wall time of one plain eval-mode forward pass over ``data`` (the best of ``repeat``).

    The unit in which fxgndi states costs: ``seconds / forward_seconds`` is the number of
    forward-pass equivalents a method needs on the same data.

    Example:
        >>> forward_seconds(nn.Linear(2, 2), [torch.zeros(4, 2)]) > 0
        True
    """
    device = device_of(model)
    batches = [x for x, _ in iter_batches(data, device=device, max_batches=max_batches)]
    best = float("inf")
    with eval_mode(model), torch.no_grad():
        model(batches[0])  # warm-up: first-call allocations are not the model's cost
        for _ in range(repeat):
            start = time.perf_counter()
            for x in batches:
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best
