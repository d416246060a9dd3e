"""Models with several inputs through every verb: G-NDI against exact ablation by hooks."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

import fxgndi
from fxgndi.pruning.importance import GNDIImportance


class TwoInputs(nn.Module):
    """An image branch and a vector branch added before the head: every site's effect is
    linear in alpha (ReLU is positively homogeneous), so G-NDI equals exact ablation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, img, vec):
        return self.head(F.relu(self.conv(img)).mean((2, 3)) + F.relu(self.fc(vec)))


def _data():
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 5, generator=g)),
             torch.randint(0, 3, (6,), generator=g))]


def _hooked_effect(model, inputs, modules, channel):
    """Mean over samples of ||f(x) - f(x with `channel` of each module's output zeroed)||_2."""
    with torch.no_grad():
        ref = model(*inputs)
        handles = [m.register_forward_hook(
            lambda mod, a, out: out.index_fill(1, torch.tensor([channel]), 0.0))
            for m in modules]
        try:
            out = model(*inputs)
        finally:
            for h in handles:
                h.remove()
    return (out - ref).norm(dim=1).mean()


def test_score_and_ablate_feed_both_inputs():
    model, data = TwoInputs().eval(), _data()
    scores = fxgndi.score(model, data, sites=["conv"], granularity="channel")
    truth = [_hooked_effect(model, data[0][0], [model.conv], c) for c in range(4)]
    assert torch.allclose(torch.as_tensor(scores["conv"], dtype=torch.float32),
                          torch.stack(truth), rtol=1e-4, atol=1e-6)
    exact = fxgndi.ablate(model, data, sites=["conv"], granularity="channel", metric="logit_l2")
    assert exact["conv"].shape == (4,)


def test_gndi_importance_on_two_inputs_and_keyword_batches():
    model, data = TwoInputs().eval(), _data()
    (img, vec), y = data[0]
    example = (img[:1], vec[:1])
    dg = tp.DependencyGraph().build_dependency(model, example)
    group = dg.get_pruning_group(model.conv, tp.prune_conv_out_channels, list(range(4)))
    # the group couples conv's channels with fc's features (the add): both are removed
    truth = torch.stack([_hooked_effect(model, (img, vec), [model.conv, model.fc], c)
                         for c in range(4)])
    for batches in (data, [(img, vec)], [{"x": {"img": img, "vec": vec}, "y": y}]):
        got = GNDIImportance(batches)(group)
        assert torch.allclose(got, truth, rtol=1e-4, atol=1e-6), batches


def test_prune_and_validate_two_inputs():
    model, data = TwoInputs().eval(), _data()
    result = fxgndi.prune(model, data, sparsity=0.5, ignored_layers=[model.head])
    assert result.model.conv.out_channels == 2
    assert result.model(*data[0][0]).shape == (6, 3)
    report = fxgndi.validate(model, data, sites=["conv"], granularity="channel",
                             importances=["gndi"], n_channels=4, truth="logit_l2")
    assert report is not None
