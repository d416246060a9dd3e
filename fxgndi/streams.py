"""Streaming over data: batches from any loader, running means with standard errors."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch

from .errors import DataError


def iter_batches(data: Iterable, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_batches: int | None = None,
                 need_labels: bool = False, why: str = ""
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` from a DataLoader or any iterable of ``(x, y)``, ``[x, y]`` or ``x``.

    ``y`` is None when the data has no labels; ``need_labels=True`` makes that an error whose
    message says ``why`` labels are needed. Floating inputs are cast to ``dtype`` when given;
    at most ``max_batches`` are read. An iterable that yields nothing raises DataError.

    Example:
        >>> [x.shape for x, y in iter_batches([torch.zeros(2, 3)])]
        [torch.Size([2, 3])]
    """
    if data is None:
        raise DataError(f"{why or 'this computation'} needs data: pass an iterable of (x, y)")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be >= 1 or None, not {max_batches}")
    count = 0
    for item in data:
        if max_batches is not None and count >= max_batches:
            break
        if isinstance(item, torch.Tensor):
            x, y = item, None
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
            x = item[0]
            y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        elif isinstance(item, dict) and "x" in item:
            x, y = item["x"], item.get("y")
        else:
            raise DataError(f"cannot read a batch of type {type(item).__name__}: yield tensors "
                            "x, or tuples (x, y) of tensors")
        if need_labels and y is None:
            raise DataError(f"{why or 'this computation'} needs labels, but the data yields "
                            "inputs only: pass batches of (x, y)")
        if device is not None or (dtype is not None and x.is_floating_point()):
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
            y = y.to(device) if y is not None else None
        count += 1
        yield x, y
    if count == 0:
        raise DataError("the data yielded no batches (empty loader?): pass at least one batch")


def require_reiterable(data: Iterable) -> Iterable:
    """Return ``data``, or raise DataError if it is a one-shot iterator (a generator).

    fxgndi reads the data more than once (shapes, calibration, then scoring); a generator
    would silently lose its first batches.

    Example:
        >>> require_reiterable([torch.zeros(1)])
        [tensor([0.])]
    """
    if iter(data) is data:
        raise DataError("the data is a one-shot iterator (a generator?), but it is read more "
                        "than once: pass a list of batches or a DataLoader")
    return data


def first_batch(data: Iterable) -> torch.Tensor:
    """The input tensor of the first batch of ``data``.

    Example:
        >>> first_batch([(torch.ones(1, 2), torch.zeros(1))]).shape
        torch.Size([1, 2])
    """
    for x, _ in iter_batches(data):
        return x
    raise AssertionError("unreachable: iter_batches raises on empty data")


class RunningMoments:
    """Streaming per-entry mean and standard error of per-sample values, in float64.

    Feed ``[B, ...]`` tensors of per-sample values; read ``mean``, ``stderr`` and ``count``.

    Example:
        >>> m = RunningMoments(); m.update(torch.tensor([1.0, 3.0])); float(m.mean)
        2.0
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().to(torch.float64)
        s, sq = v.sum(0), (v * v).sum(0)
        if self.total is None:
            self.total, self.total_sq = s, sq
        else:
            self.total, self.total_sq = self.total + s, self.total_sq + sq
        self.count += v.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise DataError("no samples were seen")
        return self.total / self.count

    @property
    def stderr(self) -> torch.Tensor:
        mean = self.mean
        if self.count < 2:
            return torch.full_like(mean, math.nan)
        var = (self.total_sq - self.count * mean * mean).clamp_min(0) / (self.count - 1)
        return (var / self.count).sqrt()

    def state(self) -> dict[str, Any]:
        return {"total": self.total, "total_sq": self.total_sq, "count": self.count}
