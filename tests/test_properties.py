"""Property-based tests: no false alarms, planted errors always caught, lossless files."""

import io

import numpy as np
import oracles
from conftest import compute_in
from hypothesis import given
from hypothesis import strategies as st

from lincheck import arrays, check, precision, streaming

SIMULATED = ["fp64", "fp32", "tf32", "bf16", "fp16"]  # conftest.compute_in's kernels

dims = st.integers(min_value=1, max_value=12)
dtypes = st.sampled_from(["float64", "float32", "float16"])
exponents = st.integers(min_value=-8, max_value=8)


def _layer(seed, N, D_in, D_out, dtype, ex, ew, eg):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((N, D_in)) * 10.0**ex).astype(dtype)
    W = (rng.standard_normal((D_out, D_in)) * 10.0**ew).astype(dtype)
    B = (rng.standard_normal(D_out) * 10.0 ** (ex + ew)).astype(dtype)
    G = (rng.standard_normal((N, D_out)) * 10.0**eg).astype(dtype)
    return X, W, B, G


@given(
    seed=st.integers(0, 2**32 - 1),
    N=st.integers(1, 64),
    D_in=st.integers(1, 64),
    D_out=st.integers(1, 64),
    precision=st.sampled_from(SIMULATED),
    ex=exponents,
    ew=exponents,
    eg=exponents,
    as_float32=st.booleans(),
)
def test_subjects_computed_in_the_declared_arithmetic_always_pass(
    seed, N, D_in, D_out, precision, ex, ew, eg, as_float32
):
    """Shapes up to 64, scales 1e-8 to 1e8, mixed signs, all five precisions, no tolerance."""
    if precision == "fp16":  # keep values and sums inside float16's range
        ex, ew, eg = (int(np.clip(e, -2, 0)) for e in (ex, ew, eg))
    X, W, B, G = _layer(seed, N, D_in, D_out, "float64", ex, ew, eg)
    if as_float32:  # inputs saved as float32, as most dumps are
        X, W, B, G = (a.astype(np.float32) for a in (X, W, B, G))
    grads = compute_in(precision, X, W, G)
    report = check(X, W, B, G, **grads, precision=precision)
    assert report.passed, [(c.tensor, c.subject, c.bound_ratio) for c in report.failed]


@given(
    seed=st.integers(0, 2**32 - 1),
    N=dims,
    D_in=dims,
    D_out=dims,
    dtype=dtypes,
    ex=exponents,
    ew=exponents,
    eg=exponents,
)
def test_correct_gradients_in_their_dtype_always_pass(seed, N, D_in, D_out, dtype, ex, ew, eg):
    if dtype == "float16":  # keep float16 values and products inside its range (6e-5 .. 65504)
        ex, ew, eg = (int(np.clip(e, -1, 1)) for e in (ex, ew, eg))
    X, W, B, G = _layer(seed, N, D_in, D_out, dtype, ex, ew, eg)
    # float16 sums accumulate in float32, as frameworks' do (NumPy's own float16 sum over
    # an axis adds in float16: that is the fp16-acc16 arithmetic, tests/test_bounds.py).
    dB = G.sum(0, dtype=np.float32).astype(G.dtype) if dtype == "float16" else G.sum(0)
    report = check(X, W, B, G, dX=G @ W, dW=G.T @ X, dB=dB)
    assert report.passed, [(c.tensor, c.subject, c.bound_ratio) for c in report.failed]


@given(
    seed=st.integers(0, 2**32 - 1),
    N=dims,
    D_in=dims,
    D_out=dims,
    ex=exponents,
    ew=exponents,
    eg=exponents,
    tensor=st.sampled_from(["dX", "dW", "dB"]),
    data=st.data(),
)
def test_one_entry_off_by_twice_its_tolerance_is_caught_and_located(
    seed, N, D_in, D_out, ex, ew, eg, tensor, data
):
    X, W, B, G = _layer(seed, N, D_in, D_out, "float64", ex, ew, eg)
    grads = {"dX": G @ W, "dW": G.T @ X, "dB": G.sum(0)}
    g = grads[tensor]
    index = tuple(data.draw(st.integers(0, s - 1)) for s in g.shape)
    # Twice the tolerance there: the subject's and the reference's float64 bounds.
    M, S = oracles.Magnitudes.of(X, W, B, G).of_tensor(tensor)
    k = {"dX": D_out, "dW": N, "dB": N}[tensor]
    tol = 2 * precision.reference_bound(M[index], 0.0, k).worst
    planted = 2 * tol + 4 * abs(g[index]) * 2.0**-52
    g[index] += planted
    failed = check(X, W, B, G, **grads).failed
    assert [c.tensor for c in failed] == [tensor]
    assert failed[0].worst_index == index


@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(["<f8", ">f8", "<f4", ">f4", "<f2", "int8", ">i4", "<u2", "bool"]),
    fortran=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_npy_roundtrip_is_lossless(shape, dtype, fortran, seed):
    a = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    if fortran:
        a = np.asfortranarray(a)
    buf = io.BytesIO()
    np.save(buf, a)
    size = buf.tell()
    buf.seek(0)
    back = arrays._read_npy(buf, size, "X")
    assert back.dtype == a.dtype and back.shape == a.shape
    assert np.array_equal(back, a, equal_nan=True)


@given(
    seed=st.integers(0, 2**32 - 1),
    N=st.integers(1, 80),
    D_in=dims,
    D_out=dims,
    ex=exponents,
    eg=exponents,
    tensor=st.sampled_from(["dX", "dW", "dB", "Y", None]),
    mode=st.sampled_from(["sample", "directions"]),
)
def test_streamed_subject_checks_agree_with_full_ones(seed, N, D_in, D_out, ex, eg, tensor, mode):
    """Row blocks of a few rows change no verdict on a subject, and find the same bad entry.

    Both engines compare every entry of a subject with the float64 reference under
    the same bound; streaming only sums dW and dB block by block (the same γ_N bound).
    """
    X, W, B, G = _layer(seed, N, D_in, D_out, "float64", ex, 0, eg)
    grads = {"dX": G @ W, "dW": G.T @ X, "dB": G.sum(0), "Y": X @ W.T + B}
    if tensor is not None:  # one entry off by a clear margin (far above any bound)
        flat = np.random.default_rng(seed).integers(grads[tensor].size)
        grads[tensor].flat[flat] += 1e-6 * (1.0 + np.abs(grads[tensor]).max())
    full = check(X, W, B, G, **grads, mode="full")
    old = streaming.ROW_BLOCK_BYTES
    streaming.ROW_BLOCK_BYTES = 8 * 40 * (D_in + D_out)  # blocks of about 4 rows
    try:
        streamed = check(X, W, B, G, **grads, mode=mode, samples=8)
    finally:
        streaming.ROW_BLOCK_BYTES = old
    assert streamed.passed == full.passed == (tensor is None)
    by = {c.tensor: c for c in streamed.checks if c.oracle == "reference"}
    for c in full.checks:
        if c.oracle != "reference":
            continue
        s = by[c.tensor]
        assert s.passed == c.passed
        if not c.passed:  # the planted entry (among rounding errors, summed in another order)
            assert s.worst_index == c.worst_index, c.tensor
        assert np.array_equal(s.error_map > 1, c.error_map > 1)  # the same entries over


@given(
    seed=st.integers(0, 2**32 - 1),
    N=st.integers(1, 48),
    D_in=st.integers(1, 40),
    D_out=st.integers(1, 24),
    preset=st.sampled_from(sorted(precision.PRESETS)),
    order=st.sampled_from(["sequential", "pairwise", "blocked", "tree"]),
    mags=st.sampled_from(["unit", "small-w", "large-w"]),
    bug=st.sampled_from(["zero", "sign", "half"]),
    tensor=st.sampled_from(["dX", "dW", "dB", "Y"]),
)
def test_emulated_kernels_of_every_preset_never_fail_and_gross_bugs_never_pass(
    seed, N, D_in, D_out, preset, order, mags, bug, tensor
):
    """Every preset's kernel, emulated bit for bit (tests/emulate.py) in some summation
    order, on random shapes and magnitudes: its correct results never fail (they pass, or
    are inconclusive where the arithmetic cannot resolve them), and a zero, sign-flipped or
    halved tensor never passes. LINCHECK_HYPOTHESIS=long runs 5,000 of these."""
    import test_emulated as te

    if mags == "large-w" and preset.startswith("fp16"):
        return  # dX ≈ 1e5: beyond float16's range
    X, W, B, dY = te.inputs(preset, (N,), D_in, D_out, mags, seed % 2**16)
    got = te.em.emulate(X, W, B, dY, preset, order, seed=seed % 2**16).cast()
    report = te.run(preset, X, W, B, dY, got)
    assert all(c.verdict != "fail" for c in report.checks), [
        (c.tensor, c.subject, c.bound_ratio) for c in report.failed
    ]
    wrong = np.asarray(got[tensor], dtype=np.float64)
    if not np.any(wrong):
        return  # a zero gradient: no mistake of its own size to plant
    wrong = {"zero": 0 * wrong, "sign": -wrong, "half": wrong / 2}[bug]
    bad = te.run(preset, X, W, B, dY, {**got, tensor: wrong})
    assert not bad.passed
