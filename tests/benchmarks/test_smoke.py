"""The benchmark scripts run end to end on a tiny configuration and their checks pass."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from types import ModuleType

import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scoring_speed_runs_and_agrees(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "speed.json"
    rc = load("scoring_speed").main([
        "--models", "resnet18", "--batch", "2", "--image-size", "32", "--repeat", "1",
        "--channel-sample", "2", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert torch.get_num_threads() == threads  # main restores the caller's thread count
    assert "PASS resnet18" in printed and "EXTRAPOLATED" in printed
    (result,) = json.loads(out.read_text())["results"]
    assert result["sites"] == 21 and result["channels"] == 4810
    assert result["layer_rel_err"] <= 1e-4 and result["channel_rel_err"] <= 1e-4
    assert result["layer_speedup"] > 0 and result["channel_speedup"] > 0


def test_hooked_jvp_matches_finite_difference():
    """The independent reference: the hooked JVP equals (f(alpha = eps) - f(0)) / eps."""
    bench = load("scoring_speed")
    model = bench.build_model("resnet18", 32).double()
    x = bench.make_input(2, 32).double()
    fc = model.get_submodule("layer4.1.conv2")
    tangent = bench.hooked_tangent(model, fc, x, torch.ones(2, dtype=torch.float64))
    eps = 1e-6
    with torch.no_grad():
        handle = fc.register_forward_hook(lambda m, a, h: h - eps * h)
        try:
            shifted = model(x)
        finally:
            handle.remove()
        finite = (shifted - model(x)) / eps
    torch.testing.assert_close(tangent, finite, rtol=1e-4, atol=1e-6)


def test_overhead_runs_and_outputs_are_identical(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    rc = load("overhead").main([
        "--models", "resnet18", "--batches", "2", "--image-size", "32", "--rounds", "2",
        "--block", "0.02", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    (row,) = json.loads(out.read_text())["results"]
    assert row["equal_none"] and row["equal_zero"] and row["equal_traced"]
    assert row["ops_graph_vs_traced"] == "same"  # no-alpha nodes dispatch nothing
    assert row["model_ms"] > 0 and row["graph_ms"] > 0


def test_depth_speed_part_runs(capsys, tmp_path):
    threads = torch.get_num_threads()
    rows = load("depth").main(["speed", "--models", "resnet18", "--size", "32", "--batch", "1",
                               "--repeat", "1", "--sparsity", "0.2", "--threads", "1"])
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    printed = capsys.readouterr().out
    assert "latency gain per MAC removed" in printed
    by_method = {r[1]: r for r in rows}
    assert set(by_method) == {"dense", "depth (gndi)", "width (l1)"}
    depth_cut, width_cut = by_method["depth (gndi)"][3], by_method["width (l1)"][3]
    assert depth_cut >= 0.2 and abs(width_cut - depth_cut) < 0.03  # equal MACs, within 2%
    fake = [(0, "dense", 0.9, None, 0.9, 0.0, ""), (1, "depth: x", 0.8, None, 0.85, 0.1, "b")]
    load("depth").plot_accuracy(fake, tmp_path / "depth.png")
    assert (tmp_path / "depth.png").stat().st_size > 0


def test_cli_startup_runs():
    medians = load("cli_startup").main(["--repeat", "1"])
    assert set(medians) >= {"fxgndi --help", 'python -c "import torch"'}
    assert all(m > 0 for m in medians.values())


def test_scoring_speed_pruning_cost_runs(tmp_path, capsys):
    out = tmp_path / "cost.json"
    rc = load("scoring_speed").main([
        "--pruning-cost", "--models", "resnet18", "--image-size", "32", "--samples", "8",
        "--batch", "4", "--num-classes", "20", "--probes", "4", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "prune(importance='gndi') / prune(importance='weight_taylor')" in printed
    (result,) = json.loads(out.read_text())["results"]
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"l1", "weight_taylor", "gndi", "gndi probe R=4", "gndi exact"}
    assert rows["gndi exact"]["mode"] == "reverse" and rows["gndi probe R=4"]["mode"] == "probe"
    assert rows["gndi"]["mode"] == result["default_mode"]  # 20 outputs: probes iff R < 20
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows["weight_taylor"]["vs_weight_taylor"] == 1
    (agreement,) = result["agreement"]
    assert agreement["groups"] == 12 and -1 <= agreement["spearman_min"] <= 1
    assert agreement["removed_exact_ratio"] >= 1 - 1e-6  # the exact ranking removes the least


def test_speedup_smoke_runs_both_targets(tmp_path, capsys, monkeypatch):
    """Pruning measures latency with a stand-in clock proportional to the MACs (deterministic):
    halving it must halve the MACs too, within the latency target's 5%."""
    from fxgndi.core.cost import count_macs_params
    from fxgndi.deploy.latency import Latency
    monkeypatch.setattr(Latency, "times", lambda self, models, x: [
        [float(count_macs_params(m, x)[0])] * self.repeat for m in models])
    monkeypatch.setenv("FXGNDI_CACHE", str(tmp_path))
    out = tmp_path / "speedup.json"
    assert load("speedup").main(["--smoke", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| resnet18 | macs" in printed and "| resnet18 | latency" in printed
    assert "| resnet18 | macs-uniform" in printed
    (result,) = json.loads(out.read_text())["results"]
    macs, latency = result["targets"]["macs"], result["targets"]["latency"]
    assert macs["error"] is None and latency["error"] is None
    assert result["targets"]["macs-uniform"]["error"] is None
    for target in ("macs", "macs-uniform"):
        assert 1 / 0.52 <= result["targets"][target]["macs_ratio"] <= 1 / 0.48
    assert 1 / 0.55 <= latency["macs_ratio"] <= 1 / 0.45
    assert latency["latency"]["runtime"] == "eager" and latency["latency"]["batch_size"] == 1
    rows = {(r["name"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("dense eager", 1), ("macs eager", 1), ("macs-uniform eager", 1),
                         ("latency eager", 1)}
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert "pruned slower than dense:" in printed
    assert load("speedup").main(["--from-json", str(out), str(out)]) == 0  # runs nothing
    assert capsys.readouterr().out.count("| resnet18 | latency") == 2


def test_digits_models_trains_and_saves_a_model_that_classifies(tmp_path, capsys):
    load("digits_models").main(["--archs", "resnet18", "--image-size", "16", "--epochs", "2",
                                "--out", str(tmp_path)])
    assert "resnet18 at 16 px: test accuracy" in capsys.readouterr().out
    import torchvision
    from fxgndi.app.data import load_data
    from fxgndi.pruning.finetune import evaluate
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "resnet18_16.pt", weights_only=True))
    test = load_data("digits", split="test", batch_size=256, image_size=16)
    assert evaluate(model.eval(), test)["accuracy"] > 0.5  # ten classes: chance is 0.1


def test_heap_benchmark_times_each_setting_in_a_fresh_interpreter(capsys):
    import platform

    heap = load("heap")
    rc = heap.main(["--models", "resnet18", "--batch", "1", "--image-size", "32",
                    "--warmup", "0", "--repeat", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    if platform.libc_ver()[0] == "glibc":
        rows = [line for line in printed.splitlines() if line.startswith("| resnet18")]
        assert [row.split("|")[2].strip() for row in rows] == list(heap.SETTINGS)
        assert float(rows[0].split("|")[-2]) == 1.0  # system against itself


def test_speedup_keep_width_keeps_the_matching_layers_and_the_output_layers():
    import torchvision

    speedup = load("speedup")
    args = speedup.parse_args(speedup.SMOKE + ["--keep-width", r"layer1\.0\.conv1"])
    args.latency_batch = 1
    dense = torchvision.models.resnet18(weights=None).eval()
    pruned = speedup.prune(dense, torch.randn(1, 3, 32, 32), "macs-uniform", args).model
    assert pruned.layer1[0].conv1.out_channels == 64  # kept, as asked
    assert pruned.fc.out_features == 1000  # the output layer, kept as by default
    assert pruned.layer2[0].conv1.out_channels < 128  # the rest is pruned
