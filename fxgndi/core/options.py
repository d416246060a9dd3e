"""The run settings every verb shares, as one keyword group.

``score``, ``ablate``, ``validate``, ``prune``, ``prune_depth`` and ``GNDIImportance`` take the
same run options (where to run, how much data, how much memory, progress, seeds, resumable
state, how to trace) as keyword arguments, checked and defaulted in one place,
:func:`run_options`; inside the library they travel as one :class:`RunOptions`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, ContextManager, Mapping, TypedDict

from fxgndi.core.heap import steady_heap


@dataclass(frozen=True)
class RunOptions:
    """How a verb runs (not what it computes).

    Attributes:
        device: where to run (``"cpu"``, ``"cuda:1"``); default: where the model lives.
        max_batches: read at most this many batches of the data.
        max_memory: bytes for the activations and tangents of one step (an int, or a string
            such as ``"4GB"``, ``"512MiB"``): batches and vmap chunks are split to fit.
        chunk_size: units or cotangents per vmap call (default: sized automatically).
        progress: show progress bars.
        seed: seeds everything random (probes, random importance, channel samples).
        run_state: a file for the partial sums of a long run, saved atomically every
            ``save_every`` batches and when interrupted; ``resume=True`` continues from it.
        leaf_modules: module names or classes torch.fx keeps opaque (not traced through).
        concrete_args: values for forward arguments that are Python flags
            (``{"return_features": False}``), fixed while tracing.
        example_inputs: the input batch (a tensor or a tuple of tensors) the model is traced
            with and its costs counted on; default: the first sample of the data.
        output: which tensor of the model's output is read: a key, index, attribute or
            callable (default: the tensor itself, a dict's "logits" or "out", a tuple's first;
            :func:`fxgndi.core.outputs.select_output`).

    Example:
        >>> RunOptions(max_memory="1GiB").max_memory
        1073741824
    """

    device: Any = None
    max_batches: int | None = None
    max_memory: int | str | None = None
    chunk_size: int | None = None
    progress: bool = True
    seed: int = 0
    run_state: str | os.PathLike | None = None
    resume: bool = False
    save_every: int = 50
    leaf_modules: tuple = field(default_factory=tuple)
    concrete_args: dict[str, Any] | None = None
    example_inputs: Any = None
    output: Any = None

    def __post_init__(self) -> None:
        from fxgndi.core.runtime import check_device  # torch: not at import (fxgndi --help)

        check_device(self.device)
        object.__setattr__(self, "max_memory", parse_bytes(self.max_memory))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if self.max_batches is not None and (isinstance(self.max_batches, bool)
                                             or int(self.max_batches) < 1):
            raise ValueError(f"max_batches must be >= 1 or None, not {self.max_batches!r}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, not {self.chunk_size!r}")
        if int(self.save_every) < 1:
            raise ValueError(f"save_every must be >= 1 batch, not {self.save_every}")
        if self.resume and self.run_state is None:
            raise ValueError("resume=True needs run_state=PATH (the file the run saved)")

    def heap(self) -> ContextManager[bool]:
        """The C heap a scoring loop runs on: steady (freed activations reused, not page-faulted
        in anew every batch: a scoring pass over 50 MB feature maps ran 1.45x faster, for 19%
        more peak RSS) unless ``max_memory`` bounds memory (:func:`fxgndi.core.heap.steady_heap`).

        Example:
            >>> with RunOptions(max_memory="1GiB").heap() as steady:
            ...     steady
            False
        """
        return steady_heap(self.max_memory is None)

    def but(self, **changes: Any) -> RunOptions:
        """A copy with ``changes``.

        Example:
            >>> RunOptions().but(progress=False).progress
            False
        """
        return replace(self, **changes)


class RunKwargs(TypedDict, total=False):
    """The keyword group ``**run`` of the verbs: the fields of :class:`RunOptions`."""

    device: Any
    max_batches: int | None
    max_memory: int | str | None
    chunk_size: int | None
    progress: bool
    seed: int
    run_state: str | os.PathLike | None
    resume: bool
    save_every: int
    leaf_modules: tuple
    concrete_args: dict[str, Any] | None
    example_inputs: Any
    output: Any


RUN_OPTION_NAMES = tuple(f.name for f in fields(RunOptions))


def run_options(verb: str, given: Mapping[str, Any], **defaults: Any) -> RunOptions:
    """The :class:`RunOptions` of one call: ``given`` (the verb's ``**run`` keywords) over the
    verb's own ``defaults``; an unknown keyword is a TypeError naming the run options.

    Example:
        >>> run_options("score", {"progress": False}).progress
        False
        >>> run_options("score", {"progres": False})
        Traceback (most recent call last):
        ...
        TypeError: score() got an unexpected keyword argument 'progres'; ...
    """
    unknown = [k for k in given if k not in RUN_OPTION_NAMES]
    if unknown:
        raise TypeError(f"{verb}() got an unexpected keyword argument {unknown[0]!r}; its run "
                        f"options are {', '.join(RUN_OPTION_NAMES)}")
    return RunOptions(**{**defaults, **given})


def parse_bytes(size: int | float | str | None) -> int | None:
    """A memory size in bytes: an int, or a string such as ``"4GB"``, ``"512MiB"``, ``"2e9"``.

    Example:
        >>> parse_bytes("1.5GiB"), parse_bytes("200MB"), parse_bytes(None)
        (1610612736, 200000000, None)
    """
    if size is None:
        return None
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value = float(size)
    else:
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)\s*", str(size).lower())
        if not match:
            raise ValueError(f"cannot read the memory size {size!r}: write bytes or a number "
                             "with a unit, e.g. 4GB, 512MiB")
        unit = match.group(2).rstrip("b")
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
                 "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}[unit]
        value = float(match.group(1)) * scale
    if value <= 0:
        raise ValueError(f"max_memory must be positive, not {size!r}")
    return int(value)
