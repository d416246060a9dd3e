"""Tracing, scoring and ablating on a representative set of torchvision classifiers."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxgndi
from fxgndi.gndi.estimate import forward_tangents, reverse_tangents

from tests.helpers import hooked_gndi, replace_output

MODELS = ["resnet18", "mobilenet_v3_small", "vgg11_bn", "densenet121", "efficientnet_b0",
          "convnext_tiny", "vit_b_16"]


def build(name: str) -> torch.nn.Module:
    kwargs = {"image_size": 32} if name.startswith("vit") else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    for m in model.modules():  # ViT's zero-initialised head would make every tangent 0
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average: one pass sets the statistics
    # Random-init BatchNorm statistics shrink deep nets' outputs towards 0 (EfficientNet's
    # logits are ~1e-13); statistics from one batch give activations of a realistic scale.
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_trace_score_and_ablate(name):
    model = build(name)
    x = torch.randn(2, 3, 32, 32)
    graph = fxgndi.intervene(model, ["conv", "linear"], example_inputs=x)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
    sites = graph.sites
    assert len(sites) >= 3 and all(s.channels for s in sites)

    scores = fxgndi.score(graph, [x], progress=False)
    # Random-init nets can saturate a few gates (hardsigmoid), giving exact zeros there.
    assert scores.values.shape == (len(sites),) and (scores.values > 0).mean() > 0.8

    # The G-NDI of one mid-network site equals a hooked JVP (plain torch.func) on the model.
    probe = sites[len(sites) // 2]
    module = model.get_submodule(probe.name)
    assert scores[probe.name] == pytest.approx(hooked_gndi(model, module, [x]), rel=1e-3)

    # The exact ablation of the same site equals a hook that zeroes that module.
    exact = fxgndi.ablate(graph, [x], metric="logit_l2", channels=None, progress=False)
    with torch.no_grad():
        with replace_output(model.get_submodule(probe.name), torch.zeros_like):
            hooked = model(x)
        expected = (hooked - model(x)).norm(dim=-1).mean().item()
        scale = model(x).norm(dim=-1).mean().item()
    assert exact[probe.name] == pytest.approx(expected, rel=1e-4, abs=1e-5 * scale)

    # Forward mode (one JVP per site) agrees with reverse mode on a few sites.
    few = [(s.name, None) for s in sites[-3:]]
    with torch.no_grad():
        fwd = forward_tangents(graph, x, None, "logits", few)
        rev = reverse_tangents(graph, x, None)
    for i, (site, _) in enumerate(few):
        atol = 1e-4 * rev[site].abs().max().item() + 1e-12
        torch.testing.assert_close(fwd[:, i], rev[site], rtol=1e-4, atol=atol)
