"""Every use of torch-pruning's private or undocumented API, in one place.

fxgndi builds on torch-pruning's public API (``DependencyGraph``, ``BasePruner``, the pruning
functions and importances) and needs a few of its internals besides: the dependency graph a
group belongs to (``group._DG``), which handlers prune inputs or outputs, the module-to-node
map, a node's dependency list (to couple tied layers), the score normalisation of its
importances (``Importance._normalize``) and ``BasePruner``'s channel rounding (``_round_to``,
to round each layer to its own multiple: :func:`make_pruner`). They are reached only through
the functions here, checked against the versions fxgndi was tested with (:data:`TESTED`): on
another version a missing internal is a clear error naming it.

On the tested versions a few of torch-pruning's graph-building functions are wrapped once, at
import, where they fail on real models (each wrapper's docstring names the model): a 5-D
``expand`` read as grouped-query attention (:func:`_drop_broadcast_gqa`), a concat or split of
unknown width (:func:`_skip_unknown_concat`, :func:`_exact_split_sizes`,
:func:`_split_piece_channels`), a split piece read by several nodes
(:func:`_pair_split_pieces`), a reshape map dividing by 0 channels
(:func:`_no_reshape_map_on_zero`), and groups that grow without end
(:func:`_bound_group_building`). A layer's per-channel parameters besides weight and bias are
pruned by :func:`prune_group`.

Example:
    >>> tested_version()
    True
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from fxgndi.core.errors import FxgndiError

TESTED = ((1, 5), (1, 6))  # torch-pruning major.minor versions fxgndi's suite passes with
# The root module types torch-pruning's BasePruner starts groups from, by default.
ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM)


def tested_version(version: str | None = None) -> bool:
    """Whether torch-pruning's ``version`` (default: the installed one) is one fxgndi was
    tested with.

    Example:
        >>> tested_version("1.6.1"), tested_version("2.0.0")
        (True, False)
    """
    parts = (version or tp.__version__).split(".")
    try:
        return (int(parts[0]), int(parts[1])) in TESTED
    except (ValueError, IndexError):
        return False


if not tested_version():
    warnings.warn(f"fxgndi was tested with torch-pruning {', '.join(f'{a}.{b}' for a, b in TESTED)}"
                  f", not {tp.__version__}: pruning may fail on changed internals (each such "
                  "failure names the internal)", RuntimeWarning, stacklevel=2)


def _internal(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(f"torch-pruning {tp.__version__} has no {type(obj).__name__}.{name}, "
                           f"which fxgndi uses (tested with {TESTED}): install a tested "
                           "version, e.g. pip install 'torch-pruning>=1.5,<1.7'") from None


def graph_of(group: Any) -> Any:
    """The DependencyGraph that made ``group``.

    Example:
        >>> graph_of(group).model  # doctest: +SKIP
    """
    return _internal(group, "_DG")


def pruned_groups(dg: Any) -> int:
    """How many groups have been pruned through ``dg`` (its pruning history): changes whenever
    torch-pruning prunes the model it describes.

    Example:
        >>> pruned_groups(tp.DependencyGraph())
        0
    """
    return len(_internal(dg, "pruning_history")())


def prunes_inputs_only(dg: Any, handler: Any) -> bool:
    """Whether ``handler`` removes input channels of its layer and not output channels (the
    layer is a *consumer* of the group: conv, linear, LSTM; not BatchNorm or depthwise convs).

    Example:
        >>> dg = tp.DependencyGraph()
        >>> prunes_inputs_only(dg, tp.prune_conv_in_channels)
        True
    """
    return (_internal(dg, "is_in_channel_pruning_fn")(handler)
            and not _internal(dg, "is_out_channel_pruning_fn")(handler))


def prunes_inputs(dg: Any, handler: Any) -> bool:
    """Whether ``handler`` removes input channels of its layer.

    Example:
        >>> prunes_inputs(tp.DependencyGraph(), tp.prune_linear_in_channels)
        True
    """
    return _internal(dg, "is_in_channel_pruning_fn")(handler)


def prunes_outputs(dg: Any, handler: Any) -> bool:
    """Whether ``handler`` removes output channels of its layer.

    Example:
        >>> prunes_outputs(tp.DependencyGraph(), tp.prune_conv_out_channels)
        True
    """
    return _internal(dg, "is_out_channel_pruning_fn")(handler)


def channel_vectors(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a conv / linear subclass adds besides ``weight`` and ``bias`` that hold
    one value per output channel (shape ``[C]`` or ``[C, 1, ...]``, such as timm's
    ``ScaledStdConv2d.gain``): torch-pruning's pruners cut only weight and bias.

    Example:
        >>> conv = nn.Conv2d(1, 4, 3)
        >>> conv.gain = nn.Parameter(torch.ones(4, 1, 1, 1))
        >>> [name for name, _ in channel_vectors(conv)]
        ['gain']
    """
    width = getattr(layer, "out_channels", getattr(layer, "out_features", None))
    if not isinstance(layer, ROOT_TYPES[:2]) or not isinstance(width, int):
        return []
    return [(name, param) for name, param in layer.named_parameters(recurse=False)
            if name not in ("weight", "bias") and param.dim() >= 1 and param.shape[0] == width
            and all(size == 1 for size in param.shape[1:])]


def prune_group(group: Any) -> None:
    """``group.prune()``, with the :func:`channel_vectors` of the layers whose output channels
    it removes cut to the same channels (without them the pruned layer fails its forward).

    Example:
        >>> for group in pruner.step(interactive=True):  # doctest: +SKIP
        ...     prune_group(group)
    """
    dg, cuts = graph_of(group), {}
    for item in group:
        layer = item.dep.target.module
        vectors = channel_vectors(layer) if isinstance(layer, nn.Module) else []
        if vectors and prunes_outputs(dg, item.dep.handler):
            cut = cuts.setdefault(layer, (vectors, vectors[0][1].shape[0], set()))
            cut[2].update(int(i) for i in item.idxs)
    group.prune()
    for layer, (vectors, width, gone) in cuts.items():
        keep = torch.tensor([c for c in range(width) if c not in gone], dtype=torch.long)
        for name, param in vectors:
            setattr(layer, name, kept_parameter(param, keep))


def kept_parameter(param: nn.Parameter, keep: torch.Tensor, dim: int = 0) -> nn.Parameter:
    """A new parameter of ``param``'s entries ``keep`` along ``dim`` (same requires_grad).

    Example:
        >>> kept_parameter(nn.Parameter(torch.arange(4.)), torch.tensor([0, 3])).tolist()
        [0.0, 3.0]
    """
    with torch.no_grad():
        return nn.Parameter(param.index_select(dim, keep.to(param.device)).clone(),
                            requires_grad=param.requires_grad)


def traced_modules(dg: Any) -> Iterator[nn.Module]:
    """The modules the dependency graph has a node for.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 2))
        >>> sum(isinstance(m, nn.Linear) for m in traced_modules(dg))
        2
    """
    return iter(_internal(dg, "module2node"))


def couple(dg: Any, first: nn.Module, first_outputs: bool, second: nn.Module,
           second_outputs: bool) -> None:
    """Make pruning ``first``'s output (``first_outputs``) or input channels prune the same
    channels of ``second``'s outputs or inputs, and the other way round: a dependency the
    traced graph cannot see (a parameter both layers hold). Raises ValueError when a layer has
    no node in the graph (it is not called in the forward).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(),
        ...                     nn.Linear(3, 1))
        >>> dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 2))
        >>> couple(dg, net[0], True, net[2], True)
        >>> g = dg.get_pruning_group(net[0], tp.prune_linear_out_channels, [0])
        >>> names = {m: n for n, m in net.named_modules()}
        >>> sorted((names[i.dep.target.module], i.dep.handler.__name__) for i in g
        ...        if isinstance(i.dep.target.module, nn.Linear))  # doctest: +NORMALIZE_WHITESPACE
        [('0', 'prune_out_channels'), ('2', 'prune_in_channels'), ('2', 'prune_out_channels'),
         ('4', 'prune_in_channels')]
    """
    module2node = _internal(dg, "module2node")
    for layer in (first, second):
        if layer not in module2node:
            raise ValueError(f"{type(layer).__name__} is not called in the traced forward")

    def fn(layer: nn.Module, outputs: bool) -> Any:
        pruner = dg.get_pruner_of_module(layer)
        return pruner.prune_out_channels if outputs else pruner.prune_in_channels

    a, b = module2node[first], module2node[second]
    a_fn, b_fn = fn(first, first_outputs), fn(second, second_outputs)
    _internal(a, "dependencies").append(tp.Dependency(a_fn, b_fn, source=a, target=b))
    _internal(b, "dependencies").append(tp.Dependency(b_fn, a_fn, source=b, target=a))


def consumer_items(group: Any) -> list[tuple[nn.Module, list[int], list[int]]]:
    """``(layer, idxs, root_idxs)`` of the group's consumers: the layers whose *input* channels
    (only) the group prunes: conv, linear, LSTM. Depthwise convs, BatchNorm and the like, whose
    in and out channels go together, are members, not consumers.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=10).eval()
        >>> dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 32, 32))
        >>> g = dg.get_pruning_group(m.layer1[0].conv1, tp.prune_conv_out_channels, [0, 1])
        >>> [type(layer).__name__ for layer, _, _ in consumer_items(g)]
        ['Conv2d']
    """
    dg = graph_of(group)
    return [(item.dep.target.module, [int(i) for i in item.idxs],
             [int(i) for i in item.root_idxs])
            for item in group if prunes_inputs_only(dg, item.dep.handler)]


# Node types whose output element (channel, position) depends on that one input element only.
_POSITIONWISE = (tp.ops.OPTYPE.BN, tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.PRELU)


def element_reads(group: Any) -> dict[nn.Module, list[tuple[int, int]] | None]:
    """The consumers that read the group through a reshape splitting its units into channels
    (``Linear -> view(B, C, h, w) -> conv``), where several root units make one input channel.

    torch-pruning maps such root units to that channel and keeps one root per channel, so the
    consumer's item does not say which root unit is which element. The reshape's own item
    does: per sample, the flat element index of each root unit (a view keeps the row-major
    order, and so do the position-wise ops between it and the consumer: BatchNorm, activations,
    adds). Returns ``consumer layer -> [(flat element index of its input, root idx)]``, or None
    for a consumer reached from such a reshape through an op that moves elements (a concat,
    a depthwise conv, ...): no element map. Consumers that read whole channels are absent.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 1, 1))
        >>> dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 3))
        >>> g = dg.get_pruning_group(net[0], tp.prune_linear_out_channels, list(range(8)))
        >>> sorted(element_reads(g)[net[2]])[:3]
        [(0, 0), (1, 1), (2, 2)]
    """
    dg = graph_of(group)
    upstream: dict[Any, list[Any]] = {}
    for item in group:
        upstream.setdefault(item.dep.target, []).append(item)
    reads: dict[nn.Module, list[tuple[int, int]] | None] = {}
    for item in group:
        if not prunes_inputs_only(dg, item.dep.handler):
            continue
        width = len({int(i) for i in item.idxs})
        todo, seen = [(item.dep.source, True)], set()
        while todo:
            node, positionwise = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for up in upstream.get(node, []):
                if node.type == tp.ops.OPTYPE.RESHAPE and len({int(i) for i in up.idxs}) > width:
                    reads[item.dep.target.module] = [
                        (int(i), int(r)) for i, r in zip(up.idxs, up.root_idxs)] \
                        if positionwise else None
                    todo = []
                    break
                todo.append((up.dep.source, positionwise and node.type in _POSITIONWISE))
    return reads


def channel_groups(pruner: Any, group: Any) -> int:
    """How many equal slices torch-pruning's pruner averages ``group``'s scores over (its
    ``_get_channel_groups``: grouped convs, GroupNorms, attention heads in the group); the
    group's length must be a multiple of it.

    Example:
        >>> channel_groups(pruner, group)  # doctest: +SKIP
        1
    """
    return int(_internal(pruner, "_get_channel_groups")(group))


def normalize(scores: torch.Tensor, normalizer: Any) -> torch.Tensor:
    """torch-pruning's own normalisation of importance scores (None: unchanged), so that
    fxgndi's importances mix with its criteria.

    Example:
        >>> normalize(torch.tensor([1.0, 3.0]), "max")
        tensor([0.3333, 1.0000])
    """
    if normalizer is None:
        return scores
    importance = tp.importance.GroupMagnitudeImportance(normalizer=normalizer)
    return _internal(importance, "_normalize")(scores, normalizer)


# round_layer(graph, module, outputs, n_pruned, channels) -> n_pruned: how many of the root
# ``module``'s ``channels`` (output channels when ``outputs``) its group removes once rounded.
RoundLayer = Callable[[Any, nn.Module, bool, int, int], int]


def make_pruner(model: nn.Module, example_inputs: Any, *,
                round_to: int | RoundLayer | None = None, **options: Any) -> Any:
    """torch-pruning's ``BasePruner(model, example_inputs, round_to=..., **options)``, where
    ``round_to`` may also be a function rounding each group on its own: ``round_to(dependency
    graph, root module, outputs, n_pruned, channels) -> n_pruned`` (torch-pruning 1.6 knows
    one global multiple).

    ``BasePruner._prune`` asks the graph for the root's channel count
    (``DG.get_out_channels`` / ``get_in_channels``) just before it calls
    ``self._round_to(n_pruned, channels, round_to)``; the pruner made here records the layer
    asked for and passes it to ``round_to``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> pruner = make_pruner(net, torch.zeros(1, 2), pruning_ratio=0.5,
        ...                      importance=tp.importance.GroupMagnitudeImportance(),
        ...                      ignored_layers=[net[2]], round_to=lambda g, m, o, n, c: n + 2)
        >>> pruner.step()
        >>> net[0].out_features  # 8 removed, rounded to 10
        6
    """
    if not callable(round_to):
        return tp.pruner.BasePruner(model, example_inputs, round_to=round_to, **options)
    _internal(tp.pruner.BasePruner, "_round_to")
    return _LayerRoundingPruner(model, example_inputs, round_layer=round_to, **options)


class _LayerRoundingPruner(tp.pruner.BasePruner):
    """A BasePruner whose ``_round_to`` knows the group's root layer (see :func:`make_pruner`)."""

    def __init__(self, model: nn.Module, example_inputs: Any, *, round_layer: RoundLayer,
                 **options: Any) -> None:
        # Any truthy round_to makes _prune call _round_to; it is never used as a number here.
        super().__init__(model, example_inputs, round_to=1, **options)
        self.round_layer = round_layer
        self._asked: tuple[nn.Module, bool] | None = None
        for outputs, name in ((True, "get_out_channels"), (False, "get_in_channels")):
            original = _internal(self.DG, name)

            def asked(module: nn.Module, _original: Any = original, _outputs: bool = outputs
                      ) -> Any:
                self._asked = (module, _outputs)
                return _original(module)

            setattr(self.DG, name, asked)

    def _round_to(self, n_pruned: int, current_channels: int, round_to: Any) -> int:
        if self._asked is None:
            raise RuntimeError(f"torch-pruning {tp.__version__} rounds channels without asking "
                               "the graph for the layer's width first, which fxgndi's per-layer "
                               f"round_to needs (tested with {TESTED}): install a tested "
                               "version or pass an integer round_to")
        module, outputs = self._asked
        self._asked = None
        n_pruned = self.round_layer(self.DG, module, outputs, n_pruned, current_channels)
        return max(0, min(int(n_pruned), current_channels - 1))


def group_modules(dg: Any, module: nn.Module, outputs: bool = True
                  ) -> list[tuple[nn.Module, bool]]:
    """``(module, its outputs are pruned)`` for the modules of the group that pruning
    ``module``'s output (``outputs``) or input channels makes, in the group's order (for a
    conv / linear layer: members lose output channels, consumers input channels).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 2))
        >>> [(type(m).__name__, out) for m, out in group_modules(dg, net[0])
        ...  if isinstance(m, nn.Linear)]
        [('Linear', True), ('Linear', False)]
    """
    pruner = dg.get_pruner_of_module(module)
    group = dg.get_pruning_group(module, pruner.prune_out_channels if outputs
                                 else pruner.prune_in_channels, idxs=[0])
    found: dict[tuple[nn.Module, bool], None] = {}
    for item in group:
        target, handler = item.dep.target.module, item.dep.handler
        if isinstance(target, nn.Module):
            found[(target, bool(prunes_outputs(dg, handler)))] = None
    return list(found)


def _drop_broadcast_gqa(original: Callable) -> Callable:
    """torch-pruning's index-map update, then without the grouped-query-attention maps it made
    for a 5-D ``expand`` that is not one (it reads every such expand as Hugging Face's
    ``repeat_kv``; on a broadcast the repeat comes out 0 and the map divides by zero): an
    expand along the batch or tokens keeps the channels, so those get no map."""
    mapping_type = tp.dependency.index_mapping._GQAIndexMapping

    @functools.wraps(original)
    def update(graph: Any) -> None:
        original(graph)
        expands = [n for n in graph.module2node.values() if n.type == tp.ops.OPTYPE.EXPAND]
        for node in expands:  # the maps are on the expand's dependencies and its inputs'
            for dep in [*node.dependencies, *(d for n in node.inputs for d in n.dependencies)]:
                for k, mapping in enumerate(dep.index_mapping):
                    if isinstance(mapping, mapping_type) and not (
                            mapping.repeat >= 1 and mapping.head_dim >= 1):
                        dep.index_mapping[k] = None
    return update


def _skip_unknown_concat(original: Callable) -> Callable:
    """torch-pruning's concat index map, but none where an input's channel count cannot be
    inferred: torch-pruning returns without a map there itself, but only after summing the
    counts, which raises ``TypeError: int + NoneType`` first (timm's CoaT, CSPDarkNet's focus
    stem, TNT, DINOv3: the dependency graph could not be built at all)."""
    shape_infer = tp.dependency.shape_infer

    @functools.wraps(original)
    def update(graph: Any, cat_node: Any) -> None:
        if cat_node.type == tp.ops.OPTYPE.CONCAT and cat_node.module.concat_sizes is None \
                and any(shape_infer.infer_channels_between(graph, n, cat_node) is None
                        for n in cat_node.inputs):
            return
        original(graph, cat_node)
    return update


def _exact_split_sizes(original: Callable) -> Callable:
    """torch-pruning's shape inference, then the exact sizes of every split whose autograd
    node saves one ``split_size`` (``torch.split(x, 32, 1)``, ``x.chunk(2, -1)``): torch-pruning
    looks for ``_saved_self_sizes`` there, which current PyTorch names ``_saved_self_sym_sizes``,
    and falls back to inferring each consumer's channels in the order it met them: Res2Net's
    split came out [128, 32, 32, 32] for four pieces of 32 (the concat reading the last piece
    counted all of its inputs), and a rotary embedding's [None, None] made its split pruner
    raise ``TypeError: int + NoneType`` (DINOv3 ViTs). The pieces are ``split_size`` each, the
    last one the remainder, for a split along channels (dim 1; along another dim exact sizes
    let index maps through flattens that torch-pruning never made before: EfficientViT's
    graph took 140 s instead of 0.8 s). A split still sized only in part gets no
    sizes (and no offsets): the pruner then leaves it as it is and no index map goes through
    it, as for any split along a dim other than channels."""

    @functools.wraps(original)
    def init(graph: Any) -> None:
        original(graph)
        for node in graph.module2node.values():
            if node.type != tp.ops.OPTYPE.SPLIT:
                continue
            sizes = _split_pieces(node.grad_fn)
            if sizes is not None:
                offsets = [0]
                for size in sizes:
                    offsets.append(offsets[-1] + size)
                node.module.split_sizes, node.module.offsets = sizes, offsets
            elif node.module.split_sizes is not None \
                    and any(size is None for size in node.module.split_sizes):
                node.module.split_sizes = node.module.offsets = None
    return init


def _split_pieces(grad_fn: Any) -> list[int] | None:
    """The piece sizes of a split into equal pieces along dim 1, from its autograd node (None
    for other splits)."""
    size, dim = getattr(grad_fn, "_saved_split_size", None), getattr(grad_fn, "_saved_dim", None)
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if not isinstance(size, int) or size <= 0 or not isinstance(dim, int) or not shape:
        return None
    dim = dim - 2 ** 64 if dim >= 2 ** 63 else dim  # saved as unsigned: -1 is 2 ** 64 - 1
    if not -len(shape) <= dim < len(shape) or dim % len(shape) != 1:
        return None  # sizes along channels (dim 1) only, as torch-pruning maps splits
    total = int(shape[dim])
    return [min(size, total - lo) for lo in range(0, total, size)]


def _split_sizes(node: Any) -> list | None:
    """The piece sizes torch-pruning holds for a split node (None for other nodes)."""
    return getattr(node.module, "split_sizes", None) if node.type == tp.ops.OPTYPE.SPLIT \
        else None


def _pieces_read(node: Any, split: Any) -> set[int]:
    """The pieces of ``split`` that ``node`` reads: the output numbers of its autograd edges to
    the split's autograd node."""
    return {nr for fn, nr in getattr(node.grad_fn, "next_functions", ()) if fn is split.grad_fn}


def _split_piece_channels(original: Callable) -> Callable:
    """torch-pruning's recursive channel inference, with a split's reader given the size of
    the piece it reads. torch-pruning takes the size at the reader's position among the
    split's consumers, in the order its traversal met them (Res2Net, CSPNet: the wrong piece's
    size; a piece read twice, as a rotary embedding's halves are: an index past the sizes'
    end, IndexError). While the reader's channels are inferred, the split lists the reader at
    the position of the piece its autograd edge reads; an index past the end still means
    unknown (None)."""

    @functools.wraps(original)
    def infer(graph: Any, node: Any, recursive_depth: list) -> Any:
        laid_out = []
        for split in node.inputs:
            sizes = _split_sizes(split)
            pieces = _pieces_read(node, split) if sizes else set()
            if len(pieces) == 1 and min(pieces) < len(sizes):
                laid_out.append((split, split.outputs))
                split.outputs = [_NO_READER] * min(pieces) + [node]
        try:
            return original(graph, node, recursive_depth)
        except IndexError:
            return None
        finally:
            for split, outputs in laid_out:
                split.outputs = outputs
    return infer


def _pair_split_pieces(original: Callable) -> Callable:
    """torch-pruning's split index map, with each consumer of the split paired with the piece
    it reads. torch-pruning pairs the i-th consumer node with the i-th piece: the nodes come in
    the order its backward traversal met them, not in piece order (Res2Net's split, read by a
    conv, two adds and a concat, mapped indices past a layer's width: IndexError), and a piece
    read by several nodes (a rotary embedding's halves) makes more consumers than pieces. The
    piece a consumer reads is the output number of its autograd edge to the split; the
    original runs once per round of consumers laid out by piece, so its own rules (which dims
    it maps) apply unchanged. A consumer reading several pieces falls back to the original."""

    @functools.wraps(original)
    def update(graph: Any, split_node: Any) -> None:
        sizes = _split_sizes(split_node)
        readers: list[list[Any]] = [[] for _ in sizes or ()]
        for node in split_node.outputs if sizes else ():
            pieces = _pieces_read(node, split_node)
            if len(pieces) != 1 or not 0 <= min(pieces) < len(sizes):
                readers = []
                break
            readers[pieces.pop()].append(node)
        if not readers:
            if sizes is None or len(split_node.outputs) == len(sizes):
                original(graph, split_node)
            return  # more readers than pieces, not all of one piece: no map is right
        outputs = split_node.outputs
        try:
            for round_ in range(max(map(len, readers))):
                split_node.outputs = [r[round_] if round_ < len(r) else _NO_READER for r in readers]
                original(graph, split_node)
        finally:
            split_node.outputs = outputs
    return update


class _NoReader:
    """A piece's slot in a round without a reader of it: no dependency targets it."""

    dependencies: tuple = ()


_NO_READER = _NoReader()


def _no_reshape_map_on_zero(original: Callable) -> Callable:
    """torch-pruning's reshape index map, but none where it inferred 0 channels on one side
    (its own note: a residual connection to the model's inputs), which it divided by
    (ZeroDivisionError: timm's SHViT). The error comes before any map is set."""

    @functools.wraps(original)
    def update(graph: Any, reshape_node: Any) -> None:
        try:
            original(graph, reshape_node)
        except ZeroDivisionError:
            return
    return update


def _patch_index_mapping() -> None:
    index_mapping = getattr(getattr(tp, "dependency", None), "index_mapping", None)
    names = ("update_index_mapping", "update_concat_index_mapping", "update_reshape_index_mapping",
             "update_split_index_mapping", "_GQAIndexMapping")
    if index_mapping is None or not all(hasattr(index_mapping, n) for n in names) \
            or getattr(index_mapping, "_fxgndi_patched", False):
        return
    index_mapping.update_index_mapping = _drop_broadcast_gqa(index_mapping.update_index_mapping)
    index_mapping.update_concat_index_mapping = _skip_unknown_concat(
        index_mapping.update_concat_index_mapping)
    shape_infer = tp.dependency.shape_infer
    shape_infer.init_shape_information = _exact_split_sizes(
        shape_infer.init_shape_information)
    shape_infer.infer_out_channels_recursively = _split_piece_channels(
        shape_infer.infer_out_channels_recursively)
    index_mapping.update_reshape_index_mapping = _no_reshape_map_on_zero(
        index_mapping.update_reshape_index_mapping)
    index_mapping.update_split_index_mapping = _pair_split_pieces(
        index_mapping.update_split_index_mapping)
    index_mapping._fxgndi_patched = True


def _member_channel_groups(original: Callable) -> Callable:
    """``BasePruner._get_channel_groups``, counting a grouped member (a grouped conv, a
    GroupNorm) in the root's channels: a member that sees ``1/k`` of the root's channels (one
    piece of a split) with ``g`` groups needs ``k * g`` equal blocks of the root pruned alike.
    torch-pruning took ``g`` (Res2NeXt: a 128-channel root split into four 32-channel pieces,
    each read by a conv of 8 groups, was pruned in 8 blocks of 16; each conv's groups of 4 then
    lost different positions, and its in-channel pruning, which keeps the first ``len / g``
    kept indices, indexed past its weight)."""

    @functools.wraps(original)
    def get(self: Any, group: Any) -> int:
        count = int(original(self, group))
        dg = self.DG
        root = group[0].dep
        outputs = dg.is_out_channel_pruning_fn(root.handler)
        width = (dg.get_out_channels if outputs else dg.get_in_channels)(root.target.module)
        for dep, _ in group:
            module = dep.target.module
            member_outputs = dg.is_out_channel_pruning_fn(dep.handler)
            groups = (self.out_channel_groups if member_outputs
                      else self.in_channel_groups).get(module)
            own = (dg.get_out_channels if member_outputs else dg.get_in_channels)(module) \
                if groups else None
            if isinstance(width, int) and isinstance(own, int) and 0 < own < width \
                    and width % own == 0:
                count = max(count, groups * (width // own))
        return count
    return get


# A group past either bound, per node of the dependency graph, has run away:
_ENTRIES_PER_NODE = 64  # entries (a layer and the indices it loses)
_INDICES_PER_NODE = 16384  # indices over all entries (a flatten multiplies them) ...
_MIN_INDICES = 2**23  # ... and at least this many (vgg16's classifier group: 232k in 41 nodes)
_limit: list[tuple[int, int] | None] = [None]  # the bounds of the group being built, if any


class GroupRunaway(FxgndiError):
    """A torch-pruning group that kept growing while it was built (index maps through
    concats, splits or reshapes that never close on one set of indices)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"torch-pruning's group grew past {what}")
        self.root: nn.Module | None = None


_RUNAWAYS: dict[tuple, list[str]] = {}  # per model structure: roots whose group ran away


def _structure(model: nn.Module) -> tuple:
    """A model's parameter names and shapes: the prunes of one search build their graphs on
    copies of one model, and a group that ran away on one runs away on all."""
    return (type(model).__qualname__,
            tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))


def runaway_roots(dg: Any) -> list[nn.Module]:
    """The root layers whose torch-pruning group ran away while ``dg``'s groups were built
    (they keep their widths; see ``_bound_group_building``).

    Example:
        >>> runaway_roots(tp.DependencyGraph())
        []
    """
    return list(dg.__dict__.get("_fxgndi_runaways", ()))


def _bound_group_building() -> None:
    """Bounds torch-pruning's group building, and lets ``get_all_groups`` go on without the
    groups that run away: their root layers keep their widths, with a warning. On some models
    (timm's rexnet_100, efficientformerv2_s0, deepseek_vit_412m) the traversal of one group
    follows index maps that never close: rexnet's first group held 22k entries after 60 s and
    kept growing, and efficientformerv2's 26th group held 18.7M indices in 29 entries (one of
    8.4M: reshape maps multiplied them), so every prune ran past any timeout. The largest
    healthy groups measured: timm's inception_next_atto 2616 entries for 172 nodes (15 per
    node: its channel splits), 1108 indices per node; torchvision at 224 px: vit_b_16 504
    entries for 516 nodes, 387k indices; vgg16 232k indices in 41 nodes."""
    graph_class, group_class = tp.DependencyGraph, tp.dependency.group.Group
    add_dep, get_group, get_all = (group_class.add_dep, graph_class.get_pruning_group,
                                   graph_class.get_all_groups)

    @functools.wraps(add_dep)
    def bounded_add_dep(self: Any, dep: Any, idxs: Any) -> None:
        if _limit[0] is not None:
            entries, indices = _limit[0]
            total = self.__dict__.get("_fxgndi_indices", 0) + len(idxs)
            self.__dict__["_fxgndi_indices"] = total
            if len(self._group) >= entries or total > indices:
                raise GroupRunaway(f"{entries} entries" if len(self._group) >= entries
                                   else f"{indices} indices")
        add_dep(self, dep, idxs)

    @functools.wraps(get_group)
    def bounded_get_group(self: Any, module: nn.Module, pruning_fn: Any, idxs: Any) -> Any:
        outer = _limit[0]
        nodes = len(self.module2node) + 16
        _limit[0] = (round(_ENTRIES_PER_NODE * nodes),
                     max(round(_INDICES_PER_NODE * nodes), _MIN_INDICES))
        try:
            return get_group(self, module, pruning_fn, idxs)
        except GroupRunaway as exc:
            exc.root = exc.root or module
            raise
        finally:
            _limit[0] = outer

    @functools.wraps(get_all)
    def get_all_without_runaways(self: Any, ignored_layers: Sequence[Any] = (),
                                 root_module_types: Any = (tp.ops.TORCH_CONV,
                                                           tp.ops.TORCH_LINEAR)) -> Any:
        runaways = self.__dict__.get("_fxgndi_runaways")
        if runaways is None:  # the roots that ran away in a graph of this same model before
            modules = dict(self.model.named_modules())
            runaways = self.__dict__["_fxgndi_runaways"] = [
                modules[n] for n in _RUNAWAYS.get(_structure(self.model), ()) if n in modules]
        yielded: set[int] = set()  # out-pruned members of the groups given before a restart
        while True:
            try:
                for group in get_all(self, ignored_layers=[*ignored_layers, *runaways],
                                     root_module_types=root_module_types):
                    if id(group[0].dep.target.module) in yielded:  # given before the restart
                        continue
                    yielded |= {id(dep.target.module) for dep, _ in group
                                if self.is_out_channel_pruning_fn(dep.handler)}
                    yield group
                return
            except GroupRunaway as exc:
                runaways.append(exc.root)
                name = self._module2name.get(exc.root, type(exc.root).__name__)
                _RUNAWAYS.setdefault(_structure(self.model), []).append(name)
                warnings.warn(f"{exc} building the group of '{name}' (index maps through "
                              "concats, splits or reshapes that do not close): that group "
                              "keeps its width", RuntimeWarning, stacklevel=2)

    group_class.add_dep = bounded_add_dep
    graph_class.get_pruning_group = bounded_get_group
    graph_class.get_all_groups = get_all_without_runaways


def _index_group_ops() -> None:
    """torch-pruning's ``Group.has_pruning_op`` by a set of (target, handler, indices) instead
    of a scan that compares the index lists of the whole group: the same answer. Building a
    group calls it once per edge it follows, so the scan made building a group of n entries
    cost n^2 list comparisons (deepseek_vit_412m's runaway groups, 8k entries each, took
    minutes to reach the bound). The set is rebuilt after entries are replaced
    (``__setitem__``, ``add_and_merge``) rather than appended."""
    group_class = tp.dependency.group.Group

    def has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:
        seen = self.__dict__.get("_fxgndi_ops")
        if seen is None or seen[0] > len(self._group):
            seen = self.__dict__["_fxgndi_ops"] = [0, set()]
        for item in self._group[seen[0]:]:
            seen[1].add((item.dep.target, item.dep.handler, tuple(item.idxs)))
        seen[0] = len(self._group)
        return (dep.target, dep.handler, tuple(idxs)) in seen[1]

    def forgetting(method: Callable) -> Callable:
        @functools.wraps(method)
        def replaced(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.__dict__.pop("_fxgndi_ops", None)
            return method(self, *args, **kwargs)
        return replaced

    group_class.has_pruning_op = has_pruning_op
    group_class.__setitem__ = forgetting(group_class.__setitem__)
    group_class.add_and_merge = forgetting(group_class.add_and_merge)


def _patch_channel_groups() -> None:
    pruner_class = tp.pruner.BasePruner
    if not getattr(pruner_class._get_channel_groups, "_fxgndi_patched", False):
        pruner_class._get_channel_groups = _member_channel_groups(
            pruner_class._get_channel_groups)
        pruner_class._get_channel_groups._fxgndi_patched = True


if tested_version():
    _patch_channel_groups()
    _patch_index_mapping()
    _bound_group_building()
    _index_group_ops()
