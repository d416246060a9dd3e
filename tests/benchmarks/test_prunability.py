"""benchmarks/prunability.py beyond classifiers: a segmentation row and a timm row (skipped
without timm) reach every stage, and the pruned models really are smaller."""

from __future__ import annotations

import pytest

import benchmarks.prunability as bench


def test_segmentation_row_prunes_and_returns_both_dense_outputs():
    row = bench.run_one("deeplabv3_mobilenet_v3_large", "gndi", 0.5, 1, 3,
                        zoo="torchvision-segmentation")
    assert row["traced"] and row["scored"] and row["pruned"] and row["forward"], \
        row.get("error")
    assert row["size"] == 64
    assert row["macs_after"] < 0.5 * row["macs_before"]  # channel ratio 0.5: MACs ~ quartered


def test_segmentation_check_refuses_a_wrong_shape():
    import torch
    case = bench.build_case("torchvision-segmentation", "fcn_resnet50", 2, 4, size=32)
    good = {"out": torch.zeros(2, 4, 32, 32), "aux": torch.zeros(2, 4, 32, 32)}
    case.check(good)
    with pytest.raises(RuntimeError, match=r"\['aux'\] shape \(2, 4, 16, 16\)"):
        case.check({**good, "aux": torch.zeros(2, 4, 16, 16)})


@pytest.mark.parametrize("name", ["test_resnet", "test_nfnet"])  # nfnet: a conv's gain
def test_timm_row_prunes_and_runs(name):
    pytest.importorskip("timm")
    row = bench.run_one(name, "gndi", 0.5, 1, 10, zoo="timm")
    assert row["traced"] and row["scored"] and row["pruned"] and row["forward"], \
        row.get("error")
    assert row["size"] == 64 and row["macs_after"] < row["macs_before"]


def test_unknown_zoo_is_refused():
    with pytest.raises(ValueError, match="unknown zoo 'keras': use one of torchvision"):
        bench.zoo_models("keras")


def test_summary_counts_each_failure_cause_once():
    rows = [{"model": "a", "forward": True},
            {"model": "c", "forward": False, "error": "timeout after 600.0 s"},
            {"model": "b", "forward": False, "error": "timeout after 600.0 s"},
            {"model": "d", "forward": False,
             "error": "trace: UntraceableModelError: torch.fx could not trace X's own forward"},
            {"model": "e", "forward": False, "error": "prune: FxgndiError: torch-pruning 1.6.0 "
             "could not build the dependency graph of CspNet: TypeError: ..."},
            {"model": "f", "forward": False, "error": "prune: FxgndiError: the pruned Hiera "
             "fails its forward on example_inputs (RuntimeError: shape ...)"},
            {"model": "g", "forward": False, "error": "prune: AttributeError: 'NoneType'"}]
    assert bench.summary(rows).splitlines() == [
        "1 of 7 pruned and ran a forward pass",
        "timeout (2): b, c",
        "untraceable by torch.fx (1): d",
        "torch-pruning's dependency graph (1): e",
        "pruned model fails its forward (1): f",
        "other prune error (1): g"]
