"""Argument and value checks shared by every verb: one wording for each kind of mistake."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from fxgndi.core.errors import NonFiniteError
from fxgndi.core.names import renamed


def check_choice(what: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the allowed values when ``value`` is not one of them.

    Example:
        >>> check_choice("readout", "logit", ("logits", "loss"))
        Traceback (most recent call last):
        ...
        ValueError: unknown readout 'logit': use one of logits, loss
    """
    if value not in allowed:
        hint = renamed(value) if isinstance(value, str) else None
        extra = f" (renamed: use {hint})" if hint else ""
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}{extra}")


def check_fraction(what: str, value: Any, meaning: str = "") -> float:
    """``value`` as a float in the open interval (0, 1), else a ValueError saying why.

    Example:
        >>> check_fraction("sparsity", 1.5)
        Traceback (most recent call last):
        ...
        ValueError: sparsity must be in (0, 1), not 1.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{what} must be in (0, 1){meaning}, not {value!r}")
    return float(value)


def check_count(what: str, value: Any, *, minimum: int = 1, allow_none: bool = False,
                meaning: str = "") -> int | None:
    """``value`` as an integer >= ``minimum`` (or None, with ``allow_none``), else a
    ValueError saying why.

    Example:
        >>> check_count("round_to", 0, allow_none=True)
        Traceback (most recent call last):
        ...
        ValueError: round_to must be None or an integer >= 1, not 0
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be {'None or ' if allow_none else ''}an integer >= "
                         f"{minimum}{meaning}, not {value!r}")
    return int(value)


def check_finite(values: Any, what: str, *, labels: Sequence[str] | None = None,
                 fix: str = "check the model's activations on this data (overflow, log of "
                            "zero)") -> None:
    """Raise NonFiniteError when ``values`` (a tensor, an array, or nested tuples / lists /
    dicts of them) hold NaN or Inf. With ``labels``, one per entry of the last dimension, the
    message names the entries that are not finite.

    Example:
        >>> import torch
        >>> check_finite(torch.tensor([[1.0, float("nan")]]), "scores", labels=["a", "b"])
        Traceback (most recent call last):
        ...
        fxgndi.core.errors.NonFiniteError: NaN or Inf in scores at b: check the model's ...
    """
    import numpy as np
    import torch

    def leaves(v: Any):
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            for item in v:
                yield from leaves(item)
        elif isinstance(v, (torch.Tensor, np.ndarray)) or np.isscalar(v):
            yield v

    for leaf in leaves(values):
        if isinstance(leaf, torch.Tensor):
            finite = torch.isfinite(leaf.detach()).cpu().numpy()
        else:
            finite = np.isfinite(np.asarray(leaf, dtype=float))
        if finite.all():
            continue
        where = ""
        if labels is not None and finite.ndim >= 1 and finite.shape[-1] == len(labels):
            bad = ~finite.reshape(-1, len(labels)).all(0)
            names = [name for name, b in zip(labels, bad) if b]
            where = f" at {', '.join(names[:10])}" + (" ..." if len(names) > 10 else "")
        raise NonFiniteError(f"NaN or Inf in {what}{where}: {fix}")
