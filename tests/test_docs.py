"""The examples in docstrings run and give what they show."""

import doctest

import pytest

import lincheck
from lincheck import api, checks, core, numeric


@pytest.mark.parametrize("module", [lincheck, core, checks, numeric, api], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0
    if module is not numeric:
        assert result.attempted > 0
