"""Site selection on a traced graph: which activations get an intervention node.

A *site* is one fx node whose output is intervened on. Module sites are named by the
qualified name of the module as in ``model.named_modules()``; a module called more than once
(torchvision's ResNet reuses one ``relu`` twice per block) gives ``name``, ``name:1``, ...
A residual-branch site (kind ``"block"``) is the branch feeding a residual add (not the skip)
and is named after the module that performs the add.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxgndi.core.errors import SiteSelectionError
from fxgndi.core.names import SITE_KINDS
from fxgndi.fx.analysis import analyze, facts

SiteSpec = Union[str, Callable[[fx.Node], bool], Sequence[Union[str, Callable[[fx.Node], bool]]]]

_ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU, nn.Softplus, nn.SELU, nn.CELU,
)
_ACTIVATION_FUNCTIONS: frozenset = frozenset({
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid,
    F.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.mish, F.softplus,
})
_MODULE_KINDS: dict[str, tuple[type, ...]] = {
    "conv": (nn.modules.conv._ConvNd,),
    "linear": (nn.Linear,),
    "bn": (nn.modules.batchnorm._BatchNorm,),
    "norm": (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm),
    "act": _ACTIVATION_MODULES,
}
KINDS: tuple[str, ...] = SITE_KINDS


@dataclass
class Site:
    """One intervention site.

    Attributes:
        name: user-facing name (module qualified name, ``name:k`` for reuse, or node name).
        kind: ``conv``, ``linear``, ``bn``, ``norm``, ``act``, ``block``, ``module`` or ``node``.
        node: name of the fx node whose output is intervened on.
        channel_dim: dimension that holds channels (1 for NCHW, -1 for tokens/NHWC), or None
            when unknown before shapes are seen (then 1 for 4-D outputs, else -1).
        shape: per-sample output shape, filled once a batch has gone through the graph.

    Example:
        >>> Site("layer1.0.conv1", "conv", "layer1_0_conv1", 1, (64, 8, 8)).channels
        64
    """

    name: str
    kind: str
    node: str
    channel_dim: int | None = None
    shape: tuple[int, ...] | None = None

    @property
    def channels(self) -> int | None:
        """Number of channels (None before shapes are known)."""
        if self.shape is None:
            return None
        if not self.shape:
            return 1
        dim = self.resolved_channel_dim()
        return self.shape[dim - 1] if dim > 0 else self.shape[dim]

    def resolved_channel_dim(self) -> int:
        """Channel dimension of the batched activation (see :func:`default_channel_dim`)."""
        if self.channel_dim is not None:
            return self.channel_dim
        return default_channel_dim(1 + len(self.shape) if self.shape is not None else 0)


def default_channel_dim(ndim: int) -> int:
    """Channel dim when the producing layer does not say: 1 for [B, C, H, W], else the last.

    Example:
        >>> default_channel_dim(4), default_channel_dim(3)
        (1, -1)
    """
    return 1 if ndim == 4 else -1


def describe_nodes(gm: fx.GraphModule) -> list[Site]:
    """All candidate sites of a traced module, in graph order (no selection applied).

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        >>> [s.name for s in describe_nodes(gm)]
        ['0', '1']
    """
    analyze(gm)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            k = calls.get(node.target, 0)
            calls[node.target] = k + 1
            name = node.target if k == 0 else f"{node.target}:{k}"
            sites.append(Site(name, _module_kind(module), node.name, facts(node).channel_dim))
        elif node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
            sites.append(Site(node.name, "act", node.name, facts(node).channel_dim))
    sites.extend(_residual_branches(gm))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order[s.node])
    return sites


def select_sites(gm: fx.GraphModule, spec: SiteSpec) -> list[Site]:
    """Resolve a site specification against a traced module.

    ``spec`` is a kind keyword (``"conv"``, ``"linear"``, ``"bn"``, ``"norm"``, ``"act"``,
    ``"block"``), a site name or glob (``"layer1.*"``), a callable on fx nodes, or a list mixing
    them. Raises SiteSelectionError listing what exists when an entry matches nothing.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
        >>> [s.name for s in select_sites(gm, ["conv", "act"])]
        ['0', '1']
    """
    candidates = describe_nodes(gm)
    entries: Iterable = [spec] if isinstance(spec, str) or callable(spec) else spec
    entries = list(entries)
    if not entries:
        raise SiteSelectionError("empty site selection: pass a kind such as 'conv', a name "
                                 "or glob, a callable on fx nodes, or a list of these")
    chosen: dict[str, Site] = {}
    for entry in entries:
        matched = _match(gm, candidates, entry)
        if not matched:
            raise SiteSelectionError(_nothing_matched(entry, candidates))
        for site in matched:
            chosen.setdefault(site.node, site)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(chosen.values(), key=lambda s: order[s.node])


def _match(gm: fx.GraphModule, candidates: list[Site], entry) -> list[Site]:
    if callable(entry):
        by_node = {s.node: s for s in candidates}
        return [by_node.get(n.name) or Site(n.name, "node", n.name, facts(n).channel_dim)
                for n in gm.graph.nodes
                if n.op not in ("placeholder", "output", "get_attr") and entry(n)]
    if not isinstance(entry, str):
        raise SiteSelectionError(f"cannot select sites with {entry!r}: use a kind keyword, a "
                                 "name or glob, or a callable on torch.fx nodes")
    if entry in KINDS:
        return [s for s in candidates if s.kind == entry]
    return [s for s in candidates if fnmatch.fnmatchcase(s.name, entry)]


def _nothing_matched(entry, candidates: list[Site]) -> str:
    kinds = sorted({s.kind for s in candidates})
    names = [s.name for s in candidates]
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return (f"site selection {entry!r} matched nothing. Kinds present: {', '.join(kinds)}. "
            f"Site names: {shown}")


def _module_kind(module: nn.Module) -> str:
    for kind, types in _MODULE_KINDS.items():
        if isinstance(module, types):
            return kind
    return "module"


def _residual_branches(gm: fx.GraphModule) -> list[Site]:
    """The branch input of every residual add (see :class:`fxgndi.fx.analysis.NodeFacts`)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sites: list[Site] = []
    per_module: dict[str, int] = {}
    for node in gm.graph.nodes:
        residual = facts(node).residual
        if residual is None:
            continue
        branch = nodes[residual[0]]
        owner = _owner_module(node) or node.name
        k = per_module.get(owner, 0)
        per_module[owner] = k + 1
        name = owner if k == 0 else f"{owner}:{k}"
        sites.append(Site(name, "block", branch.name, facts(branch).channel_dim))
    return sites


def _owner_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return path or None
