"""Verdicts without tolerances: every precision, sensitivity, lower-precision hints, overrides."""

import numpy as np
import pytest
from conftest import compute_in, layer

import lincheck
from lincheck import check, layouts
from lincheck.precision import TF32, round_to

ALL = ["fp64", "fp32", "tf32", "bf16", "fp16"]  # the kernels conftest.compute_in simulates;
# every preset, fp8 and float16 accumulation included, is in tests/test_emulated.py


def inputs_for(precision, rng, N=32, D_in=64, D_out=16, batch=None):
    """float64 inputs; for fp16 kept inside float16's range."""
    X, W, B, G = layer(rng, N, D_in, D_out, batch=batch)
    if precision == "fp16":
        X, W, G = X / 4, W / 4, G / 4
    return X, W, B, G


def supplied(report, tensor):
    (c,) = [c for c in report.checks if c.tensor == tensor and c.subject == "supplied"]
    return c


@pytest.mark.parametrize("precision", ALL)
def test_correct_subjects_pass_in_their_declared_arithmetic(rng, precision):
    X, W, B, G = inputs_for(precision, rng)
    report = check(X, W, B, G, **compute_in(precision, X, W, G), precision=precision)
    assert report.passed, [(c.tensor, c.bound_ratio) for c in report.failed]
    assert {c.precision for c in report.checks if c.subject == "supplied"} == {precision}
    assert report.hints == ()


@pytest.mark.parametrize("shape", [(32, 64, 16), (32, 32, 32)], ids=["readme", "square"])
@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize(
    "bug, tensor",
    [("transposed", "dW"), ("mean", "dB"), ("sign", "dX"), ("scaled", "dW")],
)
def test_common_bugs_fail_under_every_precision(rng, precision, bug, tensor, shape):
    X, W, B, G = inputs_for(precision, rng, *shape)  # square: a transposed dW has the right shape
    grads = compute_in(precision, X, W, G)
    if bug == "transposed":
        grads["dW"] = grads["dW"].T.copy()
    elif bug == "mean":
        grads["dB"] = grads["dB"] / 32
    elif bug == "sign":
        grads["dX"] = -grads["dX"]
    else:
        grads["dW"] = grads["dW"] * 1.5
    report = check(X, W, B, G, **grads, precision=precision)
    assert [c.tensor for c in report.failed] == [tensor]


@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize("tensor", ["dX", "dW", "dB"])
def test_sensitivity_is_exact(rng, precision, tensor):
    """A change just above min_detectable_error fails; an error just under the tolerance passes."""
    X, W, B, G = inputs_for(precision, rng, N=16, D_in=12, D_out=8)
    grads = {k: v.astype(np.float64) for k, v in compute_in(precision, X, W, G).items()}
    clean = supplied(check(X, W, B, G, **grads, precision=precision), tensor)
    assert clean.passed
    worst = clean.worst_entries[0]
    index = worst.index
    g = grads[tensor]

    # Just below the tolerance at the worst entry: still passes.
    g[index] = worst.oracle + 0.99 * worst.tolerance
    assert supplied(check(X, W, B, G, **grads, precision=precision), tensor).passed
    # Just above it: fails, at that entry.
    g[index] = worst.oracle + 1.01 * worst.tolerance
    above = supplied(check(X, W, B, G, **grads, precision=precision), tensor)
    assert not above.passed and above.worst_index == index

    # A change of 1.01 × min_detectable_error anywhere is caught and located.
    g[index] = worst.subject
    for where in [index, tuple(0 for _ in g.shape), tuple(s - 1 for s in g.shape)]:
        planted = g.copy()
        planted[where] += 1.01 * clean.min_detectable_error
        report = check(X, W, B, G, **{**grads, tensor: planted}, precision=precision)
        assert [c.tensor for c in report.failed] == [tensor]
        assert supplied(report, tensor).worst_index == where


def test_tf32_rounded_float32_fails_fp32_passes_tf32_and_is_hinted(rng):
    X, W, B, G = inputs_for("fp32", rng)
    X, W, B, G = (a.astype(np.float32) for a in (X, W, B, G))
    tf32 = {k: v for k, v in compute_in("tf32", X, W, G).items() if k != "dB"}
    as_fp32 = check(X, W, B, G, **tf32)
    assert {c.tensor for c in as_fp32.failed} == {"dX", "dW"}
    assert [(h.code, h.tensor) for h in as_fp32.hints] == [
        ("lower_precision", "dX"),
        ("lower_precision", "dW"),
    ]
    assert "fits TF32 tensor cores" in as_fp32.hints[0].message
    assert 'check with precision="tf32"' in as_fp32.hints[0].message  # Python's spelling
    with layouts.command_line_advice():  # the CLI's
        assert "check with --precision tf32" in check(X, W, B, G, **tf32).hints[0].message
    assert check(X, W, B, G, **tf32, precision="tf32").passed


def test_bfloat16_subject_is_hinted_as_bf16(rng):
    X, W, B, G = (a.astype(np.float32) for a in inputs_for("bf16", rng))
    grads = compute_in("bf16", X, W, G)
    report = check(X, W, B, G, **grads)
    assert not report.passed
    assert {h.tensor for h in report.hints} == {"dX", "dW", "dB"}
    assert all("fits bfloat16 operands" in h.message for h in report.hints)
    assert all('precision="bf16"' in h.message for h in report.hints)


def test_real_bugs_get_no_lower_precision_hint(rng):
    X, W, B, G = (a.astype(np.float32) for a in inputs_for("fp32", rng))
    grads = compute_in("fp32", X, W, G)
    grads["dB"] = grads["dB"] / 32
    report = check(X, W, B, G, **grads)
    assert [c.tensor for c in report.failed] == ["dB"]
    assert [(h.code, h.tensor) for h in report.hints] == [("mean_instead_of_sum", "dB")]


def test_typical_ratio_shows_how_far_from_typical(rng):
    X, W, B, G = (a.astype(np.float32) for a in inputs_for("fp32", rng))
    report = check(X, W, B, G, **compute_in("fp32", X, W, G))
    for c in report.checks:
        if c.subject == "supplied":
            # Real float32 errors sit well under the worst case but near the √k·u scale.
            assert c.bound_ratio < 0.5 and 0.05 < c.typical_ratio < 5, c


def test_allclose_override_decides_when_given(rng):
    X, W, B, G = layer(rng, 8, 5, 3)
    grads = compute_in("fp64", X, W, G)
    grads["dW"][1, 2] *= 1 + 1e-4
    assert not check(X, W, B, G, **grads).passed
    loose = check(X, W, B, G, **grads, rtol=1e-3)
    assert loose.passed
    assert {c.rule for c in loose.checks} == {"allclose"}
    assert supplied(loose, "dW").tolerance_rule == "atol 0 + rtol 0.001 × |reference|"
    strict = check(X, W, B, G, **grads, atol=1e-12)
    assert [c.tensor for c in strict.failed] == ["dW"]
    assert [h.code for h in strict.hints] == ["localized"]  # no lower_precision under allclose


def test_complex_step_witness_agrees(rng):
    X, W, B, G = layer(rng, 8, 5, 3)
    report = check(X, W, B, G, method="complex-step")
    assert report.passed and report.witness["method"] == "complex-step"
    assert report.witness["forward_passes"] == 2 * 5 + 1
    grads = compute_in("fp64", X, W, G)
    grads["dX"] = -grads["dX"]
    assert [
        c.tensor
        for c in check(X, W, B, G, **grads, against="witness", method="complex-step").failed
    ] == ["dX"]


def test_tf32_rounding_simulation_is_what_the_bound_assumes(rng):
    x = rng.standard_normal(1000)
    for mode, u in (("rn", TF32.u), ("rz", 2 * TF32.u)):  # the tf32 preset converts with rz
        rel = np.abs(round_to(x, TF32, mode) - x) / np.abs(x)
        assert rel.max() <= u and rel.max() > u / 2


def test_float16_sums_over_long_batches_pass_with_float32_accumulation(rng):
    """float16 gradients of 4096 terms, accumulated in float32 as frameworks do, pass and
    are conclusive (they were all "inconclusive" under a float16-accumulation model); under
    float16 accumulation (fp16-acc16) no bound resolves them: inconclusive, never a pass."""
    from lincheck.checks import analytic_gradients, random_inputs

    data = random_inputs(rng, 4096, 8, 4, "float16")
    grads = analytic_gradients(data)
    args = (data["X"], data["W"], data["B"], data["dY"])
    report = check(*args, **grads)
    assert report.passed and all(c.verdict == "pass" for c in report.checks)
    acc16 = check(*args, **grads, precision="fp16-acc16")
    inconclusive = {c.tensor: c for c in acc16.failed}
    assert sorted(inconclusive) == ["dB", "dW"]  # N = 4096 terms; dX sums only 4
    assert {c.verdict for c in inconclusive.values()} == {"inconclusive"}
    assert inconclusive["dW"].message.startswith("inconclusive: under fp16-acc16 arithmetic")
    assert acc16.hints == ()  # nothing failed: no claims
    grads["dW"] = grads["dW"] * 3
    assert [c.tensor for c in check(*args, **grads).failed] == ["dW"]


def test_float16_bias_reductions_in_float16_pass_and_any_order_is_inconclusive(rng):
    """NumPy adds float16 rows in float16 (G.sum(0)), as XLA reduces bias gradients in a
    tree of float16 sums: the default fp16 model's reduction (reduce=fp16/32) covers it.
    Under fp16-acc16 (float16 accumulation in any order) 512 additions cannot resolve dB's
    own size: inconclusive, never a pass. A halved dB fails either way it can."""
    X, W, B, G = (a.astype(np.float16) for a in inputs_for("fp16", rng, N=512, D_in=8, D_out=4))
    dB = G.sum(0)
    assert check(X, W, B, G, dB=dB).passed
    assert check(X, W, B, G, dB=G.sum(0, dtype=np.float32).astype(np.float16)).passed
    (acc16,) = check(X, W, B, G, dB=dB, precision="fp16-acc16").failed
    assert acc16.verdict == "inconclusive"
    (halved,) = check(X, W, B, G, dB=dB / 2).failed
    assert halved.verdict == "fail"


EVERY_WITNESS = [
    ("full", "central"),
    ("full", "dense"),
    ("full", "complex-step"),
    ("sample", "central"),
    ("directions", "central"),
]

SUBNORMAL_SCALES = [  # (X, W and B, dY): products inside Y underflow, and L multiplies them by G
    (0.1, 3e-316, 1e3),
    (1.0, 1e-310, 1e5),
    (3e-316, 0.1, 1e3),
    (1e-160, 1e-160, 1e10),
]


@pytest.mark.parametrize("scales", SUBNORMAL_SCALES, ids=str)
@pytest.mark.parametrize("mode, method", EVERY_WITNESS)
def test_underflow_inside_y_is_bounded_in_every_witness(scales, mode, method):
    """The formulas are right, so the reference must pass against the witness, however
    small the products inside Y (it failed at Err/tol 32: the underflow in Y, multiplied
    by |dY| in the loss, was not in the bound)."""
    rng = np.random.default_rng(0)
    sx, sw, sg = scales
    X, W, B, G = (
        rng.standard_normal(s) * scale
        for s, scale in (((8, 5), sx), ((3, 5), sw), ((3,), sw), ((8, 3), sg))
    )
    report = lincheck.check(X, W, B, G, mode=mode, method=method)
    assert report.passed, [(c.tensor, c.bound_ratio) for c in report.checks]


# (X, W and B, dY, rows of X scaled apart): every value finite, no product overflows
EXTREME_SCALES = [
    (1e-300, 1.0, 1e100, 1.0),
    (1.0, 1e-300, 1e100, 1.0),
    (1.0, 1.0, 1.0, 1e160),
]


@pytest.mark.parametrize("scales", EXTREME_SCALES, ids=str)
@pytest.mark.parametrize("mode, method", EVERY_WITNESS)
def test_extreme_but_finite_scales_get_a_verdict_not_an_overflow_claim(scales, mode, method):
    """X = 1e-300 beside dY = 1e100: a step capped at 2⁶⁴ times X's scale left the
    cancellation term to overflow, and full mode exited 2 claiming that "sums of products
    overflow float64"; sample said inconclusive and directions gave a NaN ratio. The step
    is now limited by what the forward pass can hold, not by θ's own scale."""
    rng = np.random.default_rng(1)
    sx, sw, sg, apart = scales
    X, W, B, G = (
        rng.standard_normal(s) * scale
        for s, scale in (((8, 5), sx), ((3, 5), sw), ((3,), sw), ((8, 3), sg))
    )
    X[0] *= apart  # rows scaled far apart share one step in the directions
    X[1] *= apart / 1e10
    report = lincheck.check(X, W, B, G, mode=mode, method=method)
    assert report.passed, [(c.tensor, c.bound_ratio, c.message) for c in report.checks]
    assert all(np.isfinite(c.bound_ratio) for c in report.checks)


@pytest.mark.parametrize("spread", ["normal", "tiny"])
def test_magnitudes_summed_in_float32_are_bounded_up(rng, monkeypatch, spread):
    """A product of absolute values computed in float32 (as large layers' magnitudes are),
    bounded up by ``upper_product``, is never below the exact product (summed in fractions),
    values below float32's normal range included; and no more than 0.1% above it when the
    values are in range (a bound that merely holds could be vacuous)."""
    from fractions import Fraction

    from lincheck import bounds

    monkeypatch.setattr(bounds, "ABS32_WORK", 0)  # float32 at any size
    if spread == "normal":
        a = rng.exponential(size=(6, 40)) * 10.0 ** rng.integers(-8, 8, (6, 40))
        b = rng.exponential(size=(40, 5)) * 10.0 ** rng.integers(-8, 8, (40, 5))
    else:  # around and below 2⁻¹²⁶ ≈ 1.2e-38, where float32 loses digits or flushes to zero
        a = rng.exponential(size=(6, 40)) * 10.0 ** rng.integers(-45, -38, (6, 40))
        b = rng.exponential(size=(40, 5))
    computed, in32 = bounds.abs_product(a, b)
    assert in32
    sums = (bounds.upper_sum(a.sum(axis=1)[:, None], 40), bounds.upper_sum(b.sum(axis=0), 40))
    upper = bounds.upper_product(computed, 40, in32, sums)
    for i in range(6):
        for j in range(5):
            exact = sum(Fraction(a[i, t]) * Fraction(b[t, j]) for t in range(40))
            assert Fraction(upper[i, j]) >= exact
            if spread == "normal":
                assert upper[i, j] <= float(exact) * (1 + 1e-3)


@pytest.mark.parametrize("tensor", ["dX", "dW"])
def test_float32_magnitudes_of_rows_far_apart_stay_each_entrys_own(monkeypatch, tensor):
    """dY's rows (and so dW's output units) 10⁶⁰ apart, magnitudes summed in float32: each
    entry's bound is never below its exact Σ|a||b| (in fractions) and within 0.1% of it.
    Float32's underflow allowance scales the entry's own operand sums: one allowance for
    all, from the largest entry's sums, would raise the small entries' bounds (and their
    tolerances) by some 10²² of their size."""
    from fractions import Fraction

    from lincheck import bounds
    from lincheck.workspace import Workspace

    monkeypatch.setattr(bounds, "ABS32_WORK", 0)  # float32 at any size
    rng = np.random.default_rng(3)
    N, D_in, D_out = 6, 5, 4
    X = rng.normal(size=(N, D_in)).astype(np.float32).astype(np.float64)
    W = rng.normal(size=(D_out, D_in)).astype(np.float32).astype(np.float64)
    G = rng.normal(size=(N, D_out))
    if tensor == "dX":
        G[0::2] *= 1e-30
        G[1::2] *= 1e30
    else:
        G[:, 0::2] *= 1e-30
        G[:, 1::2] *= 1e30
    G = G.astype(np.float32).astype(np.float64)
    M, _ = Workspace(X, W, None, G).magnitude(tensor)
    a, b = (np.abs(G), np.abs(W)) if tensor == "dX" else (np.abs(G).T, np.abs(X))
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            exact = sum(Fraction(a[i, t]) * Fraction(b[t, j]) for t in range(a.shape[1]))
            assert Fraction(M[i, j]) >= exact
            assert M[i, j] <= float(exact) * (1 + 1e-3), (i, j, M[i, j], float(exact))


@pytest.mark.parametrize("mode", ["sample", "directions"])
def test_small_rows_doubled_fail_beside_large_rows(monkeypatch, mode):
    """A float32 dX whose small rows (dY's rows 10⁻³⁰, beside rows 10³⁰) are all twice the
    reference fails in the partial modes, whose row blocks' magnitudes are summed in
    float32 as a large layer's are; the correct dX passes."""
    from lincheck import bounds

    monkeypatch.setattr(bounds, "ABS32_WORK", 0)  # float32 at any size
    rng = np.random.default_rng(4)
    N, D_in, D_out = 16, 6, 5
    X = rng.normal(size=(N, D_in)).astype(np.float32)
    W = rng.normal(size=(D_out, D_in)).astype(np.float32)
    G = rng.normal(size=(N, D_out))
    G[0::2] *= 1e-30
    G[1::2] *= 1e30
    G = G.astype(np.float32)
    dX = G.astype(np.float64) @ W.astype(np.float64)  # within any float32 tolerance
    assert check(X, W, None, G, dX=dX.astype(np.float32), precision="fp32", mode=mode).passed
    wrong = dX.copy()
    wrong[0::2] *= 2
    report = check(X, W, None, G, dX=wrong.astype(np.float32), precision="fp32", mode=mode)
    (dx,) = [c for c in report.checks if c.tensor == "dX" and c.subject == "supplied"]
    assert dx.verdict == "fail" and dx.worst_index[0] % 2 == 0, (dx.verdict, dx.worst_index)
