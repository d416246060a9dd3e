"""What torch-pruning needs to know about an architecture it cannot prune out of the box.

torch-pruning builds its dependency graph from the autograd graph of one forward pass. These
kinds of modules defeat that, each for a reason found in its forward code:

* channel shuffle (ShuffleNetV2): ``view -> transpose -> view`` interleaves the two halves of a
  concatenation. torch-pruning's reshape rule divides by zero on it; and a shuffle stays a
  shuffle only if both halves keep the same channels, which no index mapping can promise. While
  tracing, each block's shuffle runs as a :class:`ChannelShuffle` module, one node of known
  width that no group crosses, and every group that reaches one is kept whole
  (:func:`unprunable_layers`): the channels inside each branch are pruned, the trunk is not.
* windowed attention (Swin V1 / V2): ``shifted_window_attention`` calls ``F.linear`` on the
  modules' weights and reshapes with the width of its input, so torch-pruning sees the qkv /
  proj layers as element-wise ops of the wrong width (Swin-S/B raise in the patch merging's
  concatenation, Swin-T / V2 never finish grouping). Each attention is one opaque node with a
  pruner (:class:`WindowAttentionPruner`) that prunes the residual stream's channels from
  ``qkv`` (inputs; q, k and v outputs), ``proj`` and, since the attention reshapes q / k / v to
  the input width, the same head dimensions. Heads are kept, so the relative position tables
  (one column per head), ``logit_scale`` and the continuous position MLP stay as they are; the
  stream is pruned in ``num_heads`` equal slices so every head keeps as many dims. V1 scales q
  by ``(C / heads) ** -0.5`` of its input width ``C``: q's weights are rescaled so that the
  pruned attention equals the original with those dims zeroed.
  Patch merging (a strided slice and a 4-way concat) is one node with
  :class:`PatchMergingPruner`.
* MaxViT: a partition attention layer (window / grid partition, relative-position attention,
  MLP) reshapes with its input width too; each is one opaque node with
  :class:`PartitionAttentionPruner`, pruned like Swin's attention; the MBConv blocks are
  pruned as usual.
* ViT: ``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` on its weights, so
  torch-pruning's tracer walks through its ops as element-wise ones of the stream's width; it
  is made opaque too, and pruned by torch-pruning's own MHA pruner in ``num_heads`` equal
  slices (``out_channel_groups``: every head keeps as many dims; torch-pruning's ``num_heads``
  option expects separate qkv layers and drops the group); q is rescaled to keep the attention's
  temperature (:func:`keep_attention_scale`), and ``VisionTransformer.hidden_dim``, which
  ``_process_input`` reshapes with, is reset afterwards (:func:`fix_widths`).

* frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, what the detection backbones use, and
  any other norm that is a per-channel affine map held in buffers): its forward reads the
  buffers ``weight`` / ``bias`` / ``running_mean`` / ``running_var``, which torch-pruning does not
  know it must prune (the pruned model fails with a size mismatch). Each is one opaque node with
  :class:`ChannelNormPruner`, which prunes those buffers with its channels (in and out coupled,
  like a BatchNorm). Recognised by layout, not by class (:func:`is_frozen_norm`), so detectron2's
  and timm's copies are handled too.
* norms that hold their width in ``normalized_shape`` and that torch-pruning does not know
  (``nn.RMSNorm``, timm's ``RmsNorm``: Gemma 4's ViT): torch-pruning prunes their weight as a
  loose parameter and leaves ``normalized_shape``; each is one node with
  :class:`ChannelNormPruner` too (:func:`is_shaped_norm`).

ConvNeXt's ``layer_scale`` ([C, 1, 1]) and ViT's class token / position embedding are found by
torch-pruning's unwrapped-parameter detection, which prunes their last non-singleton dim: right
for all of them, so nothing is needed here.

Families are recognised by the module classes whose forward code the handling depends on;
:func:`plan_for` collects what applies to a model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torchvision.models import maxvit, shufflenetv2, swin_transformer

from fxgndi.pruning._tp import kept_parameter, prunes_outputs, traced_modules


class _Opaque(torch.autograd.Function):
    """``value`` in the forward pass, linked in the autograd graph to ``source`` only: what
    torch-pruning sees of a module or function it must not look into."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.shape = source.shape
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.new_zeros(ctx.shape), None


def opaque(source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value``, with an autograd graph that leads to ``source`` and nowhere else.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> y = opaque(x, (x * 3).detach())
        >>> y.tolist(), type(y.grad_fn).__name__
        ([3.0, 3.0], '_OpaqueBackward')
    """
    return _Opaque.apply(source, value)


class ChannelShuffle(nn.Module):
    """A channel shuffle as a module, for torch-pruning's tracer to see (see :func:`tracing`).

    Example:
        >>> ChannelShuffle(shufflenetv2.channel_shuffle, 2)(torch.arange(4.).view(1, 4, 1, 1)
        ...                                                ).flatten().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """

    def __init__(self, fn: Callable[..., torch.Tensor], groups: int) -> None:
        super().__init__()
        self.fn, self.groups, self.channels = fn, groups, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channels = x.shape[1]
        return self.fn(x, self.groups)


class ChannelShufflePruner(tp.BasePruningFunc):
    """Refuses: a shuffle's channels are kept whole (:func:`unprunable_layers`)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError("a group through a channel shuffle reached the pruner: it should "
                           "have been ignored (fxgndi.pruning.architectures.unprunable_layers)")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.channels

    get_in_channels = get_out_channels


def _prune_heads_and_stream(qkv: nn.Linear, proj: nn.Linear, idxs: Sequence[int],
                            heads: int) -> int:
    """Remove stream channels ``idxs`` from an attention whose q / k / v width equals the
    stream width: ``qkv`` inputs and its q, k and v outputs, ``proj`` inputs and outputs.
    Returns the new width."""
    width = proj.out_features
    idxs = sorted(int(i) for i in idxs)
    if (width - len(idxs)) % heads:
        raise ValueError(f"pruning {len(idxs)} of {width} channels leaves a width that "
                         f"{heads} heads cannot share: pass the attention's head count as "
                         "out_channel_groups (fxgndi.prune does)")
    if qkv.out_features != 3 * width or proj.in_features != width:
        raise ValueError(f"attention with qkv {qkv.out_features} and proj {proj.in_features} "
                         f"wide for a {width}-channel stream: not the layout this pruner knows")
    tp.prune_linear_in_channels(qkv, idxs)
    tp.prune_linear_out_channels(qkv, [i + k * width for k in range(3) for i in idxs])
    tp.prune_linear_in_channels(proj, idxs)
    tp.prune_linear_out_channels(proj, idxs)
    return width - len(idxs)


class WindowAttentionPruner(tp.BasePruningFunc):
    """torchvision Swin (V1 and V2) ``ShiftedWindowAttention``: one node whose input and output
    channels are the residual stream's; heads kept, head dims pruned with the stream.

    Example:
        >>> attn = swin_transformer.ShiftedWindowAttention(8, [2, 2], [0, 0], num_heads=2)
        >>> _ = WindowAttentionPruner().prune_out_channels(attn, [0, 4])
        >>> attn.qkv.weight.shape, attn.proj.weight.shape
        (torch.Size([18, 6]), torch.Size([6, 6]))
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.proj.out_features
        kept = _prune_heads_and_stream(layer.qkv, layer.proj, idxs, layer.num_heads)
        if not isinstance(layer, swin_transformer.ShiftedWindowAttentionV2):
            # V1 scales q by (C / heads) ** -0.5 with C its input width: keep the original
            # scale, so that the pruned attention is the original one without those dims
            with torch.no_grad():
                layer.qkv.weight[:kept] *= math.sqrt(kept / width)
                if layer.qkv.bias is not None:
                    layer.qkv.bias[:kept] *= math.sqrt(kept / width)
        return layer

    prune_in_channels = prune_out_channels  # one set of channels: in and out are coupled

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.out_features

    get_in_channels = get_out_channels


class PatchMergingPruner(tp.BasePruningFunc):
    """torchvision Swin ``PatchMerging`` (V1: norm over the 4C concat, then reduction) and
    ``PatchMergingV2`` (reduction, then norm over 2C): input channel ``c`` is read at ``c``,
    ``C + c``, ``2C + c`` and ``3C + c`` of the concatenation.

    Example:
        >>> pm = swin_transformer.PatchMerging(4)
        >>> _ = PatchMergingPruner().prune_in_channels(pm, [1])
        >>> pm.dim, pm.reduction.in_features, pm.norm.normalized_shape
        (3, 12, (12,))
    """

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.dim
        spread = [i + k * width for k in range(4) for i in sorted(int(j) for j in idxs)]
        if layer.norm.normalized_shape[0] == layer.reduction.in_features:  # V1
            tp.prune_layernorm_out_channels(layer.norm, spread)
        tp.prune_linear_in_channels(layer.reduction, spread)
        layer.dim = width - len(idxs)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.norm.normalized_shape[0] == layer.reduction.out_features:  # V2
            tp.prune_layernorm_out_channels(layer.norm, list(idxs))
        tp.prune_linear_out_channels(layer.reduction, list(idxs))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.dim


class PartitionAttentionPruner(tp.BasePruningFunc):
    """torchvision MaxViT ``PartitionAttentionLayer`` (partition, pre-norm relative-position
    attention and MLP with residuals, departition): one node whose input and output channels
    are the stream's. Prunes both LayerNorms, the attention's ``to_qkv`` / ``merge`` (heads
    kept, head dims pruned with the stream: the attention reshapes to its input width), the
    MLP's first layer's inputs and last layer's outputs.

    Example:
        >>> layer = maxvit.PartitionAttentionLayer(8, 4, 2, "window", (4, 4), 2, nn.GELU,
        ...                                        nn.LayerNorm, 0.0, 0.0, 0.0)
        >>> _ = PartitionAttentionPruner().prune_out_channels(layer, [0, 4])
        >>> layer.attn_layer[1].head_dim, layer.mlp_layer[1].in_features
        (3, 6)
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        attn = next(m for m in layer.modules()
                    if isinstance(m, maxvit.RelativePositionalMultiHeadAttention))
        width = attn.merge.out_features
        for norm in layer.modules():
            if isinstance(norm, nn.LayerNorm) and norm.normalized_shape[0] == width:
                tp.prune_layernorm_out_channels(norm, list(idxs))
        linears = [m for m in layer.mlp_layer if isinstance(m, nn.Linear)]
        tp.prune_linear_in_channels(linears[0], list(idxs))
        tp.prune_linear_out_channels(linears[-1], list(idxs))
        attn.head_dim = _prune_heads_and_stream(attn.to_qkv, attn.merge, idxs,
                                                attn.n_heads) // attn.n_heads
        layer.head_dim = attn.head_dim
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return next(m for m in reversed(layer.mlp_layer) if isinstance(m, nn.Linear)).out_features

    get_in_channels = get_out_channels


_FROZEN_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen (affine-only) BatchNorm: no parameters, no children, and
    1-D buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` of one length.

    Example:
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> is_frozen_norm(FrozenBatchNorm2d(4)), is_frozen_norm(nn.BatchNorm2d(4).eval())
        (True, False)
    """
    if next(module.parameters(), None) is not None or next(module.children(), None) is not None:
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if not all(isinstance(buffers.get(b), torch.Tensor) for b in _FROZEN_NORM_BUFFERS):
        return False
    shapes = {tuple(buffers[b].shape) for b in _FROZEN_NORM_BUFFERS}
    return len(shapes) == 1 and len(next(iter(shapes))) == 1


def is_shaped_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm torch-pruning does not know that holds its width in
    ``normalized_shape`` (one dim) besides 1-D parameters / buffers of that width:
    ``nn.RMSNorm``, timm's ``RmsNorm``. torch-pruning prunes its weight as a loose parameter
    and leaves ``normalized_shape``, and the pruned model fails its forward.

    Example:
        >>> is_shaped_norm(nn.RMSNorm(4)), is_shaped_norm(nn.LayerNorm(4))
        (True, False)
    """
    if isinstance(module, tp.ops.TORCH_LAYERNORM) or next(module.children(), None) is not None:
        return False
    shape = getattr(module, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, (tuple, list)) or len(shape) != 1 or not isinstance(shape[0], int):
        return False
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return bool(tensors) and all(t.shape == (shape[0],) for t in tensors)


class ChannelNormPruner(tp.BasePruningFunc):
    """A norm that is a per-channel map torch-pruning does not know (:func:`is_frozen_norm`,
    :func:`is_shaped_norm`): removes the channels from each of its 1-D parameters and buffers
    of the channel count, and from ``num_features`` / ``normalized_shape`` when it has them; in
    and out coupled, like a BatchNorm.

    Example:
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> bn = FrozenBatchNorm2d(4)
        >>> bn.running_mean += torch.arange(4.)
        >>> _ = ChannelNormPruner().prune_out_channels(bn, [1, 2])
        >>> bn.running_mean.tolist(), bn.weight.shape
        ([0.0, 3.0], torch.Size([2]))
        >>> rms = nn.RMSNorm(4)
        >>> _ = ChannelNormPruner().prune_out_channels(rms, [0])
        >>> rms.normalized_shape, rms.weight.shape
        ((3,), torch.Size([3]))
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = self.get_out_channels(layer)
        gone = {int(i) for i in idxs}
        keep = torch.tensor([c for c in range(width) if c not in gone], dtype=torch.long)
        with torch.no_grad():
            for name, param in list(layer.named_parameters(recurse=False)):
                if param.shape == (width,):
                    setattr(layer, name, kept_parameter(param, keep))
            for name, buffer in list(layer.named_buffers(recurse=False)):
                if buffer is not None and buffer.shape == (width,):
                    setattr(layer, name, buffer[keep.to(buffer.device)].clone())
        if isinstance(getattr(layer, "num_features", None), int):
            layer.num_features = len(keep)
        shape = getattr(layer, "normalized_shape", None)
        if isinstance(shape, int):
            layer.normalized_shape = len(keep)
        elif isinstance(shape, (tuple, list)):
            layer.normalized_shape = type(shape)([len(keep)])
        return layer

    prune_in_channels = prune_out_channels  # a per-channel map: in and out are one set

    def get_out_channels(self, layer: nn.Module) -> int:
        shape = getattr(layer, "normalized_shape", None)
        if shape is not None:
            return int(shape if isinstance(shape, int) else shape[0])
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels


@dataclass
class ArchitecturePlan:
    """What :func:`fxgndi.prune` passes torch-pruning for one model (see the module
    docstring), and what it does around it.

    Attributes:
        families: names of the handlings that apply, for reports.
        customized_pruners: module class -> pruner; their modules are opaque while tracing.
        out_channel_groups: module -> number of equal slices its channels are pruned in.
        opaque_types: module classes hidden from the tracer besides the customized ones
            (``nn.MultiheadAttention``, which torch-pruning prunes itself).
        opaque_functions: ``(python module, function name, block class)``: each call of the
            function from a block of that class runs as a :class:`ChannelShuffle` while
            tracing; groups through them are kept whole.
        consumers: module class -> channel dim, for layers G-NDI must tap as readers of a
            group (their in and out channels are pruned separately).
        after: called on the pruned model to reset attributes that hold widths.

    Example:
        >>> plan_for(nn.Linear(2, 2)).families
        []
    """

    families: list[str] = field(default_factory=list)
    customized_pruners: dict[type, tp.BasePruningFunc] = field(default_factory=dict)
    out_channel_groups: dict[nn.Module, int] = field(default_factory=dict)
    opaque_types: list[type] = field(default_factory=list)
    opaque_functions: list[tuple[Any, str, type]] = field(default_factory=list)
    consumers: dict[type, int] = field(default_factory=dict)
    after: list[Callable[[nn.Module], None]] = field(default_factory=list)

    def pruner_options(self) -> dict[str, Any]:
        """Keyword arguments for ``torch_pruning.pruner.BasePruner``.

        Example:
            >>> sorted(plan_for(nn.Linear(2, 2)).pruner_options())
            ['customized_pruners', 'out_channel_groups']
        """
        pruners = dict(self.customized_pruners)
        if self.opaque_functions:
            pruners[ChannelShuffle] = ChannelShufflePruner()
        return {"customized_pruners": pruners or None,
                "out_channel_groups": dict(self.out_channel_groups)}


def plan_for(model: nn.Module) -> ArchitecturePlan:
    """The handling ``model`` needs, from the classes of its modules.

    Example:
        >>> import torchvision
        >>> plan_for(torchvision.models.shufflenet_v2_x0_5()).families
        ['channel shuffle']
    """
    plan = ArchitecturePlan()
    modules = list(model.modules())
    for family in (_channel_shuffle, _window_attention, _partition_attention,
                   _multihead_attention, _channel_norms):
        family(model, modules, plan)
    return plan


def _channel_shuffle(model: nn.Module, modules: list[nn.Module], plan: ArchitecturePlan) -> None:
    if any(isinstance(m, shufflenetv2.InvertedResidual) for m in modules):
        plan.families.append("channel shuffle")
        plan.opaque_functions.append((shufflenetv2, "channel_shuffle",
                                      shufflenetv2.InvertedResidual))


def _window_attention(model: nn.Module, modules: list[nn.Module], plan: ArchitecturePlan) -> None:
    attention = [m for m in modules if isinstance(m, swin_transformer.ShiftedWindowAttention)]
    if not attention:
        return
    plan.families.append("windowed attention")
    plan.customized_pruners[swin_transformer.ShiftedWindowAttention] = WindowAttentionPruner()
    plan.customized_pruners[swin_transformer.ShiftedWindowAttentionV2] = WindowAttentionPruner()
    for merging in (swin_transformer.PatchMerging, swin_transformer.PatchMergingV2):
        plan.customized_pruners[merging] = PatchMergingPruner()
        plan.consumers[merging] = -1  # channels last
    plan.out_channel_groups.update({m: m.num_heads for m in attention})


def _partition_attention(model: nn.Module, modules: list[nn.Module],
                         plan: ArchitecturePlan) -> None:
    layers = [m for m in modules if isinstance(m, maxvit.PartitionAttentionLayer)]
    if not layers:
        return
    plan.families.append("partition attention")
    plan.customized_pruners[maxvit.PartitionAttentionLayer] = PartitionAttentionPruner()
    for layer in layers:
        attn = next(m for m in layer.modules()
                    if isinstance(m, maxvit.RelativePositionalMultiHeadAttention))
        plan.out_channel_groups[layer] = attn.n_heads


def _multihead_attention(model: nn.Module, modules: list[nn.Module],
                         plan: ArchitecturePlan) -> None:
    attention = [m for m in modules if isinstance(m, nn.MultiheadAttention)]
    if not attention:
        return
    plan.families.append("multi-head attention")
    plan.opaque_types.append(nn.MultiheadAttention)
    plan.out_channel_groups.update({m: m.num_heads for m in attention})
    head_dims = {m: m.head_dim for m in attention}
    plan.after.append(lambda pruned: keep_attention_scale(head_dims))


def _channel_norms(model: nn.Module, modules: list[nn.Module], plan: ArchitecturePlan) -> None:
    for label, found in (("frozen BatchNorm", is_frozen_norm),
                         ("normalized-shape norm", is_shaped_norm)):
        kinds = {type(m) for m in modules if found(m)}
        if kinds:
            plan.families.append(label)
            plan.customized_pruners.update({kind: ChannelNormPruner() for kind in kinds})


def keep_attention_scale(head_dims: dict[nn.MultiheadAttention, int]) -> None:
    """Rescale q of each ``nn.MultiheadAttention`` whose head dim shrank from ``head_dims[m]``:
    attention divides q.k by sqrt(head dim), so without this pruning would also change the
    attention's temperature. Afterwards the pruned attention equals the original one with the
    removed dims zeroed.

    Example:
        >>> mha = nn.MultiheadAttention(4, 2)
        >>> q = mha.in_proj_weight[:2].clone()
        >>> mha.head_dim = 1  # as if pruned from 2 to 1 dims per head
        >>> keep_attention_scale({mha: 2})
        >>> torch.allclose(mha.in_proj_weight[:2], q * 0.5 ** 0.5)
        True
    """
    for mha, before in head_dims.items():
        if mha.head_dim == before:
            continue
        factor = math.sqrt(mha.head_dim / before)
        with torch.no_grad():
            mha.in_proj_weight[:mha.embed_dim] *= factor
            if mha.in_proj_bias is not None:
                mha.in_proj_bias[:mha.embed_dim] *= factor


@contextlib.contextmanager
def tracing(model: nn.Module, plan: ArchitecturePlan) -> Iterator[None]:
    """While torch-pruning traces ``model``: modules with a customized pruner show the tracer
    only their input (see :func:`opaque`), and each block's call of an opaque function runs as
    a :class:`ChannelShuffle` child of the block (removed on exit).

    Example:
        >>> with tracing(model, plan):  # doctest: +SKIP
        ...     pruner = tp.pruner.BasePruner(model, x, **plan.pruner_options(), ...)
    """
    hidden = [*plan.customized_pruners, *plan.opaque_types]
    handles = [m.register_forward_hook(_hide, with_kwargs=True)
               for m in model.modules() if hidden and isinstance(m, tuple(hidden))]
    patched: list[tuple[Any, str, Callable]] = []
    children: list[nn.Module] = []
    current: list[nn.Module] = []
    for owner, name, block_type in plan.opaque_functions:
        fn = getattr(owner, name)
        for block in model.modules():
            if isinstance(block, block_type):
                block.add_module(_SHUFFLE, ChannelShuffle(fn, 2))
                children.append(block)
                handles.append(block.register_forward_pre_hook(
                    lambda mod, args: current.append(mod)))
                handles.append(block.register_forward_hook(
                    lambda mod, args, out: _pop(current)))
        patched.append((owner, name, fn))
        setattr(owner, name, lambda x, groups, fn=fn: _shuffle_of(current, fn, x, groups))
    try:
        yield
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
        for h in handles:
            h.remove()
        for block in children:
            delattr(block, _SHUFFLE)


_SHUFFLE = "fxgndi_channel_shuffle"


def _hide(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """The output (the first, of a tuple such as ``nn.MultiheadAttention``'s) as an opaque op
    of the first input."""
    source = args[0] if args else next(iter(kwargs.values()))
    if isinstance(out, tuple):
        return (opaque(source, out[0].detach()), *out[1:])
    return opaque(source, out.detach())


def _pop(stack: list[nn.Module]) -> None:
    stack.pop()  # a forward hook that returns None keeps the block's output


def _shuffle_of(current: list[nn.Module], fn: Callable, x: torch.Tensor, groups: int
                ) -> torch.Tensor:
    """The calling block's :class:`ChannelShuffle`, or ``fn`` outside such a block."""
    shuffle = getattr(current[-1], _SHUFFLE, None) if current else None
    if shuffle is None:
        return fn(x, groups)
    shuffle.groups = groups
    return shuffle(x)


def unprunable_layers(dg: Any, root_module_types: Sequence[type]) -> list[nn.Module]:
    """Out-channel members of every group that reaches a :class:`ChannelShuffle`: the shuffle
    stays one only if both its halves keep the same channels, so these groups stay whole.

    Example:
        >>> extra = unprunable_layers(pruner.DG, pruner.root_module_types)  # doctest: +SKIP
    """
    if not any(isinstance(m, ChannelShuffle) for m in traced_modules(dg)):
        return []
    out: list[nn.Module] = []
    for group in dg.get_all_groups(root_module_types=root_module_types):
        if any(isinstance(dep.target.module, ChannelShuffle) for dep, _ in group):
            out.extend(dep.target.module for dep, _ in group
                       if prunes_outputs(dg, dep.handler)
                       and isinstance(dep.target.module, nn.Module))
    return out
