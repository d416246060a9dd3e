"""Shared test helpers: small models with fixed weights, and hook-based references that are
independent of fxgndi (plain PyTorch)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """conv -> bn -> relu -> residual block -> pool -> linear, small enough to check by hand."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(h + self.bn2(self.conv2(h)))
        return self.fc(self.pool(h).flatten(1))


def randomize_batchnorm(model: nn.Module, *, mean: float = 0.5,
                        var: tuple[float, float] = (0.5, 2.0),
                        weight: tuple[float, float] | None = (0.5, 1.5),
                        bias: tuple[float, float] | None = (-0.2, 0.2)) -> nn.Module:
    """Give every BatchNorm uniform random statistics (running mean in [-mean, mean], running
    variance in ``var``) and affines (``weight``, ``bias``; None keeps them), so that no channel
    is silent and rankings have no ties. Returns the model in eval mode."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.uniform_(-mean, mean)
                bn.running_var.uniform_(*var)
                if weight is not None:
                    bn.weight.uniform_(*weight)
                if bias is not None:
                    bn.bias.uniform_(*bias)
    return model.eval()


def make_tiny(dtype: torch.dtype = torch.float32) -> TinyNet:
    """A TinyNet in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    return randomize_batchnorm(TinyNet().to(dtype))


@contextlib.contextmanager
def replace_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                   call: int = 0) -> Iterator[None]:
    """Forward hook that replaces the output of ``module``'s ``call``-th call by ``fn(output)``.

    Independent of fxgndi: this is how one ablates with plain PyTorch.
    """
    seen = {"n": 0}

    def hook(mod, args, output):
        k = seen["n"]
        seen["n"] += 1
        return fn(output) if k == call else output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention kernels that forward-mode AD can go through on the CPU (plain PyTorch)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def hooked_gndi(model: nn.Module, module: nn.Module, batches, points=(0.0,)) -> float:
    """G-NDI of zeroing ``module``'s output, computed with a forward hook and torch.func.jvp
    only: the output becomes ``out * (1 - a)``; the tangent d logits / d a is averaged over the
    path ``points`` (``(0.0,)``: first order), then its per-sample L2 norm is averaged over
    every sample of ``batches``."""
    norms = []
    for x in batches:
        tangents = []
        for point in points:
            def f(a, x=x):
                handle = module.register_forward_hook(lambda m, args, out: out * (1 - a))
                try:
                    return model(x)
                finally:
                    handle.remove()
            with math_attention():
                _, t = torch.func.jvp(f, (torch.tensor(float(point)),), (torch.tensor(1.0),))
            tangents.append(t)
        norms.append(torch.stack(tangents).mean(0).norm(dim=-1))
    return torch.cat(norms).mean().item()


def channel_dim(module: nn.Module) -> int:
    """Where a module's channels lie: the last dim for nn.Linear, dim 1 otherwise."""
    return -1 if isinstance(module, nn.Linear) else 1


def removed_channels(model: nn.Module, kept: Mapping[str, Sequence[int]], side: str = "out"
                     ) -> dict[str, list[int]]:
    """Per conv / linear layer named in ``kept``: its ``side`` ("in" or "out") channels that
    ``kept`` does not list (those pruning removed)."""
    gone = {}
    for name, idx in kept.items():
        layer = model.get_submodule(name)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            conv = isinstance(layer, nn.Conv2d)
            width = (layer.in_channels if conv else layer.in_features) if side == "in" else \
                (layer.out_channels if conv else layer.out_features)
            gone[name] = sorted(set(range(width)) - set(idx))
    return gone


def zeroed_output(model: nn.Module, x: torch.Tensor, *,
                  inputs: Mapping[str, Sequence[int]] = {},
                  outputs: Mapping[str, Sequence[int]] = {}) -> torch.Tensor:
    """``model(x)`` without gradients with channels zeroed: ``inputs[name]`` where module
    ``name`` reads them (forward pre-hook), ``outputs[name]`` where it writes them (forward
    hook), in :func:`channel_dim`. Plain PyTorch: what removing those channels must equal where
    nothing between writer and reader normalises over channels."""
    def fill(t: torch.Tensor, idx: Sequence[int], dim: int) -> torch.Tensor:
        return t.index_fill(dim % t.dim(), torch.tensor(list(idx), dtype=torch.long), 0)

    with contextlib.ExitStack() as stack:
        for name, idx in inputs.items():
            if idx:
                m = model.get_submodule(name)
                stack.enter_context(m.register_forward_pre_hook(
                    lambda m, a, idx=idx: (fill(a[0], idx, channel_dim(m)), *a[1:])))
        for name, idx in outputs.items():
            if idx:
                m = model.get_submodule(name)
                stack.enter_context(m.register_forward_hook(
                    lambda m, a, out, idx=idx: fill(out, idx, channel_dim(m))))
        with torch.no_grad():
            return model(x)
