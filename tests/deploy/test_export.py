"""fxgndi.export / fxgndi.load: four formats round-trip pruned models; failures leave no file.

The reference is always the eager (pruned) model's own output on fresh inputs of another batch
size than the export's, and for .pt2 a separate Python process that never imports fxgndi.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn
from torchvision.models.vision_transformer import VisionTransformer

import fxgndi
from fxgndi.core.errors import FxgndiError, UntraceableModelError
from fxgndi.deploy.export import ExportError, artifact_info, export, load
from fxgndi.app.models import load_model

from tests.helpers import make_tiny, randomize_batchnorm

SUFFIXES = (".pt2", ".onnx", ".ts", ".pth")
MODELS = ("resnet18", "mobilenet_v3_small", "vit")
VIT = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
           num_classes=10)


def _lively(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affines, unit-gain linear layers, so that outputs are
    O(1) and differences show (freshly built MobileNets output ~1e-3 logits)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.normal_(0.0, m.in_features ** -0.5)
    return randomize_batchnorm(model, mean=0.2, var=(0.5, 1.5), weight=(0.8, 1.5))


def _vit_ignored(model: VisionTransformer) -> list[str]:
    # prune() does not handle the ViT's hidden width yet (class token, positional embedding and
    # the reshape in _process_input): keep the patch embedding, the attention blocks, the MLPs'
    # output layers and the head, so only the MLPs' hidden width (mlp.0 outputs) is pruned.
    blocks = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
    return ["conv_proj", "heads.head"] + [f"{b}.{s}" for b in blocks
                                          for s in ("self_attention", "mlp.3")]


def _pruned(name: str) -> tuple[nn.Module, dict]:
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    if name == "vit":
        model = _lively(VisionTransformer(**VIT))
        ignored = _vit_ignored(model)
        kwargs = {}
    else:
        model = _lively(load_model(name, num_classes=10))
        ignored, kwargs = "auto", {"model_name": name, "model_kwargs": {"num_classes": 10}}
    # repair=False: a repair on 4 random images shrinks the outputs this test compares
    result = fxgndi.prune(model, data, sparsity=0.5, target="channels", importance="l1",
                          ignored_layers=ignored, repair=False)
    shrunk = [n for n, (b, a) in result.channels.items() if a < b]
    assert shrunk, "the model was not pruned"
    return result.model, kwargs


@pytest.fixture(scope="module")
def all_exported(tmp_path_factory) -> dict:
    """name -> (pruned model, its four exports from a batch of 2)."""
    out = {}
    for name in MODELS:
        folder = tmp_path_factory.mktemp(name)
        model, kwargs = _pruned(name)
        example = torch.randn(2, 3, 32, 32)
        out[name] = model, {s: export(model, folder / f"model{s}", example_inputs=example,
                                      **kwargs) for s in SUFFIXES}
    return out


@pytest.fixture(params=MODELS)
def exported(request, all_exported):
    return (request.param, *all_exported[request.param])


def test_every_format_round_trips_at_another_batch_size(exported):
    name, model, results = exported
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.05  # outputs large enough for the comparison to mean much
    for suffix, result in results.items():
        assert result.max_abs_diff < 1e-4, (suffix, result)
        assert result.bytes == os.path.getsize(result.path) > 0
        fresh = VisionTransformer(**VIT) if name == "vit" and suffix == ".pth" else None
        loaded = load(result.path, model=fresh)
        with torch.no_grad():
            got = loaded(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4,
                                   msg=f"{name} {suffix}")


def test_pth_rebuilds_the_pruned_architecture(exported):
    name, model, results = exported
    path = results[".pth"].path
    fresh = VisionTransformer(**VIT) if name == "vit" else None
    loaded = load(path, model=fresh)  # resnet / mobilenet: rebuilt from the stored name
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == shapes
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_artifact_info_records_counts_of_the_eager_model(exported):
    _, model, results = exported
    params = sum(p.numel() for p in model.parameters())
    for result in results.values():
        info = artifact_info(result.path)
        assert info["params"] == params
        assert info["input_shapes"] == [[3, 32, 32]] and info["dynamic_batch"]
        assert info["macs"] > params / 2  # every weight is used at least once per sample


def test_pt2_loads_in_a_process_without_fxgndi(all_exported, tmp_path):
    x = torch.randn(3, 3, 32, 32)
    cases = []
    for name, (model, results) in all_exported.items():
        with torch.no_grad():
            torch.save({"x": x, "y": model(x)}, tmp_path / f"{name}.pt")
        cases.append((results[".pt2"].path, str(tmp_path / f"{name}.pt")))
    script = (  # one process for all three: starting torch is the slow part
        "import sys, torch\n"
        f"for program, io in {cases!r}:\n"
        "    io = torch.load(io)\n"
        "    got = torch.export.load(program).module()(io['x'])\n"
        "    print((got - io['y']).abs().max().item())\n"
        "assert not any(m.startswith('fxgndi') for m in sys.modules), 'fxgndi was imported'\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    diffs = [float(line) for line in out.stdout.split()]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs


def test_fixed_batch_pt2_refuses_another_batch(tmp_path):
    model = make_tiny()
    path = tmp_path / "fixed.pt2"
    export(model, path, example_inputs=torch.randn(2, 2, 8, 8), dynamic_batch=False)
    program = load(path)
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(program(x), model(x))
    with pytest.raises(AssertionError, match="Guard failed"):
        program(torch.randn(3, 2, 8, 8))


def test_batch_of_one_example_still_exports_a_dynamic_batch(tmp_path):
    model = make_tiny()
    result = export(model, tmp_path / "one.pt2", example_inputs=torch.randn(1, 2, 8, 8))
    x = torch.randn(5, 2, 8, 8)
    torch.testing.assert_close(load(result.path)(x), model(x))


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = export(model, tmp_path / "m.ts", example_inputs=torch.randn(2, 4))
    assert result.max_abs_diff == 0.0  # exported in eval mode: dropout off on both sides
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python branch on a tensor value: torch.export cannot capture it
            return x * 2
        return x


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_unknown_suffix_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"\.pt2, \.onnx, \.ts, \.pth"):
        export(nn.Linear(2, 2), tmp_path / "model.bin", example_inputs=torch.randn(2, 2))
    assert _leftovers(tmp_path) == []


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export(nn.Linear(2, 2), tmp_path / "nope" / "m.pt2", example_inputs=torch.randn(2, 2))
    assert _leftovers(tmp_path) == []


def test_untraceable_model_is_a_clear_error_and_leaves_no_file(tmp_path):
    with pytest.raises(UntraceableModelError, match="torch.export export could not capture") as err:
        export(_DataDependent(), tmp_path / "m.pt2", example_inputs=torch.ones(2, 3))
    assert isinstance(err.value, FxgndiError) and "Fix:" in str(err.value)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix,writer", [(".pt2", "torch.export.save"),
                                           (".ts", "torch.jit.save")])
def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch, suffix, writer):
    def half_written(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt

    module, attr = writer.rsplit(".", 1)
    monkeypatch.setattr(eval(module), attr, half_written)
    target = tmp_path / f"m{suffix}"
    target.write_bytes(b"old")  # an older file of that name survives a failed export
    with pytest.raises(KeyboardInterrupt):
        export(nn.Linear(2, 2), target, example_inputs=torch.randn(2, 2))
    assert _leftovers(tmp_path) == [target.name] and target.read_bytes() == b"old"


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load(tmp_path / "missing.pt2")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pth")
    with pytest.raises(ExportError, match="load_model"):
        load(tmp_path / "plain.pth")
    export(nn.Linear(2, 2), tmp_path / "anon.pth", example_inputs=torch.randn(2, 2))
    with pytest.raises(ExportError, match="model="):
        load(tmp_path / "anon.pth")
    with pytest.raises(ExportError, match="Linear"):
        load(tmp_path / "anon.pth", model=nn.Conv2d(2, 2, 1))
    loaded = load(tmp_path / "anon.pth", model=nn.Linear(2, 2))
    assert isinstance(loaded, nn.Linear)


def test_result_to_dict_is_json(tmp_path):
    r = export(nn.Linear(3, 2), tmp_path / "m.onnx", example_inputs=torch.randn(2, 3))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["format"] == "onnx" and d["bytes"] == os.path.getsize(tmp_path / "m.onnx")
    assert artifact_info(tmp_path / "m.onnx")["params"] == 3 * 2 + 2


def test_cli_export_writes_the_checkpoint_model(tmp_path, capsys):
    from fxgndi.app.cli import main
    model = _lively(load_model("resnet18", num_classes=10))
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    out = tmp_path / "r18.onnx"
    code = main(["export", "--model", "resnet18", "--checkpoint", str(tmp_path / "r18.pt"),
                 "--num-classes", "10", "--limit", "4", "--out", str(out), "--json", "--quiet"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "onnx" and printed["max_abs_diff"] < 1e-4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x), model(x), rtol=1e-4, atol=1e-4)


def test_cli_prune_refuses_an_unknown_suffix_before_any_work(tmp_path, capsys):
    from fxgndi.app.cli import main
    code = main(["prune", "--model", "resnet18", "--limit", "4", "--importance", "l1",
                 "--out", str(tmp_path / "pruned.bin"), "--quiet"])
    assert code == 1
    assert "suffix" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".pt2", ".onnx", ".ts"])
def test_two_threads_exporting_to_one_path_both_succeed_and_the_file_loads(tmp_path, suffix):
    # torch.export and the ONNX exporter keep global tracing state: side by side in one
    # process they used to break each other ("could not capture the model").
    path, outcomes = tmp_path / f"m{suffix}", []
    models = [make_tiny(), randomize_batchnorm(make_tiny())]

    def work(model):
        try:
            outcomes.append(export(model, path, example_inputs=torch.randn(2, 2, 8, 8)))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcomes.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    assert _leftovers(tmp_path) == [path.name]
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        got, expected = load(path)(x), [m(x) for m in models]
    # the file is whole: one of the two models, exactly
    assert any(torch.allclose(got, e, rtol=1e-4, atol=1e-5) for e in expected)


def test_cli_format_overrides_the_suffix(tmp_path, capsys):
    from fxgndi.app.cli import main
    out = tmp_path / "r18.bin"
    argv = ["export", "--model", "resnet18", "--num-classes", "10", "--limit", "2",
            "--out", str(out), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "suffix '.bin'" in err and "--format" in err and err.count("\n") == 1
    assert main([*argv, "--format", "ts", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "torchscript"
    assert load(out, format="ts")(torch.randn(1, 3, 32, 32)).shape == (1, 10)
