"""The tracer's retry with a model library's notrace registry (timm's), faked here so that the
test needs no timm."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from fxgndi.core.errors import UntraceableModelError
from fxgndi.fx.trace import trace


class Gate(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def half(x: torch.Tensor) -> torch.Tensor:
    if x.mean() > 0:  # untraceable too, unless recorded as one call
        return x / 2
    return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half(self.gate(self.conv(x)))


def _registry(modules: list, functions: list) -> types.ModuleType:
    fake = types.ModuleType("timm.layers._fx")
    fake.get_notrace_modules = lambda: set(modules)
    fake.get_notrace_functions = lambda: set(functions)
    return fake


def test_untraceable_model_traces_with_the_library_registry(monkeypatch):
    model = Net().eval()
    for name in ("timm.layers._fx", "timm.models._features_fx"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(UntraceableModelError, match="module 'gate' \\(Gate\\)"):
        trace(model)
    monkeypatch.setitem(sys.modules, "timm.layers._fx", _registry([Gate], [half]))
    gm = trace(model)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op.startswith("call")]
    assert calls == [("call_module", "conv"), ("call_module", "gate"), ("call_function", half)]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), half(model.gate(model.conv(x))))


def test_a_registry_that_does_not_cover_the_failure_reports_the_first_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.layers._fx", _registry([Gate], []))
    with pytest.raises(UntraceableModelError, match="Fix: keep it opaque"):
        trace(Net())  # half() still breaks the trace
