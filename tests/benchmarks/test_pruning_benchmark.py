"""benchmarks/pruning.py runs end to end on a tiny configuration; its verdict is right."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_smoke import load


def test_runs_at_the_requested_macs_and_writes_table_figure_and_json(tmp_path, capsys):
    bench = load("pruning")
    png, out = tmp_path / "pruning.png", tmp_path / "rows.json"
    rows = bench.main(["--model", "resnet18", "--criteria", "gndi-zero", "l1",
                       "--points", "2", "--finetune-epochs", "1", "--samples", "32",
                       "--train-limit", "64", "--test-limit", "64", "--plot", str(png),
                       "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert [r["criterion"] for r in rows] == ["gndi-zero", "l1"]
    for r in rows:
        assert abs(r["macs_kept"] - 0.5) <= 0.02  # prune's tolerance around the 2x point
        for key in ("acc", "acc_recal", "acc_repair", "acc_ft"):
            assert 0 <= r[key] <= 1 and r[key] * 64 == round(r[key] * 64)  # a count of 64
    assert "gndi-zero against the best torch-pruning built-in" in printed
    assert "taylor: |w * dL/dw|" in printed  # the notes on the built-ins
    assert png.stat().st_size > 10_000
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["dense"]["n"] == 64
    again = bench.main(["--from-json", str(out), str(out), "--plot", ""])  # runs nothing
    assert json.dumps(again) == json.dumps(rows + rows)
    assert capsys.readouterr().out.count("gndi-zero against the best") == 4  # one per column


def test_verdict_compares_gndi_with_the_best_builtin_per_point():
    bench = load("pruning")
    rows = [{"criterion": c, "reduction": f, "acc": a} for c, f, a in [
        ("gndi-zero", 2.0, 0.70), ("l1", 2.0, 0.50), ("fpgm", 2.0, 0.72),
        ("gndi-zero", 3.0, 0.40), ("l1", 3.0, 0.30), ("ablation-zero", 3.0, 0.9)]]
    assert bench.verdict(rows, "acc") == [("2x", 0.70, "fpgm", 0.72, "NO"),
                                          ("3x", 0.40, "l1", 0.30, "yes")]


def test_points_must_be_reductions():
    with pytest.raises(SystemExit):
        load("pruning").main(["--points", "0.5"])
