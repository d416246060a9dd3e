"""Helpers shared by the pruning criteria: layer lookup, eval mode, batches, channel reduction.

Every criterion scores the OUTPUT channels of conv/linear layers (``nn.Conv1d/2d/3d``,
``nn.Linear``), named as in ``model.named_modules()``, and returns one float64 vector per layer
where higher means more important. Activation-based criteria read a layer's output with a
forward hook; ``nn.MultiheadAttention.out_proj`` never runs its own forward, so its output is
read at the attention module's first output instead. Linear outputs are taken as
``[B, ..., C]`` (batch first).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from fxgndi.core.checks import check_finite as check_finite_values
from fxgndi.core.errors import DataError, SiteSelectionError
from fxgndi.core.runtime import device_of, eval_mode, on_device  # noqa: F401  (re-exported)
from fxgndi.core.streams import iter_batches

CHANNEL_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Scores = dict[str, np.ndarray]


def scorable_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers of ``model`` that criteria can score.

    Example:
        >>> import torch.nn as nn
        >>> scorable_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)))
        ['0', '2']
    """
    return [n for n, m in model.named_modules() if isinstance(m, CHANNEL_LAYERS)]


def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None) -> dict[str, nn.Module]:
    """Map layer names to modules; ``None`` means every conv/linear layer.

    Raises ``SiteSelectionError`` (a ``ValueError``) naming an unknown or non-conv/linear name.

    Example:
        >>> import torch.nn as nn
        >>> list(resolve_layers(nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"]))
        ['0']
    """
    valid = scorable_layers(model)
    if layers is None:
        names = valid
    elif isinstance(layers, str):
        names = [layers]
    else:
        names = list(dict.fromkeys(layers))
    if not names:
        raise SiteSelectionError(
            f"no layers to score; pass conv/linear layer names, valid ones: {valid}")
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in modules:
            raise SiteSelectionError(
                f"layer {name!r} is not a module of the model; valid conv/linear layers: {valid}")
        if not isinstance(modules[name], CHANNEL_LAYERS):
            raise SiteSelectionError(
                f"layer {name!r} is a {type(modules[name]).__name__}, not a Conv1d/2d/3d or "
                f"Linear layer; valid conv/linear layers: {valid}")
        out[name] = modules[name]
    return out


@contextmanager
def requiring_grad(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Temporarily set ``requires_grad=True`` on ``params`` (frozen layers can be scored too).

    Example:
        >>> w = torch.zeros(2)
        >>> with requiring_grad([w]):
        ...     w.requires_grad
        True
        >>> w.requires_grad
        False
    """
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def batches(data: Iterable, device: torch.device, max_batches: int | None, *,
            labels: bool = True, arity: int = 1
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Up to ``max_batches`` float32 ``(x, y)`` batches on ``device`` (labels required by default;
    ``arity``: the model's positional inputs, as :func:`fxgndi.core.streams.split_batch`).

    Example:
        >>> [x.dtype for x, _ in batches([(torch.zeros(1), torch.zeros(1))], "cpu", None)]
        [torch.float32]
    """
    return iter_batches(data, device=device, dtype=torch.float32, max_batches=max_batches,
                        need_labels=labels, why="this criterion", arity=arity)


def first_input_shape(data: Iterable) -> tuple[int, ...]:
    """Shape of one sample (without the batch dim) of the first batch of ``data``.

    Example:
        >>> first_input_shape([(torch.zeros(4, 3, 8, 8), torch.zeros(4))])
        (3, 8, 8)
    """
    x, _ = next(iter_batches(data, max_batches=1))
    return tuple(x.shape[1:])


def logits_of(output: Any) -> torch.Tensor:
    """The model output as a tensor of logits; a clear error for tuples/dicts.

    Example:
        >>> logits_of(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    raise DataError(
        f"the model returned {type(output).__name__}, not a tensor of logits; wrap it in a "
        "module whose forward returns the logits tensor")


def channels_first(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A layer output with channels in dim 1: conv outputs already are ``[B, C, ...]``; a Linear
    output ``[B, ..., C]`` gets its last dim moved to dim 1.

    Example:
        >>> channels_first(torch.nn.Linear(2, 5), torch.zeros(3, 7, 5)).shape
        torch.Size([3, 5, 7])
    """
    if isinstance(module, nn.Linear) and out.dim() > 2:
        return out.movedim(-1, 1)
    return out


def per_channel(weight_score: torch.Tensor) -> np.ndarray:
    """Sum a per-weight score over each output channel (dim 0 of conv/linear weights).

    Example:
        >>> per_channel(torch.ones(4, 3, 2, 2)).tolist()
        [12.0, 12.0, 12.0, 12.0]
    """
    return weight_score.detach().reshape(weight_score.shape[0], -1).sum(1).double().cpu().numpy()


def check_finite(method: str, scores: Scores) -> Scores:
    """Raise ``NonFiniteError`` if any score is NaN or Inf; return ``scores`` otherwise.

    Example:
        >>> check_finite("snip", {"0": np.ones(2)})["0"].tolist()
        [1.0, 1.0]
    """
    for name, s in scores.items():
        check_finite_values(s, f"the {method} scores of layer {name!r}",
                            fix="NaN/Inf in activations or gradients: check the model and data "
                                "for NaNs or reduce the input scale")
    return scores


def _hook_target(model: nn.Module, name: str, module: nn.Module) -> tuple[nn.Module, bool, bool]:
    """Where a layer's output can be observed: ``(module to hook, output is a tuple, seq-first)``.

    ``nn.MultiheadAttention`` uses its ``out_proj`` weight functionally (the Linear's forward
    never runs), but the attention's first output IS the out_proj output: hook the parent.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return parent, True, not parent.batch_first
    return module, False, False


@contextmanager
def forward_hooks(model: nn.Module, modules: dict[str, nn.Module],
                  make_hook: Callable[[str, nn.Module], Callable[[torch.Tensor], Any]]
                  ) -> Iterator[None]:
    """Observe each layer's output: ``make_hook(name, module)`` returns ``fn(out)``, called with
    the output (batch first); a tensor returned by ``fn`` replaces the output. Hooks are removed
    on exit.

    Example:
        >>> seen = []
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with forward_hooks(net, {"0": net[0]}, lambda n, m: lambda out: seen.append(n)):
        ...     _ = net(torch.zeros(1, 2))
        >>> seen
        ['0']
    """
    handles = []
    for name, module in modules.items():
        target, in_tuple, seq_first = _hook_target(model, name, module)
        fn = make_hook(name, module)

        def hook(mod, inputs, output, fn=fn, in_tuple=in_tuple, seq_first=seq_first):
            out = output[0] if in_tuple else output
            swap = seq_first and out.dim() == 3
            new = fn(out.transpose(0, 1) if swap else out)
            if new is None:
                return None
            new = new.transpose(0, 1) if swap else new
            return (new, *output[1:]) if in_tuple else new
        handles.append(target.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_calls(method: str, calls: dict[str, int]) -> None:
    """Hook-based criteria need each scored layer called exactly once per forward.

    Example:
        >>> check_calls("hrank", {"0": 1})
    """
    for name, n in calls.items():
        if n == 0:
            raise SiteSelectionError(
                f"{method}: layer {name!r} was never called by the model's forward (its weight "
                "is used functionally or the layer is unused); score another layer")
        if n > 1:
            raise SiteSelectionError(
                f"{method}: layer {name!r} is called {n} times per forward (a shared module); "
                "activation-based criteria need one call per forward")
