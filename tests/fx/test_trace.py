"""The tracer's retries: with a model library's notrace registry (timm's, faked here so that the
test needs no timm), then with each failing submodule kept opaque."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from fxgndi.core.errors import UntraceableModelError
from fxgndi.core.streams import Inputs
from fxgndi.fx.trace import bind_defaults, trace


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
    with pytest.raises(UntraceableModelError, match="Net's own forward.*module 'gate' \\(Gate\\)"):
        trace(model)  # gate alone would be made opaque; half() in Net's forward still fails
    monkeypatch.setitem(sys.modules, "timm.layers._fx", _registry([Gate], [half]))
    gm = trace(model)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op.startswith("call")]
    assert calls == [("call_module", "conv"), ("call_module", "gate"), ("call_function", half)]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), half(model.gate(model.conv(x))))


def test_a_registry_that_does_not_cover_the_failure_reports_the_first_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.layers._fx", _registry([Gate], []))
    with pytest.raises(UntraceableModelError, match="Net's own forward.*Tried: the 1 module "
                       "classes and 0 functions timm registers"):
        trace(Net())  # half() still breaks the trace


class Block(nn.Module):
    """A traceable block around an untraceable gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x)) + x


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block1, self.block2 = Block(), Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.stem(x)))


def _no_registry(monkeypatch) -> None:
    for name in ("timm.layers._fx", "timm.models._features_fx"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_failing_submodules_are_kept_opaque_and_the_rest_is_traced(monkeypatch):
    _no_registry(monkeypatch)
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    with pytest.warns(UserWarning, match=r"2 submodule\(s\) of TwoBlocks \('block1.gate', "
                                         r"'block2.gate'"):
        gm = trace(model)
    assert gm.meta["fxgndi_opaque"] == ["block1.gate", "block2.gate"]
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["stem", "block1.conv", "block1.gate", "block2.conv", "block2.gate"]
    # The opaque gates still branch at run time: with zero weights each block's conv outputs
    # its bias, which the gate turns positive whichever its sign, so the model is stem(x) + 2.
    x = torch.randn(2, 3, 4, 4)
    for sign in (1.0, -1.0):
        for block in (model.block1, model.block2):
            block.conv.weight.data.zero_()
            block.conv.bias.data.fill_(sign)
        torch.testing.assert_close(gm(x), model.stem(x) + 2)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None, scale=2.0):
        if mask is not None:  # a Proxy for mask is never None: the trace fails
            x = x * mask
        return self.fc(x) * scale


def test_defaults_are_bound_only_where_the_trace_needs_them_to_run_the_example():
    model = Masked()
    x = torch.randn(2, 4)
    # torch.fx traces mask as a tensor input: the graph multiplies by it, and fails without one
    with pytest.raises(TypeError):
        trace(model)(x)
    with pytest.warns(UserWarning, match=r"\{'mask': None, 'scale': 2.0\} bound.*concrete_args="):
        bound = bind_defaults(model, x)
    assert bound == {"mask": None, "scale": 2.0}
    torch.testing.assert_close(trace(model, concrete_args=bound)(x), model.fc(x) * 2)
    # given values stand; a trace that runs binds nothing; a supplied mask is not bound
    assert bind_defaults(model, x, concrete_args={"mask": None}) == {"mask": None}
    assert bind_defaults(model, Inputs((x, torch.ones(2, 4)))) is None


def test_a_traceable_model_records_no_opaque_module():
    gm = trace(TwoBlocks(), leaf_modules=[Gate])
    assert gm.meta["fxgndi_opaque"] == []


def test_an_untraceable_top_level_says_what_was_tried(monkeypatch):
    _no_registry(monkeypatch)
    with pytest.raises(UntraceableModelError) as err:
        trace(Net())  # gate is made opaque, then half() in Net's own forward fails
    message = str(err.value)
    assert "could not trace Net's own forward" in message
    assert "Tried: these submodules kept opaque after they failed: module 'gate' (Gate)" in message
    assert "The first failure was in module 'gate' (Gate)" in message
    assert "torch.fx.wrap" in message and "concrete_args" in message
