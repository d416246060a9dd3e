"""Each pruning criterion against an independent computation on a tiny network."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxgndi.gndi.criteria import (CRITERIA, aggregate, grasp_scores, hrank_scores,
                                  magnitude_l1_scores, magnitude_l2_scores, random_scores,
                                  score_channels, snip_scores, synflow_scores, taylor_scores)
from fxgndi.gndi.criteria.hrank import feature_matrices

LAYERS = ["conv1", "conv2", "fc"]


class Tiny(nn.Module):
    """conv -> ReLU(inplace) -> conv -> BN -> ReLU -> global pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.relu = nn.ReLU(inplace=True)  # overwrites conv1's output: hooks must cope
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv2(self.relu(self.conv1(x))))
        return self.fc(self.pool(torch.relu(h)).flatten(1))


def make_tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.randn(4) * 0.3)
        m.bn.running_var.copy_(torch.rand(4) + 0.5)
        m.bn.weight.copy_(torch.randn(4))
        m.bn.bias.copy_(torch.randn(4) * 0.2)
        m.conv1.weight[2].zero_()  # a dead channel: rank 0, zero scores
        m.conv1.bias[2] = 0.0
        m.fc.weight[0].zero_()
        m.fc.bias[0] = 0.0
    return m.train()  # criteria must switch to eval mode themselves


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, 2, 8, 8, generator=g)
    x1[1] = 0.0  # constant feature maps: rank 1
    x2 = torch.randn(3, 2, 8, 8, generator=g)
    return [(x1, torch.randint(0, 3, (5,), generator=g)),
            (x2, torch.randint(0, 3, (3,), generator=g))]


def manual_forward(m: Tiny, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Tiny forward written with functionals, eval-mode BN; returns (a1, a2, logits)."""
    a1 = F.conv2d(x, m.conv1.weight, m.conv1.bias)
    a2 = F.conv2d(F.relu(a1), m.conv2.weight, m.conv2.bias)
    h = F.batch_norm(a2, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias,
                     training=False, eps=m.bn.eps)
    logits = F.linear(F.relu(h).mean((2, 3)), m.fc.weight, m.fc.bias)
    return a1, a2, logits


def rows(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(t.shape[0], -1).sum(1).double().numpy()


def weights_of(m: Tiny) -> list[torch.Tensor]:
    return [m.conv1.weight, m.conv2.weight, m.fc.weight]


# ---------------------------------------------------------------------------- criteria values


def test_magnitude_by_hand():
    m = make_tiny()
    l1, l2 = magnitude_l1_scores(m, None, LAYERS), magnitude_l2_scores(m, None, LAYERS)
    for name, w in zip(LAYERS, weights_of(m)):
        w = w.detach().double().numpy().reshape(w.shape[0], -1)
        np.testing.assert_allclose(l1[name], np.abs(w).sum(1), rtol=1e-12)
        np.testing.assert_allclose(l2[name], np.sqrt((w ** 2).sum(1)), rtol=1e-12)
        assert l1[name].dtype == np.float64


@pytest.mark.parametrize("max_batches", [1, None])
def test_snip_against_backward_on_copy(max_batches):
    m, data = make_tiny(), make_data()
    ref = copy.deepcopy(m).eval()
    for x, y in data[: max_batches or len(data)]:
        F.cross_entropy(ref(x), y).backward()  # .grad accumulates = sum of batch gradients
    got = snip_scores(m, data, LAYERS, max_batches=max_batches)
    for name, w in zip(LAYERS, weights_of(ref)):
        np.testing.assert_allclose(got[name], rows((w.grad * w).abs()), rtol=1e-5, atol=1e-9)


def test_snip_defaults_to_one_batch():
    m, data = make_tiny(), make_data()
    a, b = snip_scores(m, data, ["conv2"]), snip_scores(m, data[:1], ["conv2"], max_batches=None)
    np.testing.assert_array_equal(a["conv2"], b["conv2"])


def test_grasp_hvp_against_finite_differences():
    m, data = make_tiny(), make_data()
    got = grasp_scores(m, data, LAYERS)
    ref = copy.deepcopy(m).double().eval()
    ws = weights_of(ref)
    data64 = [(x.double(), y) for x, y in data]

    def grad_at(ws_value: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            for w, v in zip(ws, ws_value):
                w.copy_(v)
        total = [torch.zeros_like(w) for w in ws]
        for x, y in data64:
            gs = torch.autograd.grad(F.cross_entropy(ref(x) / 200.0, y), ws)
            total = [t + g for t, g in zip(total, gs)]
        return total

    w0 = [w.detach().clone() for w in ws]
    g = grad_at(w0)
    h = 1e-3 / torch.sqrt(sum((v ** 2).sum() for v in g))
    plus = grad_at([w + h * v for w, v in zip(w0, g)])
    minus = grad_at([w - h * v for w, v in zip(w0, g)])
    hg = [(p - q) / (2 * h) for p, q in zip(plus, minus)]
    for name, w, hv in zip(LAYERS, w0, hg):
        expected = rows(w * hv)  # importance = -S = w * Hg (GraSP removes the highest S)
        scale = np.abs(expected).max()
        assert scale > 0
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5 * scale)


def test_grasp_orientation_matches_reference_sign():
    # With importance = w * Hg, GraSP's score S = -importance: the channel GraSP would remove
    # first (highest S) is the one with the LOWEST importance here.
    m, data = make_tiny(), make_data()
    imp = grasp_scores(m, data, ["conv2"])["conv2"]
    assert np.argmax(-imp) == np.argmin(imp)
    assert not np.allclose(imp, 0)


def test_synflow_closed_form_on_linear_chain():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 5, bias=False),
                        nn.Linear(5, 2, bias=False))
    a1, a2, a3 = (net[i].weight.detach().double().abs() for i in (0, 2, 3))
    one = lambda n: torch.ones(n, dtype=torch.float64)  # noqa: E731
    # R = 1' A3 A2 A1 1 ; dR/dA2 = (A3' 1)(A1 1)'  etc. (ReLU is the identity on positives)
    d1 = torch.outer(a2.T @ a3.T @ one(2), one(3))
    d2 = torch.outer(a3.T @ one(2), a1 @ one(3))
    d3 = torch.outer(one(2), a2 @ a1 @ one(3))
    got = synflow_scores(net, None, ["0", "2", "3"], input_shape=(3,))
    for name, a, d in zip(["0", "2", "3"], (a1, a2, a3), (d1, d2, d3)):
        np.testing.assert_allclose(got[name], (a * d).sum(1).numpy(), rtol=1e-12)


def test_synflow_linearizes_batchnorm_buffers():
    m, data = make_tiny(), make_data()
    got = synflow_scores(m, data, LAYERS)  # input shape from the first batch
    ref = copy.deepcopy(m).double()
    with torch.no_grad():
        for t in ref.state_dict().values():
            t.abs_()
    ws = weights_of(ref)
    r = manual_forward(ref, torch.ones(1, 2, 8, 8, dtype=torch.float64))[2].sum()
    for name, w, g in zip(LAYERS, ws, torch.autograd.grad(r, ws)):
        np.testing.assert_allclose(got[name], rows((w * g).abs()), rtol=1e-10)


def test_synflow_needs_an_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        synflow_scores(make_tiny(), None, LAYERS)


def test_hrank_against_numpy_matrix_rank():
    m, data = make_tiny(), make_data()
    got = hrank_scores(m, data, LAYERS)
    ref = copy.deepcopy(m).eval()
    sums = [np.zeros(3), np.zeros(4), np.zeros(3)]
    n = 0
    with torch.no_grad():
        for x, _ in data:
            for k, a in enumerate(manual_forward(ref, x)):
                a = a.double().numpy()
                for i in range(a.shape[0]):
                    for c in range(a.shape[1]):
                        fmap = a[i, c] if a.ndim == 4 else a[i, c].reshape(1, 1)
                        sums[k][c] += np.linalg.matrix_rank(fmap)
            n += x.shape[0]
    for name, s in zip(LAYERS, sums):
        np.testing.assert_allclose(got[name], s / n, rtol=0, atol=1e-12)
    assert got["conv1"][2] == 0 and got["fc"][0] == 0  # dead channels
    assert 1 < got["conv1"][0] < 6  # the all-zero sample gives rank 1, the others rank 6


def test_hrank_feature_matrix_shapes():
    lin, conv1d, conv3d = nn.Linear(2, 5), nn.Conv1d(2, 5, 1), nn.Conv3d(2, 5, 1)
    assert feature_matrices(lin, torch.zeros(2, 7, 5)).shape == (2, 5, 1, 7)
    assert feature_matrices(conv1d, torch.zeros(2, 5, 9)).shape == (2, 5, 1, 9)
    assert feature_matrices(conv3d, torch.zeros(2, 5, 3, 4, 6)).shape == (2, 5, 12, 6)


def test_taylor_against_per_sample_loop():
    m, data = make_tiny(), make_data()
    got = taylor_scores(m, data, LAYERS)
    ref = copy.deepcopy(m).eval()
    sums = [np.zeros(3), np.zeros(4), np.zeros(3)]
    n = 0
    for x, y in data:
        for i in range(x.shape[0]):
            acts = manual_forward(ref, x[i:i + 1])
            loss = F.cross_entropy(acts[2], y[i:i + 1])
            for k, (a, g) in enumerate(zip(acts, torch.autograd.grad(loss, acts))):
                prod = (a * g).detach()[0]
                sums[k] += (prod.mean((1, 2)) if prod.dim() == 3 else prod).abs().double().numpy()
            n += 1
    for name, s in zip(LAYERS, sums):
        np.testing.assert_allclose(got[name], s / n, rtol=1e-5, atol=1e-9)
    normed = taylor_scores(m, data, ["conv2"], normalize=True)["conv2"]
    np.testing.assert_allclose(np.linalg.norm(normed), 1.0)


class TinyAttention(nn.Module):
    """Tokens -> Linear -> seq-first MultiheadAttention (out_proj never runs its forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(6, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, attn_out: list | None = None) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)  # [T, B, E]
        a = self.attn(h, h, h, need_weights=False)[0]
        if attn_out is not None:
            attn_out.append(a)
        return self.head(a.mean(0))


def test_attention_out_proj_is_read_at_the_attention_output():
    torch.manual_seed(4)
    m = TinyAttention()
    x, y = torch.randn(3, 5, 4), torch.tensor([0, 2, 1])
    got = taylor_scores(m, [(x, y)], ["attn.out_proj", "embed"])
    expected = np.zeros(6)
    for i in range(3):
        seen: list = []
        loss = F.cross_entropy(m(x[i:i + 1], seen), y[i:i + 1])
        a = seen[0]
        (g,) = torch.autograd.grad(loss, a)
        expected += (a * g).detach()[:, 0].mean(0).abs().double().numpy()  # mean over tokens
    np.testing.assert_allclose(got["attn.out_proj"], expected / 3, rtol=1e-5, atol=1e-9)
    ranks = hrank_scores(m, [(x, y)], ["attn.out_proj", "embed"])
    assert (ranks["attn.out_proj"] == 1).all() and (ranks["embed"] == 1).all()  # [T] rows


def test_grasp_runs_through_hardsigmoid_and_attention():
    # hardsigmoid_backward and the fused attention kernels have no double backward in torch
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv1d(4, 6, 1), nn.Hardsigmoid(), nn.Flatten(), nn.Linear(6 * 5, 3))
    x, y = torch.randn(3, 4, 5), torch.tensor([0, 2, 1])
    out = grasp_scores(net, [(x, y)], ["0", "3"])
    assert isinstance(net[1], nn.Hardsigmoid) and out["0"].shape == (6,)
    att = TinyAttention()
    assert grasp_scores(att, [(torch.randn(3, 5, 4), y)], ["attn.out_proj"])[
        "attn.out_proj"].shape == (6,)


def test_random_is_seeded():
    m = make_tiny()
    a, b = random_scores(m, None, LAYERS), random_scores(m, None, LAYERS[::-1])
    c = random_scores(m, None, LAYERS, seed=1)
    for name in LAYERS:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
        assert ((a[name] >= 0) & (a[name] < 1)).all()


# ----------------------------------------------------------------------- contract and errors


@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_user_model_is_left_unchanged(method):
    m, data = make_tiny(), make_data()
    m.bn.eval()  # mixed flags must come back exactly as they were
    m.conv1.bias.requires_grad_(False)
    m.fc.weight.requires_grad_(False)  # frozen layers can still be scored
    state = copy.deepcopy(m.state_dict())
    flags = {n: mod.training for n, mod in m.named_modules()}
    req = {n: p.requires_grad for n, p in m.named_parameters()}
    with torch.no_grad():  # gradient criteria must enable grad themselves
        out = score_channels(method, m, data, LAYERS)
    assert list(out) == LAYERS
    for name, mod_out in zip(LAYERS, (3, 4, 3)):
        assert out[name].shape == (mod_out,) and out[name].dtype == np.float64
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in m.parameters())
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    assert {n: p.requires_grad for n, p in m.named_parameters()} == req


def test_dispatcher_matches_direct_calls():
    m, data = make_tiny(), make_data()
    np.testing.assert_array_equal(score_channels("snip", m, data, ["conv2"])["conv2"],
                                  snip_scores(m, data, ["conv2"])["conv2"])
    assert set(CRITERIA) == {"magnitude_l1", "magnitude_l2", "snip", "grasp", "synflow",
                             "hrank", "activation_taylor", "random"}
    assert list(score_channels("magnitude_l1", m, None, None)) == LAYERS  # None = all


def test_errors_name_the_cause():
    m, data = make_tiny(), make_data()
    with pytest.raises(ValueError, match="unknown criterion 'fisher'.*magnitude_l1"):
        score_channels("fisher", m, data, LAYERS)
    with pytest.raises(ValueError, match="'conv9'.*conv1"):
        score_channels("snip", m, data, ["conv9"])
    with pytest.raises(ValueError, match="'bn' is a BatchNorm2d.*conv1"):
        score_channels("activation_taylor", m, data, ["bn"])
    with pytest.raises(ValueError, match="no batches"):
        snip_scores(m, [], LAYERS)
    with pytest.raises(ValueError, match=r"needs labels.*\(inputs, y\)"):
        snip_scores(m, [torch.zeros(2, 2, 8, 8)], LAYERS)


def test_aggregate_sum_and_mean():
    scores = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([-1.0, 5.0])}
    assert aggregate(scores) == {"a": 6.0, "b": 4.0}
    assert aggregate(scores, "mean") == {"a": 2.0, "b": 2.0}
    with pytest.raises(ValueError, match="sum"):
        aggregate(scores, "max")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(CRITERIA))
def test_cuda_matches_cpu(method):
    m, data = make_tiny(), make_data()
    cpu = score_channels(method, m, data, LAYERS)
    gpu = score_channels(method, m, data, LAYERS, device="cuda")
    for name in LAYERS:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-3, atol=1e-6)
    assert all(p.device.type == "cpu" for p in m.parameters())
