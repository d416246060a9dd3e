"""Least-squares repair against hand-built exact cases and torch.linalg.lstsq."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxgndi
from fxgndi.core.errors import DataError
from fxgndi.pruning.reconstruct import consumers, reconstruct

from tests.helpers import make_tiny


class _Fed(nn.Module):
    """``inner`` fed with channels made from the model's input by ``make`` (a dense model
    whose removed channels are a known function of the kept ones)."""

    def __init__(self, inner: nn.Module, make=lambda x: x) -> None:
        super().__init__()
        self.inner, self.make = inner, make

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.make(x))


def _dependent(x: torch.Tensor) -> torch.Tensor:
    """Appends channel 0.5 * x0 - x1 (with zero padding the relation holds in every patch)."""
    return torch.cat([x, 0.5 * x[:, :1] - x[:, 1:2]], 1)


def test_linear_refit_is_exact_when_the_removed_input_is_a_combination_of_kept_ones():
    torch.manual_seed(0)
    dense = nn.Linear(3, 4).double()
    pruned = nn.Linear(2, 4).double()
    with torch.no_grad():
        pruned.weight.copy_(dense.weight[:, :2])
        pruned.bias.copy_(dense.bias)
    x = torch.randn(50, 2, dtype=torch.float64)
    report = reconstruct(_Fed(pruned), _Fed(dense, _dependent), [x], layers=["inner"], ridge=0,
                         progress=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), dense(_dependent(x)), rtol=1e-9, atol=1e-9)
    # The exact solution, by hand: w0 + 0.5 w2, w1 - w2.
    w = dense.weight.detach()
    torch.testing.assert_close(pruned.weight.detach(),
                               torch.stack([w[:, 0] + 0.5 * w[:, 2], w[:, 1] - w[:, 2]], 1),
                               rtol=1e-8, atol=1e-8)
    assert report.layers[0].relative_error_after < 1e-8 < report.layers[0].relative_error_before


def test_padded_conv_refit_is_exact_for_a_dependent_channel():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    pruned = nn.Conv2d(2, 5, 3, padding=1, bias=False).double()
    x = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        pruned.weight.copy_(dense.weight[:, :2])
    report = reconstruct(_Fed(pruned), _Fed(dense, _dependent), [x], layers=["inner"],
                         ridge=0, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), dense(_dependent(x)), rtol=1e-8, atol=1e-8)
    assert pruned.bias is not None and float(pruned.bias.abs().max()) < 1e-8  # a bias was fit
    assert report.layers[0].rows == 6 * 7 * 7 and report.layers[0].unknowns == 2 * 9 + 1


def test_strided_grouped_conv_equals_lstsq_per_group():
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2).double()
    pruned = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2).double()  # one input per group...

    def full(kept):  # channels 3 and 7 are removed: the dense model had tanh-made ones there
        a, b = kept[:, :3], kept[:, 3:]
        return torch.cat([a, a[:, :1].tanh(), b, (b[:, 1:2] * b[:, 2:3]).sin()], 1)

    with torch.no_grad():
        pruned.weight.copy_(dense.weight[:, [0, 1, 2]])
    x = torch.randn(5, 6, 9, 9, dtype=torch.float64)
    reconstruct(_Fed(pruned), _Fed(dense, full), [x], layers=["inner"], ridge=0,
                progress=False)
    with torch.no_grad():
        target = dense(full(x))
    for g in range(2):  # independent: unfold by hand, torch.linalg.lstsq with a bias column
        patches = F.unfold(x[:, 3 * g:3 * g + 3], 3, padding=1, stride=2)  # [5, 27, 25]
        a = torch.cat([patches.permute(0, 2, 1).reshape(-1, 27),
                       torch.ones(5 * 25, 1, dtype=torch.float64)], 1)
        b = target[:, 3 * g:3 * g + 3].reshape(5, 3, -1).permute(0, 2, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(a, b).solution  # [28, 3]
        torch.testing.assert_close(pruned.weight[3 * g:3 * g + 3].detach().reshape(3, 27),
                                   solution[:27].T, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(pruned.bias[3 * g:3 * g + 3].detach(), solution[27],
                                   rtol=1e-7, atol=1e-9)


def test_consumers_are_the_layers_that_lost_inputs():
    dense = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    pruned = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 4, 1))
    assert consumers(pruned, dense) == ["2"]  # the depthwise conv is a member, not a consumer


def test_a_too_small_calibration_set_is_a_clear_error_or_a_warning_with_the_condition():
    torch.manual_seed(0)
    dense = _Fed(nn.Linear(30, 2), lambda x: F.pad(x, (0, 10)))
    pruned = _Fed(nn.Linear(20, 2))
    x = torch.randn(5, 20)  # 5 rows for 21 unknowns per output
    with pytest.raises(DataError, match="only 5 rows"):
        reconstruct(copy.deepcopy(pruned), dense, [x], layers=["inner"], ridge=0,
                    progress=False)
    with pytest.warns(RuntimeWarning, match="condition number"):
        report = reconstruct(pruned, dense, [x], layers=["inner"], ridge=1e-3, progress=False)
    # The system has rank 5 < 21: the smallest eigenvalue of X^T X + lambda I is lambda.
    a = torch.cat([x, torch.ones(5, 1)], 1).double()
    xtx = a.T @ a
    lam = 1e-3 * xtx.diagonal().mean()
    expected = torch.linalg.cond(xtx + lam * torch.eye(21, dtype=torch.float64))
    assert report.layers[0].condition == pytest.approx(float(expected), rel=1e-2)  # estimate


def test_prune_with_repair_never_changes_the_users_model_and_fits_the_dense_outputs():
    model = make_tiny()
    data = [(torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repaired = fxgndi.prune(model, data, sparsity=0.5, importance="l1",
                            repair={"recalibrate_bn": False})
    plain = fxgndi.prune(model, data, sparsity=0.5, importance="l1", repair=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fits = repaired.settings["repair_ran"]["reconstruct"]["layers"]
    assert [f["name"] for f in fits] == ["conv2", "fc"]  # the layers that lost inputs
    with torch.no_grad():
        x = torch.cat([x for x, _ in data])
        error = [(m(x) - model(x)).norm() / model(x).norm() for m in (plain.model,
                                                                      repaired.model)]
    assert error[1] < error[0]


def test_a_shuffling_loader_gives_the_fit_of_the_same_samples_in_order():
    torch.manual_seed(0)
    dense = nn.Linear(3, 4).double()
    x = torch.randn(40, 2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8,
                                         shuffle=True)
    fits = []
    for data in ([x], loader):
        pruned = nn.Linear(2, 4).double()
        reconstruct(_Fed(pruned), _Fed(dense, _dependent), data, layers=["inner"], ridge=0,
                    progress=False)
        fits.append(pruned.weight.detach().clone())
    torch.testing.assert_close(fits[1], fits[0], rtol=1e-9, atol=1e-9)


def test_iterative_pruning_repairs_between_steps(monkeypatch):
    import fxgndi.pruning.width as width
    calls = []
    real = width.repair_model
    monkeypatch.setattr(width, "repair_model", lambda model, *a, **k: calls.append(
        sum(p.numel() for p in model.parameters())) or real(model, *a, **k))
    model = make_tiny()
    data = [(torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    r = fxgndi.prune(model, data, sparsity=0.5, importance="l1", iterative_steps=2)
    # once between the two steps (on the half-pruned model), once at the end
    final = sum(p.numel() for p in r.model.parameters())
    assert len(calls) == 2 and calls[0] > calls[1] == final
    plain = fxgndi.prune(model, data, sparsity=0.5, importance="l1", iterative_steps=2,
                         repair=False)
    assert len(calls) == 3  # no repair between the steps: only the (empty) final call
    assert plain.model.conv2.out_channels == r.model.conv2.out_channels
