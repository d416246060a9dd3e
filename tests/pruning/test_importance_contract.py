"""torch-pruning's importance contract for GNDIImportance / AblationImportance: None for the
groups they cannot score (torch-pruning skips them, fxgndi.prune says which), and
``group_reduction``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from fxgndi.pruning.importance import AblationImportance, GNDIImportance
from fxgndi.pruning.width import prune
from tests.helpers import randomize_batchnorm


class FeatureNet(nn.Module):
    """conv1 -> bn -> relu -> conv2: conv2's channels are the model output, read by no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


class RecurrentNet(nn.Module):
    """embed (linear) -> LSTM -> head: the embed group is read by the LSTM, which G-NDI cannot
    tap; the LSTM's own group is read by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(torch.relu(self.embed(x)))
        return self.head(out[:, -1])


def _feature_net() -> tuple[FeatureNet, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = randomize_batchnorm(FeatureNet())
    return model, [torch.randn(4, 2, 5, 5) for _ in range(2)]


def _group(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    """The group of all of ``layer``'s output channels."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    if isinstance(layer, nn.Linear):
        return dg.get_pruning_group(layer, tp.prune_linear_out_channels,
                                    list(range(layer.out_features)))
    return dg.get_pruning_group(layer, tp.prune_conv_out_channels,
                                list(range(layer.out_channels)))


@pytest.mark.parametrize("cls", [GNDIImportance, AblationImportance])
def test_a_group_nothing_reads_scores_none_and_says_why(cls):
    model, data = _feature_net()
    imp = cls(data)
    assert imp(_group(model, model.conv2, data[0])) is None
    assert "no conv or linear layer reads its channels" in imp.skipped["conv2"]
    scores = imp(_group(model, model.conv1, data[0]))  # the other group is still scored
    assert scores.shape == (6,) and bool((scores > 0).all())
    assert list(imp.skipped) == ["conv2"]


def test_a_group_an_lstm_reads_scores_none():
    torch.manual_seed(0)
    model = RecurrentNet().eval()
    data = [torch.randn(4, 7, 3)]
    imp = GNDIImportance(data)
    assert imp(_group(model, model.embed, data[0])) is None
    assert "'lstm' reads its channels but is not a conv or linear layer" in imp.skipped["embed"]


def test_torch_pruning_skips_the_groups_scored_none():
    model, data = _feature_net()
    pruner = tp.pruner.BasePruner(model, data[0][:1], importance=GNDIImportance(data),
                                  pruning_ratio=0.5)
    pruner.step()
    assert (model.conv1.out_channels, model.conv2.out_channels) == (3, 4)
    assert model(data[0]).shape == (4, 4, 5, 5)


def test_prune_reports_the_groups_the_importance_skipped():
    model, data = _feature_net()
    result = prune(model, data, sparsity=0.5, ignored_layers=None, repair=False)
    assert result.channels == {"conv1": (6, 3), "conv2": (4, 4)}
    assert set(result.skipped) == {"conv2"}
    assert result.skipped["conv2"].startswith("keeps its width: GNDIImportance did not score")
    assert "model output" in result.skipped["conv2"]
    assert result.model(data[0]).shape == (4, 4, 5, 5)
    assert "conv2" in result.table()


def _hooked_effect_norms(model: FeatureNet, data) -> torch.Tensor:
    """E_x ||d out / d alpha_c|| of removing conv1's channel c (its BatchNorm output scaled by
    1 - alpha), by central differences through a forward hook (plain PyTorch)."""
    def out(c: int, alpha: float, x: torch.Tensor) -> torch.Tensor:
        def hook(m, a, o):
            o = o.clone()
            o[:, c] *= 1 - alpha
            return o
        handle = model.bn1.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(x).flatten(1)
        finally:
            handle.remove()
    eps = 1e-3
    return torch.stack([torch.cat([((out(c, eps, x) - out(c, -eps, x)) / (2 * eps)).norm(dim=1)
                                   for x in data]).mean() for c in range(6)])


def test_every_group_reduction_is_the_one_score_of_the_group():
    model, data = _feature_net()
    model.double()
    data = [x.double() for x in data]
    group = _group(model, model.conv1, data[0])
    scores = {r: GNDIImportance(data, group_reduction=r, mode="reverse")(group)
              for r in ("mean", "sum", "max", "prod", "first", "gate", None)}
    # one row: torch-pruning's [members, channels] layout with one member
    assert scores[None].shape == (1, 6)
    torch.testing.assert_close(scores["mean"].double(), _hooked_effect_norms(model, data),
                               rtol=1e-4, atol=1e-6)
    for reduction, value in scores.items():  # torch-pruning's own identities, on that row
        row = scores[None]
        expected = {"sum": row.sum(0), "max": row.max(0)[0], "prod": row.prod(0), None: row,
                    "gate": row[-1], "first": row[0]}.get(reduction, row.mean(0))
        torch.testing.assert_close(value, expected)


def test_an_unknown_group_reduction_is_refused():
    with pytest.raises(ValueError, match="unknown group_reduction 'median': use one of"):
        GNDIImportance([torch.zeros(1, 2)], group_reduction="median")


def test_prune_refuses_an_unreduced_importance():
    model, data = _feature_net()
    with pytest.raises(ValueError, match=r"returned \(1, 6\) scores .* \(1-D\)"):
        prune(model, data, importance=GNDIImportance(data, group_reduction=None), repair=False)


class Gated(nn.Module):
    """A conv behind data-dependent control flow: torch.fx keeps it opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.mean() > 0 else -y


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.gated = Gated()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.gated(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(h.mean((2, 3)))


def test_prune_prunes_around_a_submodule_torch_fx_cannot_trace():
    torch.manual_seed(0)
    model = randomize_batchnorm(GatedNet())
    data = [(torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    with pytest.warns(UserWarning, match="'gated'"):
        result = prune(model, data, sparsity=0.5, repair=False)
    # conv1's channels are read inside the opaque module: kept, and said why; gated.conv's
    # are read by conv2 (tapped outside it) and conv2's by fc: both halved.
    assert result.channels == {"conv1": (6, 6), "gated.conv": (6, 3), "conv2": (8, 4),
                               "fc": (3, 3)}
    assert set(result.skipped) == {"conv1"}
    assert "'gated.conv' reads its channels but is not a conv or linear layer called in the " \
           "traced graph" in result.skipped["conv1"]
    assert result.model(data[0][0]).shape == (4, 3)
    assert model.gated.conv.out_channels == 6  # the user's model is not touched
