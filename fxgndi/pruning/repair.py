"""Repair: what is done to a pruned model so that what remains computes what the dense model
did, shared by width and depth pruning.

One :class:`Repair` says which steps run: folding removed channels' means into their
consumers' biases (width pruning only, during removal), re-estimating BatchNorm statistics,
and fine-tuning. :func:`repair_model` runs the steps that follow removal, in that order, and
returns what ran for the result's settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch.nn as nn

from fxgndi.core.runtime import eval_mode
from fxgndi.pruning.finetune import fine_tune
from fxgndi.pruning.recalibrate import recalibrate_bn


@dataclass(frozen=True)
class Repair:
    """The repair steps of a pruning call.

    Attributes:
        compensate: fold each removed channel's mean input to every consumer (over the data,
            before pruning) into that consumer's bias, so the pruned model computes
            ``do(read_c := E[read_c])`` instead of reading 0 (width pruning; see
            :mod:`fxgndi.pruning.compensate`).
        recalibrate_bn: re-estimate every BatchNorm's running statistics on the data after
            pruning (:func:`fxgndi.pruning.recalibrate.recalibrate_bn`; no weight changes).
        finetune: ``dict(epochs=..., lr=..., ...)`` for :func:`fxgndi.pruning.finetune.fine_tune`
            on the data, last (None: none); it recalibrates BatchNorm first (unless
            ``recalibrate_bn`` just did) and trains at peak rate ``FINETUNE_LR`` by default.

    Example:
        >>> Repair(recalibrate_bn=True).to_dict()
        {'compensate': False, 'recalibrate_bn': True, 'finetune': None}
    """

    compensate: bool = False
    recalibrate_bn: bool = False
    finetune: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        finetune = self.finetune
        if finetune is not None and (not isinstance(finetune, dict) or "epochs" not in finetune):
            raise ValueError("finetune must be None or a dict with at least 'epochs', e.g. "
                             "finetune=dict(epochs=1)")

    def to_dict(self) -> dict[str, Any]:
        """The steps as a plain dict (for settings and JSON)."""
        return asdict(self)


def as_repair(repair: Repair | dict[str, Any] | None) -> Repair:
    """A :class:`Repair` from one, from a dict of its fields, or None (no repair).

    Example:
        >>> as_repair({"recalibrate_bn": True}).recalibrate_bn
        True
    """
    if repair is None:
        return Repair()
    if isinstance(repair, Repair):
        return repair
    if isinstance(repair, dict):
        unknown = sorted(set(repair) - set(Repair.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown repair step {unknown[0]!r}: the steps are "
                            f"{', '.join(Repair.__dataclass_fields__)}")
        return Repair(**repair)
    raise TypeError(f"repair must be a fxgndi.Repair, a dict of its fields or None, not "
                    f"{type(repair).__name__}")


def repair_model(model: nn.Module, data: Iterable, repair: Repair, *,
                 max_batches: int | None = None, progress: bool = False) -> None:
    """Run the steps of ``repair`` that follow removal on ``model``, in place: BatchNorm
    recalibration, then fine-tuning.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        >>> import torch
        >>> repair_model(net, [torch.ones(4, 1, 3, 3)], Repair(recalibrate_bn=True))
    """
    if repair.recalibrate_bn:
        recalibrate_bn(model, data, max_batches=max_batches)
    if repair.finetune:
        with eval_mode(model):
            fine_tune(model, data, **{"progress": progress,
                                      "recalibrate": not repair.recalibrate_bn,
                                      **repair.finetune})
