"""The C heap under CPU tensors: keep freed memory for reuse while a block runs, hand it back.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB unless told
otherwise) with fresh pages from the kernel and unmaps them when the block is freed. A model
whose activations are that large therefore page-faults all of them in again on every call:
measured here (2-core x86_64, torch 2.14.1, one thread, batch 32 at 112 px, a fresh process:
``benchmarks/heap.py``) that was 43% of mobilenet_v2's eager time (82k page faults, 112 of 258
ms in the kernel) and 35% of efficientnet_b0's, and a G-NDI scoring pass of a model with 50 MB
feature maps ran 1.5x faster without it. Worse for a measurement, the cost falls on tensors
above a size cliff that glibc moves with the process's history (its threshold rises to the
largest block freed so far), so the same model timed in two processes, or minutes apart in one,
reads tens of percent apart, and a pruned model whose activations fall under the cliff looks
faster than its MACs say.

:func:`steady_heap` raises the thresholds for the block, so that freed memory stays in the
heap and is reused (what onnxruntime's arena, jemalloc and tcmalloc do), and on exit restores
glibc's usual limits (or the process's own, where its environment set them) and returns the
free pages to the kernel (:func:`trim_free_memory`).
To get the same speed in a deployed process: ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=1073741824 python serve.py`` (glibc's tunables), or preload jemalloc /
tcmalloc. Elsewhere than glibc both functions do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from typing import Any, Iterator

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # blocks up to 1 GiB come from the heap while steady; the heap grows by as much
# mallopt parameter -> (glibc's environment variable, its GLIBC_TUNABLES name, the value restored
# when the process set neither). mallopt cannot read the values it replaces, nor switch glibc's
# dynamic thresholds back on: the usual values are where those end once a 32 MiB block has been
# freed (their maximum), as in any torch process with large tensors; the top pad is glibc's.
_SETTINGS = {
    _M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", 32 << 20),
    _M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold", 64 << 20),
    _M_TOP_PAD: ("MALLOC_TOP_PAD_", "glibc.malloc.top_pad", 128 << 10),
}

_lock = threading.Lock()
_depth = 0


@contextlib.contextmanager
def steady_heap(enabled: bool = True) -> Iterator[bool]:
    """Run the block with freed memory kept in glibc's heap for reuse (no page faults on
    large tensors), then restore the usual limits and hand the free pages back. Yields
    whether it took effect (False off glibc, or with ``enabled=False``). Nests.

    Example:
        >>> import torch
        >>> with steady_heap():  # a 64 MiB block, faulted in once instead of three times
        ...     sums = [float(torch.zeros(2**24).sum()) for _ in range(3)]
        >>> sums
        [0.0, 0.0, 0.0]
    """
    global _depth
    mallopt = _libc_function("mallopt") if enabled else None
    if mallopt is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            for parameter in _SETTINGS:
                mallopt(parameter, _KEEP)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for parameter in _SETTINGS:
                    mallopt(parameter, _restored(parameter))
                trim_free_memory()


def _restored(parameter: int) -> int:
    """The value ``parameter`` goes back to: the process's own setting, from the environment
    glibc read it from (``GLIBC_TUNABLES`` first, then ``MALLOC_*_``), else the usual one: a
    deployment started with the tunables this module recommends keeps them."""
    variable, tunable, usual = _SETTINGS[parameter]
    tunables = dict(item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":")
                    if "=" in item)
    value = tunables.get(tunable, os.environ.get(variable))
    try:
        return int(value, 0) if value is not None else usual
    except ValueError:
        return usual


def page_faults() -> int:
    """The process's minor page faults so far (0 where the platform does not count them).

    Example:
        >>> before = page_faults()
        >>> page_faults() >= before
        True
    """
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def trim_free_memory() -> None:
    """Return glibc's free heap pages to the kernel (``malloc_trim(0)``): a freed block that
    stays resident would otherwise be reused without any rise of the RSS. A no-op where libc
    has no ``malloc_trim``.

    Example:
        >>> trim_free_memory()
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(ctypes.c_size_t(0))


@functools.lru_cache(maxsize=None)
def _libc_function(name: str) -> Any:
    """glibc's ``name`` from the process's own symbols, looked up once (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    if name == "mallopt":
        function.argtypes = [ctypes.c_int, ctypes.c_int]
    return function
