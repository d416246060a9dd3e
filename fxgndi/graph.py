"""Trace a model with torch.fx and insert intervention nodes at the chosen sites.

After each site ``h`` the graph computes ``h + alpha * (b - h)``. ``alpha = 0`` is the original
model, ``alpha = 1`` is the intervention ``do(h := b)``, and ``d f / d alpha`` at 0 is the G-NDI
tangent ``J (b - h)``. One traced module therefore serves every JVP and every ablation.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import SiteSelectionError, UntraceableModelError
from .runtime import eval_mode
from .sites import Site, SiteSpec, default_channel_dim, select_sites

GRANULARITIES = ("layer", "channel")
_ALPHA_PREFIX = "fxgndi_alpha_"
_SITE_PREFIX = "fxgndi_site_"


class GndiTracer(fx.Tracer):
    """A torch.fx tracer that keeps user-chosen modules as leaves and remembers where it failed.

    ``leaf_modules`` holds qualified module names and/or module classes that are not traced
    through (their insides cannot be sites, but their outputs can).

    Example:
        >>> tracer = GndiTracer(leaf_modules=[nn.MultiheadAttention])
        >>> graph = tracer.trace(nn.Sequential(nn.Linear(2, 2)))
    """

    def __init__(self, leaf_modules: Iterable[str | type] = ()) -> None:
        super().__init__()
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
    its nodes and drop the module-stack metadata that names residual-block sites. Raises
    UntraceableModelError naming the failing module and suggesting ``leaf_modules`` or
    ``concrete_args``.

    Example:
        >>> gm = trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, fx.GraphModule) and concrete_args is None:
        return fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    tracer = GndiTracer(leaf_modules)
    try:
        # In eval mode: torch.fx bakes `self.training` into functional calls (torchvision's
        # stochastic_depth, F.dropout), and a measurement must not be random.
        with eval_mode(model):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many types: TraceError, TypeError, ...
        where = (f"module '{tracer.failed_module}' "
                 f"({type(model.get_submodule(tracer.failed_module)).__name__})"
                 if tracer.failed_module else f"model {type(model).__name__}")
        raise UntraceableModelError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}. Fix: keep it "
            f"opaque with leaf_modules=['{tracer.failed_module or '<module name>'}'] (its output "
            "can still be a site), or fix data-dependent arguments with concrete_args={...}."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class Intervention(nn.Module):
    """The node ``h + alpha * (b - h)`` inserted after one site.

    ``alpha`` is None (no intervention: returns ``h`` itself, at no cost), a tensor of shape
    [B] (layer granularity) or [B, C] (channel granularity). The baseline ``b`` is None for
    zero, or a tensor broadcastable to ``h``.

    Example:
        >>> node = Intervention(channel_dim=1, granularity="layer")
        >>> node(torch.ones(2, 3), torch.tensor([0.0, 1.0]))
        tensor([[1., 1., 1.],
                [0., 0., 0.]])
    """

    def __init__(self, channel_dim: int | None, granularity: str) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.granularity = granularity
        self.baseline: torch.Tensor | None
        self.register_buffer("baseline", None, persistent=False)

    def forward(self, h: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
        if alpha is None:
            return h
        a = alpha.reshape(self.alpha_view(h.dim(), alpha.shape))
        # h * (1 - a) and lerp make no activation-sized temporary (h - a * h makes one, and its
        # page faults cost up to +50% on mobilenet_v2); both return h exactly at a = 0.
        if self.baseline is None:
            return h * (1 - a)
        return torch.lerp(h, self.baseline.expand_as(h), a)

    def alpha_view(self, ndim: int, alpha_shape: torch.Size) -> list[int]:
        """Shape that broadcasts a [B] or [B, C] alpha over an activation of ``ndim`` dims."""
        view = [1] * ndim
        view[0] = alpha_shape[0]
        if self.granularity == "channel" and ndim > 1:
            dim = self.channel_dim if self.channel_dim is not None else default_channel_dim(ndim)
            view[dim] = alpha_shape[1]
        return view


class InterventionGraph(nn.Module):
    """A traced model with an intervention node after every selected site.

    Call it as ``graph(x, alphas)`` where ``alphas`` maps site names to tensors of shape [B]
    (layer granularity) or [B, C] (channel granularity); a missing site means 0. Build it with
    :func:`intervene`.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> g = intervene(model, sites="linear")
        >>> x = torch.randn(4, 2)
        >>> torch.equal(g(x), g.model(x))
        True
    """

    def __init__(self, gm: fx.GraphModule, sites: list[Site], granularity: str,
                 model: nn.Module) -> None:
        super().__init__()
        self.gm = gm
        self.granularity = granularity
        self._sites = sites
        self._index = {s.name: i for i, s in enumerate(sites)}
        object.__setattr__(self, "model", model)  # a reference, not a registered submodule

    @property
    def sites(self) -> list[Site]:
        """The selected sites: name, kind, per-sample output shape and channel count."""
        return list(self._sites)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self._sites]

    def node(self, name: str) -> Intervention:
        """The Intervention module of a site (holds its baseline)."""
        return getattr(self.gm, f"{_SITE_PREFIX}{self._index_of(name)}")

    def _index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise SiteSelectionError(f"'{name}' is not a site of this graph; sites: "
                                     f"{', '.join(self.site_names)}") from None

    def forward(self, *inputs: torch.Tensor,
                alphas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = {}
        for name, alpha in (alphas or {}).items():
            kwargs[f"{_ALPHA_PREFIX}{self._index_of(name)}"] = alpha
        return self.gm(*inputs, **kwargs)

    def set_baseline(self, name: str, value: torch.Tensor | None) -> None:
        """Set one site's baseline (None = zero)."""
        self.node(name).baseline = value

    def describe(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Run one batch, record every site's per-sample shape, and return the output.

        Example:
            >>> g = intervene(nn.Sequential(nn.Conv2d(1, 4, 3)), sites="conv")
            >>> _ = g.describe(torch.randn(2, 1, 8, 8)); g.sites[0].shape
            (4, 6, 6)
        """
        with observe(self) as seen, torch.no_grad():
            out = self(*inputs)
        self.record_shapes(seen)
        return out

    def record_shapes(self, seen: Mapping[str, torch.Tensor]) -> None:
        """Set every site's shape (and resolved channel dim) from one batch's activations.

        Example:
            >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
            >>> with observe(g) as seen: _ = g(torch.randn(4, 2))
            >>> g.record_shapes(seen); g.sites[0].channels
            3
        """
        for site in self._sites:
            if site.name not in seen:
                raise SiteSelectionError(f"site '{site.name}' was not reached by the forward "
                                         "pass (dead branch?); choose other sites")
            site.shape = tuple(seen[site.name].shape[1:])
            self.node(site.name).channel_dim = site.resolved_channel_dim()

    def calibrate(self, data: Iterable, kind: str = "channel-mean", *,
                  progress: bool = False) -> None:
        """Set every site's baseline to its streaming ``"mean"`` or ``"channel-mean"`` on data.

        Example:
            >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
            >>> g.calibrate([torch.ones(4, 2)]); g.node("0").baseline.shape
            torch.Size([1, 3])
        """
        from .baselines import apply_baseline
        apply_baseline(self, kind, data, progress=progress)

    def table(self) -> str:
        """A printable table of the sites."""
        from .report import format_table
        rows = [(s.name, s.kind, "x".join(map(str, s.shape)) if s.shape else "?", s.channels)
                for s in self._sites]
        return format_table(rows, ["site", "kind", "shape", "channels"])


@contextlib.contextmanager
def observe(graph: InterventionGraph) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``seen[name]`` holds the last activation that reached each site.

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
        >>> with observe(g) as seen: _ = g(torch.randn(5, 2))
        >>> seen["0"].shape
        torch.Size([5, 3])
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in graph.sites:
        def hook(module, args, output, name=site.name):
            seen[name] = args[0]
        handles.append(graph.node(site.name).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def intervene(model: nn.Module, sites: SiteSpec = "conv", *, granularity: str = "layer",
              baseline: Any = "zero", data: Iterable | None = None,
              example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
              leaf_modules: Iterable[str | type] = (),
              concrete_args: dict[str, Any] | None = None,
              progress: bool = False) -> InterventionGraph:
    """Trace ``model`` and insert ``h + alpha * (b - h)`` after every selected site.

    Args:
        model: any torch.fx-traceable module; its parameters are shared, never copied or changed.
        sites: kind keyword (``"conv"``, ``"linear"``, ``"bn"``, ``"norm"``, ``"act"``,
            ``"block"``), module name or glob, callable on fx nodes, or a list of these.
        granularity: ``"layer"`` (alpha [B] per site) or ``"channel"`` (alpha [B, C]).
        baseline: ``"zero"``, ``"mean"``, ``"channel-mean"`` (these two need ``data``),
            a tensor for every site, or a mapping site name -> tensor.
        data: calibration batches for data-dependent baselines (also records site shapes).
        example_inputs: one input batch, to record site shapes without calibration.

    Example:
        >>> import torchvision
        >>> g = intervene(torchvision.models.resnet18(num_classes=10), sites=["conv", "linear"],
        ...               example_inputs=torch.randn(2, 3, 32, 32))
        >>> g.sites[0].name, g.sites[0].channels
        ('conv1', 64)
    """
    from .baselines import apply_baseline  # baselines builds on this module

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    selected = select_sites(gm, sites)
    _insert_interventions(gm, selected, granularity)
    graph = InterventionGraph(gm, selected, granularity, model)
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        with eval_mode(graph):
            graph.describe(*inputs)
    apply_baseline(graph, baseline, data, progress=progress)
    return graph


def _insert_interventions(gm: fx.GraphModule, sites: list[Site], granularity: str) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for i, site in enumerate(sites):
        with gm.graph.inserting_before(first_op):
            alpha = gm.graph.placeholder(f"{_ALPHA_PREFIX}{i}", default_value=None)
        gm.add_submodule(f"{_SITE_PREFIX}{i}", Intervention(site.channel_dim, granularity))
        target = nodes[site.node]
        with gm.graph.inserting_after(target):
            new = gm.graph.call_module(f"{_SITE_PREFIX}{i}", (target, alpha))
        target.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    gm.graph.lint()
    gm.recompile()
