"""The examples in the library's docstrings run and print what they show."""
import doctest
import importlib
import pkgutil

import pytest

import spam_optax

MODULES = sorted(m.name for m in pkgutil.iter_modules(spam_optax.__path__, "spam_optax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
