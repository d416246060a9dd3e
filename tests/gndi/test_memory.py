"""max_memory: batches and vmap chunks are split to fit the budget; results do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxgndi
import fxgndi.gndi.estimate as estimate
from fxgndi.core.options import parse_bytes
from fxgndi.gndi.ablation import ablated_outputs
from fxgndi.gndi.memory import created_bytes, plan_step
from fxgndi.gndi.tangents import forward_tangents, reverse_tangents

from tests.helpers import make_tiny


def test_created_bytes_of_a_tinynet_forward_by_hand(tiny):
    # one 2x6x6 sample: conv1, bn1, relu, conv2, bn2, add, relu each make 4x6x6 float32
    # (576 bytes), the pool 4 floats, the classifier 3 floats; flatten is a view
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        assert created_bytes(lambda: tiny(x)) == 7 * 576 + 16 + 12


def _split_sizes(mode, model, data, budget, **kw):
    """Samples per call of the step, under a budget (and the result)."""
    seen = []
    original = estimate.unit_norms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(estimate, "unit_norms", lambda g, x, *a: seen.append(x.shape[0]) or
                   original(g, x, *a))
        result = fxgndi.score(model, data, mode=mode, max_memory=budget, progress=False, **kw)
    return seen, result


def _one_copy_bytes(mode, model, x, kw):
    """What one sample with one vmapped copy (output, probe or unit) creates, by hand."""
    graph = fxgndi.intervene(model, kw.get("sites", "conv"),
                             granularity=kw.get("granularity", "layer"), example_inputs=x)
    first_unit = [(graph.sites[0].name, 0 if graph.granularity == "channel" else None)]
    with torch.no_grad():
        if mode == "forward":
            return created_bytes(lambda: forward_tangents(graph, x, None, "logits",
                                                          first_unit, 0.0, 1))
        cot = torch.ones(1, 1, 3, dtype=x.dtype) if mode == "probe" else \
            torch.eye(3, dtype=x.dtype)[:1, None, :]
        return created_bytes(lambda: reverse_tangents(graph, x, None, "logits", 1, cot))


@pytest.mark.parametrize("mode, kw", [
    ("reverse", dict(granularity="channel", sites=["conv", "bn"])),
    ("forward", dict(steps=3)),
    ("probe", dict(probes=5)),
])
def test_a_budget_splits_the_work_but_not_the_result(mode, kw):
    model = make_tiny(torch.float64)
    data = [torch.randn(6, 2, 6, 6, dtype=torch.float64) for _ in range(2)]
    free = fxgndi.score(model, data, mode=mode, progress=False, **kw)
    need = _one_copy_bytes(mode, model, data[0][:1], kw)
    # 3.5 samples' worth (the library also counts the few bytes of its own cotangents)
    seen, tight = _split_sizes(mode, model, data, 3 * need + need // 2, **kw)
    assert seen == [3, 3, 3, 3]  # three samples fit, one copy at a time
    assert tight.meta["samples_per_step"] == 3 and tight.meta["chunk"] == 1
    np.testing.assert_allclose(tight.values, free.values, rtol=1e-10)
    np.testing.assert_allclose(tight.stderr, free.stderr, rtol=1e-8)


def test_the_plan_keeps_the_measured_bound_under_the_budget():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10)).eval()
    x = torch.randn(32, 3, 16, 16)
    graph = fxgndi.intervene(model, "conv", granularity="channel", example_inputs=x[:1])

    def trial(xs, ys, n):  # n of the 10 output cotangents, vmapped together
        cot = torch.eye(10)[:n, None, :].expand(n, xs.shape[0], 10)
        reverse_tangents(graph, xs, ys, "logits", n, cot)

    with torch.no_grad():
        one = created_bytes(lambda: trial(x[:1], None, 1))
        two = created_bytes(lambda: trial(x[:1], None, 2))
    per_copy, fixed = two - one, 2 * one - two
    assert per_copy > 0 and fixed > 0
    for budget in (parse_bytes("1MiB"), parse_bytes("300KiB"), 40 * one):
        with torch.no_grad():
            piece, chunk = plan_step(trial, x, None, 10, budget, None, {})
        assert piece * (fixed + chunk * per_copy) <= budget
        if piece < 32:  # one more sample would not fit
            assert (piece + 1) * (fixed + per_copy) > budget
        if chunk < 10:
            assert piece * (fixed + (chunk + 1) * per_copy) > budget
        assert 1 <= chunk <= 10  # never more cotangents than outputs


def test_ablation_under_a_budget_equals_the_free_run(tiny):
    data = [(torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1]))]
    free = fxgndi.ablate(tiny, data, metric="loss", granularity="channel", progress=False)
    graph = fxgndi.intervene(tiny, "conv", granularity="channel", example_inputs=data[0][0])
    x1 = data[0][0][:1]
    with torch.no_grad():  # reference forward + one ablated copy, for one sample
        need = created_bytes(lambda: (graph(x1), list(ablated_outputs(
            graph, x1, [("conv1", 0)], 1))))
    tight = fxgndi.ablate(tiny, data, metric="loss", granularity="channel",
                          max_memory=2 * need + need // 2, progress=False)
    assert tight.meta["samples_per_step"] == 2 and tight.meta["chunk"] == 1
    np.testing.assert_allclose(tight.values, free.values, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("text, expected", [("4GB", 4 * 10 ** 9), ("512MiB", 512 * 2 ** 20),
                                            ("1e6", 10 ** 6), (" 2 kb", 2000), (1024, 1024)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected
