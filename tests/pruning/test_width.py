"""GNDIImportance against independent hook computations, and fxgndi.prune end to end."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

from fxgndi.core.errors import FxgndiError
from fxgndi.pruning.importance import AblationImportance, GNDIImportance
from fxgndi.pruning.width import output_layers, prune
from tests.helpers import make_tiny, randomize_batchnorm


class ChainNet(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> relu -> pool -> linear: two uncoupled groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class ResNetLike(nn.Module):
    """A residual block: conv1/bn1 and conv_b/bn_b channels are coupled by the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_a, self.bn_a = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn1(self.conv1(x)))
        branch = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(s)))))
        return self.fc(torch.relu(s + branch).mean((2, 3)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    return randomize_batchnorm(model, bias=(-0.2, 0.6))


def _net(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(cls().double())


def _data(n_batches: int = 2, batch: int = 4, size: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 2, size, size, generator=g, dtype=torch.float64)
            for _ in range(n_batches)]


def _group(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    return dg.get_pruning_group(layer, tp.prune_conv_out_channels,
                                list(range(layer.out_channels)))


@contextlib.contextmanager
def _edit_output(module: nn.Module, fn):
    handle = module.register_forward_hook(lambda m, a, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _edit_input(module: nn.Module, fn):
    handle = module.register_forward_pre_hook(lambda m, a: (fn(a[0]),))
    try:
        yield
    finally:
        handle.remove()


def _scale_channel(c: int, alpha: float, dim: int = 1):
    def fn(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h.select(dim, c).mul_(1 - alpha)
        return h
    return fn


def _fd_tangent(model, x, edits, eps=1e-6):
    """Central difference of the logits in alpha, where ``edits(alpha)`` installs hooks."""
    outs = []
    for alpha in (eps, -eps):
        with contextlib.ExitStack() as stack, torch.no_grad():
            for cm in edits(alpha):
                stack.enter_context(cm)
            outs.append(model(x))
    return (outs[0] - outs[1]) / (2 * eps)


def _mean_norm(model, data, edits_for_channel, channels):
    """E_x ||tangent||_2 per channel, from hook finite differences."""
    values = []
    for c in range(channels):
        norms = [_fd_tangent(model, x, edits_for_channel(c)).norm(dim=-1) for x in data]
        values.append(torch.cat(norms).mean())
    return torch.stack(values)


# ---------------------------------------------------------------------------- GNDIImportance

def test_gndi_group_score_is_the_tangent_of_removing_the_channel():
    model, data = _net(ChainNet), _data()
    imp = GNDIImportance(data)
    # Removing a channel zeroes it at the BatchNorm output (and so after the ReLU): the
    # independent reference scales the BN output channel by (1 - alpha).
    for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
        scores = imp(_group(model, conv, data[0]))
        reference = _mean_norm(model, data, lambda c: lambda a: [
            _edit_output(bn, _scale_channel(c, a))], conv.out_channels)
        torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-7)


def test_coupled_group_sums_member_tangents_before_the_norm():
    model, data = _net(ResNetLike), _data()
    scores = GNDIImportance(data)(_group(model, model.conv1, data[0]))
    assert scores.shape == (4,)
    # Removal zeroes channel c of bn1 and bn_b together.
    joint = _mean_norm(model, data, lambda c: lambda a: [
        _edit_output(model.bn1, _scale_channel(c, a)),
        _edit_output(model.bn_b, _scale_channel(c, a))], 4)
    torch.testing.assert_close(scores.double(), joint, rtol=1e-5, atol=1e-7)
    # The channel's two readers, conv_a's input and fc's input: their tangents add up to it.
    for c in range(4):
        for x in data:
            ta = _fd_tangent(model, x, lambda a: [_edit_input(model.conv_a, _scale_channel(c, a))])
            tf = _fd_tangent(model, x, lambda a: [
                _edit_input(model.fc, _scale_channel(c, a, dim=-1))])
            joint = _fd_tangent(model, x, lambda a: [
                _edit_output(model.bn1, _scale_channel(c, a)),
                _edit_output(model.bn_b, _scale_channel(c, a))])
            torch.testing.assert_close(ta + tf, joint, rtol=1e-5, atol=1e-7)


class TwoBranch(nn.Module):
    """Two convs whose outputs are added: their channels are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_p, self.conv_q = nn.Conv2d(2, 4, 3), nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv_p(x) + self.conv_q(x)).mean((2, 3)))


def test_group_score_is_the_norm_of_the_sum_of_member_tangents():
    model = _net(TwoBranch)
    with torch.no_grad():  # q = -p / 2: the members' tangents point in opposite directions
        model.conv_q.weight.copy_(-0.5 * model.conv_p.weight)
        model.conv_q.bias.copy_(-0.5 * model.conv_p.bias)
    data = _data()
    scores = GNDIImportance(data)(_group(model, model.conv_p, data[0])).double()
    norm_of_sum, sum_of_norms = [], []
    for c in range(4):
        tp_ = [_fd_tangent(model, x, lambda a: [_edit_output(model.conv_p, _scale_channel(c, a))])
               for x in data]
        tq = [_fd_tangent(model, x, lambda a: [_edit_output(model.conv_q, _scale_channel(c, a))])
              for x in data]
        norm_of_sum.append(torch.cat([(p + q).norm(dim=-1) for p, q in zip(tp_, tq)]).mean())
        sum_of_norms.append(torch.cat([p.norm(dim=-1) + q.norm(dim=-1)
                                       for p, q in zip(tp_, tq)]).mean())
    torch.testing.assert_close(scores, torch.stack(norm_of_sum), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(3 * scores, torch.stack(sum_of_norms), rtol=1e-5, atol=1e-7)


def test_channel_mean_baseline_is_the_tangent_at_the_consumer_inputs():
    model, data = _net(ChainNet), _data()
    scores = GNDIImportance(data, baseline="channel-mean")(_group(model, model.conv1, data[0]))
    inputs = []
    with _edit_input(model.conv2, lambda h: inputs.append(h) or h), torch.no_grad():
        for x in data:
            model(x)
    mean = torch.cat(inputs).mean((0, 2, 3))

    def towards_mean(c, a):
        def fn(h):
            h = h.clone()
            h[:, c] += a * (mean[c] - h[:, c])
            return h
        return fn

    reference = _mean_norm(model, data, lambda c: lambda a: [
        _edit_input(model.conv2, towards_mean(c, a))], 4)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-7)


def test_ablation_importance_is_the_effect_of_physically_removing_the_channel():
    model, data = _net(ResNetLike), _data()
    scores = AblationImportance(data)(_group(model, model.conv1, data[0]))
    for c in range(4):
        pruned = copy.deepcopy(model)
        group = _group(pruned, pruned.conv1, data[0])
        group._DG.get_pruning_group(pruned.conv1, tp.prune_conv_out_channels, [c]).prune()
        assert pruned.conv1.out_channels == 3
        with torch.no_grad():
            effect = torch.cat([(pruned(x) - model(x)).norm(dim=-1) for x in data]).mean()
        torch.testing.assert_close(scores[c].double(), effect, rtol=1e-5, atol=1e-7)


def test_ablation_and_gndi_rank_alike_for_small_interventions():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(
        nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double())
    data = _data(n_batches=2, batch=8)
    group = _group(model, model[0], data[0])
    gndi = GNDIImportance(data, baseline="channel-mean")(group)
    exact = AblationImportance(data, baseline="channel-mean")(group)
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(gndi), rank(exact)]))[0, 1]
    assert spearman > 0.9, (gndi, exact)


def test_normalizer_and_options_are_checked():
    data = _data(1)
    model = _net(ChainNet)
    raw = GNDIImportance(data)(_group(model, model.conv1, data[0]))
    scaled = GNDIImportance(data, normalizer="max")(_group(model, model.conv1, data[0]))
    torch.testing.assert_close(scaled, raw / raw.max())
    with pytest.raises(ValueError, match="normalizer"):
        GNDIImportance(data, normalizer="median")
    with pytest.raises(ValueError, match="baseline"):
        GNDIImportance(data, baseline="one")


# ---------------------------------------------------------------------------- prune

class _WrongLength(tp.importance.Importance):
    def __call__(self, group):
        return torch.ones(len(group[0].idxs) + 1)


def test_an_importance_of_the_wrong_length_raises():
    model = _net(ChainNet).float()
    with pytest.raises(ValueError, match="one score per channel"):
        prune(model, [torch.randn(4, 2, 5, 5)], importance=_WrongLength())


@pytest.fixture(scope="module")
def resnet_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]


def test_prune_resnet18_keeps_the_classes_and_the_users_model(resnet_data):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, resnet_data, sparsity=0.5, importance="gndi")
    pruned = result.model
    assert pruned is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and pruned.training  # flags restored on both
    assert pruned.fc.out_features == 10 and pruned.conv1.out_channels == 32
    assert result.channels["layer4.1.conv2"] == (512, 256)
    assert result.channels_reduction > 0.45
    assert result.macs_after < 0.4 * result.macs_before
    with torch.no_grad():
        assert pruned.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "MACs" in result.table() and result.to_dict()["channels"]["fc"] == [10, 10]


@pytest.mark.parametrize("target", ["macs", "params"])
def test_target_is_met_within_two_percent(resnet_data, target):
    model = torchvision.models.resnet18(num_classes=10)
    result = prune(model, resnet_data, sparsity=0.5, target=target, importance="l1")
    removed = result.macs_reduction if target == "macs" else result.params_reduction
    assert abs(removed - 0.5) <= 0.02


def test_unreachable_target_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 100))
    with pytest.raises(FxgndiError, match="unreachable"):
        prune(model, [torch.randn(4, 4)], sparsity=0.9, target="params", importance="l1")


@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5])
def test_sparsity_outside_the_unit_interval_raises(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        prune(nn.Linear(2, 2), [torch.randn(2, 2)], sparsity=sparsity)


def _means_at_inputs(model, layers, data):
    seen = {layer: [] for layer in layers}
    handles = [layer.register_forward_pre_hook(lambda m, a: seen[m].append(a[0]))
               for layer in layers]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return {m: torch.cat(v).transpose(0, 1).flatten(1).mean(1) for m, v in seen.items()}


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "padded_conv3x3_on_1px"])
def test_compensation_is_exact(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8, bias=False),
                              nn.ReLU(), nn.Linear(8, 3))
        data = [torch.randn(16, 6) for _ in range(2)]
    else:  # a 3x3 zero-padded conv on 1x1 maps sees its constant input at one tap only
        k, pad, px = (1, 0, 4) if kind == "conv1x1" else (3, 1, 1)
        model = _randomise_bn(nn.Sequential(
            nn.Conv2d(3, 8, k, padding=pad), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, k, padding=pad, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(8, 3)))
        data = [torch.randn(16, 3, px, px) for _ in range(2)]
    model.eval()
    consumers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))][1:]
    means = _means_at_inputs(model, consumers, data)
    result = prune(model, data, sparsity=0.5, importance="l1",
                   repair={"compensate": True, "reconstruct": False, "recalibrate_bn": False})
    # Reference: the original model, each consumer reading its removed channels' means.
    names = {m: n for n, m in model.named_modules()}
    removed = {c: sorted(set(range(means[c].numel())) - set(result.kept_inputs[names[c]]))
               for c in consumers}
    assert all(len(r) == 4 for r in removed.values())

    def set_removed(layer):
        def fn(h):
            h = h.clone()
            idx = torch.tensor(removed[layer])
            shape = [1] * h.dim()
            shape[1] = len(idx)
            h[:, idx] = means[layer][idx].view(shape)
            return h
        return fn

    with contextlib.ExitStack() as stack, torch.no_grad():
        for layer in consumers:
            stack.enter_context(_edit_input(layer, set_removed(layer)))
        reference = [model(x) for x in data]
    uncompensated = prune(model, data, sparsity=0.5, importance="l1", repair=False).model
    with torch.no_grad():
        for x, ref in zip(data, reference):
            torch.testing.assert_close(result.model(x), ref, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(uncompensated(x), ref, atol=1e-3)


def test_kept_indices_name_the_surviving_weights():
    model = _net(ChainNet).float()
    data = [torch.randn(4, 2, 5, 5)]
    result = prune(model, data, sparsity=0.5, importance="gndi", repair=False)
    kept = result.kept["conv1"]
    assert len(kept) == 2 and result.kept_inputs["conv2"] == kept
    torch.testing.assert_close(result.model.conv1.weight, model.conv1.weight[kept])
    torch.testing.assert_close(result.model.conv2.weight,
                               model.conv2.weight[result.kept["conv2"]][:, kept])
    torch.testing.assert_close(result.model.bn1.running_mean, model.bn1.running_mean[kept])


@pytest.mark.parametrize("importance", ["gndi", "ablation", "weight_taylor", "hessian", "lamp",
                                        "bn", "fpgm", "random", "l2"])
def test_every_named_importance_prunes(importance):
    model = _net(ChainNet).float()
    data = [(torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,)))]
    result = prune(model, data, sparsity=0.5, importance=importance, iterative_steps=2)
    assert result.model.conv1.out_channels == 2 and result.model.fc.out_features == 3
    assert all(p.grad is None for p in result.model.parameters())


def test_compensation_scores_with_the_channel_mean_baseline_by_default():
    model = _net(ChainNet).float()
    data = [torch.randn(4, 2, 5, 5)]
    on = prune(model, data, sparsity=0.5,
               repair={"compensate": True}).settings["importance_options"]
    off = prune(model, data, sparsity=0.5).settings["importance_options"]
    assert on["baseline"] == "channel-mean" and off["baseline"] == "zero"


def test_inplace_prunes_the_given_model_and_finetune_trains_it():
    model = _net(ChainNet).float()
    data = [(torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,)))]
    untrained = prune(model, data, sparsity=0.5, importance="l1", repair=False).model
    result = prune(model, data, sparsity=0.5, importance="l1", inplace=True,
                   repair={"finetune": dict(epochs=1, lr=1e-2), "reconstruct": False,
                           "recalibrate_bn": False})
    assert result.model is model and model.conv1.out_channels == 2
    assert not torch.equal(model.fc.weight, untrained.fc.weight)
    assert result.settings["repair"]["finetune"] == {"epochs": 1, "lr": 1e-2}


def test_auto_ignored_layers_are_the_classifier():
    model = torchvision.models.resnet18(num_classes=10)
    assert output_layers(model, torch.zeros(1, 3, 32, 32)) == ["fc"]


def test_a_prune_that_removes_nothing_says_so():
    """Every prunable layer ignored: the model comes back whole, with a warning naming it."""
    model = make_tiny()
    data = [(torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)))]
    with pytest.warns(RuntimeWarning, match="prune removed no channel from"):
        r = prune(model, data, sparsity=0.5, importance="l1", repair=False,
                  ignored_layers=[n for n, m in model.named_modules()
                                  if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert r.macs_after == r.macs_before
