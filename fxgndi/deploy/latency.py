"""Latency on the runtime a model ships on: one measurement for every latency target.

:class:`Latency` says how to time (runtime, batch size, threads, repetitions);
:meth:`Latency.seconds` times a model on it: eagerly, as a ``torch.export`` program (``pt2``) or
on onnxruntime (``onnx``), the last two exported (and checked) to a temporary file first.
:meth:`Latency.compare` times a model against a reference in alternation and gives the median
of the per-round ratios: on a shared machine the speed drifts by tens of percent between
measurements taken seconds apart, and a ratio of two separate medians inherits that drift,
while back-to-back calls see nearly the same machine. ``fxgndi.prune(..., target=Latency(...))``
and ``fxgndi.prune_depth(..., target="latency")`` meet their targets on that ratio.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn

from fxgndi.core.checks import check_choice
from fxgndi.core.heap import page_faults, steady_heap as kept_heap
from fxgndi.core.names import LATENCY_RUNTIMES
from fxgndi.core.runtime import device_of, eval_mode, torch_threads
from fxgndi.core.streams import call_model

RUNTIMES = LATENCY_RUNTIMES
READINGS = 3  # a latency reading near its target is taken this often in all; the median decides
# Under a steady heap, more untimed rounds until one page-faults less than STEADY_FAULTS pages
# (4 MiB), at most STEADY_ROUNDS: the heap takes a few rounds to settle (glibc 2.36 places a
# 64-byte-aligned block past a freed one of the same size until freed neighbours coalesce:
# a 64 MiB block was faulted in anew on each of the first 1-5 calls, then never).
STEADY_ROUNDS = 8
STEADY_FAULTS = 1024


@dataclass(frozen=True)
class Latency:
    """How a latency is measured.

    Attributes:
        runtime: ``"eager"`` (the module itself), ``"pt2"`` (``torch.export``) or ``"onnx"``
            (onnxruntime, CPU).
        batch_size: the batch the model is timed on (the example input repeated).
        threads: torch / onnxruntime intra-op threads while timing (None: as they are).
        repeat, warmup: timed and untimed calls; the median of the timed ones is reported.
        steady_heap: time with freed memory kept in the C heap for reuse
            (:mod:`fxgndi.core.heap`; onnxruntime keeps its own arena either way): readings
            that do not depend on the process's history. False: page faults of fresh large
            tensors included, as a process with glibc's default settings pays them.

    Example:
        >>> Latency(runtime="eager", repeat=3).seconds(nn.Linear(4, 2), torch.zeros(1, 4)) > 0
        True
    """

    runtime: str = "eager"
    batch_size: int = 1
    threads: int | None = None
    repeat: int = 5
    warmup: int = 1
    steady_heap: bool = True

    def __post_init__(self) -> None:
        check_choice("runtime", self.runtime, RUNTIMES)
        if self.batch_size < 1 or self.repeat < 1 or self.warmup < 0:
            raise ValueError("Latency needs batch_size >= 1, repeat >= 1 and warmup >= 0")

    def seconds(self, model: nn.Module, example_inputs: Any) -> float:
        """Median seconds of one call of ``model`` (on this runtime) on a batch of
        ``batch_size`` made from ``example_inputs``."""
        return statistics.median(self.times([model], example_inputs)[0])

    def compare(self, model: nn.Module, reference: nn.Module, example_inputs: Any
                ) -> Comparison:
        """``model`` against ``reference``, timed in alternation: both medians and the median
        of the per-round ratios ``model / reference`` (what latency targets are met on).

        Example:
            >>> net = nn.Linear(64, 64)
            >>> c = Latency(repeat=3).compare(net, net, torch.zeros(1, 64))
            >>> 0.2 < c.ratio < 5 and c.before > 0 and c.after > 0
            True
        """
        before, after = self.times([reference, model], example_inputs)
        return Comparison(before=statistics.median(before), after=statistics.median(after),
                          ratio=statistics.median(a / b for a, b in zip(after, before)))

    def ratio(self, model: nn.Module, reference: nn.Module, example_inputs: Any) -> float:
        """``model``'s latency over ``reference``'s (see :meth:`compare`).

        Example:
            >>> Latency(repeat=3).ratio(nn.Identity(), nn.Linear(256, 256),
            ...                         torch.zeros(1, 256)) < 1
            True
        """
        return self.compare(model, reference, example_inputs).ratio

    def times(self, models: Sequence[nn.Module], example_inputs: Any) -> list[list[float]]:
        """Seconds of each of ``repeat`` calls of every model (after ``warmup`` untimed calls
        of each), the models called in turn, round after round, the order reversed every other
        round so that neither always follows the other. The one clock every latency reading
        comes from (a stand-in clock in tests replaces this method).

        Example:
            >>> [len(t) for t in Latency(repeat=2).times([nn.Identity()] * 2, torch.zeros(1))]
            [2, 2]
        """
        inputs = repeat_batch(example_inputs, self.batch_size)
        with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
            for model in models:
                stack.enter_context(eval_mode(model))
            runs = [self._runner(model, inputs, os.path.join(folder, f"model{i}"))
                    for i, model in enumerate(models)]
            return interleaved_seconds([lambda run=run: call_model(run, inputs) for run in runs],
                                       repeat=self.repeat, warmup=self.warmup,
                                       threads=self.threads, device=device_of(models[0]),
                                       steady_heap=self.steady_heap)

    def _runner(self, model: nn.Module, inputs: Any, stem: str) -> Callable[..., Any]:
        if self.runtime == "eager":
            return model
        from fxgndi.deploy.export import export, load
        path = f"{stem}.{self.runtime}"
        export(model, path, example_inputs=inputs)
        return load(path, threads=self.threads)


class Comparison(NamedTuple):
    """A model timed against a reference (:meth:`Latency.compare`): the reference's and the
    model's median seconds, and the median of the per-round ratios model / reference."""

    before: float
    after: float
    ratio: float


def latency_target(target: Any) -> tuple[Any, Latency | None]:
    """A pruning ``target`` as (its name, the :class:`Latency` it is measured with or None):
    ``"latency"`` is eager at batch 1, a :class:`Latency` says how; other targets pass through.

    Example:
        >>> latency_target("latency") == ("latency", Latency()), latency_target("macs")
        (True, ('macs', None))
    """
    if isinstance(target, Latency):
        return "latency", target
    if target == "latency":
        return "latency", Latency()
    return target, None


def confirmed(measure: Callable[[Any], float], target: float, *, near: float,
              readings: int = READINGS) -> Callable[[Any], float]:
    """``measure`` for a noisy reading (a latency reduction): a reading within ``near`` of
    ``target`` is taken ``readings`` times in all and their median is the result, so that a
    search neither accepts one lucky reading nor goes the wrong way on one unlucky one; readings
    far from the target decide alone. (Six paired readings of one pruned resnet18 against dense,
    batch 32, spread by 0.09 of the dense latency at 3 rounds each, 0.03 at 5, 0.02 at 11.)

    Example:
        >>> readings = iter([0.52, 0.40, 0.44])
        >>> confirmed(lambda m: next(readings), 0.5, near=0.1)(None)  # median of three
        0.44
    """
    def confirmed_measure(model: Any) -> float:
        first = measure(model)
        if abs(first - target) > near:
            return first
        return statistics.median([first, *(measure(model) for _ in range(readings - 1))])
    return confirmed_measure


def median_seconds(call: Callable[[], Any], *, repeat: int = 5, warmup: int = 1,
                   threads: int | None = None, device: torch.device | None = None,
                   steady_heap: bool = True) -> float:
    """Median wall time of ``call()`` over ``repeat`` timed calls after ``warmup`` untimed ones,
    as :func:`interleaved_seconds` times them.

    Example:
        >>> median_seconds(lambda: time.sleep(0.01), repeat=3) >= 0.01
        True
    """
    (times,) = interleaved_seconds([call], repeat=repeat, warmup=warmup, threads=threads,
                                   device=device, steady_heap=steady_heap)
    return statistics.median(times)


def interleaved_seconds(calls: Sequence[Callable[[], Any]], *, repeat: int = 5,
                        warmup: int = 1, threads: int | None = None,
                        device: torch.device | None = None,
                        steady_heap: bool = True) -> list[list[float]]:
    """Wall times of ``repeat`` rounds in which every call runs once (the order reversed every
    other round), after ``warmup`` untimed rounds; under ``torch.inference_mode``, CUDA
    synchronised around each call, and (``steady_heap``, on CPU) with freed memory kept for
    reuse (:func:`fxgndi.core.heap.steady_heap`; then, after the warm-up, untimed rounds
    until one barely page-faults: at most ``STEADY_ROUNDS``).

    Example:
        >>> fast, slow = interleaved_seconds([lambda: None, lambda: time.sleep(0.01)], repeat=2)
        >>> max(fast) < 0.01 <= min(slow)
        True
    """
    cuda = device is not None and device.type == "cuda"
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    on_cpu = device is None or device.type == "cpu"
    with torch_threads(threads), kept_heap(steady_heap and on_cpu) as steady, \
            torch.inference_mode():
        for _ in range(warmup):
            for call in calls:
                call()
        for _ in range(STEADY_ROUNDS if steady else 0):
            before = page_faults()
            for call in calls:
                call()
            if page_faults() - before < STEADY_FAULTS:
                break
        for round_ in range(repeat):
            for i in (order if round_ % 2 == 0 else order[::-1]):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                calls[i]()
                if cuda:
                    torch.cuda.synchronize(device)
                times[i].append(time.perf_counter() - start)
    return times


def repeat_batch(example: Any, size: int) -> Any:
    """``example``'s first sample repeated ``size`` times, for a tensor, a tuple of positional
    inputs or a dict of keyword inputs (what :func:`fxgndi.core.streams.call_model` feeds).

    Example:
        >>> repeat_batch((torch.zeros(2, 3), torch.ones(2)), 4)[0].shape
        torch.Size([4, 3])
    """
    def repeat(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim():
            return t[:1].expand(size, *t.shape[1:]).contiguous()
        return t
    if isinstance(example, torch.Tensor):
        return repeat(example)
    if isinstance(example, dict):
        return {k: repeat(v) for k, v in example.items()}
    return tuple(repeat(t) for t in example)
