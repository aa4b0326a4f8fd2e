"""The fully connected layer and its analytic gradients.

Pure NumPy: arrays in, arrays out. Shapes (the leading batch dimensions of
``torch.nn.Linear`` are flattened by the caller, see :func:`as_batch`)::

    X  (N, D_in)     W  (D_out, D_in)     B  (D_out,)     Y, G  (N, D_out)

Forward, entry by entry and as matrices::

    Y[n, i] = Σ_j X[n, j] W[i, j] + B[i]          Y = X Wᵀ + B

Backward, for any loss L with upstream gradient G = ∂L/∂Y::

    dX[n, j] = Σ_i G[n, i] W[i, j]                 dX = G W
    dW[i, j] = Σ_n G[n, i] X[n, j]                 dW = Gᵀ X
    dB[i]    = Σ_n G[n, i]                         dB = Σₙ G[n]

Each formula is the chain rule with ∂Y[n, i]/∂W[i, j] = X[n, j],
∂Y[n, i]/∂X[n, j] = W[i, j] and ∂Y[n, i]/∂B[i] = 1; every other partial
derivative of Y is zero, which is why each sum has a single index left.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class Gradients(NamedTuple):
    """The three gradients of a linear layer; ``dB`` is None without a bias."""

    dX: np.ndarray
    dW: np.ndarray
    dB: np.ndarray | None


def forward(X: np.ndarray, W: np.ndarray, B: np.ndarray | None) -> np.ndarray:
    """Y = X Wᵀ + B.

    Parameters
    ----------
    X : ndarray, shape (..., N, D_in)
        Inputs. Extra leading axes broadcast, so a stack of perturbed copies of
        ``X`` goes through in one BLAS call.
    W : ndarray, shape (..., D_out, D_in)
    B : ndarray, shape (..., D_out) or None

    Returns
    -------
    Y : ndarray, shape (..., N, D_out)
    """
    Y = X @ np.swapaxes(W, -1, -2)
    if B is None:
        return Y
    B = B[..., None, :]
    if Y.dtype != np.result_type(Y, B) or Y.shape != np.broadcast_shapes(Y.shape, B.shape):
        return Y + B  # B widens the result's type or shape
    Y += B  # in place: the same sums, without a second array of Y's size
    return Y


def backward(X: np.ndarray, W: np.ndarray, G: np.ndarray, bias: bool = True) -> Gradients:
    """Analytic gradients of the layer for the upstream gradient G = ∂L/∂Y.

    Parameters
    ----------
    X : ndarray, shape (N, D_in)
    W : ndarray, shape (D_out, D_in)
    G : ndarray, shape (N, D_out)
    bias : bool
        Whether the layer has a bias (if not, ``dB`` is None).

    Returns
    -------
    Gradients
        ``dX = G W`` (N, D_in), ``dW = Gᵀ X`` (D_out, D_in) and
        ``dB = Σₙ G[n]`` (D_out,), each in the dtype NumPy computes them in.

    Examples
    --------
    >>> X = np.array([[1.0, 2.0]]); W = np.array([[3.0, 4.0]]); G = np.array([[0.5]])
    >>> backward(X, W, G)
    Gradients(dX=array([[1.5, 2. ]]), dW=array([[0.5, 1. ]]), dB=array([0.5]))
    """
    # float16 sums accumulate in float32, as frameworks and tensor cores do (NumPy's own
    # float16 sum over axis 0 adds in float16: docs/numerics.md §2.1).
    acc = np.promote_types(G.dtype, np.float32) if G.dtype == np.float16 else None
    dB = G.sum(axis=0, dtype=acc).astype(G.dtype, copy=False) if bias else None
    return Gradients(G @ W, G.T @ X, dB)


def surrogate_loss(X: np.ndarray, W: np.ndarray, B: np.ndarray | None, G: np.ndarray) -> float:
    """L = Σ_{n,i} G[n, i] · Y[n, i], the scalar whose gradient with respect to Y is G.

    ∂L/∂Y = G exactly, so ∂L/∂X, ∂L/∂W, ∂L/∂B are the gradients that
    :func:`backward` computes, and finite differences of L estimate them
    using forward passes only. L is linear in every single entry of X, W
    and B (each appears in Y to the first power), so a central difference
    of L has no truncation error.
    """
    return float(np.sum(G * forward(X, W, B)))


def as_batch(X: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten leading batch dimensions: X (*, D_in) → (N, D_in), G (*, D_out) → (N, D_out).

    ``torch.nn.Linear`` accepts any number of leading dimensions and treats
    them as one batch of size N = prod(*); the gradients are the same as for
    the flattened layer, and ``dX`` has the shape of ``X``.
    """
    return X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])


class FileBacked:
    """Base of arrays read from a file as they are used (:class:`lincheck.arrays.FileArray`).

    They have ``shape``, ``dtype``, ``ndim``, ``size`` and ``reshape``; a slice of the
    first axis reads just those rows, ``np.asarray`` reads them whole. The checks keep
    them as they are and slice them (:func:`leading_chunks`, ``streaming.Rows``).
    """


CHUNK = 2**18
"""Values a chunked scan of a large array handles at a time (a few MiB per temporary)."""


def leading_chunks(a: np.ndarray) -> Iterator[slice | tuple]:
    """Slices along the first axis of about CHUNK values each (``()`` for a 0-d array).

    Whole-array scans (NaN checks, representability) go a chunk at a time
    so that a memory-mapped file larger than memory needs no temporary of
    its size.
    """
    if a.ndim == 0:
        yield ()
        return
    per_row = max(1, a.size // max(1, a.shape[0]))
    step = max(1, CHUNK // per_row)
    for start in range(0, a.shape[0], step):
        yield slice(start, start + step)
