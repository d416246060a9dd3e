"""Exceptions raised by fxgndi. Each message names the cause and the fix."""

from __future__ import annotations


class FxgndiError(Exception):
    """Base class of every error fxgndi raises on purpose."""


class UntraceableModelError(FxgndiError, RuntimeError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported ops)."""


class SiteSelectionError(FxgndiError, ValueError):
    """A site selection matched nothing, or named something that is not a site."""


class DataError(FxgndiError, ValueError):
    """The data cannot be used: empty loader, missing labels, wrong shapes."""


class NonFiniteError(FxgndiError, FloatingPointError):
    """NaN or Inf appeared in activations, outputs or scores."""


class DeviceError(FxgndiError, ValueError):
    """The requested device does not exist or cannot be used on this machine."""
