"""Intervention nodes at the chosen sites of a traced model, and their baselines.

After each site ``h`` the graph computes ``h + alpha * (b - h)``. ``alpha = 0`` is the original
model, ``alpha = 1`` is the intervention ``do(h := b)``, and ``d f / d alpha`` at 0 is the G-NDI
tangent ``J (b - h)``. One traced module therefore serves every JVP and every ablation.

A baseline ``b`` is zero (the default: no tensor is stored), a user tensor, or calibrated on
data: the streaming per-position ``"mean"`` or per-channel ``"channel-mean"`` of each site's
activation (:func:`calibrate`, which is what ``InterventionGraph.calibrate`` and
``intervene(..., baseline=..., data=...)`` use).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from fxgndi.core.checks import check_choice
from fxgndi.core.errors import SiteSelectionError
from fxgndi.core.moments import RunningMean
from fxgndi.core.names import BASELINES, GRANULARITIES
from fxgndi.core.outputs import OutputSpec, select_output
from fxgndi.core.report import format_table
from fxgndi.core.runtime import eval_mode
from fxgndi.core.streams import (Inputs, as_inputs, batch_count, call_model, input_arity,
                                 iter_batches)
from fxgndi.fx.sites import Site, SiteSpec, default_channel_dim, select_sites
from fxgndi.fx.trace import trace

_ALPHA_PREFIX = "fxgndi_alpha_"
_SITE_PREFIX = "fxgndi_site_"


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
        # page faults are a measurable cost, README "node overhead"); both return h exactly at
        # a = 0.
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
                 model: nn.Module, output: OutputSpec = None) -> None:
        super().__init__()
        self.gm = gm
        self.granularity = granularity
        self.output = output  # which tensor of the model's output the graph returns
        self._sites = sites
        self._index = {s.name: i for i, s in enumerate(sites)}
        self.baseline = "zero"  # the name of the baseline it was given, or "custom"
        # per-sample input shapes -> (per-sample shape of every site, of the output)
        self._shapes: dict[tuple, tuple[dict[str, tuple[int, ...]], tuple[int, ...]]] = {}
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

    @property
    def arity(self) -> int:
        """How many positional inputs the model takes (:func:`fxgndi.core.streams.input_arity`)."""
        return input_arity(self.model)

    def forward(self, *inputs: Any,
                alphas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = {}
        for name, alpha in (alphas or {}).items():
            kwargs[f"{_ALPHA_PREFIX}{self._index_of(name)}"] = alpha
        if len(inputs) == 1 and isinstance(inputs[0], Inputs):  # a batch of several inputs
            return select_output(call_model(self.gm, inputs[0], **kwargs), self.output)
        return select_output(self.gm(*inputs, **kwargs), self.output)

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
        self._remember(_per_sample_shapes(inputs), seen, out)
        return out

    def output_shape(self, x: torch.Tensor | Inputs) -> tuple[int, ...]:
        """The per-sample shape of the output for inputs shaped like ``x``: the one
        :meth:`describe` saw for that input shape, else that of a one-sample forward pass.

        Example:
            >>> g = intervene(nn.Sequential(nn.Conv2d(1, 4, 3)), sites="conv")
            >>> g.output_shape(torch.randn(2, 1, 8, 8))
            (4, 6, 6)
        """
        return self._shapes_for(x)[1]

    def site_shapes(self, x: torch.Tensor | Inputs) -> dict[str, tuple[int, ...]]:
        """The per-sample shape of every site's activation for inputs shaped like ``x`` (a
        segmentation model's sites change with the image size), found as :meth:`output_shape`.

        Example:
            >>> g = intervene(nn.Sequential(nn.Conv2d(1, 4, 3)), sites="conv")
            >>> g.site_shapes(torch.randn(2, 1, 8, 8)), g.site_shapes(torch.randn(2, 1, 5, 5))
            ({'0': (4, 6, 6)}, {'0': (4, 3, 3)})
        """
        return self._shapes_for(x)[0]

    def _shapes_for(self, x: torch.Tensor | Inputs
                    ) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
        key = _per_sample_shapes((x,))
        if key not in self._shapes:
            with observe(self) as seen, torch.no_grad():
                out = self(x[:1])
            self._check_reached(seen)
            self._remember(key, seen, out)
        return self._shapes[key]

    def _remember(self, key: tuple, seen: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        self._shapes[key] = ({name: tuple(h.shape[1:]) for name, h in seen.items()},
                             tuple(out.shape[1:]))

    def _check_reached(self, seen: Mapping[str, torch.Tensor]) -> None:
        for site in self._sites:
            if site.name not in seen:
                raise SiteSelectionError(f"site '{site.name}' was not reached by the forward "
                                         "pass (dead branch?); choose other sites")

    def record_shapes(self, seen: Mapping[str, torch.Tensor]) -> None:
        """Set every site's shape (and resolved channel dim) from one batch's activations.

        Example:
            >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
            >>> with observe(g) as seen: _ = g(torch.randn(4, 2))
            >>> g.record_shapes(seen); g.sites[0].channels
            3
        """
        self._check_reached(seen)
        for site in self._sites:
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
        apply_baseline(self, kind, data, progress=progress)

    def table(self) -> str:
        """A printable table of the sites."""
        rows = [(s.name, s.kind, "x".join(map(str, s.shape)) if s.shape else "?", s.channels)
                for s in self._sites]
        return format_table(rows, ["site", "kind", "shape", "channels"])


def _per_sample_shapes(inputs: tuple) -> tuple:
    """The per-sample shapes and dtypes of a call's input tensors (Inputs unpacked)."""
    tensors = [t for x in inputs for t in (x.tensors() if isinstance(x, Inputs) else [x])
               if isinstance(t, torch.Tensor)]
    return tuple((tuple(t.shape[1:]), t.dtype) for t in tensors)


@contextlib.contextmanager
def observe(graph: InterventionGraph, shifts: Mapping[str, torch.Tensor] | None = None
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``seen[name]`` holds the last activation that reached each site;
    with ``shifts``, a site named there passes on its activation plus that tensor.

    Adding a zero shift changes no value, but ``d out / d shift`` is the gradient at the
    site's activation: what the reverse-mode tangents read (:mod:`fxgndi.gndi.tangents`).

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
        >>> with observe(g) as seen: _ = g(torch.randn(5, 2))
        >>> seen["0"].shape
        torch.Size([5, 3])
        >>> with observe(g, {"0": torch.ones(3)}): shifted = g(torch.zeros(1, 2))
        >>> torch.equal(shifted, g(torch.zeros(1, 2)) + 1)
        True
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in graph.sites:
        def hook(module, args, output, name=site.name):
            seen[name] = args[0]
            if shifts is not None and name in shifts:
                return output + shifts[name]
            return None
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
              concrete_args: dict[str, Any] | None = None, output: OutputSpec = None,
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
        leaf_modules, concrete_args: as :func:`fxgndi.trace`.
        output: which tensor of the model's output the graph returns (a key, index, attribute
            or callable; default: see :func:`fxgndi.core.outputs.select_output`).

    Example:
        >>> import torchvision
        >>> g = intervene(torchvision.models.resnet18(num_classes=10), sites=["conv", "linear"],
        ...               example_inputs=torch.randn(2, 3, 32, 32))
        >>> g.sites[0].name, g.sites[0].channels
        ('conv1', 64)
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not "
                         f"{granularity!r}")
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    selected = select_sites(gm, sites)
    _insert_interventions(gm, selected, granularity)
    graph = InterventionGraph(gm, selected, granularity, model, output)
    if example_inputs is not None:
        with eval_mode(graph):
            graph.describe(as_inputs(example_inputs))
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


def apply_baseline(graph: InterventionGraph, baseline: Any, data: Iterable | None = None, *,
                   progress: bool = False) -> None:
    """Set every site's baseline of ``graph`` from a name, a tensor or a mapping.

    ``"mean"`` and ``"channel-mean"`` are calibrated on ``data`` (streaming); a tensor applies
    to every site; a mapping gives one tensor per site name (others stay zero).

    Example:
        >>> import torch.nn as nn
        >>> from fxgndi import intervene
        >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
        >>> apply_baseline(g, "channel-mean", [torch.ones(4, 2)])
    """
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}, "
                             "a tensor, or a mapping site name -> tensor")
        if baseline != "zero" and data is None:
            raise ValueError(f"baseline {baseline!r} needs calibration data: pass data=loader")
        graph.baseline = baseline
        if baseline == "zero":
            for name in graph.site_names:
                graph.set_baseline(name, None)
            return
        for name, value in calibrate(graph, data, kind=baseline, progress=progress).items():
            graph.set_baseline(name, value)
        return
    if isinstance(baseline, (torch.Tensor, Mapping)):
        graph.baseline = "custom"
    if isinstance(baseline, torch.Tensor):
        for name in graph.site_names:
            graph.set_baseline(name, baseline)
        return
    if isinstance(baseline, Mapping):
        for name, value in baseline.items():
            graph.set_baseline(name, None if value is None else torch.as_tensor(value))
        return
    raise TypeError(f"baseline must be a name {BASELINES}, a tensor or a mapping, "
                    f"not {type(baseline).__name__}")


def calibrate(graph: InterventionGraph, data: Iterable, *, kind: str = "channel-mean",
              max_batches: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Streaming mean activation of every site over ``data`` (also records site shapes).

    ``kind="mean"`` keeps the full per-position mean, shape [1, *site.shape]; ``"channel-mean"``
    averages over everything but the channel dim and broadcasts over the rest.

    Example:
        >>> import torch.nn as nn
        >>> from fxgndi import intervene
        >>> g = intervene(nn.Sequential(nn.Linear(2, 3)), sites="linear")
        >>> calibrate(g, [torch.ones(4, 2)], kind="mean")["0"].shape
        torch.Size([1, 3])
    """
    check_choice("calibration", kind, ("mean", "channel-mean"))
    device = next((p.device for p in graph.parameters()), None)
    means: dict[str, RunningMean] = {}
    dtypes: dict[str, torch.dtype] = {}
    batches = iter_batches(data, device=device, max_batches=max_batches, arity=graph.arity)
    with eval_mode(graph), torch.no_grad():
        for i, (x, _) in enumerate(tqdm(batches, desc="calibrate", disable=not progress,
                                        total=batch_count(data, max_batches), unit="batch")):
            with observe(graph) as seen:
                graph(x)
            if i == 0:
                graph.record_shapes(seen)
                means = {s.name: RunningMean(None if kind == "mean" else s.resolved_channel_dim())
                         for s in graph.sites}
                dtypes = {name: h.dtype for name, h in seen.items()}
            for name, mean in means.items():
                mean.update(seen[name])
    return {name: mean.value.to(dtypes[name]) for name, mean in means.items()}
