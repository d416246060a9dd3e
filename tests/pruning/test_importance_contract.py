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
