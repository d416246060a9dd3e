"""Which tensor of a model's output fxgndi reads, and its class layout.

Models return a tensor, a tuple / list (auxiliary heads), a dict (torchvision segmentation's
``{"out": ..., "aux": ...}``, Hugging Face's ``ModelOutput``) or a namedtuple. Every verb reads
one tensor, chosen by the run option ``output``: a key, an index, an attribute name, or a
callable on the output; by default the tensor itself, a dict's ``"logits"`` or else ``"out"``
entry, a namedtuple's ``logits`` field, or a tuple's first element.

Class layout: outputs are ``[B, C]`` or dense ``[B, C, *positions]`` (segmentation), classes
in dim 1 as in ``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from fxgndi.core.errors import DataError

OutputSpec = Union[None, str, int, Callable[[Any], torch.Tensor]]


def select_output(out: Any, output: OutputSpec = None) -> torch.Tensor:
    """The tensor of ``out`` that ``output`` names (see the module docstring).

    Example:
        >>> select_output({"out": torch.zeros(2, 3), "aux": torch.ones(2, 3)}).sum().item()
        0.0
        >>> select_output((torch.zeros(1), torch.ones(1)), 1).item()
        1.0
    """
    if callable(output):
        chosen = output(out)
    elif output is not None:
        try:
            if isinstance(output, str) and not isinstance(out, dict):
                chosen = getattr(out, output)  # a namedtuple's field
            else:
                chosen = out[output]  # a dict's key, a sequence's index
        except (KeyError, IndexError, AttributeError, TypeError):
            raise DataError(f"the model's output ({_describe(out)}) has no {output!r}: pass "
                            "output= a key, index or attribute it has, or a callable") from None
    else:
        chosen = _default(out)
    if not isinstance(chosen, torch.Tensor):
        raise DataError(f"output={output!r} selects {type(chosen).__name__} from the model's "
                        f"output ({_describe(out)}), not a tensor: pass output= a key, index or "
                        "callable that picks one tensor")
    return chosen


def _default(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for key in ("logits", "out"):
            if key in out:
                return out[key]
        raise DataError(f"the model returns a dict ({_describe(out)}) and fxgndi cannot tell "
                        "which entry to read: pass output='<key>' (CLI: --output KEY)")
    if hasattr(out, "_fields"):  # namedtuple
        return getattr(out, "logits") if "logits" in out._fields else out[0]
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    raise DataError(f"cannot read the model's output of type {type(out).__name__}: pass "
                    "output= a callable that returns one tensor")


def _describe(out: Any) -> str:
    if isinstance(out, dict):
        return f"dict with keys {', '.join(map(str, out))}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__} of {len(out)}"
    return type(out).__name__


def class_layout(out: torch.Tensor) -> torch.Tensor:
    """``out`` as ``[B, C, P]``: classes in dim 1 and every position flattened into the last
    (P = 1 for ``[B, C]``).

    Example:
        >>> class_layout(torch.zeros(2, 5, 4, 4)).shape, class_layout(torch.zeros(2, 5)).shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 1]))
    """
    if out.dim() < 2:
        raise DataError(f"the model's output has shape {tuple(out.shape)}: fxgndi needs a batch "
                        "dim and an output dim ([B, K] or [B, C, ...])")
    return out.reshape(out.shape[0], out.shape[1], -1)
