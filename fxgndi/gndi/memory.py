"""The memory plan of one step: how many samples and vmapped copies fit ``max_memory``."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def plan_step(trial: Callable[[torch.Tensor, torch.Tensor | None, int], Any],
              x: torch.Tensor, y: torch.Tensor | None, copies: int, budget: int | None,
              chunk_size: int | None, cost: dict[str, int]) -> tuple[int, int | None]:
    """``(samples per piece, vmap chunk)`` that keep one step within ``budget`` bytes.

    ``trial(x, y, n)`` runs the step on ``n`` vmapped copies only. Memory on ``b`` samples
    with a chunk of ``c`` copies is bounded by ``b * (single + (c - 1) * per_copy)``: ``single``
    and ``single + per_copy`` are measured on one sample by :func:`created_bytes` (every tensor
    the step creates, counted as if none were freed: an upper bound) with one and with two
    copies (one copy runs without vmap in reverse mode, and costs less than the slope says).
    ``copies`` caps the chunk (outputs for reverse mode, units for forward mode and
    ablations); ``cost`` caches the measurement (one per input shape and mode).
    """
    if budget is None:
        return x.shape[0], chunk_size
    if not cost:
        one = x[:1], None if y is None else y[:1]
        single = created_bytes(lambda: trial(*one, 1))
        per_copy = created_bytes(lambda: trial(*one, 2)) - single if copies > 1 else single
        cost["single"], cost["per_copy"] = max(single, 1), max(per_copy, 1)
    single, per_copy = cost["single"], cost["per_copy"]
    piece = min(x.shape[0], budget // single)
    if piece < 1:
        raise ValueError(f"max_memory={budget / 2 ** 20:.0f} MiB is below the "
                         f"{single / 2 ** 20:.1f} MiB that one sample needs for "
                         f"inputs of shape {tuple(x.shape[1:])}: raise max_memory or use "
                         "smaller inputs")
    fit = 1 + max(0, (budget // piece - single) // per_copy)
    return piece, int(min(fit, copies, chunk_size or fit))


def created_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of all the tensors that ``fn()`` creates (views and in-place results excluded).

    An upper bound of its peak tensor memory: frees are not subtracted.

    Example:
        >>> created_bytes(lambda: torch.zeros(4, 8).add(1).relu_())
        256
    """
    counter = _ByteCounter()
    with counter:
        fn()
    return counter.total


class _ByteCounter(TorchDispatchMode):
    """Sums the bytes of every tensor an aten operation returns (views and in-place ops
    return no new memory and are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        aliasing = any(r.alias_info is not None for r in schema.returns)
        if not aliasing:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
        return out


def memory_meta(budget: int | None, plan: dict[str, Any]) -> dict[str, Any]:
    """``max_memory`` and the split it chose (of the last batch), for Scores.meta."""
    return {} if budget is None else {"max_memory": budget, **plan}


def pieces(x: torch.Tensor, y: torch.Tensor | None, piece: int
           ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(offset, x, y)`` slices of at most ``piece`` samples."""
    for lo in range(0, x.shape[0], piece):
        yield lo, x[lo:lo + piece], None if y is None else y[lo:lo + piece]
