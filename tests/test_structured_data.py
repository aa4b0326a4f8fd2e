"""Correct gradients of structured data never fail the statistical tier.

Each case was a false alarm found by an adversarial review of the two tiers: a batch sorted
by class with dY = softmax − onehot (partial sums of one sign for thousands of rows), and an
input feature with one value per class that is not a number of the operand format (its
conversion errors repeat instead of averaging out). Real frameworks where they compute
the case (torch's bfloat16 autocast, JAX's bfloat16 bias reduction), the exact emulator
(tests/emulate.py) for the truncating accumulators of tensor cores.
"""

import numpy as np
import pytest
import test_emulated as te

import lincheck

C = 10  # classes


def sorted_softmax_batch(N: int, D_in: int, seed: int = 0):
    """X ≥ 0 with a column of ones, G = softmax − onehot of a batch sorted by class."""
    rng = np.random.default_rng(seed)
    y = np.sort(rng.integers(0, C, N))
    p = np.exp(rng.normal(size=(N, C)))
    p /= p.sum(1, keepdims=True)
    G = p.copy()
    G[np.arange(N), y] -= 1
    X = np.abs(rng.normal(size=(N, D_in)))
    X[:, 0] = 1.0
    return X, rng.normal(size=(C, D_in)), rng.normal(size=C), G, y, rng


def verdicts(report):
    return {c.tensor: c.verdict for c in report.checks if c.subject == "supplied"}


@pytest.mark.parametrize("spec, N", [("tf32", 20_000), ("fp16", 65_536), ("fp8", 32_768)])
def test_truncating_sums_of_a_sorted_batch(spec, N):
    """Truncation errors share a sign: with partial sums of one sign they add up. The
    statistical tier bounds that bias by the terms' order-weighted sum (it failed at
    Err/tol 2.95 for tf32, 3.1 for fp16, 3.5 for fp8)."""
    X, W, B, G, _, _ = sorted_softmax_batch(N, 4)
    scales = {}
    if spec == "fp8":  # given power-of-two scales: the emulated s · q is exact
        scales = {"X_scale": 2.0**-6, "W_scale": 2.0**-6, "dY_scale": 2.0**-8}
    else:
        fmt = te.em.parse(spec).x
        G, X, W, B = (te.em.convert(a, fmt) for a in (G, X, W, B))
    got = te.em.emulate(X, W, B, G, spec, "sequential", tensors=("dW", "dB"), **scales).cast()
    report = lincheck.check(X, W, B, G, dW=got["dW"], dB=got["dB"], precision=spec, **scales)
    assert "fail" not in verdicts(report).values(), report.checks


def test_a_tensor_sum_starts_rounded_into_a_narrower_accumulator():
    """One float32 dY entering a 14-bit accumulator is rounded on entry (it failed for
    certain at Err/tol 4e11: the entry rounding was not counted for dB)."""
    G = np.array([[1 + 2.0**-20, 1 + 2.0**-21]], dtype=np.float32).astype(np.float64)
    X, W, B = np.ones((1, 3)), np.ones((2, 3)), np.zeros(2)
    got = te.em.emulate(X, W, B, G, "fp32,reduce=14bit/128", "sequential").cast()
    report = lincheck.check(X, W, B, G, dB=got["dB"], precision="fp32,reduce=14bit/128")
    assert verdicts(report) == {"dB": "pass"}


def test_torch_autocast_with_a_feature_of_one_value_per_class():
    """bf16 autocast converts X inside the layer; one feature's value per class is not a
    bfloat16 number, so its conversion error repeats across the class's rows: the exact
    shift of the conversions bounds it (a correct dW failed at Err/tol 1.57)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[test]')")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    X, _, _, G, y, rng = sorted_softmax_batch(65_536, 4)
    X = X.astype(np.float32)
    X[:, 1] = rng.uniform(0.1, 1.0, C)[y]
    G = G.astype(ml_dtypes.bfloat16)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, C)
    x = torch.tensor(X, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.backward(torch.tensor(G.astype(np.float32)).to(torch.bfloat16))
    W, B = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    for mode in ("full", "sample"):
        report = lincheck.check(
            X, W, B, G, dW=layer.weight.grad.numpy(), precision="bf16", mode=mode
        )
        assert verdicts(report) == {"dW": "pass"}, report.checks


def test_jax_bias_reduction_of_a_sorted_batch():
    """XLA reduces a bfloat16 dB in 32-term windows: with a sorted batch its partial sums
    keep one sign, which the tree's own partial sums (not a random-data estimate) bound
    (a correct dB failed at Err/tol 1.12 at N = 8192)."""
    jax = pytest.importorskip("jax", reason="jax is not installed (pip install '.[test]')")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import jax.numpy as jnp

    X, W, B, G, _, _ = sorted_softmax_batch(8192, 4)
    X, W, B, G = (a.astype(ml_dtypes.bfloat16) for a in (X, W, B, G))
    _, vjp = jax.vjp(lambda x, w, b: x @ w.T + b, *(jnp.asarray(a) for a in (X, W, B)))
    dX, dW, dB = (np.asarray(t) for t in vjp(jnp.asarray(G)))
    report = lincheck.check(X, W, B, G, dX=dX, dW=dW, dB=dB)
    assert "fail" not in verdicts(report).values(), report.checks
