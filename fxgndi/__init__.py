"""fxgndi: causal layer and channel importance (G-NDI) on torch.fx.

Example:
    >>> import torch, torchvision, fxgndi
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> data = [torch.randn(8, 3, 32, 32)]
    >>> scores = fxgndi.score(model, data, sites="conv", progress=False)
    >>> exact = fxgndi.ablate(model, data, sites="conv", metric="logit_l2", progress=False)
"""

from .baselines import calibrate
from .bench import BenchReport, bench
from .depth import DepthPruneResult, prune_depth
from .errors import (DataError, FxgndiError, NonFiniteError, SiteSelectionError,
                     UntraceableModelError)
from .estimate import ablate, readout, score
from .export import ExportResult, export, load
from .graph import InterventionGraph, intervene, trace
from .importance import GNDIImportance
from .prune import PruneResult, prune
from .scores import Scores
from .sites import Site
from .validate import ValidityReport, validate

__version__ = "0.1.0"

__all__ = [
    "ablate", "bench", "calibrate", "export", "intervene", "load", "prune", "prune_depth",
    "readout", "score", "trace", "validate", "BenchReport", "DepthPruneResult", "ExportResult",
    "GNDIImportance", "InterventionGraph", "PruneResult", "Scores", "Site", "ValidityReport",
    "DataError", "FxgndiError", "NonFiniteError", "SiteSelectionError", "UntraceableModelError",
]
