"""Latency on the runtime a model ships on: one measurement for every latency target.

:class:`Latency` says how to time (runtime, batch size, threads, repetitions);
:meth:`Latency.seconds` times a model on it: eagerly, as a ``torch.export`` program (``pt2``) or
on onnxruntime (``onnx``), the last two exported (and checked) to a temporary file first.
``fxgndi.prune(..., target=Latency(...))`` and ``fxgndi.prune_depth(..., target="latency")``
measure with it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from fxgndi.core.checks import check_choice
from fxgndi.core.names import LATENCY_RUNTIMES
from fxgndi.core.runtime import device_of, eval_mode, torch_threads
from fxgndi.core.streams import call_model

RUNTIMES = LATENCY_RUNTIMES


@dataclass(frozen=True)
class Latency:
    """How a latency is measured.

    Attributes:
        runtime: ``"eager"`` (the module itself), ``"pt2"`` (``torch.export``) or ``"onnx"``
            (onnxruntime, CPU).
        batch_size: the batch the model is timed on (the example input repeated).
        threads: torch / onnxruntime intra-op threads while timing (None: as they are).
        repeat, warmup: timed and untimed calls; the median of the timed ones is reported.

    Example:
        >>> Latency(runtime="eager", repeat=3).seconds(nn.Linear(4, 2), torch.zeros(1, 4)) > 0
        True
    """

    runtime: str = "eager"
    batch_size: int = 1
    threads: int | None = None
    repeat: int = 5
    warmup: int = 1

    def __post_init__(self) -> None:
        check_choice("runtime", self.runtime, RUNTIMES)
        if self.batch_size < 1 or self.repeat < 1 or self.warmup < 0:
            raise ValueError("Latency needs batch_size >= 1, repeat >= 1 and warmup >= 0")

    def seconds(self, model: nn.Module, example_inputs: Any) -> float:
        """Median seconds of one call of ``model`` (on this runtime) on a batch of
        ``batch_size`` made from ``example_inputs``."""
        inputs = repeat_batch(example_inputs, self.batch_size)
        with tempfile.TemporaryDirectory() as folder, eval_mode(model):
            run = self._runner(model, inputs, folder)
            return median_seconds(lambda: call_model(run, inputs), repeat=self.repeat,
                                  warmup=self.warmup,
                                  threads=self.threads, device=device_of(model))

    def _runner(self, model: nn.Module, inputs: Any, folder: str) -> Callable[..., Any]:
        if self.runtime == "eager":
            return model
        from fxgndi.deploy.export import export, load
        path = os.path.join(folder, f"model.{self.runtime}")
        export(model, path, example_inputs=inputs)
        return load(path, threads=self.threads)


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


def median_seconds(call: Callable[[], Any], *, repeat: int = 5, warmup: int = 1,
                   threads: int | None = None, device: torch.device | None = None) -> float:
    """Median wall time of ``call()`` over ``repeat`` timed calls after ``warmup`` untimed ones,
    under ``torch.inference_mode`` (CUDA synchronised).

    Example:
        >>> median_seconds(lambda: time.sleep(0.01), repeat=3) >= 0.01
        True
    """
    cuda = device is not None and device.type == "cuda"
    times = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            call()
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
