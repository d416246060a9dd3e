"""GNDIImportance on wide heads (probes, auto mode, scalar readouts), its score cache, and its
memory plan: against finite differences through forward hooks, computed without fxgndi."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

import fxgndi.pruning.importance as importance_module
from fxgndi.core.names import DEFAULT_PROBES
from fxgndi.gndi.memory import created_bytes
from fxgndi.gndi.tangents import probe_signs
from fxgndi.pruning.importance import GNDIImportance, group_effects
from fxgndi.pruning.width import prune
from tests.helpers import randomize_batchnorm


class WideResidual(nn.Module):
    """A residual block with a ``classes``-wide head: conv1/bn1 and conv_b/bn_b channels are one
    group (coupled by the add), read by conv_a and fc."""

    def __init__(self, classes: int = 40) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_a, self.bn_a = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv_b, self.bn_b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn1(self.conv1(x)))
        branch = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(s)))))
        return self.fc(torch.relu(s + branch).mean((2, 3)))


def _model(classes: int = 40) -> WideResidual:
    torch.manual_seed(0)
    return randomize_batchnorm(WideResidual(classes).double(), bias=(-0.2, 0.6))


def _data(classes: int = 40, n_batches: int = 2, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 2, 5, 5, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n_batches)]


def _group(model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None):
    """The whole group of ``layer`` (conv1 by default; torch-pruning's get_all_groups, and so
    the cache, roots the conv1 / conv_b group at conv_b)."""
    layer = model.conv1 if layer is None else layer
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    return dg.get_pruning_group(layer, tp.prune_conv_out_channels,
                                list(range(layer.out_channels)))


@contextlib.contextmanager
def _scaled(model: WideResidual, c: int, alpha: float):
    """Removing channel c of the conv1 group zeroes it at bn1 and bn_b together."""
    def scale(m, a, out):
        out = out.clone()
        out[:, c] *= 1 - alpha
        return out
    handles = [m.register_forward_hook(scale) for m in (model.bn1, model.bn_b)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fd_tangents(model, x, y, c, readout="logits", eps=1e-6):
    """[B, K] central difference of the readout in the channel's alpha (plain PyTorch)."""
    def read(alpha):
        with _scaled(model, c, alpha), torch.no_grad():
            logits = model(x)
        if readout == "logits":
            return logits
        if readout == "loss":
            return F.cross_entropy(logits, y, reduction="none")[:, None]
        true = logits.gather(1, y[:, None])
        others = logits.scatter(1, y[:, None], -float("inf")).amax(1, keepdim=True)
        return true - others
    return (read(eps) - read(-eps)) / (2 * eps)


# ---------------------------------------------------------------------------- probes

def test_probe_scores_are_the_rademacher_estimate_of_the_summed_tangent():
    model, data = _model(), _data()
    R, seed = 5, 3
    scores = GNDIImportance(data, mode="probe", probes=R, seed=seed)(_group(model, data[0][0]))
    reference = []
    for c in range(4):
        per_sample = []
        for index, (x, y) in enumerate(data):
            t = _fd_tangents(model, x, y, c)  # the group's joint tangent [B, K]
            z = probe_signs(seed, index, R, x.shape[0], t.shape[1]).double()  # [R, B, K]
            per_sample.append((z * t).sum(-1).pow(2).mean(0).sqrt())
        reference.append(torch.cat(per_sample).mean())
    torch.testing.assert_close(scores.double(), torch.stack(reference), rtol=1e-5, atol=1e-8)


def test_probes_converge_to_the_exact_scores_and_auto_picks_them_on_wide_heads():
    model, data = _model(), _data()
    group = _group(model, data[0][0])
    exact_imp = GNDIImportance(data, mode="reverse")
    exact = exact_imp(group)
    reference = torch.stack([torch.cat([_fd_tangents(model, x, y, c).norm(dim=-1)
                                        for x, y in data]).mean() for c in range(4)])
    torch.testing.assert_close(exact.double(), reference, rtol=1e-5, atol=1e-8)
    many = GNDIImportance(data, mode="probe", probes=3000)(group)
    torch.testing.assert_close(many, exact, rtol=0.05, atol=0)
    auto = GNDIImportance(data, probes=8)  # 40 outputs >= 2 x 8 probes
    torch.testing.assert_close(auto(group), GNDIImportance(data, mode="probe", probes=8)(group))
    assert auto.chosen_mode == "probe" and exact_imp.chosen_mode == "reverse"
    assert auto.options()["probes"] == 8 and exact_imp.options()["probes"] is None


def test_auto_keeps_the_exact_mode_unless_the_probes_halve_the_cost():
    classes = 2 * DEFAULT_PROBES - 1  # R probes would save less than half of K exact passes
    model, data = _model(classes), _data(classes)
    group = _group(model, data[0][0])
    auto = GNDIImportance(data)
    torch.testing.assert_close(auto(group), GNDIImportance(data, mode="reverse")(group),
                               rtol=0, atol=0)
    assert auto.chosen_mode == "reverse"
    halving = GNDIImportance(data, probes=classes // 2)
    halving(group)
    assert halving.chosen_mode == "probe"
    exact = GNDIImportance(data, probes=2, p=1)  # p != 2: probes do not estimate it
    exact(group)
    assert exact.chosen_mode == "reverse"


def test_probe_signs_follow_the_seed():
    model, data = _model(), _data()
    group = _group(model, data[0][0])
    a = GNDIImportance(data, mode="probe", probes=4, seed=0)(group)
    b = GNDIImportance(data, mode="probe", probes=4, seed=0)(group)
    c = GNDIImportance(data, mode="probe", probes=4, seed=1)(group)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="probe", p=1), "2-norm"),
    (dict(mode="forward"), "one JVP per channel"),
    (dict(mode="fast"), "unknown mode"),
    (dict(probes=0), "probes must be a positive integer"),
])
def test_bad_mode_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GNDIImportance(_data(), **kwargs)


@pytest.mark.parametrize("readout", ["loss", "margin"])
def test_scalar_readouts_are_the_tangent_of_the_per_sample_loss_or_margin(readout):
    model, data = _model(), _data()
    imp = GNDIImportance(data, readout=readout)
    scores = imp(_group(model, data[0][0]))
    reference = torch.stack([torch.cat([_fd_tangents(model, x, y, c, readout).abs()[:, 0]
                                        for x, y in data]).mean() for c in range(4)])
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-8)
    assert imp.chosen_mode == "reverse"  # one output: one VJP per batch


def test_scalar_readouts_need_labels_in_range():
    model = _model()
    x = _data()[0][0]
    with pytest.raises(Exception, match="needs labels"):
        GNDIImportance([x], readout="loss")(_group(model, x))
    with pytest.raises(Exception, match="labels up to 99"):
        GNDIImportance([(x, torch.full((4,), 99))], readout="margin")(_group(model, x))


# ---------------------------------------------------------------------------- score cache

@pytest.fixture
def passes(monkeypatch):
    """Counts scoring passes: calls of GNDIImportance.batch_effects on the first batch."""
    seen = []
    original = GNDIImportance.batch_effects

    def counted(self, graph, x, y, plans, index):
        if index == 0:
            seen.append({key[0]: plan.size for key, plan in plans.items()})
        return original(self, graph, x, y, plans, index)

    monkeypatch.setattr(GNDIImportance, "batch_effects", counted)
    return seen


def test_the_cache_hits_copies_and_misses_edits(passes):
    model, data = _model(), _data()
    x = data[0][0]
    imp = GNDIImportance(data)
    first = imp(_group(model, x, model.conv_b))
    imp(_group(model, x, model.conv_a))  # another group of the same graph: scored already
    assert len(passes) == 1
    twin = copy.deepcopy(model)  # what each step of a MAC target's ratio search prunes
    torch.testing.assert_close(imp(_group(twin, x, twin.conv_b)), first, rtol=0, atol=0)
    assert len(passes) == 1
    twin.conv_a.weight.data[0, 0, 0, 0] += 1  # seen by no version counter
    imp(_group(twin, x, twin.conv_b))
    assert len(passes) == 2
    other = copy.deepcopy(model)
    other.fc.weight = nn.Parameter(other.fc.weight.detach().flip(0))  # same shape and sum
    imp(_group(other, x, other.conv_b))
    assert len(passes) == 3
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    whole = dg.get_pruning_group(model.conv_b, tp.prune_conv_out_channels, list(range(4)))
    imp(whole)
    assert len(passes) == 3
    dg.get_pruning_group(model.conv_a, tp.prune_conv_out_channels, [0]).prune()
    imp(whole)  # pruned through the same dependency graph: a new model state
    assert len(passes) == 4 and passes[-1]["conv_a"] == 2
    fresh = _model()
    imp(_group(fresh, x, fresh.conv_b))  # the original model again: still cached
    assert len(passes) == 4


def test_clear_forgets_an_edit_made_on_the_same_dependency_graph(passes):
    model, data = _model(), _data()
    imp = GNDIImportance(data)
    group = _group(model, data[0][0], model.conv_b)
    before = imp(group)
    with torch.no_grad():
        model.fc.weight.mul_(2)  # the same graph, nothing pruned through it: documented
    imp.clear()
    torch.testing.assert_close(imp(group), 2 * before)
    assert len(passes) == 2


@pytest.mark.parametrize("target, steps, expected", [("macs", 1, 1), ("channels", 2, 2)])
def test_prune_scores_each_distinct_model_once(passes, target, steps, expected):
    model, data = _model(), _data()
    imp = GNDIImportance(data)
    result = prune(model, data, sparsity=0.4, target=target, iterative_steps=steps,
                   importance=imp, tolerance=0.1)
    dense = [p for p in passes if p == {"conv_b": 4, "conv_a": 3}]
    assert len(passes) == expected and len(dense) == 1
    assert result.settings["importance_options"]["chosen_mode"] == "probe"


def test_a_mac_target_rescores_no_copy_of_the_dense_model(passes):
    model, data = _model(), _data()
    imp = GNDIImportance(data)
    prune(model, data, sparsity=0.4, target="macs", iterative_steps=2, importance=imp,
          tolerance=0.1)
    dense = [p for p in passes if p == {"conv_b": 4, "conv_a": 3}]
    assert len(dense) == 1 and len(passes) > 1  # step 2's models differ per ratio tried


# ---------------------------------------------------------------------------- memory

def _one_copy_bytes(imp, model, x, mode):
    """What one sample with one vmapped copy (output or probe) creates, measured by hand."""
    group = _group(model, x, model.conv_b)
    imp(group)  # builds the intervention graph
    graph, plans = imp._state["graph"], imp._all_plans(group._DG.get_all_groups())[0]
    x1, k = x[:1], 40
    z = probe_signs(0, 0, 1, 1, k)

    def step():  # the cotangents are made inside the step, as the library's are
        cot = (z.to(x.dtype) if mode == "probe"
               else torch.eye(k, dtype=x.dtype)[:1, None, :].expand(1, 1, k))
        group_effects(graph, x1, None, plans, "logits", 2, cot, 1)

    with torch.no_grad():
        return created_bytes(step)


@pytest.mark.parametrize("mode", ["reverse", "probe"])
def test_a_budget_splits_the_work_but_not_the_result(monkeypatch, mode):
    model = _model()
    data = [torch.randn(6, 2, 5, 5, dtype=torch.float64) for _ in range(2)]
    group = _group(model, data[0], model.conv_b)
    free = GNDIImportance(data, mode=mode, probes=5)(group)
    need = _one_copy_bytes(GNDIImportance(data, mode=mode, probes=5), model, data[0], mode)
    seen = []
    original = importance_module.group_effects
    monkeypatch.setattr(importance_module, "group_effects", lambda g, x, *a: (
        seen.append((x.shape[0], a[-1])) or original(g, x, *a)))
    tight = GNDIImportance(data, mode=mode, probes=5, max_memory=3 * need + need // 2)
    scores = tight(group)
    steps = [s for s in seen if s != (1, 1) and s != (1, 2)]  # less plan_step's trials
    assert steps == [(3, 1)] * 4  # three samples fit, one output / probe at a time
    assert tight.plan == {"samples_per_step": 3, "chunk": 1}
    torch.testing.assert_close(scores, free, rtol=1e-10, atol=0)
