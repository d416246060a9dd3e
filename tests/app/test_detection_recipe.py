"""The detection recipe of the README: a torchvision detector is not fx-traceable as a whole, so
its backbone (ResNet body + FPN) is pruned on its own, on the images as the detector's transform
feeds them, and put back; the detector still runs and returns boxes."""

from __future__ import annotations

import copy

import torch
import torchvision

from fxgndi.pruning.width import prune


def all_feature_maps(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """The readout over every level of an FPN's dict output, flattened per sample."""
    return torch.cat([f.flatten(1) for f in features.values()], 1)


def test_faster_rcnn_backbone_prunes_and_the_detector_returns_boxes():
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).eval()
    images = [torch.rand(3, 64, 80) for _ in range(2)]
    with torch.no_grad():
        batch = detector.transform(images)[0].tensors  # what the backbone sees
        dense_features = detector.backbone(batch)
    backbone = copy.deepcopy(detector.backbone)

    result = prune(detector.backbone, [batch], example_inputs=batch[:1], sparsity=0.5,
                   repair=False, output=all_feature_maps)

    for a, b in zip(detector.backbone.state_dict().values(), backbone.state_dict().values()):
        assert torch.equal(a, b)  # the detector's own backbone is untouched
    assert result.macs_after < 0.6 * result.macs_before
    # the widths inside the body shrank, the residual streams too (through the FPN's inputs) ...
    assert result.model.get_submodule("body.layer1.0.conv1").out_channels < 64
    assert result.model.get_submodule("fpn.inner_blocks.3.0").in_channels < 2048
    # ... but every level the RPN and box heads read keeps its name, shape and 256 channels
    with torch.no_grad():
        pruned_features = result.model(batch)
    assert {k: v.shape for k, v in pruned_features.items()} == \
        {k: v.shape for k, v in dense_features.items()}
    assert all(v.shape[1] == 256 for v in pruned_features.values())

    detector.backbone = result.model
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for d in detections:
        assert d["boxes"].dim() == 2 and d["boxes"].shape[1] == 4
        assert d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0] > 0
        assert torch.isfinite(d["boxes"]).all()
