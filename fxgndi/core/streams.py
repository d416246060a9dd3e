"""Streaming over data: batches from any loader, the example input of a run, and slices of
its batches (shards of a distributed run, the rest of a resumed one)."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from fxgndi.core.errors import DataError
from fxgndi.core.runtime import eval_mode


BATCH_RULE = ("a batch is the model's inputs, or (inputs, labels), or {'x': inputs, 'y': "
              "labels}; the inputs are a tensor, a tuple of tensors (forward's positional "
              "arguments) or a dict of tensors (its keyword arguments)")


class Inputs:
    """One batch's inputs to a model that takes several: forward's positional arguments (a
    tuple) or keyword arguments (a dict), the batch dim first in every tensor.

    It slices, moves and measures like the one input tensor of a single-input model
    (``x[:1]``, ``x.to(device)``, ``x.shape[0]``), so the code that feeds batches to a model
    handles both; :func:`call_model` feeds it to ``forward``.

    Example:
        >>> x = Inputs((torch.zeros(4, 3), torch.ones(4, 2)))
        >>> x[:1].shape, [t.shape for t in x[1:3].value]
        (torch.Size([1, 3]), [torch.Size([2, 3]), torch.Size([2, 2])])
    """

    def __init__(self, value: tuple | list | dict) -> None:
        tensors = list(value.values()) if isinstance(value, dict) else list(value)
        if not any(isinstance(t, torch.Tensor) for t in tensors):
            raise DataError(f"inputs of {type(value).__name__} hold no tensor: {BATCH_RULE}")
        self.value: tuple | dict = dict(value) if isinstance(value, dict) else tuple(value)
        first = next(t for t in tensors if isinstance(t, torch.Tensor))
        sizes = {t.shape[0] for t in tensors if isinstance(t, torch.Tensor) and t.dim()}
        if len(sizes) > 1:
            raise DataError(f"the inputs of one batch have different batch sizes {sorted(sizes)}"
                            ": every input tensor needs the batch dim first")
        self.shape, self.device = first.shape, first.device

    @property
    def args(self) -> tuple:
        return self.value if isinstance(self.value, tuple) else ()

    @property
    def kwargs(self) -> dict:
        return self.value if isinstance(self.value, dict) else {}

    def _map(self, fn: Any) -> Inputs:
        if isinstance(self.value, dict):
            return Inputs({k: fn(v) if isinstance(v, torch.Tensor) else v
                           for k, v in self.value.items()})
        return Inputs(tuple(fn(v) if isinstance(v, torch.Tensor) else v for v in self.value))

    def __getitem__(self, index: slice) -> Inputs:
        if not isinstance(index, slice):
            raise TypeError("Inputs are sliced along the batch dim only: x[lo:hi]")
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> Inputs:
        """Every tensor on ``device``; floating ones cast to ``dtype`` when given."""
        return self._map(lambda t: t.to(device=device,
                                        dtype=dtype if t.is_floating_point() else None))

    def is_floating_point(self) -> bool:
        return any(t.is_floating_point() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        values = self.value.values() if isinstance(self.value, dict) else self.value
        return [t for t in values if isinstance(t, torch.Tensor)]

    def __repr__(self) -> str:
        return f"Inputs({self.value!r})"


def as_inputs(value: Any) -> Any:
    """A tensor as it is; a tuple / list (positional arguments) or a dict (keyword arguments)
    as :class:`Inputs`.

    Example:
        >>> as_inputs({"a": torch.zeros(2, 1)}).kwargs["a"].shape
        torch.Size([2, 1])
    """
    if isinstance(value, (Inputs, torch.Tensor)):
        return value
    if isinstance(value, (tuple, list, dict)):
        return Inputs(value)
    raise DataError(f"cannot read inputs of type {type(value).__name__}: {BATCH_RULE}")


def raw_inputs(x: Any) -> Any:
    """What torch-pruning and tracing take as ``example_inputs``: the tensor, the tuple of
    positional inputs or the dict of keyword inputs.

    Example:
        >>> raw_inputs(Inputs([torch.zeros(1)]))
        (tensor([0.]),)
    """
    return x.value if isinstance(x, Inputs) else x


def call_model(model: Any, x: Any, **kwargs: Any) -> Any:
    """``model(x)`` for one input tensor, ``model(*args)`` / ``model(**kwargs)`` for
    :class:`Inputs` (and for a raw tuple or dict of inputs).

    Example:
        >>> call_model(lambda a, b: a + b, Inputs((torch.ones(1), torch.ones(1))))
        tensor([2.])
    """
    x = as_inputs(x)
    if isinstance(x, Inputs):
        return model(*x.args, **x.kwargs, **kwargs)
    return model(x, **kwargs)


def call_hooked(model: nn.Module, x: Any, hooks: Mapping[nn.Module, Callable[..., Any]]
                ) -> Any:
    """``model(x)`` once, in eval mode and without gradients, with each module of ``hooks``
    carrying its forward hook for that call only (removed after it, also on an error).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> seen = []
        >>> _ = call_hooked(net, torch.zeros(2, 4), {net[0]: lambda m, a, out: seen.append(out)})
        >>> seen[0].shape
        torch.Size([2, 3])
    """
    with contextlib.ExitStack() as stack:
        for module, hook in hooks.items():
            stack.enter_context(module.register_forward_hook(hook))
        with eval_mode(model), torch.no_grad():
            return call_model(model, x)


def input_arity(model: Any) -> int:
    """How many positional inputs ``model``'s forward requires (at least 1): parameters
    without a default, before any ``*args``. An object with an ``arity`` attribute (an
    InterventionGraph) says it itself.

    Example:
        >>> class Two(torch.nn.Module):
        ...     def forward(self, a, b, flag=False): return a + b
        >>> input_arity(Two()), input_arity(torch.nn.Linear(2, 2))
        (2, 1)
    """
    given = getattr(model, "arity", None)
    if isinstance(given, int):
        return given
    try:
        params = inspect.signature(model.forward if isinstance(model, torch.nn.Module)
                                   else model).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(1 for p in params if p.kind in kinds and p.default is p.empty))


def split_batch(item: Any, arity: int = 1) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of one batch, by the one rule fxgndi reads batches with
    (``BATCH_RULE``): a tensor is the inputs (no labels); a dict is ``{"x": inputs, "y":
    labels}``; a tuple / list is ``(inputs, labels, ...)``, except that for a model with
    ``arity`` > 1 positional inputs a tuple of exactly that many tensors is the inputs
    themselves. Inputs that are a tuple or dict come back as :class:`Inputs`.

    A flat tuple of more tensors than a multi-input model takes is ambiguous (are the last
    ones labels?) and raises DataError naming the fix: ``((x1, x2), y)``.

    Example:
        >>> x, y = split_batch((torch.zeros(2, 3), torch.ones(2, 5)), arity=2)
        >>> type(x).__name__, y
        ('Inputs', None)
        >>> x, y = split_batch(((torch.zeros(2, 3), torch.ones(2, 5)), torch.tensor([0, 1])))
        >>> [t.shape[1] for t in x.value], y.tolist()
        ([3, 5], [0, 1])
    """
    if isinstance(item, (torch.Tensor, Inputs)):
        return item, None
    if isinstance(item, dict):
        if "x" not in item:
            raise DataError(f"cannot read a dict batch with keys {sorted(map(str, item))}: "
                            f"{BATCH_RULE}; pass keyword inputs as {{'x': {{...}}, 'y': labels}}"
                            " or ({...}, labels)")
        return as_inputs(item["x"]), _labels(item.get("y"))
    if isinstance(item, (tuple, list)) and item:
        flat = all(isinstance(t, torch.Tensor) for t in item)
        if arity > 1 and flat:
            if len(item) == arity:
                return Inputs(item), None
            raise DataError(f"a batch of {len(item)} tensors for a model with {arity} "
                            f"positional inputs is ambiguous: {BATCH_RULE}; pass "
                            f"((x1, ..., x{arity}), labels)")
        if isinstance(item[0], (torch.Tensor, Inputs, tuple, list, dict)):
            return as_inputs(item[0]), _labels(item[1] if len(item) > 1 else None)
    raise DataError(f"cannot read a batch of type {type(item).__name__}: {BATCH_RULE}")


def _labels(y: Any) -> torch.Tensor | None:
    return y if isinstance(y, torch.Tensor) else None


def iter_batches(data: Iterable, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, max_batches: int | None = None,
                 need_labels: bool = False, why: str = "", allow_empty: bool = False,
                 arity: int = 1) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Yield ``(x, y)`` from a DataLoader or any iterable of batches, read by
    :func:`split_batch` (``BATCH_RULE``; ``arity``: the model's positional inputs,
    :func:`input_arity`): ``x`` is a tensor, or :class:`Inputs` for several inputs.

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
    if isinstance(data, (torch.Tensor, Inputs)):
        raise DataError(f"the data is one {type(data).__name__}, not an iterable of batches "
                        "(iterating it would read each sample as a batch): pass [x], [(x, y)] "
                        "or a DataLoader")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be >= 1 or None, not {max_batches}")
    count = 0
    for item in data:
        if max_batches is not None and count >= max_batches:
            break
        x, y = split_batch(item, arity)
        if need_labels and y is None:
            raise DataError(f"{why or 'this computation'} needs labels, but the data yields "
                            "inputs only: pass batches of (inputs, y)")
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


def first_batch(data: Iterable, arity: int = 1) -> Any:
    """The inputs of the first batch of ``data`` (a tensor, or :class:`Inputs`).

    Example:
        >>> first_batch([(torch.ones(1, 2), torch.zeros(1))]).shape
        torch.Size([1, 2])
    """
    for x, _ in iter_batches(data, arity=arity):
        return x
    raise AssertionError("unreachable: iter_batches raises on empty data")


def example_input(data: Iterable, given: Any = None, device: torch.device | str = "cpu",
                  arity: int = 1) -> Any:
    """The input a model is traced and its cost counted on: ``given`` (a tensor, a tuple of
    positional or a dict of keyword inputs) moved to ``device``, else the first sample of
    ``data`` (a tuple or dict for several inputs: :func:`raw_inputs`).

    Example:
        >>> example_input([torch.zeros(8, 3)]).shape
        torch.Size([1, 3])
    """
    if given is None:
        return raw_inputs(first_batch(iter_batches(data, device=torch.device(device),
                                                   arity=arity))[:1])
    if isinstance(given, torch.Tensor):
        return given.to(device)
    if isinstance(given, dict):
        return {k: t.to(device) if isinstance(t, torch.Tensor) else t for k, t in given.items()}
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
