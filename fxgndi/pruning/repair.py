"""Repair: what is done to a pruned model so that what remains computes what the dense model
did, shared by width and depth pruning.

One :class:`Repair` says which steps run: folding removed channels' means into their
consumers' biases (width pruning, during removal), least-squares refits of the consumers
(:mod:`fxgndi.pruning.reconstruct`), re-estimating BatchNorm statistics
(:mod:`fxgndi.pruning.recalibrate`), and fine-tuning. :func:`repair_model` runs the steps that
follow removal, in that order, and returns what ran for the result's settings.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch.nn as nn

from fxgndi.core.errors import DataError
from fxgndi.core.runtime import eval_mode
from fxgndi.pruning.finetune import fine_tune
from fxgndi.pruning.recalibrate import recalibrate_bn
from fxgndi.pruning.reconstruct import reconstruct


@dataclass(frozen=True)
class Repair:
    """The repair steps of a pruning call (the defaults return a model that works without
    fine-tuning; README "Repair" has the measurements behind them).

    Attributes:
        reconstruct: refit every consumer of removed channels by least squares so that its
            output on the data matches the dense model's, layer by layer on the already
            repaired network (:func:`fxgndi.pruning.reconstruct.reconstruct`; width pruning).
        recalibrate_bn: re-estimate every BatchNorm's running statistics on the data after
            pruning (:func:`fxgndi.pruning.recalibrate.recalibrate_bn`; no weight changes); a
            model without BatchNorm that tracks statistics is left as it is. ``"auto"`` (the
            default) does it when the data has a batch of 2 or more samples and otherwise
            warns and skips it; True makes that an error.
        compensate: fold each removed channel's mean input to every consumer (over the data,
            before pruning) into that consumer's bias, so the pruned model computes
            ``do(read_c := E[read_c])`` instead of reading 0 (width pruning; the bias-only
            special case of ``reconstruct``, see :mod:`fxgndi.pruning.compensate`).
        finetune: ``dict(epochs=..., lr=..., ...)`` for :func:`fxgndi.pruning.finetune.fine_tune`
            on the data, last (None: none); it recalibrates BatchNorm first (unless
            ``recalibrate_bn`` just did) and trains at peak rate ``FINETUNE_LR`` by default.
        ridge: the least-squares regulariser, relative to the mean diagonal of ``X^T X``
            (1e-3: the best of 1e-4 ... 1 on held-out train images for both digits models,
            README "Repair").

    Example:
        >>> Repair(recalibrate_bn=False).to_dict()["reconstruct"]
        True
    """

    reconstruct: bool = True
    recalibrate_bn: bool | str = "auto"
    compensate: bool = False
    finetune: dict[str, Any] | None = None
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        finetune = self.finetune
        if finetune is not None and (not isinstance(finetune, dict) or "epochs" not in finetune):
            raise ValueError("finetune must be None or a dict with at least 'epochs', e.g. "
                             "finetune=dict(epochs=1)")
        if self.recalibrate_bn not in (True, False, "auto"):
            raise ValueError(f"recalibrate_bn must be True, False or 'auto', not "
                             f"{self.recalibrate_bn!r}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, not {self.ridge}")

    @classmethod
    def none(cls) -> Repair:
        """No repair at all: the pruned model as torch-pruning leaves it.

        Example:
            >>> Repair.none().recalibrate_bn
            False
        """
        return cls(reconstruct=False, recalibrate_bn=False)

    def to_dict(self) -> dict[str, Any]:
        """The steps as a plain dict (for settings and JSON)."""
        return asdict(self)


def as_repair(repair: Repair | dict[str, Any] | bool | None) -> Repair:
    """A :class:`Repair` from one, from a dict of its fields (the rest default), True (the
    defaults) or False / None (no repair).

    Example:
        >>> as_repair({"recalibrate_bn": False}).reconstruct, as_repair(False).reconstruct
        (True, False)
    """
    if repair is True:
        return Repair()
    if repair is None or repair is False:
        return Repair.none()
    if isinstance(repair, Repair):
        return repair
    if isinstance(repair, dict):
        unknown = sorted(set(repair) - set(Repair.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown repair step {unknown[0]!r}: the steps are "
                            f"{', '.join(Repair.__dataclass_fields__)}")
        return Repair(**repair)
    raise TypeError(f"repair must be a fxgndi.Repair, a dict of its fields, True or False, not "
                    f"{type(repair).__name__}")


def repair_model(model: nn.Module, data: Iterable, repair: Repair, *,
                 dense: nn.Module | None = None,
                 kept_outputs: dict[str, Sequence[int]] | None = None,
                 max_batches: int | None = None, max_memory: int | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Run the steps of ``repair`` that follow removal on ``model``, in place: least-squares
    refits against ``dense`` (when given), then BatchNorm recalibration, then fine-tuning.
    Returns what ran (layers refit, samples recalibrated on, seconds per step).

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        >>> repair_model(net, [torch.ones(4, 1, 3, 3)], Repair())["recalibrate_bn"]
        4
    """
    ran: dict[str, Any] = {"reconstruct": None, "recalibrate_bn": 0, "finetune": None,
                           "seconds": {}}
    if repair.reconstruct and dense is not None:
        start = time.perf_counter()
        report = reconstruct(model, dense, data, kept_outputs=kept_outputs, ridge=repair.ridge,
                             max_batches=max_batches, max_memory=max_memory,
                             progress=progress)
        ran["reconstruct"] = report.to_dict()
        ran["seconds"]["reconstruct"] = time.perf_counter() - start
    if repair.recalibrate_bn:
        start = time.perf_counter()
        try:
            ran["recalibrate_bn"] = recalibrate_bn(model, data, max_batches=max_batches)
        except DataError as exc:
            if repair.recalibrate_bn is True:
                raise
            warnings.warn(f"BatchNorm statistics were not recalibrated: {exc}", RuntimeWarning,
                          stacklevel=3)
        ran["seconds"]["recalibrate_bn"] = time.perf_counter() - start
    if repair.finetune:
        start = time.perf_counter()
        with eval_mode(model):
            fine_tune(model, data, **{"progress": progress,
                                      "recalibrate": not ran["recalibrate_bn"],
                                      **repair.finetune})
        ran["finetune"] = dict(repair.finetune)
        ran["seconds"]["finetune"] = time.perf_counter() - start
    return ran
