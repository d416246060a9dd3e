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

Kernels are timed, and cached per machine, by :class:`fxgndi.pruning.kernels.KernelTimer`: a
second prune on the same machine measures nothing it measured before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch  # noqa: F401 (the examples)
import torch.nn as nn

from fxgndi.core.layers import CONVS, LAYERS, in_width
from fxgndi.deploy.latency import Latency, repeat_batch
from fxgndi.pruning._tp import RoundLayer, group_modules
from fxgndi.pruning.kernels import KernelTimer, macs_per_sample
from fxgndi.pruning.latency import layer_inputs

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
        self.timer = KernelTimer(replace(latency, repeat=spec.repeat, warmup=1), spec.cache)
        self.shapes = layer_shapes(model, example_inputs)  # name -> (input, output) per sample
        self.decisions: dict[tuple[str, bool], int] = {}
        self.enabled = True  # False: round nothing (prune drops rounding that misses a target)

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
        if not grids or not layers or sum(macs_per_sample(layer, self.shapes[name][1])
                                          for name, layer, _ in layers) < self.spec.min_macs:
            return base

        def per_channel(widths: list[int]) -> float:
            return sum(self.timer.resized_seconds(layer, self.shapes[name][0], out, width) / width
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


def layer_shapes(model: nn.Module, example: Any) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per-sample input and output shapes of every conv / linear layer on ``example``.

    Example:
        >>> layer_shapes(nn.Sequential(nn.Linear(3, 2)), torch.zeros(5, 3))
        {'0': ((3,), (2,))}
    """
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
