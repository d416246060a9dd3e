"""G-NDI estimators and ablations against finite differences and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxgndi
from fxgndi.core.errors import DataError, NonFiniteError
from fxgndi.gndi.estimate import forward_tangents, reverse_tangents

from tests.helpers import make_tiny, replace_output


def finite_difference(model, module, x, direction, eps=1e-5, call=0):
    """d logits / d alpha at 0 where the hook computes h + alpha * direction(h): central FD."""
    with torch.no_grad():
        with replace_output(module, lambda h: h + eps * direction(h), call):
            plus = model(x)
        with replace_output(module, lambda h: h - eps * direction(h), call):
            minus = model(x)
    return (plus - minus) / (2 * eps)


@pytest.fixture
def tiny64():
    return make_tiny(torch.float64)


def test_reverse_and_forward_tangents_match_finite_differences(tiny64):
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    g = fxgndi.intervene(tiny64, ["conv", "bn", "act"], example_inputs=x)
    with torch.no_grad():
        rev = reverse_tangents(g, x, None)
        fwd = forward_tangents(g, x, None, "logits", [(s, None) for s in g.site_names])
    for i, name in enumerate(g.site_names):
        module, call = (tiny64.relu, 1) if name == "relu:1" else (
            tiny64.get_submodule(name.split(":")[0]), 0)
        fd = finite_difference(tiny64, module, x, lambda h: -h, call=call)
        torch.testing.assert_close(rev[name], fd, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fwd[:, i], fd, rtol=1e-6, atol=1e-8)


def test_channel_tangents_match_finite_differences_and_sum_to_the_layer(tiny64):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    layer = fxgndi.intervene(tiny64, "bn1", example_inputs=x)
    chan = fxgndi.intervene(tiny64, "bn1", granularity="channel", example_inputs=x)
    with torch.no_grad():
        per_channel = reverse_tangents(chan, x, None)["bn1"]  # [B, C, K]
        whole = reverse_tangents(layer, x, None)["bn1"]  # [B, K]
    torch.testing.assert_close(per_channel.sum(1), whole, rtol=1e-10, atol=1e-12)
    for c in range(4):
        mask = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
        mask[0, c] = 1
        fd = finite_difference(tiny64, tiny64.bn1, x, lambda h: -h * mask)
        torch.testing.assert_close(per_channel[:, c], fd, rtol=1e-6, atol=1e-8)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.lstm, self.head = nn.Linear(3, 6), nn.LSTM(6, 5, batch_first=True), \
            nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(torch.relu(self.embed(x)))[0][:, -1])


def test_reverse_tangents_through_an_lstm_match_finite_differences():
    # float32 on CPU runs oneDNN's LSTM, whose backward failed under torch.func (no workspace)
    torch.manual_seed(0)
    model = Recurrent().eval()
    x = torch.randn(4, 7, 3)
    g = fxgndi.intervene(model, "embed", example_inputs=x)
    with torch.no_grad():
        tangent = reverse_tangents(g, x, None)["embed"]
    fd = finite_difference(model, model.embed, x, lambda h: -h, eps=1e-2)
    torch.testing.assert_close(tangent, fd, rtol=1e-3, atol=1e-4)
    assert torch.backends.mkldnn.enabled


class Tokens(nn.Module):
    """Linear layers over [B, N, C] tokens: their channels are the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(torch.tanh(self.embed(x)))).mean(1))


@pytest.mark.parametrize("granularity, baseline", [("layer", "mean"),
                                                   ("channel", "channel-mean")])
def test_reverse_tangents_toward_a_calibrated_baseline_on_last_dim_channels(granularity,
                                                                            baseline):
    torch.manual_seed(0)
    model = Tokens().double().eval()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    g = fxgndi.intervene(model, "embed", granularity=granularity, baseline=baseline, data=[x])
    b = g.node("embed").baseline
    assert b is not None and b.abs().sum() > 0
    with torch.no_grad():
        tangent = reverse_tangents(g, x, None)["embed"]
    if granularity == "layer":
        fd = finite_difference(model, model.embed, x, lambda h: b - h)
        torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
        return
    assert tangent.shape == (3, 4, 2)
    for c in range(4):
        mask = torch.zeros(4, dtype=torch.float64)
        mask[c] = 1
        fd = finite_difference(model, model.embed, x, lambda h: (b - h) * mask)
        torch.testing.assert_close(tangent[:, c], fd, rtol=1e-6, atol=1e-8)


def test_score_is_the_mean_p_norm_of_the_tangent(tiny64):
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    fd = finite_difference(tiny64, tiny64.conv2, x, lambda h: -h)
    for p in (1, 2, math.inf):
        s = fxgndi.score(tiny64, [x], sites="conv2", p=p, progress=False)
        norms = torch.linalg.vector_norm(fd, ord=p, dim=-1)
        assert s["conv2"] == pytest.approx(norms.mean().item(), rel=1e-6)
        assert s.stderr[0] == pytest.approx(norms.std().item() / math.sqrt(6), rel=1e-5)
        assert s.n_samples == 6


@pytest.mark.parametrize("readout", ["probs", "loss", "margin"])
def test_readouts_match_finite_differences(tiny64, readout):
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])

    def out(logits):
        if readout == "probs":
            return logits.softmax(-1)
        if readout == "loss":
            return F.cross_entropy(logits, y, reduction="none")[:, None]
        others = logits.clone()
        others[torch.arange(5), y] = -float("inf")
        return logits[torch.arange(5), y][:, None] - others.max(-1).values[:, None]

    eps = 1e-6
    with torch.no_grad():
        with replace_output(tiny64.conv1, lambda h: h - eps * h):
            plus = out(tiny64(x))
        with replace_output(tiny64.conv1, lambda h: h + eps * h):
            minus = out(tiny64(x))
    expected = ((plus - minus) / (2 * eps)).norm(dim=-1).mean().item()
    s = fxgndi.score(tiny64, [(x, y)], sites="conv1", readout=readout, progress=False)
    assert s["conv1"] == pytest.approx(expected, rel=1e-5)


def test_modes_agree_and_probes_converge(tiny64):
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    kw = dict(sites=["conv", "bn"], granularity="channel", progress=False)
    rev = fxgndi.score(tiny64, [x], mode="reverse", **kw)
    fwd = fxgndi.score(tiny64, [x], mode="forward", **kw)
    probe = fxgndi.score(tiny64, [x], mode="probe", probes=4000, **kw)
    np.testing.assert_allclose(fwd.values, rev.values, rtol=1e-10)
    np.testing.assert_allclose(probe.values, rev.values, rtol=0.1)
    assert fxgndi.score(tiny64, [x], **kw).meta["mode"] == "reverse"  # 3 outputs < 16 channels


def test_path_integration_converges_to_the_exact_logit_change(tiny64):
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        with replace_output(tiny64.bn1, torch.zeros_like):
            ablated = tiny64(x)
        exact = (ablated - tiny64(x)).norm(dim=-1).mean().item()
    errors = []
    for steps in (1, 64):
        s = fxgndi.score(tiny64, [x], sites="bn1", steps=steps, progress=False)
        errors.append(abs(s["bn1"] - exact) / exact)
    # The midpoint rule converges unevenly through ReLU kinks, so compare ends only.
    assert errors[0] > 0.1 and errors[1] < 2e-3


def test_ablation_metrics_match_hand_computation(tiny64):
    xs = [torch.randn(5, 2, 6, 6, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 3, (5,)) for _ in range(2)]
    data = list(zip(xs, ys))
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        ref = tiny64(x)
        with replace_output(tiny64.conv2, torch.zeros_like):
            abl = tiny64(x)
    expected = {
        "accuracy": ((ref.argmax(1) == y).double().mean() - (abl.argmax(1) == y).double().mean()),
        "loss": F.cross_entropy(abl, y) - F.cross_entropy(ref, y),
        "logit_l2": (abl - ref).norm(dim=1).mean(),
        "kl": F.kl_div(abl.log_softmax(1), ref.log_softmax(1), log_target=True,
                       reduction="batchmean"),
    }
    for metric, value in expected.items():
        a = fxgndi.ablate(tiny64, data, sites="conv", metric=metric, progress=False)
        assert a["conv2"] == pytest.approx(value.item(), rel=1e-9, abs=1e-12), metric
        assert a.n_samples == 10


def test_channel_ablation_with_channel_mean_baseline_matches_a_hook(tiny64):
    data = [torch.randn(6, 2, 6, 6, dtype=torch.float64)]
    x = data[0]
    with torch.no_grad():
        mean = tiny64.conv1(x).mean((0, 2, 3))
        ref = tiny64(x)
        with replace_output(tiny64.conv1, lambda h: torch.cat(
                [h[:, :2], mean[2].expand_as(h[:, 2:3]), h[:, 3:]], 1)):
            abl = tiny64(x)
    a = fxgndi.ablate(tiny64, data, sites="conv1", baseline="channel-mean",
                      channels=[("conv1", 2), ("conv1", 0)], metric="logit_l2", progress=False)
    assert a.names == ["conv1[2]", "conv1[0]"]
    assert a.values[0] == pytest.approx((abl - ref).norm(dim=1).mean().item(), rel=1e-9)


def test_chunking_does_not_change_results(tiny64):
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    kw = dict(sites=["conv", "bn"], granularity="channel", progress=False)
    np.testing.assert_allclose(fxgndi.score(tiny64, [x], chunk_size=1, **kw).values,
                               fxgndi.score(tiny64, [x], chunk_size=7, **kw).values, rtol=1e-12)
    a1 = fxgndi.ablate(tiny64, [x], metric="logit_l2", chunk_size=1, **kw)
    a2 = fxgndi.ablate(tiny64, [x], metric="logit_l2", chunk_size=5, **kw)
    np.testing.assert_allclose(a1.values, a2.values, rtol=1e-12)


def test_streaming_over_batches_equals_one_big_batch(tiny64):
    xs = [torch.randn(3, 2, 6, 6, dtype=torch.float64) for _ in range(3)]
    many = fxgndi.score(tiny64, xs, sites="conv", progress=False)
    one = fxgndi.score(tiny64, [torch.cat(xs)], sites="conv", progress=False)
    np.testing.assert_allclose(many.values, one.values, rtol=1e-12)
    np.testing.assert_allclose(many.stderr, one.stderr, rtol=1e-9)


def test_scores_report(tiny, tmp_path):
    s = fxgndi.score(tiny, [torch.randn(3, 2, 6, 6)], sites="conv", granularity="channel",
                     progress=False)
    assert s.names[:2] == ["conv1[0]", "conv1[1]"] and s["conv2"].shape == (4,)
    assert s.top(1)[0][1] == pytest.approx(float(s.values.max()))
    d = s.to_dict()
    assert d["granularity"] == "channel" and len(d["units"]) == 8
    assert "conv1[0]" in s.table()
    s.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


# --- bad input: each a clear error -------------------------------------------------------


def test_labels_required_for_loss_readout_and_accuracy(tiny):
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(DataError, match="readout 'loss' needs labels"):
        fxgndi.score(tiny, [x], readout="loss", progress=False)
    with pytest.raises(DataError, match="metric 'accuracy' needs labels"):
        fxgndi.ablate(tiny, [x], progress=False)


def test_empty_data_is_an_error(tiny):
    with pytest.raises(DataError, match="no batches"):
        fxgndi.score(tiny, [], progress=False)


def test_one_shot_iterator_is_refused_instead_of_losing_batches(tiny):
    batches = (torch.randn(2, 2, 6, 6) for _ in range(3))
    with pytest.raises(DataError, match="one-shot iterator"):
        fxgndi.score(tiny, batches, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="probe", p=1), "probe mode estimates the 2-norm"),
    (dict(mode="reverse", steps=4), "path integration"),
    (dict(readout="softmax"), "unknown readout"),
    (dict(mode="fast"), "unknown mode"),
    (dict(steps=0), "steps must be"),
    (dict(baseline="median"), "unknown baseline"),
    (dict(granularity="neuron"), "granularity must be"),
])
def test_bad_arguments_name_the_fix(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fxgndi.score(tiny, [torch.randn(2, 2, 6, 6)], progress=False, **kwargs)


def test_bad_channels_and_metric(tiny):
    x = [(torch.randn(2, 2, 6, 6), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="out of range for site 'conv1' with 4 channels"):
        fxgndi.ablate(tiny, x, sites="conv1", channels=[("conv1", 4)], progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        fxgndi.ablate(tiny, x, metric="top5", progress=False)


def test_non_finite_activations_are_reported(tiny):
    x = torch.randn(2, 2, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf in G-NDI tangents at conv1"):
        fxgndi.score(tiny, [x], progress=False)


def test_progress_bars_have_totals_of_batches_times_path_points(tiny, capsys):
    data = [torch.randn(3, 2, 6, 6) for _ in range(2)]
    fxgndi.score(tiny, data, steps=4, baseline="channel-mean", progress=True)
    bars = capsys.readouterr().err.replace("\r", "\n")
    # 2 batches x 4 path points, with an ETA; calibration counts its 2 batches too
    assert "G-NDI (4 path points): 100%" in bars and " 8/8 [" in bars, bars
    assert "calibrate: 100%" in bars and " 2/2 [" in bars and "0it" not in bars, bars


def test_each_path_point_moves_the_progress_bar(tiny, monkeypatch):
    import fxgndi.gndi.run as run
    seen = []

    class Recording(run.tqdm):
        def update(self, n=1):
            out = super().update(n)
            seen.append(self.n)
            return out

    monkeypatch.setattr(run, "tqdm", Recording)
    data = [torch.randn(4, 2, 6, 6) for _ in range(2)]
    fxgndi.score(tiny, data, steps=4, progress=True)
    assert sorted(set(seen)) == [1, 2, 3, 4, 5, 6, 7, 8]
    # under a memory budget a batch is scored in pieces: each piece ticks its share
    seen.clear()
    fxgndi.score(tiny, data, steps=2, progress=True, max_memory="30KB")
    assert seen[-1] == 4 and any(not float(n).is_integer() for n in seen), seen


def test_auto_mode_takes_probes_only_when_every_exact_mode_costs_more():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 2 * 2, 40)).double().eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    kw = dict(sites="conv", granularity="channel", progress=False)
    # 11 channels, 40 outputs: forward mode (11 JVPs) unless the probes are fewer than that
    assert fxgndi.score(model, [x], probes=16, **kw).meta["mode"] == "forward"
    wide = fxgndi.score(model, [x], probes=4, **kw)
    assert wide.meta["mode"] == "probe" and wide.meta["probes"] == 4
    np.testing.assert_array_equal(wide.values, fxgndi.score(model, [x], mode="probe",
                                                            probes=4, **kw).values)
    assert fxgndi.score(model, [x], probes=4, p=1, **kw).meta["mode"] == "forward"
    assert fxgndi.score(model, [x], probes=4, steps=2, **kw).meta["mode"] == "forward"
    layers = fxgndi.score(model, [x], sites="conv", probes=2, progress=False)
    assert layers.meta["mode"] == "forward"  # 2 sites: 2 JVPs, no more than 2 probes
