"""benchmarks/repair.py runs end to end on a tiny configuration, on the splits it says."""

from __future__ import annotations

import json

from tests.benchmarks.test_smoke import load


def test_ridge_and_calibration_rows_are_accuracies_on_their_splits(tmp_path, capsys):
    bench = load("repair")
    out = tmp_path / "repair.json"
    rows = bench.main(["--models", "digits-resnet18", "--points", "2", "--samples", "32",
                       "--studies", "ridge", "calibration", "--ridges", "1e-3", "1",
                       "--sizes", "32", "--json", str(out)])
    ridge = [r for r in rows if r["study"] == "ridge"]
    assert [r["setting"] for r in ridge] == ["ridge 0.001", "ridge 1"]
    for r in ridge:  # the train images the calibration did not use: 1347 - 32
        assert r["split"] == "validation" and round(r["accuracy"] * 1315, 6) % 1 == 0
    (calibration,) = [r for r in rows if r["study"] == "calibration"]
    assert calibration["split"] == "test" and round(calibration["accuracy"] * 450, 6) % 1 == 0
    assert 0.5 < calibration["accuracy"] <= 1
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert "ridge:" in capsys.readouterr().out
