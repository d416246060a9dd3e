"""The intervention graph against plain PyTorch: identity at alpha 0, hooks at alpha 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fxgndi
from fxgndi.core.errors import SiteSelectionError, UntraceableModelError

from tests.helpers import replace_output


def test_zero_alphas_reproduce_the_model_exactly(tiny):
    x = torch.randn(5, 2, 6, 6)
    g = fxgndi.intervene(tiny, ["conv", "bn", "act", "linear"], granularity="channel",
                         example_inputs=x)
    zeros = {s.name: torch.zeros(5, s.channels) for s in g.sites}
    with torch.no_grad():
        assert torch.equal(g(x), tiny(x))
        assert torch.equal(g(x, alphas=zeros), tiny(x))


def test_alpha_one_equals_a_hook_that_replaces_the_output(tiny):
    x = torch.randn(4, 2, 6, 6)
    g = fxgndi.intervene(tiny, "conv", example_inputs=x)
    with torch.no_grad():
        out = g(x, alphas={"conv2": torch.ones(4)})
        with replace_output(tiny.conv2, torch.zeros_like):
            expected = tiny(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_partial_alpha_per_sample_and_channel_with_a_custom_baseline(tiny):
    x = torch.randn(3, 2, 6, 6)
    b = torch.randn(1, 4, 1, 1)
    g = fxgndi.intervene(tiny, "bn1", granularity="channel", baseline={"bn1": b},
                         example_inputs=x)
    alpha = torch.rand(3, 4)
    with torch.no_grad():
        out = g(x, alphas={"bn1": alpha})
        a = alpha[:, :, None, None]
        with replace_output(tiny.bn1, lambda h: (1 - a) * h + a * b):
            expected = tiny(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_reused_module_is_named_per_call_and_intervened_on_that_call_only(tiny):
    x = torch.randn(3, 2, 6, 6)
    g = fxgndi.intervene(tiny, "act", example_inputs=x)
    assert g.site_names == ["relu", "relu:1"]
    with torch.no_grad():
        out = g(x, alphas={"relu:1": torch.ones(3)})
        with replace_output(tiny.relu, torch.zeros_like, call=1):
            expected = tiny(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_block_site_is_the_residual_branch_not_the_skip():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    g = fxgndi.intervene(model, "block", example_inputs=x)
    assert g.site_names[:2] == ["layer1.0", "layer1.1"]
    assert len(g.sites) == 8
    with torch.no_grad():
        out = g(x, alphas={"layer2.0": torch.ones(2)})
        # The branch of layer2.0 ends at bn2; the skip (downsample) must survive.
        with replace_output(model.layer2[0].bn2, torch.zeros_like):
            expected = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_mean_and_channel_mean_baselines_are_streaming_means(tiny):
    data = [torch.randn(4, 2, 6, 6) for _ in range(3)]
    g = fxgndi.intervene(tiny, "conv1", baseline="mean", data=data)
    acts = torch.cat([tiny.conv1(x) for x in data]).detach()
    torch.testing.assert_close(g.node("conv1").baseline[0], acts.mean(0))
    g.calibrate(data, "channel-mean")
    torch.testing.assert_close(g.node("conv1").baseline.flatten(), acts.mean((0, 2, 3)))


def test_sites_describe_shapes_and_channels_on_tokens():
    model = torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=32).eval()
    g = fxgndi.intervene(model, "block", granularity="channel",
                         example_inputs=torch.randn(1, 3, 32, 32))
    first = g.sites[0]
    assert first.name == "encoder.layers.encoder_layer_0"
    assert first.shape == (5, 768) and first.channels == 768  # 4 patches + class token


def test_glob_callable_and_list_selection(tiny):
    gm_sites = fxgndi.intervene(tiny, ["conv*", lambda n: n.name == "fc"]).site_names
    assert gm_sites == ["conv1", "conv2", "fc"]


def test_user_model_is_not_changed(tiny):
    before = copy.deepcopy(tiny.state_dict())
    tiny.train()
    x = torch.randn(3, 2, 6, 6)
    fxgndi.score(tiny, [x], sites=["conv", "bn"], progress=False)
    fxgndi.ablate(tiny, [x], sites="conv", metric="logit_l2", progress=False)
    assert tiny.training and all(m.training for m in tiny.modules())
    assert not any(m._forward_hooks for m in tiny.modules())
    assert [n for n, _ in tiny.named_children()] == ["conv1", "bn1", "relu", "conv2", "bn2",
                                                     "pool", "fc"]
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny.parameters())


def test_graph_shares_parameters_instead_of_copying(tiny):
    g = fxgndi.intervene(tiny, "conv")
    assert g.gm.conv1.weight is tiny.conv1.weight


def test_selection_that_matches_nothing_lists_what_exists(tiny):
    with pytest.raises(SiteSelectionError, match="Kinds present: .*conv.*Site names: conv1"):
        fxgndi.intervene(tiny, "layer9.*")


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.inner(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_an_untraceable_submodule_is_kept_opaque_and_says_so():
    with pytest.warns(UserWarning, match=r"of Untraceable \('inner'.*leaf_modules="):
        g = fxgndi.intervene(Untraceable(), "linear")
    assert g.site_names == ["fc"]
    g = fxgndi.intervene(Untraceable(), ["inner", "linear"], leaf_modules=["inner"])
    assert g.site_names == ["inner", "fc"]


def test_an_untraceable_forward_names_what_was_tried_and_the_fix():
    class Top(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UntraceableModelError, match=r"Top's own forward.*concrete_args"):
        fxgndi.intervene(Top(), "linear")


def test_trace_is_taken_in_eval_mode():
    class FunctionalDropout(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5, self.training)

    model = FunctionalDropout().train()
    gm = fxgndi.trace(model)
    x = torch.ones(1000)
    assert torch.equal(gm(x), x)  # torch.fx baked training=False: no random zeros
    assert model.training  # and the model's own flag is restored


def test_a_graph_module_is_copied_not_retraced():
    model = torchvision.models.resnet18(num_classes=10)
    once = fxgndi.trace(model)
    twice = fxgndi.trace(once)
    assert twice is not once and twice.graph is not once.graph
    assert [n.name for n in twice.graph.nodes] == [n.name for n in once.graph.nodes]
    blocks = fxgndi.intervene(twice, "block").site_names
    assert blocks[:2] == ["layer1.0", "layer1.1"]  # module names survive, not "add", "add_1"
