"""Latency targets: the search against a deterministic stand-in clock, the per-latency ranking
of global pruning, the latency table, and the runtimes a latency is measured on."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import fxgndi
from fxgndi.core.cost import count_macs_params
from fxgndi.deploy.latency import Latency, median_seconds
from fxgndi.pruning.latency import layer_latencies

from tests.helpers import make_tiny


class Wide(nn.Module):
    """Two independent branches: 'slow' channels are four times as expensive as 'fast' ones
    under the stand-in clock below."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = nn.Conv2d(3, 16, 3, padding=1)
        self.slow = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        a = torch.relu(self.fast(x)).mean((2, 3))
        b = torch.relu(self.slow(x)).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def _clock(model: nn.Module, example) -> float:
    """Seconds = the layers' widths, slow channels costing 4x (deterministic)."""
    return float(model.fast.out_channels + 4 * model.slow.out_channels)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g))]


def test_a_latency_target_is_met_within_its_tolerance(data, monkeypatch):
    monkeypatch.setattr(Latency, "seconds", lambda self, model, example: _clock(model, example))
    r = fxgndi.prune(Wide().eval(), data, target="latency", sparsity=0.5, importance="l1",
                     repair=False)
    before, after = r.settings["latency"]["before"], r.settings["latency"]["after"]
    assert before == 80 and abs((1 - after / before) - 0.5) <= 0.05
    assert r.settings["target"] == "latency" and r.settings["latency"]["runtime"] == "eager"


def test_global_pruning_takes_more_of_the_expensive_channels(data, monkeypatch):
    """Both branches score alike (same weights); the one whose channels the latency table says
    cost more is worth less per second, so global pruning by importance per latency takes more
    of it. (A group whose every channel falls under the threshold is left whole by
    torch-pruning, which never empties a layer: the costs differ by 20% only.)"""
    model = Wide().eval()
    with torch.no_grad():
        model.slow.weight.copy_(model.fast.weight)
        model.slow.bias.copy_(model.fast.bias)
        model.head.weight[:, 16:] = model.head.weight[:, :16]
    monkeypatch.setattr(Latency, "seconds", lambda self, m, example: _clock(m, example))
    widths = {}
    for slow, fast in ((1.2, 1.0), (1.0, 1.2)):  # the table decides which branch goes first
        table = {"fast": fast, "slow": slow, "head": 0.0}
        monkeypatch.setattr("fxgndi.pruning.width.layer_latencies", lambda *a, **k: table)
        r = fxgndi.prune(model, data, target="latency", sparsity=0.4, importance="l1",
                         global_pruning=True, repair=False)
        widths[slow > fast] = (r.model.slow.out_channels, r.model.fast.out_channels)
    assert widths[True][0] < widths[True][1] and widths[False][0] > widths[False][1]


def test_the_latency_table_times_every_layer_on_its_input():
    model = make_tiny()
    table = layer_latencies(model, torch.randn(1, 2, 6, 6), Latency(repeat=2, batch_size=3))
    assert set(table) == {"conv1", "conv2", "fc"} and all(t > 0 for t in table.values())


def test_median_seconds_of_known_sleeps():
    assert 0.01 <= median_seconds(lambda: time.sleep(0.01), repeat=3) < 0.05


@pytest.mark.parametrize("runtime", ["eager", "pt2", "onnx"])
def test_every_runtime_times_the_model(runtime):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    x = torch.randn(1, 3, 6, 6)
    seconds = Latency(runtime=runtime, batch_size=4, repeat=2).seconds(model, x)
    assert seconds > 0
    assert count_macs_params(model, x)[0] > 0  # the model itself is untouched
    with pytest.raises(ValueError, match="unknown runtime"):
        Latency(runtime="tensorrt")


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(3, 4, 3)
        self.vector = nn.Linear(5, 4)

    def forward(self, img, vec):
        return self.image(img).mean((2, 3)) + self.vector(vec)


def test_a_model_with_several_inputs_is_timed_on_all_of_them_at_the_batch_asked_for():
    model, seen = TwoInputs(), []
    model.register_forward_pre_hook(lambda m, args: seen.append([a.shape[0] for a in args]))
    example = (torch.randn(1, 3, 6, 6), torch.randn(1, 5))
    table = layer_latencies(model, example, Latency(repeat=1, warmup=0, batch_size=3))
    assert set(table) == {"image", "vector"}
    assert Latency(repeat=2, warmup=0, batch_size=3).seconds(model, example) > 0
    assert seen == [[3, 3]] * 3  # the table's pass, then two timed calls: both inputs, batch 3
