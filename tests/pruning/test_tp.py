"""torch-pruning's internals are reached through fxgndi/pruning/_tp.py only."""

from __future__ import annotations

import pathlib
import re

import torch_pruning as tp

from fxgndi.pruning import _tp

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "fxgndi"
PRIVATE = re.compile(r"\._DG\b|\bmodule2node\b|\._normalize\(|is_(in|out)_channel_pruning_fn")


def test_private_api_is_used_in_tp_py_only():
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if PRIVATE.search(p.read_text()))
    assert users == ["pruning/_tp.py"]


def test_version_check():
    assert _tp.tested_version(tp.__version__)
    assert _tp.tested_version("1.5.2") and not _tp.tested_version("0.9") \
        and not _tp.tested_version("banana")


def test_missing_internal_names_itself():
    class Stub:
        pass

    try:
        _tp.graph_of(Stub())
    except RuntimeError as exc:
        assert "Stub._DG" in str(exc) and "torch-pruning" in str(exc)
    else:
        raise AssertionError("no error")
