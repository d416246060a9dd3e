"""Pruning the torchvision families torch-pruning cannot prune alone (fxgndi.pruning.architectures).

Small instances of each family are pruned with fxgndi.prune (G-NDI) and checked against
independent computations: the pruned model's output against the original's with the removed
channels zeroed by forward hooks, widths against the shapes the forward code reshapes to.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import maxvit, shufflenetv2, swin_transformer as swin
from torchvision.models import vision_transformer

from fxgndi.pruning import architectures
from fxgndi.pruning.width import prune

from tests.helpers import randomize_batchnorm, removed_channels, zeroed_output

_LAYERS = (nn.Conv2d, nn.Linear)


def _data(size: int, n: int = 2, classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,),
                                                                       generator=g))]


def _prune(model: nn.Module, size: int, importance: str = "gndi"):
    data = _data(size)
    # round_to=None: the widths asserted below are the channel ratio's, unrounded
    return prune(model.eval(), data, example_inputs=data[0][0][:1], importance=importance,
                 repair=False, round_to=None), data


def test_shufflenet_prunes_inside_branches_and_equals_zeroing():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    r, data = _prune(model, 64)
    x = data[0][0]
    assert r.settings["architectures"] == ["channel shuffle"]
    assert r.macs_after < 0.7 * r.macs_before
    pruned = dict(r.model.named_modules())
    for name, block in model.named_modules():
        if isinstance(block, shufflenetv2.InvertedResidual):
            # the channels a shuffle interleaves stay whole; the branch's inner ones are pruned
            assert pruned[f"{name}.branch2.5"].out_channels == before[f"{name}.branch2.5"]
            assert pruned[f"{name}.branch2.0"].out_channels == before[f"{name}.branch2.0"] // 2
    assert not any(isinstance(m, architectures.ChannelShuffle) for m in r.model.modules())
    assert shufflenetv2.channel_shuffle.__name__ == "channel_shuffle"  # restored
    with torch.no_grad():
        out = r.model(x)
    expected = zeroed_output(model, x, inputs=removed_channels(model, r.kept_inputs, "in"))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_vit_heads_and_hidden_dim_follow_the_pruned_stream():
    model = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64,
                                                 num_classes=10)
    r, data = _prune(model, 32)
    vit = r.model
    width = vit.conv_proj.out_channels
    assert width == 16 and vit.hidden_dim == width
    assert vit.class_token.shape[-1] == width and vit.encoder.pos_embedding.shape[-1] == width
    for m in vit.modules():
        if isinstance(m, nn.MultiheadAttention):
            assert (m.embed_dim, m.num_heads, m.head_dim) == (width, 2, width // 2)
            assert m.in_proj_weight.shape == (3 * width, width)
    assert r.macs_after < 0.5 * r.macs_before
    assert r.model(data[0][0]).shape == (2, 10)


def _tiny_swin(v2: bool) -> nn.Module:
    return swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 2, 1], num_heads=[2, 4, 4],
        window_size=[2, 2], stochastic_depth_prob=0.0, num_classes=10,
        block=swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock,
        downsample_layer=swin.PatchMergingV2 if v2 else swin.PatchMerging)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_attention_keeps_heads_and_tables(v2):
    model = _tiny_swin(v2)
    tables = {n: m.relative_position_bias_table.shape for n, m in model.named_modules()
              if isinstance(m, swin.ShiftedWindowAttention) and not v2}
    r, data = _prune(model, 32)
    assert r.settings["architectures"] == ["windowed attention"]
    assert r.macs_after < 0.5 * r.macs_before
    modules = dict(r.model.named_modules())
    for name, m in modules.items():
        if isinstance(m, swin.ShiftedWindowAttention):
            width = m.proj.out_features
            assert m.qkv.weight.shape == (3 * width, width)
            assert width % m.num_heads == 0 and width < model.get_submodule(name).proj.out_features
            if name in tables:
                assert m.relative_position_bias_table.shape == tables[name]
        if isinstance(m, (swin.PatchMerging, swin.PatchMergingV2)):
            assert m.reduction.in_features == 4 * m.dim
    assert r.model(data[0][0]).shape == (2, 10)


def test_maxvit_partition_attention_head_dim_matches_width():
    model = torchvision.models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                                      block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                                      stochastic_depth_prob=0.0, num_classes=10)
    r, data = _prune(model, 32)
    assert r.settings["architectures"] == ["partition attention"]
    for m in r.model.modules():
        if isinstance(m, maxvit.RelativePositionalMultiHeadAttention):
            assert m.n_heads * m.head_dim == m.merge.in_features == m.to_qkv.in_features
            assert m.head_dim == 4
    assert r.macs_after < 0.5 * r.macs_before
    assert r.model(data[0][0]).shape == (2, 10)


def test_convnext_layer_scale_follows_its_block():
    setting = [torchvision.models.convnext.CNBlockConfig(16, 32, 1),
               torchvision.models.convnext.CNBlockConfig(32, None, 1)]
    model = torchvision.models.ConvNeXt(setting, num_classes=10)
    r, data = _prune(model, 32)
    for name, m in r.model.named_modules():
        if isinstance(m, torchvision.models.convnext.CNBlock):
            width = model.get_submodule(name).block[0].out_channels
            assert m.block[0].out_channels == width // 2
            assert m.layer_scale.shape == (width // 2, 1, 1)
    assert r.macs_after < 0.5 * r.macs_before
    assert r.model(data[0][0]).shape == (2, 10)


@pytest.mark.parametrize("cls", [swin.ShiftedWindowAttention, swin.ShiftedWindowAttentionV2],
                         ids=["v1", "v2"])
def test_window_attention_pruner_equals_zeroing_channels_and_head_dims(cls):
    torch.manual_seed(0)
    attn = cls(8, [2, 2], [1, 1], num_heads=2).eval()
    pruned = cls(8, [2, 2], [1, 1], num_heads=2).eval()
    pruned.load_state_dict(attn.state_dict())
    gone = [1, 6]  # one dim of each head
    architectures.WindowAttentionPruner().prune_out_channels(pruned, gone)
    kept = [i for i in range(8) if i not in gone]
    # Independently: zero the removed q / k / v dims of qkv, and the input channels (hook).
    # Zero dims change neither q.k nor V2's cosine normalisation; V1's q scale stays (8/2)^-.5.
    with torch.no_grad():
        for k in range(3):
            attn.qkv.weight[[k * 8 + i for i in gone]] = 0
            attn.qkv.bias[[k * 8 + i for i in gone]] = 0
    mask = torch.ones(8)
    mask[gone] = 0
    attn.register_forward_pre_hook(lambda mod, args: (args[0] * mask,))
    x = torch.randn(2, 4, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x[..., kept]), attn(x)[..., kept])


def test_multihead_attention_pruned_with_its_plan_equals_zeroing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    original = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    original.load_state_dict(model[0].state_dict())
    plan = architectures.plan_for(model)
    gone = [1, 6]  # one dim of each head
    import torch_pruning as tp
    tp.pruner.function.MultiheadAttentionPruner().prune_out_channels(model[0], gone)
    for fix in plan.after:
        fix(model)
    kept = [i for i in range(8) if i not in gone]
    with torch.no_grad():  # independently: zero the removed q / k / v dims and inputs
        for k in range(3):
            original.in_proj_weight[[k * 8 + i for i in gone]] = 0
            original.in_proj_bias[[k * 8 + i for i in gone]] = 0
        x = torch.randn(2, 5, 8)
        x0 = x.clone()
        x0[..., gone] = 0
        expected = original(x0, x0, x0, need_weights=False)[0][..., kept]
        got = model[0](x[..., kept], x[..., kept], x[..., kept], need_weights=False)[0]
    torch.testing.assert_close(got, expected)


def test_patch_merging_v2_input_pruning_equals_zeroing():
    torch.manual_seed(0)
    merging = swin.PatchMergingV2(4).eval()
    pruned = swin.PatchMergingV2(4).eval()
    pruned.load_state_dict(merging.state_dict())
    architectures.PatchMergingPruner().prune_in_channels(pruned, [2])
    x = torch.randn(1, 4, 4, 4)
    zeroed = x.clone()
    zeroed[..., 2] = 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(x[..., [0, 1, 3]]), merging(zeroed))


def test_prunability_sweep_row():
    from benchmarks.prunability import run_one

    row = run_one("shufflenet_v2_x0_5", "l1", 0.5, 1, 10, size=64)
    assert row["traced"] and row["pruned"] and row["forward"], row.get("error")
    assert row["macs_after"] < row["macs_before"]


def _frozen_copy(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by a FrozenBatchNorm2d holding its statistics
    and affine (the same function in eval mode)."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    frozen = copy.deepcopy(model)
    for name, bn in list(frozen.named_modules()):
        if isinstance(bn, nn.BatchNorm2d):
            new = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, buffer).copy_(getattr(bn, buffer).detach())
            parent, _, child = name.rpartition(".")
            setattr(frozen.get_submodule(parent) if parent else frozen, child, new)
    return frozen.eval()


def test_frozen_batchnorm_resnet18_prunes_to_half_its_macs_and_equals_zeroing():
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    dense_bn = randomize_batchnorm(torchvision.models.resnet18(num_classes=10))
    model = _frozen_copy(dense_bn)
    x = _data(32, n=4)[0][0]
    torch.testing.assert_close(model(x), dense_bn(x))  # the conversion keeps the function
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    original = copy.deepcopy(model)
    data = _data(32, n=4)
    # uniform: every group pruned, and the same shapes for both models below whatever the clock
    r = prune(model, data, target="macs", sparsity=0.5, importance="gndi", repair=False,
              example_inputs=x[:1], allocate="uniform")
    assert r.settings["architectures"] == ["frozen BatchNorm"]
    assert abs(r.macs_reduction - 0.5) <= 0.02
    for a, b in zip(model.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)  # the user's model is untouched
    with torch.no_grad():
        out = r.model(x)
    torch.testing.assert_close(out, zeroed_output(
        original, x, inputs=removed_channels(original, r.kept_inputs, "in")),
                               rtol=1e-4, atol=1e-5)
    # each frozen norm holds the buffers of the channels its conv kept, in order
    pruned = dict(r.model.named_modules())
    producers = {"bn1": "conv1", **{n: n.replace(".bn", ".conv") for n in pruned
                                    if ".bn" in n},
                 **{n: n[:-1] + "0" for n in pruned if n.endswith("downsample.1")}}
    for norm, conv in producers.items():
        assert isinstance(pruned[norm], FrozenBatchNorm2d)
        kept = r.kept[conv]
        assert len(kept) < original.get_submodule(conv).out_channels or norm == "bn1"
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(pruned[norm], buffer),
                               getattr(original.get_submodule(norm), buffer)[kept])
    # and G-NDI ranks it exactly as it ranks the same network with BatchNorm2d (torch-pruning's
    # own BatchNorm pruner): the same function, so the same channels kept
    reference = prune(dense_bn, data, target="macs", sparsity=0.5, importance="gndi",
                      example_inputs=x[:1], allocate="uniform")
    assert {n: reference.kept[n] for n in r.kept} == r.kept
    assert len(r.kept) == 21  # the 20 convs and fc (FrozenBatchNorm2d is no tracked layer)


class RmsTokens(nn.Module):
    """Tokens through Linear -> RMSNorm -> Linear: torch-pruning 1.6 knows no RMS norm, pruned
    its weight as a loose parameter and left normalized_shape (timm's Gemma 4 ViT failed)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.head = nn.Linear(6, 16), nn.RMSNorm(16, eps=1e-6), \
            nn.Linear(16, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.up(x))).mean(1)


def test_an_rms_norm_is_pruned_with_its_channels_and_computes_over_the_kept_ones():
    torch.manual_seed(0)
    model = RmsTokens().eval()
    x = torch.randn(4, 5, 6)
    r = prune(model, [(x, torch.randint(0, 3, (4,)))], sparsity=0.5, importance="l1",
              repair=False)
    kept = r.kept["up"]
    assert r.settings["architectures"] == ["normalized-shape norm"]
    assert r.model.norm.normalized_shape == (len(kept),) and len(kept) < 16
    # by hand: the RMS norm of the kept channels only, then the head's kept columns
    with torch.no_grad():
        h = model.up(x)[..., kept]
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * model.norm.weight[kept]
        expected = (h @ model.head.weight[:, kept].T + model.head.bias).mean(1)
        torch.testing.assert_close(r.model(x), expected, rtol=1e-5, atol=1e-6)
