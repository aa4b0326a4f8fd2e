"""Number formats, precisions and the rounding-error bound of a product."""

import math

import numpy as np
import oracles
import pytest
from conftest import matmul_in

import lincheck
from lincheck import precision
from lincheck.precision import (
    BFLOAT16,
    FLOAT16,
    FLOAT32,
    FLOAT64,
    PRECISIONS,
    TF32,
    Operand,
    gamma,
    precision_for,
    reference_bound,
    representable,
    round_to,
    storage_format,
    subject_bound,
)


def product_error(M, S, k, model, storage, converted, value=0.0, largest=0.0):
    """The bound of a k-term product A @ B under ``model`` (both operands in x's format)."""
    ops = (Operand(model.x, converted), Operand(model.x, converted))
    return subject_bound(model, "dX", k, M, S, value, largest, ops, storage)


def test_round_to_hand_cases():
    one = 1.0
    # tf32 keeps 10 fraction bits: 1 + 2⁻¹¹ is a tie and goes to even (1), 1 + 3·2⁻¹² goes up.
    assert round_to(
        np.array([one + 2.0**-11, one + 3 * 2.0**-12, one + 2.0**-10]), TF32
    ).tolist() == [1.0, 1.0 + 2.0**-10, 1.0 + 2.0**-10]
    # bfloat16 keeps 7: 1 + 2⁻⁸ ties to 1, 1 + 3·2⁻⁹ goes up to 1 + 2⁻⁷.
    assert round_to(np.array([one + 2.0**-8, one + 3 * 2.0**-9]), BFLOAT16).tolist() == [
        1.0,
        1.0 + 2.0**-7,
    ]
    # Below 2⁻¹²⁶ bfloat16's spacing is its smallest subnormal, 2⁻¹³³: 2⁻¹⁴⁰ rounds to 0.
    assert round_to(np.array([-3.0, 0.0, 2.0**-140, 2.0**-133]), BFLOAT16).tolist() == [
        -3.0,
        0.0,
        0.0,
        2.0**-133,
    ]
    assert round_to(np.array([0.1]), FLOAT32)[0] == float(np.float32(0.1))


def test_representable():
    assert representable(np.array([0.5, 2.0]), BFLOAT16)
    assert not representable(np.array([0.1]), FLOAT32)
    assert representable(np.array([0.1], dtype=np.float16), TF32)  # float16 fits in tf32
    assert not representable(np.array([0.1], dtype=np.float32), TF32)
    assert representable(np.array([1e6], dtype=np.float32), FLOAT64)
    assert not representable(np.array([1e6]), FLOAT16)  # beyond float16's range
    assert representable(np.array([True, False]), FLOAT16)
    assert representable(np.array([2**40], dtype=np.int64), FLOAT64)
    assert not representable(np.array([2**53 + 1], dtype=np.int64), FLOAT64)


def test_precision_for_dtype_and_storage():
    assert precision_for(np.float32).name == "fp32"
    assert precision_for(np.float16).name == "fp16"
    assert precision_for(np.int8).name == "fp64"
    assert precision_for(np.dtype("bfloat16") if hasattr(np, "bfloat16") else np.float64)
    assert storage_format(np.float16) is FLOAT16 and storage_format(np.int32) is FLOAT64


def test_gamma():
    assert gamma(1, 2.0**-53) == pytest.approx(2.0**-53)
    assert gamma(10, 0.01) == pytest.approx(0.1 / 0.9)
    assert gamma(100, 0.01) == math.inf


@pytest.mark.parametrize("precision", ["fp64", "fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("k", [1, 7, 64, 300])
@pytest.mark.parametrize("rounded", [False, True], ids=["exact-operands", "rounded-operands"])
def test_product_error_holds_for_each_precision(rng, precision, k, rounded):
    """Each simulated kernel lands within the bound of every entry, and the bound is tight-ish."""
    G, W = rng.standard_normal((20, k)), rng.standard_normal((k, 9))
    if not rounded:  # operands already in the operand format
        fmt = PRECISIONS[precision].x
        G, W = round_to(G, fmt), round_to(W, fmt)
    exact = G @ W  # float64; its own error is far below every bound here but fp64's
    M = np.abs(G) @ np.abs(W)
    S = np.abs(G).sum(1)[:, None] + np.abs(W).sum(0)[None, :]
    got = matmul_in(precision, G, W)
    p = PRECISIONS[precision]
    largest = np.outer(np.abs(G).max(1), np.abs(W).max(0))
    bound = product_error(M, S, k, p, storage_format(got.dtype), rounded, np.abs(exact), largest)
    ref = reference_bound(M, S, k)
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound.worst + ref.worst)
    assert np.all(err <= bound.statistical + ref.worst)  # random data: within the statistical tier
    assert np.all(bound.statistical <= bound.worst)
    # Not vacuous: within a few hundred times the typical scale of the errors seen (or
    # only underflow's: one tf32 product is exact in a float32 sum).
    assert np.max(bound.worst / M) < max(1e3 * np.max(bound.typical / M), 1e-30)


def test_float16_operands_that_underflow_are_covered(rng):
    """Values near float16's subnormal range lose absolute, not relative, accuracy when rounded."""
    G = rng.standard_normal((6, 5)) * 1e-6
    W = rng.standard_normal((5, 4)) * 1e-2
    exact = G @ W
    got = G.astype(np.float16).astype(np.float32) @ W.astype(np.float16).astype(np.float32)
    got = got.astype(np.float16).astype(np.float64)
    M = np.abs(G) @ np.abs(W)
    S = np.abs(G).sum(1)[:, None] + np.abs(W).sum(0)[None, :]
    bound = product_error(M, S, 5, PRECISIONS["fp16"], FLOAT16, True, np.abs(exact))
    assert np.all(np.abs(got - exact) <= bound.worst)
    assert np.any(np.abs(got - exact) > gamma(7, FLOAT16.u) * M)  # the relative model alone fails


def test_narrower_storage_adds_a_rounding():
    M = np.array([1.0])
    as32 = product_error(M, 0.0, 4, PRECISIONS["fp32"], FLOAT32, False).worst[0]
    as16 = product_error(M, 0.0, 4, PRECISIONS["fp32"], FLOAT16, False).worst[0]
    assert as16 == pytest.approx(as32 + FLOAT16.u, rel=1e-2)
    wider = product_error(M, 0.0, 4, PRECISIONS["fp32"], FLOAT64, False).worst[0]
    assert wider == as32


def test_magnitude_sums_match_their_definition(rng):
    """S holds, per operand, the other operand's absolute sum over an entry's terms."""
    X, W, B, G = (rng.standard_normal(s) for s in ((5, 4), (3, 4), (3,), (5, 3)))
    mags = oracles.Magnitudes.of(X, W, B, G)
    n, j, i = 2, 1, 0
    S_G, S_W = (np.broadcast_to(x, (5, 4)) for x in mags.sums["dX"])  # dX = G W
    assert S_G[n, j] == pytest.approx(np.abs(W[:, j]).sum())
    assert S_W[n, j] == pytest.approx(np.abs(G[n]).sum())
    S_G, S_X = (np.broadcast_to(x, (3, 4)) for x in mags.sums["dW"])  # dW = Gᵀ X
    assert S_G[i, j] == pytest.approx(np.abs(X[:, j]).sum())
    assert S_X[i, j] == pytest.approx(np.abs(G[:, i]).sum())
    S_X, S_W = (np.broadcast_to(x, (5, 3)) for x in mags.sums["Y"])  # Y = X Wᵀ + B
    assert S_X[n, i] == pytest.approx(np.abs(W[i]).sum())
    assert S_W[n, i] == pytest.approx(np.abs(X[n]).sum())
    assert mags.sums["dB"] == (5.0,)


def test_an_operand_that_underflows_moves_products_by_the_other_operand(rng):
    """fp8 X near 1e3 with W near 1e-3: X's scale is large, W's small; the underflow of each
    is weighed by the other's sum, so a correct Y is conclusive (it was not: the larger
    η·s times both sums gave a tolerance of 86 where |Y| ≤ 5.4)."""
    from lincheck.precision import E4M3, parse

    X = rng.standard_normal((32, 64)) * 1e3
    W = rng.standard_normal((16, 64)) * 1e-3
    s_X, s_W = np.abs(X).max() / 448, np.abs(W).max() / 448
    ops = (Operand(E4M3, True, s_X), Operand(E4M3, True, s_W))
    M = np.abs(X) @ np.abs(W).T
    S = (np.abs(W).sum(1)[None, :], np.abs(X).sum(1)[:, None])
    b = subject_bound(parse("fp8"), "Y", 64, M, S, np.abs(X @ W.T), M, ops, FLOAT32)
    under = s_X * E4M3.eta * S[0] + s_W * E4M3.eta * S[1]
    assert np.all(b.worst >= under)
    assert np.all(b.worst <= 0.2 * M + 2 * under)


def _bf16_bits(a):
    """bfloat16 by its definition: the top 16 bits of float32, rounded to nearest even."""
    b = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def _tf32_bits(a):
    """TF32 as float32 with the low 13 significand bits rounded off (nearest even)."""
    b = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0xFFF + ((b >> 13) & 1)) >> 13) << 13).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize(
    "fmt, oracle", [(precision.BFLOAT16, _bf16_bits), (precision.TF32, _tf32_bits)]
)
def test_round_to_matches_the_formats_bit_definition_subnormals_included(rng, fmt, oracle):
    """Every finite float32, normal or subnormal (below 2⁻¹²⁶ the spacing is fixed at the
    format's η: 2⁻¹⁴⁰ is no bfloat16 number), rounds as the hardware format defines."""
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    bits[:50_000] &= 0x807FFFFF  # a quarter subnormal (exponent field 0)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 3.0e38)]  # far from overflow in the narrow format
    got = precision.round_to(x, fmt)
    want = oracle(x).astype(np.float64)
    assert np.array_equal(got, want)


def test_subnormal_operands_that_the_format_cannot_hold_are_bounded(rng):
    """Inputs that are bfloat16 numbers except for float32 subnormals (±2⁻¹⁴⁰): TF32 and
    bf16 kernels flush or round them, and the bound must say so (it did not: Err/tol 149)."""
    N, D_in, D_out = 16, 8, 4
    G = _bf16_bits(rng.standard_normal((N, D_out)))
    W = _bf16_bits(rng.standard_normal((D_out, D_in)))
    X = (rng.choice([-1.0, 1.0], size=(N, D_in)) * 2.0**-140).astype(np.float32)
    X[:, :2] = _bf16_bits(rng.standard_normal((N, 2)))
    for name, q in (("bf16", _bf16_bits), ("tf32", _tf32_bits)):
        dW = q(G).T @ q(X)  # float32 accumulation of the converted operands
        if name == "bf16":
            dW = _bf16_bits(dW)
        report = lincheck.check(X, W, None, G, dW=dW, precision=name)
        (check,) = [c for c in report.checks if c.tensor == "dW" and c.subject == "supplied"]
        assert check.passed, (name, check.bound_ratio)


def test_mx32_conversions_clamp_to_the_largest_value(rng):
    """Under mx32's power-of-two scale a block's amax can reach 511·s, beyond e4m3's 448:
    MX clamps (OCP Microscaling v1.0). The clamped kernel's correct dW is not a failure
    (it was "inconclusive: beyond the format's range"), and the clamp is in the bound."""
    from lincheck.precision import E4M3
    from lincheck.scaling import expand, recipe

    X = rng.standard_normal((64, 64))
    X[0, 0] = 460.0  # its block's scale is 1: q = 460 clamps to 448, 2.6% off
    W, G = rng.standard_normal((16, 64)), rng.standard_normal((64, 16))
    s = expand(recipe(X, "mx32", "X", E4M3), "mx32", "X", X.shape)
    assert s[0, 0] == 1.0
    X_hat = s * np.clip(round_to(X / s, E4M3), -448, 448)
    dW = round_to(G.T @ X_hat, BFLOAT16)
    report = lincheck.check(X, W, None, G, dW=dW, precision="fp8,scale=mx32")
    assert report.passed, report.checks
    dW[0, 0] = -dW[0, 0]
    assert not lincheck.check(X, W, None, G, dW=dW, precision="fp8,scale=mx32").passed


def test_mx32_scale_is_exact_below_a_power_of_two():
    """⌊log₂ amax⌋ from frexp: amax just under 8 has exponent 2, not 3 (log2 rounds up)."""
    from lincheck.precision import E4M3
    from lincheck.scaling import recipe

    amax = 8.0 * (1 - 2.0**-53)
    assert recipe(np.full((1, 32), amax), "mx32", "X", E4M3)[0, 0] == 2.0 ** (2 - 8)


def test_the_rule_names_the_accumulator_of_the_tensor():
    """dB's rule names its own reduction (bf16's window of 32), not the matmuls' accumulator."""
    model = PRECISIONS["bf16"]
    ops = (Operand(BFLOAT16, False),)
    rule = subject_bound(model, "dB", 64, np.ones(1), 64.0, 0.0, 1.0, ops, BFLOAT16).rule
    assert "sums in bf16/32" in rule and "fp32-rz" not in rule
    assert "sums in fp32-rz" in product_error(np.ones(1), 0.0, 4, model, BFLOAT16, False).rule


@pytest.mark.parametrize(
    "X, W, G",
    [
        ([[0.65]], [[1.33]], [[-1.27e30]]),  # one term per entry
        ([[0.65], [0.5]], [[1.33]], [[-1.27e30], [0.0]]),  # a zero row of dY
        ([[1.0], [1.0]], [[1.0]], [[1e30], [-1e30]]),  # dW and dB cancel to exactly 0
    ],
)
def test_an_operand_beyond_the_format_bounds_nothing_even_where_it_meets_a_zero(X, W, G):
    """dY beyond fp16's range under an fp16 model: the conversion's error is unbounded, so
    no tolerance bounds anything, and correct gradients (exact here: products of small
    integers and powers of two times 1e30 are exact in float32 or cancel) are inconclusive,
    never failed: an unbounded factor times a zero magnitude, value or spread is still
    unbounded, not a tolerance no error is within."""
    X, W, G = (np.asarray(a, dtype=np.float32) for a in (X, W, G))
    B = np.zeros(W.shape[0], dtype=np.float32)
    dX, dW, dB = G.astype(np.float64) @ W, G.T.astype(np.float64) @ X, G.astype(np.float64).sum(0)
    report = lincheck.check(X, W, B, G, dX=dX, dW=dW, dB=dB, precision="fp16")
    supplied = [c for c in report.checks if c.subject == "supplied"]
    assert {c.tensor for c in supplied} == {"dX", "dW", "dB"}
    for c in supplied:
        assert c.verdict == "inconclusive", (c.tensor, c.verdict, c.tolerance)
        assert c.tolerance == math.inf
