"""``round_to="auto"``: each group's kept width rounded to the channel multiple its kernels run
fastest at, per kept channel, on the device and runtime the model ships on.

Odd pruned widths (67, 271) fall off the fast kernel paths, so a pruned model can gain less
speed than it lost MACs. Every group whose kept width ``k`` is at least
:attr:`AutoRound.base` (8) keeps the nearest multiple of it, timed or not: onnxruntime's
blocked (NCHWc) convolutions, oneDNN's blocked layouts and tensor cores all work in vectors
of 8 channels, and a runtime the rounding did not time can fall off a cliff without it
(efficientnet_b0 at half its MACs, unrounded, ran at 0.5x the dense model's speed on
onnxruntime, and 1.8x rounded to 8; README). Then, for each
group :class:`Rounder` times its conv / linear layers (the root and its members at the
candidate output width, its consumers at the candidate input width, each alone on an input of
the shape it sees) at that width and at ``k`` rounded to every larger candidate multiple, and
keeps the multiple whose measured seconds per kept channel is lowest, if it beats the base
width's by ``margin``. Groups with an ``nn.MultiheadAttention`` keep their width (its embedding
width must stay a multiple of the head count).

Widths go to the *nearest* multiple (:func:`nearest_multiple`), not down: rounding a narrow
layer down (14 channels to 8) cuts it far below the ranking's ratio, and with every group
rounded down MobileNetV2 on the digits lost 3.6 points at 3x fewer MACs (README). A rounded
width still only shrinks as the channel ratio grows, so the ratio search of a MAC / parameter
/ latency target still meets the target. Where a rounded group steps
its width past the target (a coarse multiple on a group that holds many MACs), ``prune`` rounds
the groups that step where the search brackets the target more finely (to the base, then not at
all) and searches again; after a few tries it drops rounding altogether and says so in
``settings["rounding_dropped"]``.

Timings are cached per machine (device name, runtime, threads, batch, heap setting, dtype,
torch version, layer shape, width) in ``$FXGNDI_CACHE/kernel_seconds.json`` (default
``~/.cache/fxgndi``), written atomically: a second prune on the same machine measures nothing
it measured before.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fxgndi.core.files import cache_dir, write_json
from fxgndi.core.layers import CONVS, LAYERS, in_width, out_width
from fxgndi.deploy.latency import Latency, repeat_batch
from fxgndi.pruning._tp import RoundLayer, group_modules
from fxgndi.pruning.latency import layer_inputs

CACHE_NAME = "kernel_seconds.json"
# Groups holding these keep their width: attention's embedding width must stay a multiple of its
# head count, which a rounded width need not be (the MAC curve would jump where it is not).
NEVER_ROUNDED = (nn.MultiheadAttention,)


@dataclass(frozen=True)
class AutoRound:
    """How ``round_to="auto"`` chooses each group's channel multiple (``round_to=AutoRound()``
    is ``"auto"``).

    Attributes:
        multiples: the candidate multiples the kernels are timed at (each a multiple of
            ``base``).
        base: every group of at least this many kept channels keeps a multiple of it, timed
            or not (None: only what the timing rewards is rounded).
        latency: where kernels are timed (runtime, batch size, threads); None: the prune
            target's :class:`fxgndi.Latency` when it is a latency target, else eager, batch 1.
            Timed on the model's device.
        margin: a multiple is adopted only if its seconds per kept channel are below the
            unrounded width's by this fraction (timing noise must not round).
        min_macs: groups whose layers do fewer multiply-accumulates per sample than this are
            not timed, only rounded to ``base`` (their kernels are dispatch-bound).
        repeat: timed calls per kernel and width (after one warm-up call).
        cache: the timing cache file; None: ``$FXGNDI_CACHE`` or ``~/.cache/fxgndi``, file
            ``kernel_seconds.json``.

    Example:
        >>> AutoRound(multiples=(8, 16)).multiples
        (8, 16)
    """

    multiples: tuple[int, ...] = (8, 16, 32)
    base: int | None = 8
    latency: Latency | None = None
    margin: float = 0.03
    min_macs: int = 2 ** 20
    repeat: int = 3
    cache: str | os.PathLike | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.multiples or any(isinstance(m, bool) or not isinstance(m, int) or m < 2
                                     for m in self.multiples):
            raise ValueError(f"AutoRound.multiples must be integers >= 2, not {self.multiples!r}")
        if self.base is not None and (isinstance(self.base, bool) or not isinstance(
                self.base, int) or self.base < 2 or any(m % self.base for m in self.multiples)):
            raise ValueError(f"AutoRound.base must be None or an integer >= 2 that divides every "
                             f"multiple, not {self.base!r} with multiples {self.multiples!r}")
        if not 0 <= self.margin < 1 or self.repeat < 1 or self.min_macs < 0:
            raise ValueError("AutoRound needs 0 <= margin < 1, repeat >= 1 and min_macs >= 0")


def auto_round(round_to: Any) -> AutoRound | None:
    """The :class:`AutoRound` that ``round_to`` asks for (``"auto"`` or one), else None (an
    integer or None, torch-pruning's own rounding); anything else is refused.

    Example:
        >>> auto_round("auto") == AutoRound(), auto_round(8), auto_round(None)
        (True, None, None)
    """
    if isinstance(round_to, AutoRound):
        return round_to
    if isinstance(round_to, str):
        if round_to != "auto":
            raise ValueError(f"round_to must be 'auto', an integer >= 1, None or an AutoRound, "
                             f"not {round_to!r}")
        return AutoRound()
    return None


def default_cache() -> Path:
    """The timing cache file: ``$FXGNDI_CACHE/kernel_seconds.json``, default under
    ``~/.cache/fxgndi``.

    Example:
        >>> default_cache().name
        'kernel_seconds.json'
    """
    return cache_dir() / CACHE_NAME


class Rounder:
    """Chooses and remembers each group's multiple (:func:`callback` rounds with it), timing
    the kernels it needs through ``latency`` and the cache.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
        >>> rounder = Rounder(net, torch.zeros(1, 3, 8, 8), AutoRound(), Latency())
        >>> rounder.chosen
        {}
    """

    def __init__(self, model: nn.Module, example_inputs: Any, spec: AutoRound,
                 latency: Latency) -> None:
        self.spec = spec
        self.latency = replace(latency, repeat=spec.repeat, warmup=1)
        self.path = Path(spec.cache) if spec.cache is not None else default_cache()
        self.shapes = _layer_shapes(model, example_inputs)  # name -> (input, output) per sample
        self.decisions: dict[tuple[str, bool], int] = {}
        self.measured = 0  # kernels timed (not found in the cache)
        self.enabled = True  # False: round nothing (prune drops rounding that misses a target)
        self._times = _read(self.path)
        self._new: dict[str, float] = {}

    @property
    def chosen(self) -> dict[str, int]:
        """Root layer -> the multiple its group was rounded to (groups left as they are are
        absent; none once disabled)."""
        if not self.enabled:
            return {}
        return {name: m for (name, _), m in sorted(self.decisions.items()) if m > 1}

    def unround(self, roots: set[str]) -> bool:
        """Round the groups of these root layers more finely: a multiple above the base to the
        base, the base to nothing; whether any was rounded."""
        base = self.spec.base or 1
        hit = {key: (base if m > base else 1) for key, m in self.decisions.items()
               if key[0] in roots and m > 1}
        self.decisions.update(hit)
        return bool(hit)

    def callback(self, model: nn.Module) -> RoundLayer:
        """The per-group rounding torch-pruning calls while it prunes ``model`` (a copy of the
        model this rounder was made for: the same layer names)."""
        names = {m: n for n, m in model.named_modules()}

        def round_layer(dg: Any, module: nn.Module, outputs: bool, n_pruned: int,
                        channels: int) -> int:
            kept = channels - n_pruned
            if not self.enabled:
                return n_pruned
            key = (names.get(module, ""), outputs)
            if key not in self.decisions:
                self.decisions[key] = self.choose(dg, module, outputs, kept, names, channels)
            return channels - nearest_multiple(kept, self.decisions[key], channels)

        return round_layer

    def choose(self, dg: Any, module: nn.Module, outputs: bool, kept: int,
               names: dict[nn.Module, str], channels: int) -> int:
        """The multiple (1: none): the base if ``kept`` is at least that, or a larger
        candidate whose grid around ``kept`` (:func:`grid_widths`) costs the group's kernels
        fewer measured seconds per kept channel, on average, than the base's grid, by at
        least ``margin``.

        A grid is judged on two of its widths, not on the one nearest ``kept``: the multiple
        chosen here rounds the group at every ratio the search tries later, and a fine grid
        can be fast at one width and slow at the next (on AVX-512, oneDNN pads a conv to
        16-channel blocks: 40 channels cost as much as 48, and 32 a third less per channel,
        measured; a resnet18 whose stem group was judged at 45 -> 48, where multiples of 8 and
        16 agree, and then pruned to 40 ran 12% slower than at 32 for 3% more MACs)."""
        members = group_modules(dg, module, outputs)
        if any(isinstance(m, NEVER_ROUNDED) for m, _ in members):
            return 1
        # A grouped conv's width must stay a multiple of its groups: only timed widths that
        # it takes (a stand-in raises otherwise) are rounded.
        base = self.spec.base if self.spec.base and kept >= self.spec.base and not any(
            _grouped(layer) for layer, _ in members) else 1
        grids = {m: grid_widths(kept, m, channels) for m in self.spec.multiples
                 if kept >= m and m > base}
        grids = {m: g for m, g in grids.items() if g}
        layers = [(names[layer], layer, out) for layer, out in members
                  if isinstance(layer, LAYERS) and names.get(layer) in self.shapes]
        if not grids or not layers or sum(_macs(layer, self.shapes[name][1])
                                          for name, layer, _ in layers) < self.spec.min_macs:
            return base

        def per_channel(widths: list[int]) -> float:
            return sum(self.seconds(layer, self.shapes[name][0], out, width) / width
                       for width in widths for name, layer, out in layers) / len(widths)

        try:
            best, best_score = base, per_channel(grid_widths(kept, base, channels)
                                                 ) * (1 - self.spec.margin)
            for multiple in sorted(grids):
                score = per_channel(grids[multiple])
                if score < best_score:
                    best, best_score = multiple, score
        except (RuntimeError, TypeError, ValueError):
            return 1  # a layer its plain torch class cannot stand in for: left as it is
        return best

    def seconds(self, layer: nn.Module, sample_shape: tuple[int, ...], outputs: bool,
                width: int) -> float:
        """Seconds of one call of a layer like ``layer`` with ``width`` output (``outputs``) or
        input channels, on a batch of inputs shaped like ``sample_shape`` (from the cache when
        this machine timed it before)."""
        kernel, x = _resized(layer, sample_shape, outputs, width)
        key = self._key(kernel, x)
        if key not in self._times:
            with torch.no_grad():
                self._times[key] = self._new[key] = self.latency.seconds(kernel, x)
            self.measured += 1
        return self._times[key]

    def save(self) -> None:
        """Merge the new timings into the cache file (atomically; nothing when none is new)."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**_read(self.path), **self._new})
        self._new = {}

    def _key(self, kernel: nn.Module, x: torch.Tensor) -> str:
        lat = self.latency
        threads = lat.threads or torch.get_num_threads()
        heap = "|steady-heap" if lat.steady_heap else ""
        return (f"{_device_name(x.device)}|{lat.runtime}|threads={threads}|batch={lat.batch_size}"
                f"{heap}|{x.dtype}|torch={torch.__version__}|{kernel!r}"
                f"|input={tuple(x.shape[1:])}")


def _layer_shapes(model: nn.Module, example: Any) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per-sample input and output shapes of every conv / linear layer on ``example``."""
    return {name: (tuple(x.shape[1:]), out[1:])
            for name, (x, out) in layer_inputs(model, repeat_batch(example, 1)).items()}


def nearest_multiple(kept: int, multiple: int, channels: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (halves up) that is at least
    ``multiple`` and at most ``channels`` (the width before pruning); ``kept`` itself when no
    multiple fits.

    Example:
        >>> [nearest_multiple(k, 8, 40) for k in (3, 11, 12, 14, 33, 39)]
        [8, 8, 16, 16, 32, 40]
    """
    if multiple > channels:
        return kept
    rounded = max(multiple, (kept + multiple // 2) // multiple * multiple)
    return rounded if rounded <= channels else channels - channels % multiple


def grid_widths(kept: int, multiple: int, channels: int) -> list[int]:
    """The two widths of ``multiple``'s grid that a group of ``kept`` channels is judged on:
    ``kept`` rounded down to it and the next multiple up, each within ``[multiple, channels]``
    (the width before pruning); ``[kept]`` for a multiple of 1 or none.

    Example:
        >>> grid_widths(45, 8, 64), grid_widths(48, 16, 64), grid_widths(45, 32, 64)
        ([40, 48], [48, 64], [32, 64])
        >>> grid_widths(60, 16, 60), grid_widths(20, 1, 64)
        ([48], [20])
    """
    if multiple <= 1:
        return [kept]
    below = kept // multiple * multiple
    return [w for w in (below, below + multiple) if multiple <= w <= channels]


def _grouped(layer: nn.Module) -> bool:
    """A grouped convolution that is not depthwise."""
    return isinstance(layer, CONVS) and 1 < layer.groups < in_width(layer)


def _macs(layer: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample through ``layer`` (weights x output positions)."""
    positions = math.prod(out_shape[1:]) if isinstance(layer, CONVS) else \
        math.prod(out_shape[:-1])
    return layer.weight.numel() * positions


def _resized(layer: nn.Module, sample_shape: tuple[int, ...], outputs: bool, width: int
             ) -> tuple[nn.Module, torch.Tensor]:
    """A fresh layer like ``layer`` with ``width`` output (or input) channels, and an input
    sample for it (a depthwise conv changes both)."""
    ins, outs = in_width(layer), out_width(layer)
    depthwise = isinstance(layer, CONVS) and layer.groups == ins == outs and ins > 1
    if depthwise:
        ins = outs = width
    elif outputs:
        outs = width
    else:
        ins = width
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        kernel: nn.Module = nn.Linear(ins, outs, bias=layer.bias is not None, **factory)
        shape = (*sample_shape[:-1], ins)
    else:  # the plain torch class (a subclass may take other arguments or compute more)
        base = next(c for c in type(layer).__mro__ if c.__module__ == nn.Conv2d.__module__)
        kernel = base(ins, outs, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                      dilation=layer.dilation, groups=width if depthwise else layer.groups,
                      bias=layer.bias is not None, padding_mode=layer.padding_mode, **factory)
        shape = (ins, *sample_shape[1:])
    return kernel.eval(), torch.randn(1, *shape, **factory)


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
