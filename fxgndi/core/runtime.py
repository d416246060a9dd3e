"""Where and how a model runs: eval mode without losing flags, devices, safe copies."""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator

import torch
import torch.nn as nn

from fxgndi.core.errors import DeviceError


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


def check_device(device: torch.device | str | None, *, processes_per_node: int | None = None
                 ) -> torch.device | None:
    """``device`` as a ``torch.device`` once it is known to work here, else one DeviceError
    naming the cause and the fix: before any tracing, loading or spawning.

    None stays None (where the model lives). With ``processes_per_node`` (torchrun's
    ``LOCAL_WORLD_SIZE``) a ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` in each
    process, so that many devices must be visible: every process reaches the same verdict,
    before any of them joins the process group. Refused: strings
    torch cannot read, CUDA / MPS without a usable device, a CUDA index past the visible
    devices, ``cpu:N`` with N > 0 and ``meta`` (no data); any other backend must allocate.

    Example:
        >>> check_device("cpu:0")
        device(type='cpu', index=0)
        >>> check_device("gpu")
        Traceback (most recent call last):
        ...
        fxgndi.core.errors.DeviceError: unknown device 'gpu': use cpu, cuda, cuda:N or mps
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise DeviceError(f"device {device!r}: there is one CPU device; use cpu")
    elif dev.type == "cuda":
        _check_cuda(str(device), dev.index, processes_per_node)
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r}: MPS is not available here (it needs an "
                              "Apple-silicon Mac and a torch built with MPS); use cpu")
    elif dev.type == "meta":
        raise DeviceError(f"device {device!r} holds no data, so no model can run on it; use "
                          "cpu or cuda")
    else:
        try:
            torch.empty(1, device=dev)
        except Exception as err:  # each backend fails in its own way
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DeviceError(f"device {device!r} cannot be used here ({first}); use cpu"
                              ) from None
    return dev


def _check_cuda(name: str, index: int | None, processes: int | None) -> None:
    if not torch.cuda.is_available():
        build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, but no "
                 "NVIDIA driver or GPU is visible" if torch.version.cuda else
                 f"torch {torch.__version__} is a CPU-only build")
        raise DeviceError(f"device {name!r}: CUDA is not available here ({build}); use "
                          "cpu instead")
    count = torch.cuda.device_count()
    visible = (f"{count} visible (CUDA_VISIBLE_DEVICES="
               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if index is not None and index >= count:
        raise DeviceError(f"device {name!r} does not exist: {visible}, so use an index "
                          f"below {count}")
    if index is None and processes is not None and processes > count:
        raise DeviceError(f"device {name!r} under torchrun gives each of the {processes} "
                          f"processes of a node its own GPU, but {visible}: start at most "
                          f"{count} per node (--nproc-per-node)")
