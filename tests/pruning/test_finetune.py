"""fine_tune: BatchNorm statistics re-estimated on the data before the first training step."""

from __future__ import annotations

import torch
from torch import nn

from fxgndi.pruning.finetune import fine_tune


def _net_and_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():  # stale statistics, far from what the data gives
        net[1].running_mean.fill_(5.0)
        net[1].running_var.fill_(9.0)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 2, (8,))
    with torch.no_grad():
        h = net[0](x)
    return net.eval(), [(x, y)], h.mean((0, 2, 3)), h.transpose(0, 1).flatten(1).var(1)


def test_statistics_are_recalibrated_before_training():
    """With lr 0 the weights stay, and one training step moves the running mean to
    0.9 * start + 0.1 * batch mean: it equals the batch mean only if the start was the batch
    mean, that is, if the statistics were recalibrated first."""
    net, data, mean, var = _net_and_batch()
    weights = [p.detach().clone() for p in net.parameters()]
    out = fine_tune(net, data, epochs=1, lr=0.0, weight_decay=0.0, progress=False)
    assert out is net and not net.training
    for p, w in zip(net.parameters(), weights):
        assert torch.equal(p, w)
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)


def test_without_recalibration_the_stale_statistics_leak_into_the_running_average():
    net, data, mean, var = _net_and_batch()
    fine_tune(net, data, epochs=1, lr=0.0, weight_decay=0.0, recalibrate=False, progress=False)
    torch.testing.assert_close(net[1].running_mean, 0.9 * 5.0 + 0.1 * mean)
    torch.testing.assert_close(net[1].running_var, 0.9 * 9.0 + 0.1 * var)
