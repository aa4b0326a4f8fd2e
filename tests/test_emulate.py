"""The emulated kernels (tests/emulate.py) against independent oracles.

Oracles: NumPy's and ml_dtypes' own conversions and arithmetic (float32, float16,
bfloat16 adds), float32 bit masks for tf32, the ml_dtypes bit layouts for truncation,
exact rational arithmetic (fractions.Fraction) for every accumulator and order, and
hand-worked cases.
"""

from __future__ import annotations

import math
from fractions import Fraction

import emulate as em
import ml_dtypes
import numpy as np
import pytest

RN_FORMATS = ["fp32", "bf16", "fp16", "e4m3", "e5m2"]


def wide_values(rng, n, lo=-30, hi=30):
    """Random values over many binades, both signs, with exact midpoints and their neighbours."""
    x = rng.standard_normal(n) * np.exp2(rng.uniform(lo, hi, n))
    return x


def midpoints(fmt: str, rng, n=4000):
    """Values exactly halfway between neighbours of ``fmt``, and one float64 ulp either side."""
    f = em.FORMATS[fmt]
    top = min(f.max, 2.0**20)
    grid = em.round_bits(rng.uniform(-top, top, n), f.p, f.emin, "rz", f.max)
    m, e = np.frexp(grid)
    ulp = np.ldexp(1.0, np.maximum(e - 1, f.emin) - f.p + 1)
    mid = grid + np.copysign(ulp / 2, grid)
    return np.concatenate([mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf)])


@pytest.mark.parametrize("fmt", RN_FORMATS)
def test_round_bits_rn_matches_numpy_and_ml_dtypes(fmt, rng):
    f = em.FORMATS[fmt]
    x = np.concatenate([wide_values(rng, 20000), midpoints(fmt, rng), [0.0, -0.0]])
    x = x[np.abs(x) < f.max]  # overflow: e4m3fn has no infinity (NaN), the others do
    with np.errstate(over="ignore"):
        want = x.astype(f.dtype).astype(np.float64)
    got = em.round_bits(x, f.p, f.emin, "rn", f.max)
    ok = np.isfinite(want)
    np.testing.assert_array_equal(got[ok], want[ok])
    assert np.all(np.isinf(got[~ok]))


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "e4m3", "e5m2", "fp32"])
def test_rz_is_the_largest_magnitude_value_not_beyond(fmt, rng):
    # Oracle: the format's own bit layout. Stepping the stored pattern up by one moves away
    # from zero to the next value; rz(x) must be a value, no farther from 0 than x, and
    # the next value away from 0 must be beyond x.
    f = em.FORMATS[fmt]
    x = np.concatenate([wide_values(rng, 20000, -20, 20), midpoints(fmt, rng)])
    x = x[np.abs(x) <= f.max]
    r = em.convert(x, fmt, "rz")
    stored = r.astype(f.dtype)
    np.testing.assert_array_equal(stored.astype(np.float64), r)
    assert np.all(np.abs(r) <= np.abs(x))
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32}[f.dtype.itemsize]
    up = (stored.view(uint) + 1).view(f.dtype).astype(np.float64)
    below_max = np.abs(r) < f.max
    assert np.all(np.abs(up[below_max]) > np.abs(x[below_max]))
    assert np.all(np.sign(r[r != 0]) == np.sign(x[r != 0]))


@pytest.mark.parametrize("mode", ["rn", "rz"])
def test_tf32_matches_float32_bit_masks(mode, rng):
    # tf32 keeps float32's sign and exponent and the top 10 of its 23 fraction bits.
    x = wide_values(rng, 50000).astype(np.float32)
    x = np.concatenate([x, midpoints("tf32", rng).astype(np.float32)])
    u = x.view(np.uint32)
    if mode == "rz":
        want = u & np.uint32(0xFFFFE000)
    else:
        want = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(
            0xFFFFE000
        )
    want = want.view(np.float32).astype(np.float64)
    np.testing.assert_array_equal(em.convert(x, "tf32", mode), want)


def test_conversion_hand_cases():
    # bf16: 1 + 2⁻⁸ is a tie (to even: 1); rz cuts just below 1 + 2⁻⁷ to 1, either sign.
    assert em.convert([1 + 2.0**-8, 1 + 3 * 2.0**-9], "bf16").tolist() == [1.0, 1 + 2.0**-7]
    assert em.convert(
        [1 + 2.0**-7 - 2.0**-20, -(1 + 2.0**-7 - 2.0**-20)], "bf16", "rz"
    ).tolist() == [
        1.0,
        -1.0,
    ]
    # e4m3: 3 fraction bits, max 448, smallest subnormal 2⁻⁹; rz saturates at 448.
    assert em.convert([1.0625, 1.0626, 2.0**-10, 2.0**-10 + 2.0**-30, 460.0], "e4m3").tolist() == [
        1.0,
        1.125,
        0.0,
        2.0**-9,
        448.0,
    ]
    assert em.convert([1.124, 1000.0, -(2.0**-9) * 1.9], "e4m3", "rz").tolist() == [
        1.0,
        448.0,
        -(2.0**-9),
    ]
    # e5m2: 2 fraction bits; fp16: subnormal spacing 2⁻²⁴.
    assert em.convert([1.125, 1.126, 57344.0], "e5m2").tolist() == [1.0, 1.25, 57344.0]
    assert em.convert([2.0**-25, 3 * 2.0**-26], "fp16").tolist() == [0.0, 2.0**-24]


def test_sigbits_and_quantum():
    assert em.sigbits([1.0, 3.0, 0.75, 0.0]) == 2
    assert em.sigbits([1 + 2.0**-52]) == 53
    assert em.quantum([3.0, 0.75, 0.0]) == 0.25
    assert em.quantum([0.0]) == math.inf


# ---------------------------------------------------------------------------
# Accumulators and orders against exact rational arithmetic


def fr_round(v: Fraction, p: int, mode: str, emin: int = -100000) -> Fraction:
    """v rounded to p bits (smallest normal 2^emin) in exact arithmetic."""
    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, emin) - p + 1)
    n, rem = divmod(a, quantum)
    if mode == "rn" and (rem > quantum / 2 or (rem == quantum / 2 and n % 2)):
        n += 1
    return (-1 if v < 0 else 1) * n * quantum


ACC_BITS = {"fp32": (24, "rn", -126), "fp32-rz": (24, "rz", -126), "bf16": (8, "rn", -126)}
ACC_BITS["fp16"] = (11, "rn", -14)


def fr_acc(acc: str):
    if acc == "fp64":
        return lambda v: Fraction(float(v))
    if "bit/" in acc:
        bits = int(acc.split("bit/")[0])
        return lambda v: fr_round(v, bits, "rz")
    p, mode, emin = ACC_BITS[acc]
    return lambda v: fr_round(v, p, mode, emin)


def fr_sum(terms: list[Fraction], rnd, order: str, rng) -> Fraction:
    """The same order's tree, summed in exact arithmetic, each partial sum rounded by rnd.

    A sequential sum adds each exact term into the accumulator (a fused multiply-add); a
    tree holds its leaves in the accumulator's format first.
    """
    if order == "sequential":
        a = rnd(terms[0])
        for t in terms[1:]:
            a = rnd(a + t)
        return a
    if order == "blocked":
        blocks = [terms[i : i + em.BLOCK] for i in range(0, len(terms), em.BLOCK)]
        return fr_sum([fr_sum(b, rnd, "sequential", rng) for b in blocks], rnd, "sequential", rng)
    nodes = [rnd(t) for t in terms]
    while len(nodes) > 1:
        if order == "tree":
            nodes = [nodes[i] for i in rng.permutation(len(nodes))]
        pairs = [rnd(nodes[i] + nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        nodes = pairs + nodes[len(nodes) - len(nodes) % 2 :]
    return nodes[0]


def bf16_products(rng, k, E, spread=6):
    a = em.convert(
        rng.standard_normal((k, E)) * np.exp2(rng.integers(-spread, spread, (k, E))), "bf16"
    )
    b = em.convert(rng.standard_normal((k, E)), "bf16")
    return a * b  # 16 bits: exact


@pytest.mark.parametrize("order", em.ORDERS)
@pytest.mark.parametrize(
    "acc", ["fp64", "fp32", "fp32-rz", "bf16", "fp16", "14bit/8", "6bit/5", "bf16/4", "fp16/7"]
)
def test_sum_terms_matches_exact_rational_rounding(acc, order, rng):
    k, E = 45, 3
    T = bf16_products(rng, k, E)
    if acc == "fp64":  # float64 addition of fp64 values: make them need all 53 bits
        T = T * (1 + rng.uniform(0, 1, T.shape))
    got = em.sum_terms(T, acc, order, np.random.default_rng(7))
    for j in range(E):
        # The random tree's pairings are drawn per level, shared by all entries (and chunks):
        # a fresh Generator with the same seed replays them for each.
        terms = [Fraction(float(t)) for t in T[:, j]]
        if "bit/" in acc:
            K = int(acc.split("/")[1])
            chunks = [terms[i : i + K] for i in range(0, k, K)]
            chunks[-1] += [Fraction(0)] * (K - len(chunks[-1]))
            part = [fr_sum(c, fr_acc(acc), order, np.random.default_rng(7)) for c in chunks]
            want = fr_sum(part, fr_acc("fp32"), "sequential", None)
        elif "/" in acc:
            # windows of K consecutive terms, level on level (zero-padded, as the emulator)
            # (a random tree's draws: one set per level, shared by its windows)
            fmt, K = acc.split("/")
            level, K, shared = terms, int(K), np.random.default_rng(7)
            while len(level) > 1:
                size = min(K, len(level))
                level = level + [Fraction(0)] * (-len(level) % size)
                start, sums = shared.bit_generator.state, []
                for i in range(0, len(level), size):
                    shared.bit_generator.state = start
                    sums.append(fr_sum(level[i : i + size], fr_acc(fmt), order, shared))
                level = sums
            want = level[0]
        else:
            want = fr_sum(terms, fr_acc(acc), order, np.random.default_rng(7))
        assert got[j] == float(want), (j, got[j], float(want))


def test_sequential_fp32_matches_numpy_float32():
    rng = np.random.default_rng(11)
    T = bf16_products(rng, 3000, 8, spread=12)  # exact in float32
    want = np.add.accumulate(T.astype(np.float32), axis=0)[-1]
    np.testing.assert_array_equal(em.sum_terms(T, "fp32"), want.astype(np.float64))


def test_sequential_bf16_and_fp16_match_ml_dtypes_and_numpy():
    rng = np.random.default_rng(12)
    T = em.convert(rng.standard_normal((500, 16)) * 10, "bf16")
    a = T[0].astype(ml_dtypes.bfloat16)
    for t in T[1:].astype(ml_dtypes.bfloat16):
        a = a + t
    np.testing.assert_array_equal(em.sum_terms(T, "bf16"), a.astype(np.float64))
    T = em.convert(rng.standard_normal((500, 16)) * 10, "fp16")
    h = T[0].astype(np.float16)
    for t in T[1:].astype(np.float16):
        h = h + t
    np.testing.assert_array_equal(em.sum_terms(T, "fp16"), h.astype(np.float64))


def test_fp32_rz_hand_cases():
    one = 1.0
    T = np.array(
        [
            [one, one, -one, 2.0**24],
            [3 * 2.0**-25, -(2.0**-30), -3 * 2.0**-25, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    # 1 + 1.5·2⁻²⁴ truncates to 1 (RN: 1 + 2⁻²³); 1 − 2⁻³⁰ to 1 − 2⁻²⁴ (RN: 1); the sign is
    # kept; 2²⁴ + 1 + 1 stays 2²⁴ (each +1 is cut; RN: ties to even, also 2²⁴).
    assert em.sum_terms(T, "fp32-rz").tolist() == [one, one - 2.0**-24, -one, 2.0**24]
    assert em.sum_terms(T, "fp32").tolist() == [one + 2.0**-23, one, -one - 2.0**-23, 2.0**24]
    # In a pairwise tree 1 + 1 = 2 first, then 2 + 2²⁴ is exact.
    assert em.sum_terms(T[[1, 2, 0]], "fp32-rz", "pairwise")[3] == 2.0**24 + 2


def test_14bit_128_hand_case():
    # 2¹³ then 255 × 0.75: in a 14-bit truncating accumulator the first chunk's 0.75s are cut
    # (2¹³ + 0.75 → 2¹³: one unit in the last place is 1), the second chunk's 128 × 0.75 = 96
    # is exact; both chunks go into fp32: 8288 (exact sum 8383.25; fp32 alone: 8383.25).
    T = np.array([2.0**13] + [0.75] * 255)
    assert em.sum_terms(T, "14bit/128")[0] == 8288.0
    assert em.sum_terms(T, "fp32")[0] == 8383.25
    # Three chunks, the last of one term: 8288 + 0.75 in fp32.
    assert em.sum_terms(np.append(T, 0.75), "14bit/128")[0] == 8288.75


def test_round_to_odd_sum_against_fractions(rng):
    a = rng.standard_normal(5000)
    t = rng.standard_normal(5000) * np.exp2(rng.integers(-60, 60, 5000))
    ro = em._round_to_odd_sum(a, t)
    for x, y, r in zip(a, t, ro):
        exact = Fraction(x) + Fraction(y)
        if Fraction(float(r)) != exact:
            lo, hi = sorted([Fraction(float(np.nextafter(r, -np.inf))), Fraction(float(r))])
            lo2, hi2 = sorted([Fraction(float(r)), Fraction(float(np.nextafter(r, np.inf)))])
            assert lo < exact < hi or lo2 < exact < hi2
            assert np.float64(r).view(np.int64) & 1


# ---------------------------------------------------------------------------
# Scaling


def test_recipe_scales():
    A = np.array([[1.0, -3.0, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(em.recipe_scales(A, "e4m3", "tensor", "X"), [[3.0 / 448]])
    np.testing.assert_array_equal(em.recipe_scales(A, "e5m2", "row", "X"), [[3.0 / 57344], [1.0]])
    # mx32: 2^(⌊log₂ amax⌋ − emax): amax 3 → 2^(1 − 8) for e4m3, 2^(1 − 15) for e5m2.
    np.testing.assert_array_equal(em.recipe_scales(A, "e4m3", "mx32", "X"), [[2.0**-7], [1.0]])
    np.testing.assert_array_equal(em.recipe_scales(A, "e5m2", "mx32", "X"), [[2.0**-14], [1.0]])
    # block128: 1×128 blocks for X and dY, 128×128 for W.
    A = np.zeros((130, 300))
    A[0, 0], A[0, 200], A[129, 299] = 448.0, -896.0, 4480.0
    s = em.recipe_scales(A, "e4m3", "block128", "X")
    assert s.shape == (130, 3) and s[0].tolist() == [1.0, 2.0, 1.0] and s[129, 2] == 10.0
    s = em.recipe_scales(A, "e4m3", "block128", "W")
    assert s.tolist() == [[1.0, 2.0, 1.0], [1.0, 1.0, 10.0]]


def test_quantize_scaled_values():
    model = em.parse("fp8")
    A = np.array([[448.0 * 0.5, 0.5 * 1.06, -0.5 * 13.0]])  # s = 0.5
    op = em.quantize(A, "e4m3", model, "X")
    assert op.scales.tolist() == [[0.5]]
    assert op.values.tolist() == [[224.0, 0.5, -0.5 * 13.0]]  # 1.06 → 1, 13 → 13 (3 bits)
    op = em.quantize(A, "e4m3", em.parse("fp8,convert=rz"), "X", scales=1.0)
    assert op.values.tolist() == [[224.0, 0.5, -6.5]]
    assert em.quantize(A, "e4m3", em.parse("fp8,convert=rz"), "X", 0.25).values[0, 0] == 112.0


def test_parse_presets_and_keys():
    m = em.parse("bf16,bias=fused,products=exact")
    assert (m.x, m.acc, m.out, m.bias, m.products) == ("bf16", "fp32-rz", "bf16", "fused", "exact")
    m = em.parse("x=e4m3,w=e4m3,dy=e5m2,scale=tensor,acc=fp32,out=bf16")
    assert (m.x, m.dy, m.scale, m.acc, m.out) == ("e4m3", "e5m2", "tensor", "fp32", "bf16")
    assert em.parse("fp8-blockwise").acc == "14bit/128"
    assert em.parse("tf32").convert == "rz"
    assert (em.parse("bf16").reduce, em.parse("fp16").reduce) == ("bf16/32", "fp16/32")
    assert em.parse("acc=bf16").x == "fp32"  # keys alone: on top of fp32
    with pytest.raises(ValueError):
        em.parse("bf16,colour=red")


# ---------------------------------------------------------------------------
# The layer against loops in NumPy's own arithmetic


def test_fp32_rounded_products_sequential_matches_float32_loops(rng):
    N, D_in, D_out = 9, 7, 5
    X, W, G = (
        rng.standard_normal(s).astype(np.float32) for s in [(N, D_in), (D_out, D_in), (N, D_out)]
    )
    B = rng.standard_normal(D_out).astype(np.float32)
    r = em.emulate(X, W, B, G, "fp32,products=rounded")
    Y = B.copy()  # fused: the bias is the first term
    for i in range(D_in):
        Y = Y + X[:, i : i + 1] * W[:, i]
    dX = G[:, :1] * W[0]
    for o in range(1, D_out):
        dX = dX + G[:, o : o + 1] * W[o]
    dW = G[0][:, None] * X[0]
    for n in range(1, N):
        dW = dW + G[n][:, None] * X[n]
    dB = np.add.accumulate(G, axis=0)[-1]
    for got, want in [(r.Y, Y), (r.dX, dX), (r.dW, dW), (r.dB, dB)]:
        np.testing.assert_array_equal(got, want.astype(np.float64))
    assert r.dtype == np.float32


def test_bf16_preset_matches_ml_dtypes_where_exact(rng):
    # Small multiples of 1/8: every product and sum is exact in float64 and in float32, so the
    # model's results are ml_dtypes' roundings: products rounded to bf16, the sum rounded to
    # bf16 at the end, and the separate bias (float32 values) added to that and rounded.
    N, D_in, D_out = 6, 3, 2
    X, W, G = (rng.integers(-64, 64, s) / 8 for s in [(N, D_in), (D_out, D_in), (N, D_out)])
    B = rng.standard_normal(D_out).astype(np.float32).astype(np.float64)
    r = em.emulate(X, W, B, G, "bf16")
    bf = ml_dtypes.bfloat16

    def mm(a, b):  # a @ b with each product rounded by ml_dtypes, summed exactly
        return (a[:, :, None] * b[None, :, :]).astype(bf).astype(np.float64).sum(axis=1)

    y = mm(X, W.T).astype(bf).astype(np.float64)
    np.testing.assert_array_equal(r.Y, (y + B).astype(bf).astype(np.float64))
    np.testing.assert_array_equal(r.dX, mm(G, W).astype(bf).astype(np.float64))
    np.testing.assert_array_equal(r.dW, mm(G.T, X).astype(bf).astype(np.float64))
    np.testing.assert_array_equal(r.dB, G.astype(bf).astype(np.float64).sum(0).astype(bf))
    assert r.dtype == np.dtype(bf)
    assert r.cast()["dW"].dtype == np.dtype(bf)


def test_batch_dims_and_no_bias(rng):
    X = rng.standard_normal((2, 3, 5))
    G = rng.standard_normal((2, 3, 4))
    W = rng.standard_normal((4, 5))
    r = em.emulate(X, W, None, G, "fp16")
    flat = em.emulate(X.reshape(6, 5), W, None, G.reshape(6, 4), "fp16")
    assert r.Y.shape == (2, 3, 4) and r.dX.shape == (2, 3, 5) and r.dB is None
    np.testing.assert_array_equal(r.Y.reshape(6, 4), flat.Y)
    np.testing.assert_array_equal(r.dW, flat.dW)


def test_inexact_scaled_products_are_refused():
    # recipe scales amax / 448 of arbitrary data have 53 bits: s · q is not a float64 number.
    A = np.array([[1.0 + 2.0**-40, 0.3]])
    with pytest.raises(ValueError, match="not exact"):
        em.quantize(A, "e4m3", em.parse("fp8"), "X")


@pytest.mark.parametrize("acc", ["fp32", "fp32-rz", "bf16", "fp16", "14bit/128"])
def test_long_sequential_sums_match_exact_rational_rounding(acc, rng):
    # 300 terms: the sequential fast path (float64 sums, checked afterwards) is taken.
    T = bf16_products(rng, 300, 2, spread=10)
    got = em.sum_terms(T, acc, "sequential")
    for j in range(2):
        terms = [Fraction(float(t)) for t in T[:, j]]
        if "bit/" in acc:
            part = [fr_sum(terms[i : i + 128], fr_acc(acc), "sequential", None) for i in (0, 128)]
            part.append(fr_sum(terms[256:], fr_acc(acc), "sequential", None))
            want = fr_sum(part, fr_acc("fp32"), "sequential", None)
        else:
            want = fr_sum(terms, fr_acc(acc), "sequential", None)
        assert got[j] == float(want)


def test_sequential_fast_path_falls_back_on_decision_points():
    # The float64 sum 1 + (2⁻²⁴ + 2⁻⁶⁰) rounds to 1 + 2⁻²⁴, an fp32 midpoint: rounding that
    # again would tie to 1; the exact sum is above the midpoint, RN gives 1 + 2⁻²³. And
    # 1 − 2⁻⁶⁰ is 1 in float64, an fp32 number; RZ of the exact sum is 1 − 2⁻²⁴.
    T = np.zeros((100, 2))
    T[0] = 1.0
    T[1] = [2.0**-24 + 2.0**-60, -(2.0**-60)]
    assert em.sum_terms(T[:, :1], "fp32")[0] == 1 + 2.0**-23
    assert em.sum_terms(T[:, 1:], "fp32-rz")[0] == 1 - 2.0**-24
