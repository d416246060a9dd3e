"""Every docstring example in the library runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["graph", "sites", "streams", "baselines", "scores", "runtime", "estimate", "report",
           "validate", "cost", "data", "models", "compensate", "criteria"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"fxgndi.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
