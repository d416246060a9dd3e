"""Tracing with torch.fx: one tracer for every part of fxgndi, and a clear error when it fails."""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from fxgndi.core.errors import UntraceableModelError
from fxgndi.core.runtime import eval_mode
from fxgndi.core.streams import as_inputs, call_model


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
    its nodes and drop the module-stack metadata that names residual-block sites.

    A model that does not trace is traced again, first with the modules and functions its
    library (timm) registers as untraceable kept opaque (:func:`library_notrace`), then with
    each submodule that still fails (data-dependent control flow in its forward) kept opaque
    too, one at a time, innermost first (before that, forward parameters with a constant
    default, ``mask=None`` or ``return_features=False``, that ``concrete_args`` leaves open are
    bound to their defaults, with a warning: a Proxy for a flag breaks ``if mask is not None``;
    they are in ``gm.meta["fxgndi_bound_defaults"]``). Such a module's insides are not sites
    and the groups read inside it cannot be scored (``GNDIImportance`` returns None for them:
    ``prune`` keeps their widths); the modules made opaque are listed in
    ``gm.meta["fxgndi_opaque"]`` and in a warning. Raises UntraceableModelError, saying what
    was tried, when the model's own forward cannot be traced.

    Example:
        >>> gm = trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, fx.GraphModule) and concrete_args is None:
        return fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    leaves = list(leaf_modules)
    library: tuple[list[type], list[Callable]] | None = None  # not looked at until needed
    defaults: dict[str, Any] | None = None  # the forward's constant defaults, bound on failure
    opaque: list[str] = []  # submodules that failed, kept opaque in the next try
    first: tuple[BaseException, str | None] | None = None
    while True:
        modules, functions = library or ([], [])
        tracer = GndiTracer(leaves + modules + opaque, functions)
        try:
            # In eval mode: torch.fx bakes `self.training` into functional calls (torchvision's
            # stochastic_depth, F.dropout), and a measurement must not be random.
            with eval_mode(model):
                graph = tracer.trace(model, concrete_args=concrete_args)
            break
        except Exception as exc:  # torch.fx raises many types: TraceError, TypeError, ...
            first = first or (exc, tracer.failed_module)
            if library is None:
                library = library_notrace()
                if library[0] or library[1]:
                    continue
            if defaults is None:
                defaults = constant_defaults(model, concrete_args)
                if defaults:
                    concrete_args = {**(concrete_args or {}), **defaults}
                    continue
            failed = tracer.failed_module
            if not failed or failed in opaque or len(opaque) >= _MAX_OPAQUE:
                raise _untraceable(model, exc, failed, first, library, opaque) from exc
            opaque.append(failed)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["fxgndi_opaque"] = list(opaque)
    gm.meta["fxgndi_bound_defaults"] = dict(defaults or {})
    if defaults:
        warnings.warn(f"{type(model).__name__} traces only with forward's parameters "
                      f"{defaults} bound to these defaults (they are not inputs of the traced "
                      "graph); pass concrete_args= to choose other values", stacklevel=2)
    if opaque:
        shown = ", ".join(f"'{n}'" for n in opaque[:5]) + (", ..." if len(opaque) > 5 else "")
        warnings.warn(f"torch.fx could not trace {len(opaque)} submodule(s) of "
                      f"{type(model).__name__} ({shown}: data-dependent control flow); they are "
                      "kept opaque: their insides are not sites and the groups read inside "
                      "them are not pruned. Pass leaf_modules= to choose, or concrete_args= to "
                      "fix the arguments they branch on", stacklevel=2)
    return gm


_MAX_OPAQUE = 256  # submodules made opaque automatically before giving up
_CONSTANT = (type(None), bool, int, float, str)


def bind_defaults(model: nn.Module, example_inputs: Any, *,
                  leaf_modules: Iterable[str | type] = (),
                  concrete_args: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``concrete_args``, plus the constant defaults of the forward parameters that
    ``example_inputs`` leaves open, where the model's trace fails to run on ``example_inputs``
    without them and runs with them (with a warning naming them). torch.fx traces an
    ``mask=None`` parameter as a tensor input, and ``if mask is not None: x = x.view(...)``
    then takes the branch a call without ``mask`` never takes. What the verbs trace with.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, mask=None):
        ...         return x if mask is None else x * mask
        >>> import torch, warnings
        >>> with warnings.catch_warnings(record=True):
        ...     bind_defaults(Net(), torch.ones(1, 2))
        {'mask': None}
    """
    inputs = as_inputs(example_inputs)
    positional = [p.name for p in _forward_parameters(model)][:len(getattr(inputs, "args",
                                                                           (inputs,)))]
    keywords = set(getattr(inputs, "kwargs", {}))
    defaults = {k: v for k, v in constant_defaults(model, concrete_args).items()
                if k not in keywords and k not in positional}
    if not defaults:
        return concrete_args

    def runs(args: dict[str, Any] | None) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = trace(model, leaf_modules=leaf_modules, concrete_args=args)
            if gm.meta["fxgndi_bound_defaults"]:  # traced only once trace() bound them
                return False
            with eval_mode(gm), torch.no_grad():
                call_model(gm, inputs)
            return True
        except Exception:  # noqa: BLE001 - any failure of the traced graph is the answer
            return False

    bound = {**(concrete_args or {}), **defaults}
    if runs(concrete_args) or not runs(bound):
        return concrete_args
    warnings.warn(f"the trace of {type(model).__name__} runs only with forward's parameters "
                  f"{defaults} bound to these defaults (torch.fx took them for inputs); they "
                  "are bound: pass concrete_args= to choose other values", stacklevel=2)
    return bound


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: nothing to bind
        return []


def constant_defaults(model: nn.Module, concrete_args: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The parameters of ``model.forward`` with a constant default (None, a bool, a number, a
    string) that ``concrete_args`` does not fix, with those defaults: what :func:`trace` binds
    when the model does not trace with them as inputs.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, mask=None, *, features=False, size=(2, 2)): ...
        >>> constant_defaults(Net(), {"features": True})
        {'mask': None}
    """
    given = concrete_args or {}
    return {p.name: p.default for p in _forward_parameters(model)
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in given
            and p.default is not p.empty and isinstance(p.default, _CONSTANT)}


def _untraceable(model: nn.Module, exc: BaseException, failed: str | None,
                 first: tuple[BaseException, str | None],
                 library: tuple[list[type], list[Callable]] | None,
                 opaque: list[str]) -> UntraceableModelError:
    """The error of a model that does not trace even with its failing submodules opaque:
    where it failed, what was tried, and the fix."""
    def where(name: str | None) -> str:
        if not name:
            return f"{type(model).__name__}'s own forward"
        return f"module '{name}' ({type(model.get_submodule(name)).__name__})"

    tried = []
    if library and (library[0] or library[1]):
        tried.append(f"the {len(library[0])} module classes and {len(library[1])} functions "
                     "timm registers as untraceable kept opaque")
    if opaque:
        tried.append("these submodules kept opaque after they failed: "
                     + ", ".join(where(n) for n in opaque[:8]) + (", ..." if len(opaque) > 8
                                                                  else ""))
    tried_text = f" Tried: {'; '.join(tried)}." if tried else ""
    first_text = (f" (The first failure was in {where(first[1])}: "
                  f"{type(first[0]).__name__}: {first[0]}.)" if first[0] is not exc else "")
    if failed:  # a submodule failed again although it is opaque, or too many failed
        fix = (f"keep it opaque with leaf_modules=['{failed}'] (its output can still be a "
               "site), or fix data-dependent arguments with concrete_args={...}")
    else:
        fix = ("fix data-dependent arguments with concrete_args={...}, make a function the "
               "forward calls one opaque call with torch.fx.wrap, or trace a traceable part of "
               "the model on its own (e.g. prune(model.backbone, ...))")
    return UntraceableModelError(
        f"torch.fx could not trace {where(failed)}: {type(exc).__name__}: {exc}."
        f"{tried_text}{first_text} Fix: {fix}.")


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
