"""Which output tensor is read, and readouts / ablation metrics on dense (segmentation-like)
outputs, against per-position computations by hand."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxgndi
from fxgndi.core.errors import DataError
from fxgndi.core.outputs import select_output
from fxgndi.gndi.ablation import effect
from fxgndi.gndi.readouts import readout


def test_select_output_rules():
    a, b = torch.zeros(1), torch.ones(1)
    assert select_output(a) is a
    assert select_output({"out": a, "aux": b}) is a
    assert select_output({"logits": b, "out": a}) is b
    assert select_output((a, b)) is a and select_output((a, b), 1) is b
    assert select_output({"x": a, "y": b}, "y") is b
    Pair = collections.namedtuple("Pair", "features logits")
    assert select_output(Pair(a, b)) is b and select_output(Pair(a, b), "features") is a
    assert select_output({"x": a}, lambda o: o["x"] * 2).item() == 0
    with pytest.raises(DataError, match="keys x, y"):
        select_output({"x": a, "y": b})
    with pytest.raises(DataError, match="has no 'z'"):
        select_output({"x": a}, "z")


class Dense(nn.Module):
    """A 1x1 conv head over a 2x2 map: a segmentation model in miniature, returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(2, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        out = self.head(torch.relu(self.body(x)))
        return {"out": out, "aux": out.detach() * 0}


def test_dense_readouts_by_hand():
    out = torch.randn(2, 3, 2, 2)
    y = torch.randint(0, 3, (2, 2, 2))
    ce = torch.stack([torch.stack([F.cross_entropy(out[b, :, i, j][None],
                                                   y[b, i, j][None])
                                   for i in range(2) for j in range(2)]).mean() for b in range(2)])
    torch.testing.assert_close(readout(out, y, "loss")[:, 0], ce)
    margins = []
    for b in range(2):
        per = []
        for i in range(2):
            for j in range(2):
                v, t = out[b, :, i, j], y[b, i, j]
                per.append(v[t] - max(v[k] for k in range(3) if k != t))
        margins.append(torch.stack(per).mean())
    torch.testing.assert_close(readout(out, y, "margin")[:, 0], torch.stack(margins))
    target = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(readout(out, target, "loss")[:, 0],
                               ((out - target) ** 2).flatten(1).mean(1))
    assert readout(out, None, "outputs").shape == (2, 12)


def test_dense_ablation_metrics_by_hand():
    ref = torch.randn(2, 3, 2, 2)
    abl = torch.randn(1, 2, 3, 2, 2)
    y = torch.randint(0, 3, (2, 2, 2))
    acc_ref = (ref.argmax(1) == y).float().flatten(1).mean(1)
    acc_abl = (abl[0].argmax(1) == y).float().flatten(1).mean(1)
    torch.testing.assert_close(effect(ref, abl, y, "accuracy")[0], acc_ref - acc_abl)
    torch.testing.assert_close(effect(ref, abl, y, "logit_l2")[0],
                               (abl[0] - ref).flatten(1).norm(dim=1))
    kl = (ref.softmax(1) * (ref.log_softmax(1) - abl[0].log_softmax(1))).sum(1)
    kl = kl.flatten(1).mean(1)
    torch.testing.assert_close(effect(ref, abl, y, "kl")[0], kl)


def test_a_dict_output_model_scores_like_the_tensor_it_returns():
    torch.manual_seed(0)
    model = Dense().eval()
    x = torch.randn(3, 2, 2, 2)
    y = torch.randint(0, 3, (3, 2, 2))
    plain = nn.Sequential(model.body, nn.ReLU(), model.head).eval()
    for kw in (dict(readout="logits"), dict(readout="loss")):
        got = fxgndi.score(model, [(x, y)], sites="conv", progress=False, **kw)
        want = fxgndi.score(plain, [(x, y)], sites="conv", progress=False, **kw)
        torch.testing.assert_close(torch.as_tensor(got.values), torch.as_tensor(want.values))
    picked = fxgndi.score(model, [(x, y)], sites="conv", output="aux", progress=False)
    assert (picked.values == 0).all()  # the aux head is detached zeros: nothing moves it
    exact = fxgndi.ablate(model, [(x, y)], sites="conv", metric="accuracy", progress=False)
    assert exact.values.shape == (2,)
