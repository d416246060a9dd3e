"""Spreading a MAC budget over the groups by their time (``prune(allocate="time")``), against a
deterministic stand-in kernel clock: the per-channel costs it measures, the balance it strikes
(checked against the KKT conditions by hand), and what the pruned model's time does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torchvision

import fxgndi
from fxgndi.deploy.latency import Latency
from fxgndi.pruning.allocation import LayerCost, balance
from fxgndi.pruning.kernels import KernelTimer, Scaling, resized, scaling_seconds

SIZE = 64  # 3x3 conv 3 -> 16 on 64 x 64: 1.8M MACs per sample, above DISPATCH_BOUND
FIXED = 1e-5  # seconds per call, whatever the width
PER_MAC = 1e-9


class Inverted(nn.Module):
    """conv -> depthwise 5x5 conv -> pointwise conv -> head: the 16 hidden channels feed the
    depthwise conv, which the stand-in clock makes four times as slow per MAC as the others
    (a depthwise conv's poor MAC rate). Uniformly pruned, the pointwise conv's MACs fall with
    the square of the kept fraction, the depthwise conv's time only with it."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.project = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.depthwise(torch.relu(self.expand(x))))
        return self.head(self.project(h).mean((2, 3)))


def _rate(kernel: nn.Module) -> float:
    return 4 * PER_MAC if getattr(kernel, "kernel_size", None) == (5, 5) else PER_MAC


def _kernel_macs(kernel: nn.Module, x: torch.Tensor) -> int:
    if isinstance(kernel, nn.Conv2d):  # stride 1, "same" padding
        return kernel.weight.numel() * x.shape[-1] * x.shape[-2]
    return kernel.weight.numel()


def _seconds(kernel: nn.Module, x: torch.Tensor) -> float:
    """The stand-in clock: FIXED per conv / linear call plus its MACs at its rate; a whole
    model, the sum over its conv / linear layers."""
    if isinstance(kernel, (nn.Conv2d, nn.Linear)):
        return FIXED + _kernel_macs(kernel, x) * _rate(kernel)
    return sum(_seconds(m, x) for m in kernel.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


class Clock:
    """:func:`_seconds`, recording what it timed."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, int]] = []

    def __call__(self, latency: Latency, kernel: nn.Module, x: torch.Tensor) -> float:
        self.calls.append((kernel, latency.batch_size))
        return _seconds(kernel, x)


@pytest.fixture
def clock(monkeypatch, tmp_path):
    monkeypatch.setenv("FXGNDI_CACHE", str(tmp_path))
    stand_in = Clock()
    monkeypatch.setattr(Latency, "seconds", lambda self, m, x: stand_in(self, m, x))
    return stand_in


def _model_time(model: Inverted) -> float:
    return _seconds(model, torch.zeros(1, 1, SIZE, SIZE))


def _macs(model: Inverted) -> int:
    hidden, out = model.expand.out_channels, model.project.out_channels
    return (27 * hidden + 25 * hidden + hidden * out) * SIZE * SIZE + 4 * out


def _prune(allocate, **kwargs):
    torch.manual_seed(0)
    x = torch.randn(2, 3, SIZE, SIZE)
    return fxgndi.prune(Inverted().eval(), [(x, torch.zeros(2, dtype=torch.long))],
                        sparsity=0.5, target="macs", importance="l1", round_to=None,
                        repair=False, allocate=allocate, **kwargs)


def test_a_kernel_is_fitted_as_compute_plus_memory_time_of_its_channels(monkeypatch, tmp_path):
    # A clock whose kernels cost 3e-4 s per call, 2e-9 per MAC and 5e-6 per input and per
    # output channel: the fit must find exactly those (per whole kernel).
    def seconds(self, kernel, x):
        return 3e-4 + 2e-9 * _kernel_macs(kernel, x) + 5e-6 * (
            kernel.in_channels + kernel.out_channels)
    monkeypatch.setattr(Latency, "seconds", seconds)
    timer = KernelTimer(Latency(), cache=tmp_path / "k.json")
    fit = scaling_seconds(timer, nn.Conv2d(24, 16, 1), (24, SIZE, SIZE), True, True)
    assert fit.product == pytest.approx(2e-9 * 24 * 16 * SIZE * SIZE)
    assert fit.outputs == pytest.approx(5e-6 * 16) and fit.inputs == pytest.approx(5e-6 * 24)
    depthwise = scaling_seconds(timer, nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                (16, SIZE, SIZE), True, True)  # one width: outputs only
    assert depthwise == pytest.approx((0.0, 2e-9 * 16 * 9 * SIZE * SIZE + 5e-6 * 32, 0.0))


def test_the_balance_meets_both_budgets_as_worked_by_hand():
    # a: 100 MACs, 3 s that go with its (group 0's) channels; b: 200 MACs whose 1 s goes with
    # the product of group 0's and its own (group 1's) kept fractions. Halving the MACs and the
    # time together: k0 (1 + 2 k1) = 1.5 and k0 (3 + k1) = 2 give k1 = 1, k0 = 0.5. Shares:
    # w0 = (4/4) / (300/300) = 1, w1 = (1/4) / (200/300) = 3/8; k0 / k1 = (1 + 3t/8) / (1 + t)
    # = 1/2 at the least tilt, t = 4.
    layers = [LayerCost(100.0, Scaling(0.0, 3.0, 0.0), 0, None),
              LayerCost(200.0, Scaling(1.0, 0.0, 0.0), 1, 0)]
    alloc = balance(layers, [["a"], ["b"]], sparsity=0.5)
    assert alloc.weights == pytest.approx({"a": 1.0, "b": 3 / 8})
    assert alloc.tilt == pytest.approx(4.0, rel=1e-6)
    ratio = 1 - 0.5 / (1 + 4) * (1 + 4)  # where group 0 keeps 0.5: (1 - r) (1 + t) / (1 + t)
    assert alloc.keep("a", ratio) == pytest.approx(0.5) and alloc.keep("b", ratio) == 1.0


def test_where_fixed_time_dominates_the_channels_time_is_balanced_instead():
    # The same two layers and 100 s that no channel costs: the model's time cannot fall by
    # half; the channels' time is made to fall as fast as the MACs (the tilt worked above).
    layers = [LayerCost(100.0, Scaling(0.0, 3.0, 0.0), 0, None),
              LayerCost(200.0, Scaling(1.0, 0.0, 0.0), 1, 0)]
    assert balance(layers, [["a"], ["b"]], sparsity=0.5, fixed=100.0).tilt == \
        pytest.approx(4.0, rel=1e-6)


def test_the_balance_stays_uniform_where_uniform_is_proportional():
    layers = [LayerCost(100.0, Scaling(0.0, 1.0, 0.0), 0, None),  # time linear in each group
              LayerCost(200.0, Scaling(0.0, 5.0, 0.0), 1, None)]
    alloc = balance(layers, [["a"], ["b"]], sparsity=0.5)
    assert alloc.tilt == 0 and alloc.ratios(0.3) == {"a": pytest.approx(0.3),
                                                     "b": pytest.approx(0.3)}


def test_the_balance_tilts_all_the_way_where_proportional_is_out_of_reach():
    # b is memory-bound: its time goes with the sum of the two fractions, its MACs with their
    # product; no allocation makes the time fall as fast as the MACs.
    layers = [LayerCost(100.0, Scaling(0.0, 1.0, 0.0), 0, None),
              LayerCost(200.0, Scaling(0.0, 0.5, 0.5), 1, 0)]
    alloc = balance(layers, [["a"], ["b"]], sparsity=0.5, max_tilt=1e6)
    assert alloc.tilt == 1e6
    assert alloc.keep("a", 0.8) / alloc.keep("b", 0.8) == pytest.approx(
        alloc.weights["b"] / alloc.weights["a"], rel=1e-4)


def test_a_product_of_two_groups_counts_in_both():
    layer = LayerCost(64.0, Scaling(2.0, 0.5, 0.25), out_group=1, in_group=0)
    assert layer.kept_macs([0.5, 0.25]) == 64 * 0.5 * 0.25
    assert layer.kept_seconds([0.5, 0.25]) == 2.0 * 0.125 + 0.5 * 0.25 + 0.25 * 0.5
    assert layer.shares() == {1: (2.5, 64.0), 0: (2.25, 64.0)}


def test_time_falls_at_least_as_fast_as_macs_where_uniform_pruning_lags(clock):
    dense = Inverted()
    uniform, timed = _prune("uniform"), _prune("time")
    for r in (uniform, timed):  # the MAC target is met (torch-pruning's count also has the
        # biases and the pooling: within 0.03 on ours)
        assert abs(1 - _macs(r.model) / _macs(dense) - 0.5) <= 0.03
    pruned = {"uniform": uniform.model, "time": timed.model}
    time_kept = {n: _model_time(m) / _model_time(dense) for n, m in pruned.items()}
    macs_kept = {n: _macs(m) / _macs(dense) for n, m in pruned.items()}
    assert time_kept["uniform"] > macs_kept["uniform"] + 0.03  # the depthwise time lags
    assert time_kept["time"] <= macs_kept["time"] + 0.01  # as fast, here
    # the hidden channels (depthwise) lose a larger fraction than the outputs
    assert timed.model.expand.out_channels / 16 < timed.model.project.out_channels / 32
    assert timed.settings["allocation"]["tilt"] > 0
    assert uniform.settings["allocation"] is None


def test_timings_are_cached_and_the_latency_asked_for_is_used(clock):
    first = _prune(Latency(batch_size=8))
    timed = len(clock.calls)
    assert timed > 0 and {b for _, b in clock.calls} == {8}
    again = _prune(Latency(batch_size=8))
    assert len(clock.calls) == timed  # all from the cache
    assert again.channels == first.channels


def test_a_dispatch_bound_model_is_pruned_uniformly_without_timing(clock):
    x = torch.randn(2, 3, 8, 8)  # every kernel far below DISPATCH_BOUND
    data = [(x, torch.zeros(2, dtype=torch.long))]
    kwargs = dict(sparsity=0.5, target="macs", importance="l1", round_to=None, repair=False)
    timed = fxgndi.prune(Inverted().eval(), data, allocate="time", **kwargs)
    uniform = fxgndi.prune(Inverted().eval(), data, allocate="uniform", **kwargs)
    assert clock.calls == [] and timed.settings["allocation"]["tilt"] == 0
    assert timed.channels == uniform.channels


def test_allocate_names_its_choices():
    with pytest.raises(ValueError, match="allocate"):
        _prune("fastest")


@pytest.mark.parametrize("norm, shape", [
    (nn.BatchNorm2d(16), (16, 5, 5)),
    (nn.LayerNorm(16), (7, 16)),
    (torchvision.models.convnext.LayerNorm2d(16), (16, 5, 5)),
])
def test_a_norm_stands_in_at_another_width_for_its_first_channels(norm, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    norm.eval()
    kernel, x = resized(norm, shape, True, 6)
    last = isinstance(norm, nn.LayerNorm) and not isinstance(
        norm, torchvision.models.convnext.LayerNorm2d)
    assert x.shape[-1 if last else 1] == 6
    # The stand-in computes what the full norm computes on its first 6 channels (channels
    # are normalised independently by BatchNorm; a LayerNorm of 6 differs, so only shape).
    full_x = torch.randn(*x.shape[:-1], 16) if last else torch.randn(1, 16, *x.shape[2:])
    part = full_x[..., :6] if last else full_x[:, :6]
    out = kernel(part)
    assert out.shape == part.shape
    if isinstance(norm, nn.BatchNorm2d):
        assert torch.allclose(out, norm(full_x)[:, :6], atol=1e-6)
    assert math.isfinite(out.sum().item())


def test_a_latency_target_is_met_with_fewer_macs_removed(clock, monkeypatch):
    """The stand-in clock times whole models too (Latency.times): halving it by time removes
    fewer MACs than halving it uniformly, and both meet the latency within its 5%."""
    monkeypatch.setattr(Latency, "times", lambda self, models, x: [
        [_seconds(m, x)] * self.repeat for m in models])
    results = {}
    dense = Inverted()
    for allocate in ("uniform", "time"):
        torch.manual_seed(0)
        x = torch.randn(2, 3, SIZE, SIZE)
        results[allocate] = fxgndi.prune(
            Inverted().eval(), [(x, torch.zeros(2, dtype=torch.long))], sparsity=0.5,
            target=Latency(), importance="l1", round_to=None, repair=False, allocate=allocate)
    for r in results.values():
        assert abs(_model_time(r.model) / _model_time(dense) - 0.5) <= 0.05
    assert _macs(results["time"].model) > _macs(results["uniform"].model) * 1.05
