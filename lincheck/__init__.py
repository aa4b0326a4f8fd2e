"""lincheck: check the gradients of a fully connected layer Y = X Wᵀ + B.

>>> import numpy as np, lincheck
>>> rng = np.random.default_rng(0)
>>> X, W, G = rng.normal(size=(8, 5)), rng.normal(size=(3, 5)), rng.normal(size=(8, 3))
>>> lincheck.check(X, W, None, G, dX=G @ W, dW=G.T @ X).passed
True
"""

from .api import CaseResult, Sweep, assert_gradients, check_backward, check_forward
from .checks import Layer, Report, TensorCheck, analytic_gradients, check, random_inputs
from .diagnose import Hint
from .errors import InputError, LincheckError

__version__ = "0.1.0"

__all__ = [
    "CaseResult",
    "Sweep",
    "assert_gradients",
    "check_backward",
    "check_forward",
    "Hint",
    "InputError",
    "Layer",
    "LincheckError",
    "Report",
    "TensorCheck",
    "analytic_gradients",
    "check",
    "random_inputs",
]
