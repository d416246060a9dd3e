"""The README's demo tables are the demo's last run: README.md quotes docs/demo.md verbatim,
docs/demo.md has the layout the demo writes now, and `fxgndi demo` keeps what it makes in its
output folder."""

from __future__ import annotations

import importlib.util
import pathlib
import re
from types import SimpleNamespace

import numpy as np
import pytest

from fxgndi.app import demo
from fxgndi.gndi.scores import Scores
from fxgndi.gndi.validate import Agreement

ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKED = re.compile(r"<!-- demo:([\w-]+) -->\n(.*?)\n<!-- /demo:\1 -->", re.S)


def _blocks(path: pathlib.Path) -> dict[str, str]:
    return dict(MARKED.findall(path.read_text()))


def test_the_readme_quotes_the_demo_record_verbatim():
    readme, record = _blocks(ROOT / "README.md"), _blocks(ROOT / "docs" / "demo.md")
    assert {"layer", "channel"} <= set(readme), "README.md lost its demo blocks"
    for name, text in readme.items():
        assert name in record, f"README block {name!r} is not in docs/demo.md"
        assert text == record[name], (f"README block {name!r} differs from docs/demo.md: run "
                                      "make demo (it rewrites both)")


def _header_lines(text: str) -> list[str]:
    """The header row of every markdown table in ``text``, without its padding."""
    lines = text.splitlines()
    return [" ".join(lines[i].split()) for i in range(len(lines) - 1)
            if lines[i].startswith("|") and lines[i + 1].startswith("|--")]


def _fake_study() -> dict:
    def scores(values):
        return Scores([(f"l{i}", None) for i in range(len(values))], np.array(values, float),
                      np.zeros(len(values)), 4, importance="gndi")
    study = {"estimates": {"G-NDI first order (logits)": scores([1, 2]),
                           "G-NDI path m=4 (logits)": scores([1, 3])},
             "truths": {"logit_l2": scores([1, 2]), "accuracy": scores([0.1, 0.2])},
             "steps": 4}
    study["rows"] = [{"method": m, "spearman_logit_l2": 1.0, "spearman_accuracy": 1.0,
                      "kendall_accuracy": 1.0, "seconds": 1.0, "forward_equivalents": 1.0}
                     for m in ("G-NDI first order (logits)", "G-NDI path m=4 (logits)",
                               "exact ablation (logit_l2)")]
    return study


def _fake_report(baseline: str) -> SimpleNamespace:
    results = [Agreement(name, 0.5, 0.5, (0.4, 0.6), 0.4, 1.0, 1.0, 0.5, 3)
               for name in demo.DEMO_CHANNEL_IMPORTANCES]
    return SimpleNamespace(results=results, settings={"baseline": baseline},
                           table=lambda: "| full |\n|--|", plot=lambda path: None)


def _fake_pruning() -> list[dict]:
    return [{"method": "depth", "macs_removed": 0.5, "params_removed": 0.5,
             "test_accuracy": 0.5, "test_accuracy_bn_recalibrated": 0.9,
             "test_accuracy_repaired": 0.92, "test_accuracy_finetuned": 0.95}]


def test_docs_demo_md_has_the_layout_the_demo_writes_now():
    """A change of the demo's tables without a new run fails here: every block's table
    headers are the ones the formatters produce today."""
    record = _blocks(ROOT / "docs" / "demo.md")
    assert list(record) == list(demo.BLOCKS)
    study, reports = _fake_study(), {b: _fake_report(b) for b in ("channel-mean", "zero")}
    expected = {
        "layer": demo.format_agreement(study, cost=False),
        "layer-values": demo.format_layer_values(study),
        "channel": demo.channel_summary(reports),
        "channel-mean": demo.format_validity(reports["channel-mean"]),
        "channel-zero": demo.format_validity(reports["zero"]),
        "pruning": demo.format_pruning(_fake_pruning()),
    }
    for name, table in expected.items():
        if name == "layer-values":  # its columns are the methods; its rows, the sites
            assert _header_lines(record[name])[0].startswith("| site | G-NDI first order")
            continue
        assert _header_lines(record[name]) == _header_lines(table), name
        assert "torch " in record[name] and "seconds" not in record[name]


def _quote_script():
    spec = importlib.util.spec_from_file_location("quote_demo", ROOT / "scripts" /
                                                  "quote_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quote_replaces_each_readme_block_by_the_records_and_nothing_else():
    quote = _quote_script().quote
    record = ("<!-- demo:a -->\nnew a\n<!-- /demo:a -->\n"
              "<!-- demo:b -->\nnew b\n| x |\n<!-- /demo:b -->\n")
    readme = ("intro\n<!-- demo:b -->\nold b\n<!-- /demo:b -->\nmiddle 0.800\n"
              "<!-- demo:a -->\nold\na\n<!-- /demo:a -->\nend\n")
    assert quote(record, readme) == ("intro\n<!-- demo:b -->\nnew b\n| x |\n<!-- /demo:b -->\n"
                                     "middle 0.800\n<!-- demo:a -->\nnew a\n<!-- /demo:a -->\n"
                                     "end\n")
    with pytest.raises(SystemExit, match="README block.* c "):
        quote(record, "<!-- demo:c -->\nx\n<!-- /demo:c -->")


def test_the_demo_keeps_its_artifacts_in_the_output_folder(tmp_path, monkeypatch):
    """The demo's wiring, with its studies replaced by quick fakes: the folder holds
    demo.md (the recorded blocks), demo.txt (what it printed) and the exports."""
    import torch
    study = _fake_study()
    monkeypatch.setattr(demo, "digits_resnet18", lambda progress: torch.nn.Identity())
    monkeypatch.setattr(demo, "evaluate", lambda model, data: {"accuracy": 0.9})
    monkeypatch.setattr(demo, "layer_study", lambda model, data, progress: study)
    monkeypatch.setattr(demo, "validate", lambda *a, baseline, **k: _fake_report(baseline))
    monkeypatch.setattr(demo, "pruning_study", lambda *a, **k: (
        _fake_pruning(), {"depth: 2 blocks": torch.nn.Identity()}))

    def fake_speed(model, pruned, example, folder):
        for name, _ in pruned.values():
            (pathlib.Path(folder) / f"{name}.pt2").write_text("model")
        return [], SimpleNamespace(table=lambda: "| speed |", plot=lambda path: None)

    monkeypatch.setattr(demo, "speed_study", fake_speed)
    monkeypatch.setattr(demo, "_has_matplotlib", lambda: False)
    printed: list[str] = []
    out = tmp_path / "nested" / "demo-out"
    result = demo.run_demo(out=out, progress=False, print_fn=printed.append)
    assert result["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["demo.md", "demo.txt", "depth.pt2"]
    assert list(_blocks(out / "demo.md")) == list(demo.BLOCKS)
    assert (out / "demo.txt").read_text() == "\n".join(printed) + "\n"
    assert printed[-1].startswith(f"\nKept in {out}/: demo.md, demo.txt, depth.pt2")


def test_cli_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    from fxgndi.app.cli import main
    path = tmp_path / "a-file"
    path.write_text("")
    assert main(["demo", "--out", str(path), "--quiet"]) == 1
    assert "is a file" in capsys.readouterr().err
