"""The examples in docstrings run and give what they show."""

import doctest

import pytest

import lincheck
from lincheck import api, bounds, checks, core, streaming, tally, witness, workspace

WITH_EXAMPLES = [lincheck, core, checks, api]


@pytest.mark.parametrize(
    "module",
    [*WITH_EXAMPLES, bounds, streaming, tally, witness, workspace],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0
    if module in WITH_EXAMPLES:
        assert result.attempted > 0


def test_the_package_exports_what_it_lists_and_imports_lazily():
    import subprocess
    import sys

    assert sorted(lincheck.__all__) == sorted(lincheck._EXPORTS)
    for name in lincheck.__all__:
        assert getattr(lincheck, name) is not None
    # `lincheck --help` needs neither NumPy nor the checking code.
    code = (
        "import sys, lincheck.cli; print('numpy' in sys.modules, 'lincheck.checks' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
