"""Streaming over data: batches from any loader, the example input of a run, and slices of
its batches (shards of a distributed run, the rest of a resumed one)."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from fxgndi.core.errors import DataError


def iter_batches(data: Iterable, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_batches: int | None = None,
                 need_labels: bool = False, why: str = "", allow_empty: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y)`` from a DataLoader or any iterable of ``(x, y)``, ``[x, y]`` or ``x``.

    ``y`` is None when the data has no labels; ``need_labels=True`` makes that an error whose
    message says ``why`` labels are needed. Floating inputs are cast to ``dtype`` when given;
    at most ``max_batches`` are read. An iterable that yields nothing raises DataError unless
    ``allow_empty`` (one rank's shard, or a resumed run that was already complete).

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
    if count == 0 and not allow_empty:
        raise DataError("the data yielded no batches (empty loader?): pass at least one batch")


def batch_count(data: Iterable, max_batches: int | None = None) -> int | None:
    """How many batches ``data`` will yield (at most ``max_batches``), for progress bars; None
    when it has no length.

    Example:
        >>> batch_count([1, 2, 3], max_batches=2), batch_count(iter([1]))
        (2, None)
    """
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


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


def example_input(data: Iterable, given: Any = None, device: torch.device | str = "cpu"
                  ) -> Any:
    """The input a model is traced and its cost counted on: ``given`` (a tensor or a tuple of
    tensors) moved to ``device``, else the first sample of ``data``.

    Example:
        >>> example_input([torch.zeros(8, 3)]).shape
        torch.Size([1, 3])
    """
    if given is None:
        return first_batch(iter_batches(data, device=torch.device(device)))[:1]
    if isinstance(given, torch.Tensor):
        return given.to(device)
    return type(given)(t.to(device) if isinstance(t, torch.Tensor) else t for t in given)


def batch_slice(data: Iterable, start: int = 0, stop: int | None = None,
                step: int = 1) -> Iterable:
    """The batches of ``data`` whose index ``i`` is in ``range(start, stop, step)``.

    This is how a rank takes its shard (``start=rank, step=world``) and how a resumed run
    skips what it has done. A DataLoader over a map-style dataset is rebuilt around a sliced
    batch sampler, so that skipped batches are never loaded; any other iterable is sliced as
    it is read. The result can be iterated more than once.

    Example:
        >>> list(batch_slice([torch.tensor(i) for i in range(5)], 1, None, 2))
        [tensor(1), tensor(3)]
    """
    if start == 0 and stop is None and step == 1:
        return data
    if (isinstance(data, DataLoader) and data.batch_sampler is not None
            and type(data).__init__ is DataLoader.__init__):
        return type(data)(data.dataset, batch_sampler=_SlicedSampler(data.batch_sampler, start,
                                                                     stop, step),
                          num_workers=data.num_workers, collate_fn=data.collate_fn,
                          pin_memory=data.pin_memory, timeout=data.timeout,
                          worker_init_fn=data.worker_init_fn,
                          multiprocessing_context=data.multiprocessing_context,
                          generator=data.generator, persistent_workers=data.persistent_workers,
                          prefetch_factor=data.prefetch_factor if data.num_workers else None)
    return _SlicedSampler(data, start, stop, step)


class _SlicedSampler:
    """Re-iterable ``itertools.islice`` of an iterable (a batch sampler, or the data itself)."""

    def __init__(self, source: Iterable, start: int, stop: int | None, step: int) -> None:
        self.source, self.start, self.stop, self.step = source, start, stop, step

    def __iter__(self) -> Iterator:
        return itertools.islice(self.source, self.start, self.stop, self.step)

    def __len__(self) -> int:
        stop = len(self.source) if self.stop is None else min(self.stop, len(self.source))
        return len(range(self.start, stop, self.step))
