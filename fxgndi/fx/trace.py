"""Tracing with torch.fx: one tracer for every part of fxgndi, and a clear error when it fails."""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from fxgndi.core.errors import UntraceableModelError
from fxgndi.core.runtime import eval_mode


class GndiTracer(fx.Tracer):
    """A torch.fx tracer that keeps user-chosen modules as leaves and remembers where it failed.

    ``leaf_modules`` holds qualified module names and/or module classes that are not traced
    through (their insides cannot be sites, but their outputs can); ``autowrap_functions``
    are functions recorded as one call instead of traced through.

    Example:
        >>> tracer = GndiTracer(leaf_modules=[nn.MultiheadAttention])
        >>> graph = tracer.trace(nn.Sequential(nn.Linear(2, 2)))
    """

    def __init__(self, leaf_modules: Iterable[str | type] = (),
                 autowrap_functions: Iterable[Callable] = ()) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        leaves = list(leaf_modules)
        self._leaf_names = {m for m in leaves if isinstance(m, str)}
        self._leaf_types = tuple(m for m in leaves if isinstance(m, type))
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module is the first to see it
                self.failed_module = self.path_of_module(m)
            raise


def trace(model: nn.Module, *, leaf_modules: Iterable[str | type] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its parameters (no weight copy).

    The trace is taken in eval mode, so functional calls that read ``self.training`` (stochastic
    depth, ``F.dropout``) are inert in the graph. A GraphModule (e.g. a depth-pruned model) is
    copied, not re-traced: re-tracing would rename
    its nodes and drop the module-stack metadata that names residual-block sites. A model that
    does not trace is traced once more with the modules and functions its library (timm)
    registers as untraceable kept opaque (:func:`library_notrace`); if that fails too, raises
    UntraceableModelError naming the failing module and suggesting ``leaf_modules`` or
    ``concrete_args``.

    Example:
        >>> gm = trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, fx.GraphModule) and concrete_args is None:
        return fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    leaves = list(leaf_modules)
    tracer = GndiTracer(leaves)
    try:
        # In eval mode: torch.fx bakes `self.training` into functional calls (torchvision's
        # stochastic_depth, F.dropout), and a measurement must not be random.
        with eval_mode(model):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many types: TraceError, TypeError, ...
        modules, functions = library_notrace()
        if modules or functions:  # a retry keeps what the library says fx cannot trace opaque
            retry = GndiTracer(leaves + modules, functions)
            try:
                with eval_mode(model):
                    graph = retry.trace(model, concrete_args=concrete_args)
                return fx.GraphModule(retry.root, graph, type(model).__name__)
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                pass
        where = (f"module '{tracer.failed_module}' "
                 f"({type(model.get_submodule(tracer.failed_module)).__name__})"
                 if tracer.failed_module else f"model {type(model).__name__}")
        raise UntraceableModelError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}. Fix: keep it "
            f"opaque with leaf_modules=['{tracer.failed_module or '<module name>'}'] (its output "
            "can still be a site), or fix data-dependent arguments with concrete_args={...}."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def library_notrace() -> tuple[list[type], list[Callable]]:
    """The module classes and functions that an already imported model library registers as
    not traceable by torch.fx (timm's ``register_notrace_module`` /
    ``register_notrace_function``, what its own fx feature extraction keeps opaque). Empty when
    no such library is loaded; nothing is imported here.

    Example:
        >>> modules, functions = library_notrace()
        >>> all(isinstance(m, type) for m in modules)
        True
    """
    for name in ("timm.layers._fx", "timm.models._features_fx"):  # timm >= 1.0, 0.9
        registry = sys.modules.get(name)
        if registry is None:
            continue
        modules = getattr(registry, "get_notrace_modules", lambda: registry._leaf_modules)()
        functions = getattr(registry, "get_notrace_functions",
                            lambda: registry._autowrap_functions)()
        return list(modules), list(functions)
    return [], []
