"""CS231n-style affine layers (w of shape (D, M), x flattened to (N, D)), for tests/test_layout.py.

The assignments' ``affine_forward(x, w, b)`` returns ``(out, cache)`` and
``affine_backward(dout, cache)`` returns ``(dx, dw, db)`` with dw of w's shape, so
the kernel is stored as (D_in, D_out): ``lincheck run --impl ... --layout in_out``.
They flatten x's trailing dimensions, not its leading ones: the sweep's ``batched``
case is not theirs to pass (``--cases=-batched``).
"""

import numpy as np


def affine_forward(x, w, b):
    out = x.reshape(x.shape[0], -1) @ w + b
    return out, (x, w, b)


def affine_backward(dout, cache):
    x, w, b = cache
    dx = (dout @ w.T).reshape(x.shape)
    dw = x.reshape(x.shape[0], -1).T @ dout
    db = np.sum(dout, axis=0)
    return dx, dw, db


def affine_backward_db_not_summed(dout, cache):
    dx, dw, _ = affine_backward(dout, cache)
    return dx, dw, dout  # the planted bug: db is not summed over the batch


def backward(X, W, B, dY):
    """lincheck's calling convention, fn(X, W, B, dY) -> (dX, dW, dB), around the pair."""
    _, cache = affine_forward(X, W, B)
    return affine_backward(dY, cache)


def backward_db_not_summed(X, W, B, dY):
    _, cache = affine_forward(X, W, B)
    return affine_backward_db_not_summed(dY, cache)


def forward(X, W, B):
    return affine_forward(X, W, B)[0]
