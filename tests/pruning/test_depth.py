"""Depth pruning: removed branches equal the original model with those branches set to their
baseline (checked with forward hooks on the untouched model), greedy re-scoring, refusals."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torchvision
from torchvision.models import vision_transformer

from fxgndi import FxgndiError
from fxgndi.pruning.depth import prune_depth, residual_blocks

from tests.helpers import hooked_gndi, randomize_batchnorm, replace_output

RESNET_BRANCH_END = "bn2"  # BasicBlock: out = bn2(conv2(...)) + identity


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    # Random BN statistics so that no branch is near-silent and rankings are not ties.
    return randomize_batchnorm(model, weight=(0.2, 1.0), bias=None)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 32, 32, generator=g) for _ in range(2)]


def _replaced(model, values: dict[str, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    """The model's output with each named module's output replaced (None = zeros)."""
    with contextlib.ExitStack() as stack:
        for name, v in values.items():
            stack.enter_context(replace_output(
                model.get_submodule(name),
                lambda out, v=v: torch.zeros_like(out) if v is None else v.expand_as(out).clone()))
        with torch.no_grad():
            return model(x)


def _channel_means(model, name: str, batches, dims) -> torch.Tensor:
    outs = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda mod, args, out: outs.append(out.detach().clone()))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    return torch.cat(outs).mean(dim=dims, keepdim=True)[:1]


def test_candidates_exclude_projection_shortcuts(resnet):
    blocks = residual_blocks(resnet, torch.randn(1, 3, 32, 32))
    assert [b.name for b in blocks if b.candidate] == \
        ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    refused = {b.name: b.reason for b in blocks if not b.candidate}
    assert sorted(refused) == ["layer2.0", "layer3.0", "layer4.0"]
    assert all("projection shortcut" in r for r in refused.values())


def test_zero_baseline_equals_hooked_original(resnet, data):
    r = prune_depth(resnet, data, n_blocks=2, importance="random", seed=3, repair=False)
    assert len(r.removed) == 2
    x = torch.randn(5, 3, 32, 32)
    expected = _replaced(resnet, {f"{b}.{RESNET_BRANCH_END}": None for b in r.removed}, x)
    with torch.no_grad():
        got = r.model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    names = dict(r.model.named_modules())
    for block in r.removed:  # the branch's layers are gone, the block's shared relu is not
        assert f"{block}.conv1" not in names and f"{block}.bn2" not in names
    assert r.params_after < r.params_before and r.macs_after < r.macs_before
    assert r.skipped.keys() == {"layer2.0", "layer3.0", "layer4.0"}


def test_channel_mean_baseline_equals_hooked_original(resnet, data):
    r = prune_depth(resnet, data, n_blocks=1, importance="random", baseline="channel-mean",
                    repair=False)
    (block,) = r.removed
    mean = _channel_means(resnet, f"{block}.{RESNET_BRANCH_END}", data, (0, 2, 3))
    x = torch.randn(5, 3, 32, 32)
    expected = _replaced(resnet, {f"{block}.{RESNET_BRANCH_END}": mean}, x)
    with torch.no_grad():
        got = r.model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_vit_attention_and_mlp_branches(data):
    torch.manual_seed(0)
    vit = vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=10).eval()
    blocks = residual_blocks(vit, data[0][:1])
    assert [b.name for b in blocks] == [
        "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_0:1",
        "encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_1:1"]
    r = prune_depth(vit, data, n_blocks=4, importance="random", baseline="channel-mean",
                    greedy=False)
    # Attention branch ends in the block's dropout, the MLP branch in the MLP; with all four
    # removed every mean is taken on the original model (no branch is upstream of another's
    # mean except through the skips, which the means below see as the pruned model does).
    x = torch.randn(3, 3, 32, 32)
    ends = {"encoder.layers.encoder_layer_0": "encoder.layers.encoder_layer_0.dropout",
            "encoder.layers.encoder_layer_0:1": "encoder.layers.encoder_layer_0.mlp",
            "encoder.layers.encoder_layer_1": "encoder.layers.encoder_layer_1.dropout",
            "encoder.layers.encoder_layer_1:1": "encoder.layers.encoder_layer_1.mlp"}
    means: dict[str, torch.Tensor] = {}
    reference = copy.deepcopy(vit)
    for block in r.removed:  # each mean is measured with the earlier removals applied
        module = ends[block]
        outs = []
        handle = reference.get_submodule(module).register_forward_hook(
            lambda mod, args, out: outs.append(out.detach().clone()))
        _replaced(reference, means, torch.cat(data))
        handle.remove()
        means[module] = torch.cat(outs).mean(dim=(0, 1), keepdim=True)[:1]
    expected = _replaced(reference, means, x)
    with torch.no_grad():
        got = r.model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert "encoder.layers.encoder_layer_0.self_attention" not in dict(r.model.named_modules())


def _logit_l2(model, zeroed: list[str], extra: str, batches) -> float:
    """E_x ||f(x; zeroed + extra) - f(x; zeroed)||_2, by hooks on the original model."""
    total, n = 0.0, 0
    for x in batches:
        base = _replaced(model, {f"{b}.{RESNET_BRANCH_END}": None for b in zeroed}, x)
        cut = _replaced(model, {f"{b}.{RESNET_BRANCH_END}": None for b in [*zeroed, extra]}, x)
        total += torch.linalg.vector_norm(cut - base, dim=-1).sum().item()
        n += x.shape[0]
    return total / n


def test_greedy_rescores_after_each_removal(resnet, data):
    r = prune_depth(resnet, data, n_blocks=2, importance="ablation", metric="logit_l2")
    candidates = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    first = {b: _logit_l2(resnet, [], b, data) for b in candidates}
    assert r.removed[0] == min(first, key=first.get)
    assert r.history[0]["score"] == pytest.approx(first[r.removed[0]], rel=1e-4)
    rest = [b for b in candidates if b != r.removed[0]]
    second = {b: _logit_l2(resnet, [r.removed[0]], b, data) for b in rest}
    assert r.removed[1] == min(second, key=second.get)
    # The second score is measured on the pruned model, not on the original one.
    assert r.history[1]["score"] == pytest.approx(second[r.removed[1]], rel=1e-4)
    assert abs(second[r.removed[1]] - first[r.removed[1]]) > 1e-3 * first[r.removed[1]]


@pytest.mark.parametrize("steps", [1, 4])
def test_gndi_ranks_by_the_block_scores(resnet, data, steps):
    once = prune_depth(resnet, data, n_blocks=1, importance="gndi", steps=steps)
    # Each block's score by hooks: its branch output (bn2) scaled by 1 - a, JVPs at the path
    # midpoints (a = (j + 1/2) / m for m > 1), averaged, then the norm.
    points = [(j + 0.5) / steps for j in range(steps)] if steps > 1 else [0.0]
    candidates = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    by_name = {name: hooked_gndi(resnet, resnet.get_submodule(f"{name}.{RESNET_BRANCH_END}"),
                                 data, points) for name in candidates}
    assert once.removed == [min(candidates, key=by_name.get)]
    assert once.history[0]["score"] == pytest.approx(by_name[once.removed[0]], rel=1e-5)


def test_macs_target_stops_at_the_first_block_that_reaches_it(resnet, data):
    r = prune_depth(resnet, data, target="macs", sparsity=0.2, importance="random")
    assert r.macs_reduction >= 0.2
    assert all(h["macs_reduction"] < 0.2 for h in r.history[:-1])
    assert r.macs_reduction == pytest.approx(r.history[-1]["macs_reduction"])


def test_user_model_untouched_unless_inplace(resnet, data):
    labelled = [(x, torch.arange(len(x)) % 10) for x in data]
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    r = prune_depth(resnet, labelled, n_blocks=1, importance="random",
                    repair={"finetune": dict(epochs=1, lr=0.05, progress=False)})
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(r.model.get_parameter("fc.weight"), resnet.fc.weight)
    # inplace shares the weights (repair=False: recalibration would change the shared fixture)
    shared = prune_depth(resnet, data, n_blocks=1, importance="random", inplace=True,
                         repair=False)
    assert shared.model.get_parameter("fc.weight") is resnet.fc.weight


def test_refusals(resnet, data):
    with pytest.raises(FxgndiError, match="only 5 removable"):
        prune_depth(resnet, data, n_blocks=6)
    with pytest.raises(FxgndiError, match="cuts only"):
        prune_depth(resnet, data, target="macs", sparsity=0.9)
    with pytest.raises(FxgndiError, match="no residual block"):
        prune_depth(torchvision.models.vgg11(num_classes=10), data, n_blocks=1)
    with pytest.raises(ValueError, match="either n_blocks"):
        prune_depth(resnet, data)
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_depth(resnet, data, target="macs", sparsity=1.5)
    with pytest.raises(ValueError, match="unknown importance"):
        prune_depth(resnet, data, n_blocks=1, importance="l1")


def test_width_pruning_after_depth_pruning(resnet, data):
    from fxgndi import prune
    depth = prune_depth(resnet, data, n_blocks=1, importance="random")
    both = prune(depth.model, data, sparsity=0.3, target="channels", importance="l1")
    with torch.no_grad():
        out = both.model.eval()(data[0])
    assert out.shape == (6, 10) and both.macs_after < depth.macs_after


def test_cli_prune_depth(capsys):
    import json

    from fxgndi.app.cli import main
    common = ["--model", "resnet18", "--data", "digits", "--limit", "8", "--batch-size", "4",
              "--quiet"]
    assert main(["prune-depth", *common, "--blocks", "1", "--importance", "random",
                 "--no-repair", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["removed"]) == 1 and printed["macs_after"] < printed["macs_before"]
    assert set(printed["accuracy"]) == {"before", "after"}
    assert printed["data"]["calibration"]["used_for"] == ["tracing and counting MACs only"]
    assert main(["prune-depth", *common]) == 1
    assert "--blocks N" in capsys.readouterr().err
    assert main(["prune-depth", *common, "--blocks", "1", "--importance", "random",
                 "--finetune-epochs", "1", "--recalibrate-bn"]) == 0
    out = capsys.readouterr().out
    assert "pruned and repaired (BatchNorm recalibration), untrained" in out
    assert "then fine-tuned 1 epoch(s) at peak lr 0.0001" in out
    assert "the train split (8 samples) for BatchNorm recalibration and fine-tuning" in out


def test_cli_prune_depth_exports(capsys, tmp_path):
    from fxgndi.app.cli import main
    out = tmp_path / "depth.pt2"
    assert main(["prune-depth", "--model", "resnet18", "--data", "digits", "--limit", "8",
                 "--batch-size", "4", "--quiet", "--blocks", "1", "--importance", "random",
                 "--out", str(out)]) == 0
    assert f"exported to {out}" in capsys.readouterr().out
    program = torch.export.load(out).module()
    assert program(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _small(name: str) -> torch.nn.Module:
    if name == "swin":
        from torchvision.models.swin_transformer import SwinTransformer
        return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                               window_size=[4, 4], num_classes=10)
    if name == "convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt
        return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)],
                        num_classes=10)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
                                  "convnext", "swin"])
def test_families_equal_the_intervened_graph(name):
    """Each family's pruned model equals the unpruned graph with alpha = 1 at the removed
    branches (the Intervention node computes the same do() without rewriting anything)."""
    import fxgndi
    torch.manual_seed(0)
    model = _small(name).eval()
    for m in model.modules():  # non-zero biases, so that no branch is trivially silent
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.bias is not None:
            m.bias.data.uniform_(-0.5, 0.5)
        if hasattr(m, "layer_scale"):  # ConvNeXt starts its branches at 1e-6
            m.layer_scale.data.fill_(0.5)
    x = torch.randn(3, 3, 32, 32)
    r = prune_depth(model, [x], n_blocks=2, importance="random", repair=False)
    graph = fxgndi.intervene(model, sites=r.removed)
    with torch.no_grad():
        expected = graph(x, alphas={b: torch.ones(3) for b in r.removed})
        got = r.model.eval()(x)
        effect = (expected - model(x)).abs().max()
    # The removal matters far more than the difference between the two computations.
    assert (got - expected).abs().max() < 1e-3 * effect
    assert r.params_after < r.params_before


@pytest.mark.parametrize("suffix", [".pt2", ".onnx", ".ts"])
def test_depth_pruned_model_exports(resnet, data, tmp_path, suffix):
    import fxgndi
    pytest.importorskip("onnxruntime") if suffix == ".onnx" else None
    r = prune_depth(resnet, data, n_blocks=2, importance="random", baseline="channel-mean",
                    repair=False)
    path = tmp_path / f"depth{suffix}"
    fxgndi.export(r.model, path, example_inputs=data[0][:2])
    loaded = fxgndi.load(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), r.model.eval()(x), rtol=1e-4, atol=1e-4)


def test_latency_target_uses_measured_seconds(resnet, data, monkeypatch):
    """Latency is timed; a stand-in clock (seconds = parameter count) makes it deterministic."""
    from fxgndi.deploy.latency import Latency
    monkeypatch.setattr(Latency, "times", lambda self, models, x: [
        [float(sum(p.numel() for p in m.parameters()))] * self.repeat for m in models])
    r = prune_depth(resnet, data, target="latency", sparsity=0.3, importance="random")
    assert r.latency_after / r.latency_before == pytest.approx(
        r.params_after / r.params_before)
    assert 1 - r.latency_after / r.latency_before >= 0.3
    assert all(h["latency_reduction"] < 0.3 for h in r.history[:-1])
    assert "latency (ms)" in r.table()


def test_recalibrate_bn_after_depth_pruning(resnet, data):
    """A BatchNorm's statistics become the mean of its batch means over the data, with every
    BatchNorm normalising by batch statistics (how running statistics are gathered)."""
    r = prune_depth(resnet, data, n_blocks=1, importance="random", repair={"recalibrate_bn": True})
    stale = prune_depth(resnet, data, n_blocks=1, importance="random", repair=False)
    name = "layer4.1.bn2" if "layer4.1" not in r.removed else "layer4.0.bn2"
    probe = copy.deepcopy(stale.model).eval()
    for m in probe.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    seen = []
    probe.get_submodule(name).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().mean(dim=(0, 2, 3))))
    with torch.no_grad():
        for x in data:
            probe(x)
    expected = torch.stack(seen).mean(0)
    got = r.model.get_submodule(name).running_mean
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stale.model.get_submodule(name).running_mean, expected, atol=1e-3)
    assert r.settings["repair"]["recalibrate_bn"] is True


def test_pth_export_of_a_depth_pruned_model_is_refused_clearly(resnet, data, tmp_path):
    import fxgndi
    from fxgndi.deploy.export import ExportError
    r = prune_depth(resnet, data, n_blocks=1, importance="random")
    with pytest.raises(ExportError, match="GraphModule .* export to .pt2"):
        fxgndi.export(r.model, tmp_path / "depth.pth", example_inputs=data[0][:2],
                      model_name="resnet18", model_kwargs={"num_classes": 10})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(3))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x1, x2, skip=None):
        h = self.a(x1) + self.b(x2)
        for i, block in enumerate(self.blocks):
            h = h if i == skip else h + block(h)
        return self.head(h)


def test_two_input_model_with_flat_batches_loses_one_block_exactly():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4)
    r = prune_depth(model, [(x1, x2)], n_blocks=1)  # read as two inputs: the model takes two
    with torch.no_grad():
        out = r.model(x1, x2)
        matches = [i for i in range(3) if torch.allclose(out, model(x1, x2, skip=i))]
    assert len(matches) == 1 and len(r.removed) == 1
