"""BatchNorm recalibration against statistics computed by hand from hooked BatchNorm inputs."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from fxgndi.core.errors import DataError
from fxgndi.pruning.width import prune
from fxgndi.pruning.recalibrate import recalibrate_bn

from tests.helpers import make_tiny


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Dropout(0.5), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.Flatten(),
                        nn.Linear(5 * 6 * 6, 3), nn.BatchNorm1d(3))
    with torch.no_grad():  # stale statistics, as after pruning
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(7.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _hand_statistics(net: nn.Sequential, batches: list[torch.Tensor]) -> dict[int, tuple]:
    """Per BatchNorm: the mean over batches of the batch mean and unbiased batch variance of its
    input, with the network run in eval mode except the BatchNorm layers themselves."""
    bns = [i for i, m in enumerate(net) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sums = {i: [0.0, 0.0] for i in bns}
    for x in batches:
        h = x
        for i, m in enumerate(net):
            if i in bns:
                dims = [0] + list(range(2, h.dim()))
                mean, var = h.mean(dims), h.var(dims, unbiased=True)
                sums[i][0] += mean
                sums[i][1] += var
                h = (h - mean.view(1, -1, *[1] * (h.dim() - 2))) / torch.sqrt(
                    h.var(dims, unbiased=False) + m.eps).view(1, -1, *[1] * (h.dim() - 2))
                h = h * m.weight.view(1, -1, *[1] * (h.dim() - 2)) + m.bias.view(
                    1, -1, *[1] * (h.dim() - 2))
            else:
                h = m(h)  # eval mode: dropout is the identity
    return {i: (s[0] / len(batches), s[1] / len(batches)) for i, s in sums.items()}


def test_statistics_match_a_hand_computation():
    net = _net()
    torch.manual_seed(1)
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        expected = _hand_statistics(net, batches)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    assert recalibrate_bn(net, [(x, torch.zeros(8)) for x in batches]) == 24
    for i, (mean, var) in expected.items():
        torch.testing.assert_close(net[i].running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net[i].running_var, var, rtol=1e-5, atol=1e-5)
        assert net[i].momentum == 0.1  # restored
    for k, v in weights.items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)
    assert not any(m.training for m in net.modules())  # flags restored


def test_train_flags_and_other_modules_untouched():
    net = _net().train()
    recalibrate_bn(net, [torch.randn(4, 3, 6, 6)])
    assert all(m.training for m in net.modules())


def test_single_sample_batches_are_skipped_and_all_of_them_is_an_error():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_bn(net, [torch.randn(4, 3, 6, 6), torch.randn(1, 3, 6, 6)]) == 4
    net = _net()
    with pytest.raises(DataError, match="batch_size"):
        recalibrate_bn(net, [torch.randn(1, 3, 6, 6)])
    for k, v in net.state_dict().items():  # nothing half-recalibrated
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_model_without_batchnorm_reads_nothing():
    assert recalibrate_bn(nn.Linear(2, 2), [torch.randn(3, 2)]) == 0


def test_prune_recalibrates_the_pruned_models_batchnorms_on_its_data():
    """prune(repair={"recalibrate_bn": True}): each BatchNorm's statistics are the batch means /
    variances of what it reads in the *pruned* model, measured here with forward hooks."""
    model = make_tiny()
    data = [(torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = prune(model, data, sparsity=0.5, importance="l1", repair={"recalibrate_bn": True})
    assert r.settings["repair"]["recalibrate_bn"] is True
    pruned = r.model
    seen: dict[str, list[torch.Tensor]] = {"bn1": [], "bn2": []}
    hooks = [getattr(pruned, n).register_forward_hook(
        lambda m, a, o, n=n: seen[n].append(a[0])) for n in seen]
    layers = {n: getattr(pruned, n) for n in seen}
    stored = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()}
    with torch.no_grad():
        for m in layers.values():
            m.train()  # batch statistics downstream, as during recalibration
        for x, _ in data:
            pruned(x)
        for m in layers.values():
            m.eval()
    for h in hooks:
        h.remove()
    for n, inputs in seen.items():
        assert layers[n].num_features == 2  # half the channels went
        mean = torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0)
        var = torch.stack([t.var((0, 2, 3)) for t in inputs]).mean(0)
        torch.testing.assert_close(stored[n][0], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored[n][1], var, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():  # the user's model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
