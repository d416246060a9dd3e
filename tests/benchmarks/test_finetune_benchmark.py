"""benchmarks/finetune.py runs end to end on a tiny configuration; its verdict is right."""

from __future__ import annotations

import json

from tests.benchmarks.test_smoke import load


def test_runs_and_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert load("finetune").main(["--importances", "l1", "--lrs", "1e-4", "--recal", "yes",
                                  "--seeds", "0", "--train-limit", "64", "--quiet",
                                  "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "never below recal" in printed
    assert "| l1           |       0.50 | 0.0001 | yes " in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert row["lr"] == 1e-4 and row["recal_first"] == "yes" and row["sparsity"] == 0.5
    for key in ("pruned", "recal", "finetuned"):
        assert 0 <= row[key] <= 1 and round(row[key] * 450, 6) == round(row[key] * 450)


def test_a_setting_passes_only_when_no_seed_ends_below_the_recalibrated_model():
    bench = load("finetune")
    rows = [{"importance": "l1", "sparsity": 0.5, "lr": lr, "recal_first": "yes", "seed": s,
             "pruned": 0.1, "recal": 0.9, "finetuned": f}
            for lr, s, f in [(1e-4, 0, 0.95), (1e-4, 1, 0.90), (1e-3, 0, 0.99), (1e-3, 1, 0.89)]]
    table = bench.summary(rows)
    assert [(r[2], r[6], r[8]) for r in table] == [(1e-4, 0.90, "yes"), (1e-3, 0.89, "NO")]
