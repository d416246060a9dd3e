"""validate(): correlations, bootstrap CI, within-layer ranks and criteria mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats

import fxgndi
from fxgndi.gndi.validate import producing_layer, spearman_ci, within_layer_spearman

from tests.helpers import make_tiny, replace_output


@pytest.fixture
def data():
    torch.manual_seed(1)
    return [(torch.randn(12, 2, 6, 6), torch.randint(0, 3, (12,))) for _ in range(2)]


def test_layer_report_against_direct_computations(data):
    model = make_tiny()
    report = fxgndi.validate(model, data, importances=("gndi", "magnitude_l1", "ablation"),
                             truth="logit_l2", sites=["conv", "linear"], n_boot=500,
                             progress=False)
    truth = fxgndi.ablate(model, data, sites=["conv", "linear"], metric="logit_l2",
                          progress=False)
    np.testing.assert_allclose(report.truth.values, truth.values, rtol=1e-6)
    gndi = fxgndi.score(model, data, sites=["conv", "linear"], progress=False).values
    np.testing.assert_allclose(report.estimates["gndi"], gndi, rtol=1e-6)
    l1 = [m.weight.abs().sum().item() for m in (model.conv1, model.conv2, model.fc)]
    np.testing.assert_allclose(report.estimates["magnitude_l1"], l1, rtol=1e-5)
    by_name = {r.importance: r for r in report.results}
    assert by_name["gndi"].spearman == pytest.approx(stats.spearmanr(gndi, truth.values)[0])
    assert by_name["gndi"].kendall == pytest.approx(stats.kendalltau(gndi, truth.values)[0])
    assert by_name["gndi"].pearson == pytest.approx(stats.pearsonr(gndi, truth.values)[0])
    # The truth itself, by hooks that zero each layer's output on the same data.
    with torch.no_grad():
        for i, layer in enumerate((model.conv1, model.conv2, model.fc)):
            changes = []
            for x, _ in data:
                reference = model(x)
                with replace_output(layer, torch.zeros_like):
                    changes.append((model(x) - reference).norm(dim=-1))
            assert report.truth.values[i] == pytest.approx(torch.cat(changes).mean().item(),
                                                           rel=1e-5)
    assert all(r.seconds > 0 and r.forward_equivalents > 0 for r in report.results)
    assert "Spearman" in report.table() and "95% CI" in report.table()


def test_channel_report_samples_channels_and_maps_bn_sites_to_their_conv(data, tmp_path):
    model = make_tiny()
    report = fxgndi.validate(model, data, importances=("gndi", "magnitude_l2", "random"),
                             truth="logit_l2", granularity="channel", sites="bn",
                             baseline="channel-mean", n_channels=5, n_boot=300, seed=3,
                             progress=False)
    units = report.truth.units
    assert len(units) == 5 and len(set(units)) == 5
    conv = {"bn1": model.conv1, "bn2": model.conv2}
    expected = [conv[s].weight[c].norm().item() for s, c in units]
    np.testing.assert_allclose(report.estimates["magnitude_l2"], expected, rtol=1e-5)
    sites = np.array([s for s, _ in units])
    for r in report.results:  # the mean within-layer Spearman, by scipy
        pred = report.estimates[r.importance]
        rhos = [stats.spearmanr(pred[sites == s], report.truth.values[sites == s])[0]
                for s in dict.fromkeys(sites) if (sites == s).sum() >= 3
                and np.ptp(pred[sites == s]) > 0 and np.ptp(report.truth.values[sites == s]) > 0]
        assert r.within_layer_groups == len(rhos)
        if rhos:
            assert r.within_layer_spearman == pytest.approx(np.mean(rhos))
        else:
            assert np.isnan(r.within_layer_spearman)
    report.plot(tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 1000
    assert report.to_dict()["settings"]["baseline"] == "channel-mean"


def test_spearman_ci_is_a_percentile_interval_around_the_estimate():
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    b = a + rng.normal(scale=0.8, size=60)
    lo, hi = spearman_ci(a, b, n_boot=2000)
    rho = stats.spearmanr(a, b)[0]
    assert lo < rho < hi and 0.2 < hi - lo < 0.6


def test_within_layer_spearman_ignores_small_and_constant_groups():
    pred = np.array([1, 2, 3, 5, 5, 5, 9, 1.0])
    truth = np.array([1, 2, 3, 1, 2, 3, 4, 4.0])
    value, groups = within_layer_spearman(pred, truth, list("aaabbbcc"))
    assert (value, groups) == (1.0, 1)


def test_producing_layer_walks_back_to_the_conv():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    g = fxgndi.intervene(model, ["bn", "act"])
    assert producing_layer(g, "1") == "0" and producing_layer(g, "2") == "0"


def test_unknown_method_is_an_error(data):
    with pytest.raises(ValueError, match="unknown importance"):
        fxgndi.validate(make_tiny(), data, importances=("oracle",), progress=False)
