"""Shared fixtures: a seeded Generator per test, layer shapes, tolerance tables."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Property tests: a seeded, bounded run by default (a few seconds, the same examples
# every time); LINCHECK_HYPOTHESIS=long explores 5,000 fresh examples per property.
settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("LINCHECK_HYPOTHESIS", "default"))

# Layer shapes (N, D_in, D_out), including the degenerate ones.
SHAPES = [(1, 1, 1), (1, 5, 3), (4, 1, 3), (4, 5, 1), (7, 3, 7), (6, 6, 6), (32, 64, 16)]

# Relative tolerances of the independent oracles (loops, hand sums) in tests,
# in units of the sum of absolute terms: a float64 k-term sum in a different
# order differs by at most about k·2⁻⁵³ of it, and k ≤ 64 here.
ORACLE_RTOL = {"float64": 64 * 2.0**-53}


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A Generator seeded from the test's name, so every test is reproducible on its own."""
    seed = sum(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def layer(rng, N, D_in, D_out, dtype="float64", batch=None):
    """Random X, W, B, G; X and G get leading dimensions ``batch`` instead of N if given."""
    lead = tuple(batch) if batch is not None else (N,)
    X = rng.standard_normal(lead + (D_in,)).astype(dtype)
    W = rng.standard_normal((D_out, D_in)).astype(dtype)
    B = rng.standard_normal(D_out).astype(dtype)
    G = rng.standard_normal(lead + (D_out,)).astype(dtype)
    return X, W, B, G


def loop_gradients(X, W, G):
    """dX, dW, dB by explicit loops over the index formulas of the derivation."""
    N, D_in = X.shape
    D_out = W.shape[0]
    dX = np.zeros((N, D_in))
    dW = np.zeros((D_out, D_in))
    dB = np.zeros(D_out)
    for n in range(N):
        for j in range(D_in):
            dX[n, j] = sum(G[n, i] * W[i, j] for i in range(D_out))
    for i in range(D_out):
        for j in range(D_in):
            dW[i, j] = sum(G[n, i] * X[n, j] for n in range(N))
        dB[i] = sum(G[n, i] for n in range(N))
    return dX, dW, dB


def loop_forward(X, W, B):
    N, D_in = X.shape
    D_out = W.shape[0]
    Y = np.zeros((N, D_out))
    for n in range(N):
        for i in range(D_out):
            Y[n, i] = sum(X[n, j] * W[i, j] for j in range(D_in)) + (B[i] if B is not None else 0.0)
    return Y


def matmul_in(precision, A, Bm):
    """A @ Bm as a kernel in ``precision`` computes it, simulated with NumPy.

    fp64/fp32/fp16: operands converted to that dtype, NumPy's product (float16
    products accumulate in float32 and round to float16). tf32: operands rounded to
    11-bit significands, float32 product. bf16: operands and result rounded to
    8-bit significands, float32 product.
    """
    from lincheck.precision import BFLOAT16, TF32, round_to

    if precision in ("fp64", "fp32", "fp16"):
        dtype = {"fp64": np.float64, "fp32": np.float32, "fp16": np.float16}[precision]
        return np.asarray(A).astype(dtype) @ np.asarray(Bm).astype(dtype)
    fmt = {"tf32": TF32, "bf16": BFLOAT16}[precision]
    out = round_to(A, fmt).astype(np.float32) @ round_to(Bm, fmt).astype(np.float32)
    return round_to(out, BFLOAT16).astype(np.float32) if precision == "bf16" else out


def compute_in(precision, X, W, G):
    """dX, dW, dB computed in ``precision`` (see :func:`matmul_in`); dX has X's shape."""
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    ones = np.ones((1, G2.shape[0]))
    return {
        "dX": matmul_in(precision, G2, W).reshape(X.shape),
        "dW": matmul_in(precision, G2.T, X2),
        "dB": matmul_in(precision, ones, G2)[0],
    }


def case(folder, rng, N=8, D_in=5, D_out=3, **overrides):
    """A verify folder with correct float64 gradients, then ``overrides`` (None deletes; a
    callable ``fn`` gets the arrays and returns the overrides)."""
    folder.mkdir(parents=True, exist_ok=True)
    X, W, B, G = (rng.standard_normal(s) for s in ((N, D_in), (D_out, D_in), (D_out,), (N, D_out)))
    data = {"X": X, "W": W, "B": B, "dY": G, "dX": G @ W, "dW": G.T @ X, "dB": G.sum(0)}
    data.update(overrides if not callable(overrides.get("fn")) else overrides.pop("fn")(data))
    for name, a in data.items():
        if a is not None:
            np.save(folder / f"{name}.npy", a)
    return data


def mean_bias(data) -> dict:
    """The planted bug of many tests: dB averaged over the batch instead of summed."""
    return {"dB": data["dY"].mean(0)}


# (bug, the hint code that names it, the tensor it is in), planted in tests/torch_layers.py
# and tests/jax_layers.py alike. Square layers, so that a transposed dW keeps its shape
# (torch refuses a gradient of the wrong shape itself).
NAMED_BUGS = [
    ("dB mean", "mean_instead_of_sum", "dB"),
    ("dW transposed", "transposed", "dW"),
    ("dW scaled", "scaled", "dW"),
    ("dX with W transposed", "wrong_operand", "dX"),
]
