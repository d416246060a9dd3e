"""Single kernels timed at other widths: what ``round_to="auto"`` and the time allocation of a
budget measure, through one cache.

A layer's kernel is stood in for by a fresh module of its plain torch class (or a copy, for a
norm) with another output or input width, fed a random input of the shape the layer sees. Its
seconds come from :meth:`fxgndi.Latency.seconds` and are cached per machine (device name,
runtime, threads, batch, heap setting, dtype, torch version, kernel, input shape) in
``$FXGNDI_CACHE/kernel_seconds.json`` (default ``~/.cache/fxgndi``), written atomically: a
second prune on the same machine measures nothing it measured before, and prunes the same.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from fxgndi.core.files import cache_dir, write_json
from fxgndi.core.layers import CONVS, NORMS, in_width, out_width
from fxgndi.deploy.latency import Latency

CACHE_NAME = "kernel_seconds.json"
# A kernel doing less work than this per call (multiply-accumulates; a norm: elements) is
# dispatch-bound: what it costs is its call, not its channels, and timing noise would decide.
DISPATCH_BOUND = 2 ** 20
_LONGEST_NAME = 400  # a kernel whose repr is longer is named by a hash of it in the cache


def default_cache() -> Path:
    """``$FXGNDI_CACHE/kernel_seconds.json``, else ``~/.cache/fxgndi/kernel_seconds.json``.

    Example:
        >>> default_cache().name
        'kernel_seconds.json'
    """
    return cache_dir() / CACHE_NAME


class KernelTimer:
    """Seconds of single kernels on ``latency``, from the cache when this machine timed them
    before.

    Example:
        >>> timer = KernelTimer(Latency(repeat=1, warmup=0), cache="/tmp/k.json")
        >>> timer.seconds(nn.Linear(4, 4), torch.zeros(1, 4)) > 0  # doctest: +SKIP
        True
    """

    def __init__(self, latency: Latency, cache: str | Path | None = None) -> None:
        self.latency = latency
        self.path = Path(cache) if cache is not None else default_cache()
        self._times = _read(self.path)
        self._new: dict[str, float] = {}

    def seconds(self, kernel: nn.Module, x: Any) -> float:
        """Seconds of one call of ``kernel`` (a layer, or a whole model: named by a hash of
        its structure) on a batch of ``latency.batch_size`` inputs shaped like ``x`` (a batch
        of one: a tensor, or a tuple of them)."""
        key = self._key(kernel, x)
        if key not in self._times:
            with torch.no_grad():
                self._times[key] = self._new[key] = self.latency.seconds(kernel, x)
        return self._times[key]

    def resized_seconds(self, layer: nn.Module, sample_shape: tuple[int, ...], outputs: bool,
                        width: int) -> float:
        """Seconds of a layer like ``layer`` with ``width`` output (``outputs``) or input
        channels, on inputs shaped like ``sample_shape`` (one sample)."""
        return self.seconds(*resized(layer, sample_shape, outputs, width))

    def save(self) -> None:
        """Merge the new timings into the cache file (atomically; nothing when none is new)."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**_read(self.path), **self._new})
        self._new = {}

    def _key(self, kernel: nn.Module, x: Any) -> str:
        lat = self.latency
        threads = lat.threads or torch.get_num_threads()
        heap = "|steady-heap" if lat.steady_heap else ""
        tensors = [x] if isinstance(x, torch.Tensor) else [t for t in x
                                                           if isinstance(t, torch.Tensor)]
        shapes = ";".join(str(tuple(t.shape[1:])) for t in tensors)  # one: "(3, 32, 32)"
        name = repr(kernel)
        if len(name) > _LONGEST_NAME:  # a whole model: the same structure, the same time
            name = f"{type(kernel).__name__}#{hashlib.sha1(name.encode()).hexdigest()}"
        return (f"{_device_name(tensors[0].device)}|{lat.runtime}|threads={threads}"
                f"|batch={lat.batch_size}{heap}|{tensors[0].dtype}|torch={torch.__version__}"
                f"|{name}|input={shapes}")


def resized(layer: nn.Module, sample_shape: tuple[int, ...], outputs: bool, width: int
            ) -> tuple[nn.Module, torch.Tensor]:
    """A module like ``layer`` (conv, linear or norm) with ``width`` output (``outputs``) or
    input channels, and a random input sample for it (a depthwise conv and a norm change both).

    Example:
        >>> kernel, x = resized(nn.Conv2d(8, 16, 3), (8, 5, 5), True, 4)
        >>> kernel.out_channels, tuple(x.shape)
        (4, (1, 8, 5, 5))
    """
    if outputs or _single_width(layer):
        return sized(layer, sample_shape, width, width if _single_width(layer)
                     else in_width(layer))
    return sized(layer, sample_shape, out_width(layer), width)


def sized(layer: nn.Module, sample_shape: tuple[int, ...], outs: int, ins: int
          ) -> tuple[nn.Module, torch.Tensor]:
    """A module like ``layer`` with ``outs`` output and ``ins`` input channels (a depthwise
    conv or a norm: ``outs`` both), and a random input sample for it.

    Example:
        >>> kernel, x = sized(nn.Linear(8, 16), (8,), 4, 2)
        >>> kernel, tuple(x.shape)
        (Linear(in_features=2, out_features=4, bias=True), (1, 2))
    """
    if isinstance(layer, NORMS):
        return _resized_norm(layer, sample_shape, outs)
    depthwise = _single_width(layer)
    if depthwise:
        ins = outs
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        kernel: nn.Module = nn.Linear(ins, outs, bias=layer.bias is not None, **factory)
        shape = (*sample_shape[:-1], ins)
    else:  # the plain torch class (a subclass may take other arguments or compute more)
        base = next(c for c in type(layer).__mro__ if c.__module__ == nn.Conv2d.__module__)
        kernel = base(ins, outs, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                      dilation=layer.dilation, groups=outs if depthwise else layer.groups,
                      bias=layer.bias is not None, padding_mode=layer.padding_mode, **factory)
        shape = (ins, *sample_shape[1:])
    return kernel.eval(), torch.randn(1, *shape, **factory)


def _single_width(layer: nn.Module) -> bool:
    """A norm, or a depthwise conv: one width, its inputs' and its outputs'."""
    if isinstance(layer, NORMS):
        return True
    ins, outs = in_width(layer), out_width(layer)
    return isinstance(layer, CONVS) and layer.groups == ins == outs and ins > 1


def _resized_norm(norm: nn.Module, sample_shape: tuple[int, ...], width: int
                  ) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``norm`` over ``width`` channels (its per-channel tensors cut), and an input
    with that many channels where the norm reads them (the last dim for a LayerNorm whose input
    ends in its width, else dim 1 of the batch)."""
    channels = out_width(norm)
    if isinstance(norm, nn.GroupNorm) and width % norm.num_groups:
        raise ValueError(f"a GroupNorm of {norm.num_groups} groups cannot have {width} channels")
    kernel = copy.deepcopy(norm).eval()
    for name, tensor in [*kernel.named_parameters(recurse=False),
                         *kernel.named_buffers(recurse=False)]:
        if tensor is not None and tensor.dim() and tensor.shape[-1] == channels:
            cut = tensor.detach()[..., :width].clone()
            setattr(kernel, name, nn.Parameter(cut, requires_grad=False)
                    if isinstance(tensor, nn.Parameter) else cut)
    if isinstance(kernel, nn.LayerNorm):
        kernel.normalized_shape = (*kernel.normalized_shape[:-1], width)
    elif isinstance(kernel, nn.GroupNorm):
        kernel.num_channels = width
    else:
        kernel.num_features = width
    last = isinstance(norm, nn.LayerNorm) and sample_shape[-1] == channels
    shape = (*sample_shape[:-1], width) if last else (width, *sample_shape[1:])
    factory = {"device": kernel.weight.device if kernel.weight is not None else None}
    return kernel, torch.randn(1, *shape, **factory)


class Scaling(NamedTuple):
    """The seconds of a kernel that its channels cost, as ``product k_o k_i + outputs k_o +
    inputs k_i`` of the fractions ``k_o``, ``k_i`` of its output and input channels kept: a
    compute-bound kernel's time goes with the product, a memory-bound one's with the sum. A
    kernel of one width (a depthwise conv, a norm) has only ``outputs``."""

    product: float
    outputs: float
    inputs: float


def scaling_seconds(timer: KernelTimer, layer: nn.Module, sample_shape: tuple[int, ...],
                    cut_outputs: bool, cut_inputs: bool) -> Scaling | None:
    """:class:`Scaling` of ``layer``'s kernel from its seconds at full width and at about
    half of each side that is cut (``cut_outputs``, ``cut_inputs``; four timings where both
    are), which it fits exactly (each term at least 0: timing noise). The part that no channel
    costs (a call's fixed cost) is left out. None where no stand-in of it can be timed.

    Example:
        >>> timer = KernelTimer(Latency(repeat=1, warmup=0), cache="/tmp/k.json")
        >>> scaling_seconds(timer, nn.Conv2d(8, 16, 1), (8, 9, 9), True, True)  # doctest: +SKIP
        Scaling(product=1.1e-06, outputs=2e-07, inputs=1e-07)
    """
    single = _single_width(layer)
    cut_inputs = cut_inputs and not single
    if not (cut_outputs or cut_inputs) or isinstance(layer, nn.GroupNorm):
        return None
    full_out, full_in = out_width(layer), in_width(layer) if not single else out_width(layer)
    half_out = full_out // 2 if cut_outputs else full_out
    half_in = full_in // 2 if cut_inputs else full_in
    if (cut_outputs and half_out < 1) or (cut_inputs and half_in < 1):
        return None
    try:
        def at(outs: int, ins: int) -> float:
            return timer.seconds(*sized(layer, sample_shape, outs, ins))
        full = at(full_out, full_in)
        fo, fi = 1 - half_out / full_out, 1 - half_in / full_in  # fractions removed
        if not cut_inputs:
            return Scaling(0.0, max(0.0, (full - at(half_out, full_in)) / fo), 0.0)
        if not cut_outputs:
            return Scaling(0.0, 0.0, max(0.0, (full - at(full_out, half_in)) / fi))
        less_out, less_in = full - at(half_out, full_in), full - at(full_out, half_in)
        both = full - at(half_out, half_in)
        product = max(0.0, (less_out + less_in - both) / (fo * fi))
        return Scaling(product, max(0.0, less_out / fo - product),
                       max(0.0, less_in / fi - product))
    except (RuntimeError, TypeError, ValueError):
        return None  # a layer its plain torch class cannot stand in for


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{device.type}:{name}"


def _read(path: Path) -> dict[str, float]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: it is measured again and rewritten
    return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def macs_per_sample(layer: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample through a conv / linear ``layer`` (weights x output
    positions), from its per-sample output shape.

    Example:
        >>> macs_per_sample(nn.Conv2d(2, 4, 3), (4, 5, 5)), macs_per_sample(nn.Linear(3, 2), (2,))
        (1800, 6)
    """
    positions = math.prod(out_shape[1:]) if isinstance(layer, CONVS) else \
        math.prod(out_shape[:-1])
    return layer.weight.numel() * positions
