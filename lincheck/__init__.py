"""lincheck: check the gradients of a fully connected layer Y = X Wᵀ + B.

>>> import numpy as np, lincheck
>>> rng = np.random.default_rng(0)
>>> X, W, G = rng.normal(size=(8, 5)), rng.normal(size=(3, 5)), rng.normal(size=(8, 3))
>>> lincheck.check(X, W, None, G, dX=G @ W, dW=G.T @ X).passed
True

The names below are imported on first use, so ``lincheck --help`` starts
without importing NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CaseResult": "api",
    "Sweep": "api",
    "assert_backward": "api",
    "assert_gradients": "api",
    "check_backward": "api",
    "check_forward": "api",
    "Layer": "results",
    "Report": "results",
    "TensorCheck": "results",
    "analytic_gradients": "checks",
    "check": "checks",
    "random_inputs": "checks",
    "Hint": "results",
    "InputError": "errors",
    "LincheckError": "errors",
}

__all__ = [
    "CaseResult",
    "Hint",
    "InputError",
    "Layer",
    "LincheckError",
    "Report",
    "Sweep",
    "TensorCheck",
    "analytic_gradients",
    "assert_backward",
    "assert_gradients",
    "check",
    "check_backward",
    "check_forward",
    "random_inputs",
]

if TYPE_CHECKING:
    from .api import (
        CaseResult,
        Sweep,
        assert_backward,
        assert_gradients,
        check_backward,
        check_forward,
    )
    from .checks import analytic_gradients, check, random_inputs
    from .errors import InputError, LincheckError
    from .results import Hint, Layer, Report, TensorCheck


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lincheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
