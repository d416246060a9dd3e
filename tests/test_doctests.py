"""Every docstring example in the library runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fxgndi

MODULES = sorted(m.name for m in pkgutil.walk_packages(fxgndi.__path__, "fxgndi.")
                 if m.name != "fxgndi.__main__")


def test_every_module_is_listed():
    assert {"fxgndi.fx.intervention", "fxgndi.pruning.depth",
            "fxgndi.gndi.criteria.grasp"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
