"""fxgndi: causal layer and channel importance (G-NDI) on torch.fx.

This module only re-exports the public API; each name is imported from its room on first use
(so that ``fxgndi --help`` and ``import fxgndi`` stay light). The rooms, lowest first:
``fxgndi.core`` (shared utilities), ``fxgndi.fx`` (tracing, sites, interventions),
``fxgndi.gndi`` (estimators, scores, validity), ``fxgndi.deploy`` (export, load, bench),
``fxgndi.pruning`` (width and depth pruning, repair), ``fxgndi.app`` (CLI, demo, data, zoo).

Example:
    >>> import torch, torchvision, fxgndi
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> data = [torch.randn(8, 3, 32, 32)]
    >>> scores = fxgndi.score(model, data, sites="conv", progress=False)
    >>> exact = fxgndi.ablate(model, data, sites="conv", metric="logit_l2", progress=False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "fxgndi.core.errors": ("DataError", "FxgndiError", "NonFiniteError", "SiteSelectionError",
                           "UntraceableModelError"),
    "fxgndi.core.options": ("RunOptions",),
    "fxgndi.fx.trace": ("trace",),
    "fxgndi.fx.sites": ("Site",),
    "fxgndi.fx.intervention": ("InterventionGraph", "calibrate", "intervene"),
    "fxgndi.gndi.readouts": ("readout",),
    "fxgndi.gndi.estimate": ("ablate", "score"),
    "fxgndi.gndi.scores": ("Scores",),
    "fxgndi.gndi.validate": ("ValidityReport", "validate"),
    "fxgndi.deploy.export": ("ExportResult", "export", "load"),
    "fxgndi.deploy.bench": ("BenchReport", "bench"),
    "fxgndi.deploy.latency": ("Latency",),
    "fxgndi.pruning.importance": ("AblationImportance", "GNDIImportance"),
    "fxgndi.pruning.repair": ("Repair",),
    "fxgndi.pruning.rounding": ("AutoRound",),
    "fxgndi.pruning.result": ("DepthPruneResult", "PruneResult"),
    "fxgndi.pruning.width": ("prune",),
    "fxgndi.pruning.depth": ("prune_depth",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fxgndi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # what static tools see: the same names, imported eagerly
    from fxgndi.core.errors import (DataError, FxgndiError, NonFiniteError,  # noqa: F401
                                    SiteSelectionError, UntraceableModelError)
    from fxgndi.core.options import RunOptions  # noqa: F401
    from fxgndi.deploy.bench import BenchReport, bench  # noqa: F401
    from fxgndi.deploy.export import ExportResult, export, load  # noqa: F401
    from fxgndi.deploy.latency import Latency  # noqa: F401
    from fxgndi.fx.intervention import InterventionGraph, calibrate, intervene  # noqa: F401
    from fxgndi.fx.sites import Site  # noqa: F401
    from fxgndi.fx.trace import trace  # noqa: F401
    from fxgndi.gndi.estimate import ablate, score  # noqa: F401
    from fxgndi.gndi.readouts import readout  # noqa: F401
    from fxgndi.gndi.scores import Scores  # noqa: F401
    from fxgndi.gndi.validate import ValidityReport, validate  # noqa: F401
    from fxgndi.pruning.depth import prune_depth  # noqa: F401
    from fxgndi.pruning.importance import AblationImportance, GNDIImportance  # noqa: F401
    from fxgndi.pruning.repair import Repair  # noqa: F401
    from fxgndi.pruning.rounding import AutoRound  # noqa: F401
    from fxgndi.pruning.result import DepthPruneResult, PruneResult  # noqa: F401
    from fxgndi.pruning.width import prune  # noqa: F401
