"""What a model and a computation cost: MACs and parameters, and seconds of one plain forward
pass (the unit in which fxgndi states costs, and the latency a depth target measures)."""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import call_model, input_arity, iter_batches


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
    batches = [x for x, _ in iter_batches(data, device=device, max_batches=max_batches,
                                          arity=input_arity(model))]
    best = float("inf")
    with eval_mode(model), torch.no_grad():
        call_model(model, batches[0])  # warm-up: first-call allocations are not its cost
        for _ in range(repeat):
            start = time.perf_counter()
            for x in batches:
                call_model(model, x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
                      ) -> tuple[float, float]:
    """``(MACs, parameters)`` of one eval-mode forward pass, by torch-pruning's counter.

    Example:
        >>> count_macs_params(nn.Linear(3, 2), torch.zeros(1, 3))
        (8.0, 8)
    """
    import torch_pruning as tp  # its public counter; imported here to keep start-up light

    with eval_mode(model), torch.no_grad():
        return tp.utils.count_ops_and_params(model, example_inputs)
