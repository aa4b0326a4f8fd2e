"""lincheck on gradients from emulated kernels (tests/emulate.py), model by model.

For every preset and the keys that change a kernel (conversion, products, accumulator,
scaling, bias), every summation order, small shapes with leading batch dimensions and
N = 200,000: the model's own correct results must pass under ``precision=SPEC``, or be
inconclusive exactly where the model cannot resolve the gradient (asserted narrowly), and
gross mistakes planted in them must never pass. Structured data (a mean loss's constant
dY, one-hot dY, all-positive X, constant columns) must raise no false alarm.

No tolerance is chosen here: the emulator is exact for its model and lincheck decides.
"""

from __future__ import annotations

import functools

import emulate as em
import numpy as np
import pytest

import lincheck

PRESETS = ["fp64", "fp32", "tf32", "bf16", "fp16", "fp16-acc16", "fp8", "fp8-blockwise"]
TENSORS = ("dX", "dW", "dB", "Y")
# Magnitudes of X, W and dY (ranges 1e-3 … 1e3); the third would overflow fp16 in dX.
MAGS = {"unit": (1.0, 1.0, 1.0), "small-w": (1e3, 1e-3, 1e-1), "large-w": (1e-3, 1e3, 1e2)}
SMALL = {"32x64x16": ((4, 8), 64, 16), "3x37x5": ((3,), 37, 5)}
BIG = ((200_000,), 8, 4)


# ---------------------------------------------------------------------------
# Inputs


def _pin_amax(R: np.ndarray, rows: int, cols: int, top: float) -> np.ndarray:
    """R with the largest |value| of every rows × cols block set to ±top."""
    Rr, Rc = R.shape
    nr, nc = -(-Rr // rows), -(-Rc // cols)
    P = np.zeros((nr * rows, nc * cols))
    P[:Rr, :Rc] = R
    Bk = P.reshape(nr, rows, nc, cols).transpose(0, 2, 1, 3).reshape(nr, nc, rows * cols)
    idx = np.abs(Bk).argmax(-1)[..., None]
    np.put_along_axis(Bk, idx, np.copysign(top, np.take_along_axis(Bk, idx, -1)), -1)
    return Bk.reshape(nr, nc, rows, cols).transpose(0, 2, 1, 3).reshape(P.shape)[:Rr, :Rc]


def operand(rng, shape, role: str, fmt: str, model: em.Model, mag: float) -> np.ndarray:
    """Random values of size ``mag``. For scaled fp8 with amax recipes, the scale of every
    block is made a bfloat16 number c (its amax is exactly c times the format's largest
    value, and every value is c times a float32 number), so that s · q(a / s) is exact in
    float64 and the emulator stays exact."""
    if model.scale in ("tensor", "row", "block128") and fmt in em.FP8:
        f = em.FORMATS[fmt]
        rows, cols = em._block_shape(model.scale, role, np.empty(shape))
        R = rng.uniform(-f.max, f.max, shape).astype(np.float32).astype(np.float64)
        R = _pin_amax(R, rows, cols, f.max)
        nblocks = (-(-shape[0] // rows), -(-shape[1] // cols))
        c = em.convert(mag * np.exp2(rng.uniform(-1, 1, nblocks)) / f.max, "bf16")
        return R * em._expand(c, model.scale, role, R)
    A = rng.standard_normal(shape) * mag
    if model.scale == "mx32" and fmt in em.FP8:
        # A block whose amax has a significand ≥ 1.75 maps beyond the format's largest value
        # under mx32's power-of-two scale, which the contract leaves undefined: scale such
        # blocks to a significand of 1.5.
        amax = em._expand(em._group_amax(A, 1, 32), "mx32", role, A)
        m, _ = np.frexp(amax)
        A = np.where(2 * m >= 1.75, A * 1.5 / (2 * m), A)
    return A


def inputs(spec, lead, D_in, D_out, mags="unit", seed=0):
    """X (*lead, D_in), W, B, dY (*lead, D_out) for the model, seeded."""
    rng = np.random.default_rng(seed)
    m = em.parse(spec)
    N = int(np.prod(lead))
    mx, mw, mg = MAGS[mags]
    X = operand(rng, (N, D_in), "X", m.x, m, mx).reshape(lead + (D_in,))
    W = operand(rng, (D_out, D_in), "W", m.w, m, mw)
    dY = operand(rng, (N, D_out), "dY", m.dy, m, mg).reshape(lead + (D_out,))
    B = rng.standard_normal(D_out) * mx * mw
    return X, W, B, dY


@functools.lru_cache(maxsize=64)
def case(spec, lead, D_in, D_out, order, mags="unit", seed=0):
    """Inputs and the model's results (cached: the large cases are shared by tests)."""
    X, W, B, dY = inputs(spec, lead, D_in, D_out, mags, seed)
    return X, W, B, dY, em.emulate(X, W, B, dY, spec, order, seed=seed)


def checks(report) -> dict:
    """The supplied tensors' checks by name."""
    return {c.tensor: c for c in report.checks if c.subject == "supplied"}


def run(spec, X, W, B, dY, subjects: dict, **kw):
    return lincheck.check(X, W, B, dY, precision=spec, **subjects, **kw)


def _u(fmt: str, mode: str = "rn") -> float:
    p = em.FORMATS[fmt].p
    return 2.0**-p if mode == "rn" else 2.0 ** (1 - p)


def _acc_growth(acc: str, k: int) -> float:
    """(1 + u)^d − 1 for the d ≤ k additions a term goes through: the worst relative error."""
    if "bit/" in acc:
        bits, K = (int(v) for v in acc.split("bit/"))
        return (1 + 2.0 ** (1 - bits)) ** min(K, k) * (1 + 2.0**-24) ** -(-k // K) - 1
    u = {"fp64": 2.0**-53, "fp32": 2.0**-24, "fp32-rz": 2.0**-23, "bf16": 2.0**-8}
    u["fp16"] = 2.0**-11
    if "/" in acc:  # windows of K terms, level on level: K additions per level at most
        fmt, K = acc.split("/")
        depth, n = 0, k
        while n > 1:
            depth, n = depth + min(int(K), n), -(-n // int(K))
        return (1 + u[fmt]) ** depth - 1
    return (1 + u[acc]) ** k - 1


def resolvable(spec, X, W, B, dY, tensor: str) -> bool:
    """Whether the model's worst case can resolve the gradient: some entry's |value| above
    twice the worst-case error of the model there (an independent first-order analysis:
    operand conversions, rounded products, k additions, output roundings; underflow left
    out, which only makes the bound smaller). Where it cannot, an inconclusive is right."""
    m = em.parse(spec)
    X2 = np.asarray(X, dtype=np.float64).reshape(-1, W.shape[1])
    G2 = np.asarray(dY, dtype=np.float64).reshape(-1, W.shape[0])
    aX, aW, aG = np.abs(X2), np.abs(W), np.abs(G2)
    fused = B is not None and m.bias == "fused"
    if tensor == "Y":
        exact, M, k, ops = X2 @ W.T, aX @ aW.T, W.shape[1], (m.x, m.w)
        if B is not None:
            exact, M, k = exact + B, M + np.abs(B), k + fused
    elif tensor == "dX":
        exact, M, k, ops = G2 @ W, aG @ aW, W.shape[0], (m.dy, m.w)
    elif tensor == "dW":
        exact, M, k, ops = G2.T @ X2, aG.T @ aX, len(X2), (m.dy, m.x)
    else:
        exact, M, k, ops = G2.sum(0), aG.sum(0), len(X2), (m.dy,)
        if m.dy in em.FP8:
            ops = ()
    rel = 1.0
    for f in ops:
        rel *= 1 + _u(f, m.convert)
    if m.products == "rounded" and len(ops) == 2:
        rel *= 1 + _u(max(ops, key=em._WIDTH.index))
    acc = m.reduce if tensor == "dB" and m.reduce else m.acc
    rel *= (1 + _acc_growth(acc, k)) * (1 + _u(m.out)) ** (2 if tensor == "Y" else 1)
    return bool(np.any(np.abs(exact) > 2 * (rel - 1) * M))


def assert_pass(report, spec=None, X=None, W=None, B=None, dY=None):
    """Every supplied tensor passes, or is inconclusive where the model's worst case cannot
    resolve it (never where it can)."""
    for name, c in checks(report).items():
        if c.verdict == "inconclusive" and spec is not None:
            assert not resolvable(spec, X, W, B, dY, name), (name, c.message)
        else:
            assert c.verdict == "pass", (name, c.verdict, c.tier, c.bound_ratio, c.message)


# ---------------------------------------------------------------------------
# Correct gradients


@pytest.mark.parametrize("order", em.ORDERS)
@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_correct_results_pass(preset, shape, order):
    X, W, B, dY, r = case(preset, *SMALL[shape], order)
    assert_pass(run(preset, X, W, B, dY, r.cast()), preset, X, W, B, dY)


MAG_CASES = [
    (p, mags)
    for p in PRESETS
    for mags in ("small-w", "large-w")
    if not (mags == "large-w" and p.startswith("fp16"))  # dX ≈ 1e5: beyond fp16's range
]


@pytest.mark.parametrize(("preset", "mags"), MAG_CASES)
def test_preset_correct_results_pass_at_other_magnitudes(preset, mags):
    X, W, B, dY, r = case(preset, *SMALL["32x64x16"], "tree", mags)
    assert_pass(run(preset, X, W, B, dY, r.cast()), preset, X, W, B, dY)


KEYS = [
    "bf16,convert=rz",
    "fp16,convert=rz",
    "fp32,products=rounded",
    "bf16,products=exact",
    "fp16,products=exact",
    "fp32,acc=fp32-rz",
    "tf32,acc=fp32",
    "bf16,acc=bf16",
    "bf16,acc=14bit/128",
    "fp16,acc=14bit/128",
    "fp32,acc=14bit/16",
    "fp8,acc=14bit/128",
    "fp8,scale=row",
    "fp8,scale=block128",
    "fp8,scale=mx32",
    "fp8,convert=rz,scale=mx32",
    "fp8-blockwise,scale=tensor",
    "fp8-blockwise,scale=mx32",
    "x=e4m3,w=e4m3,dy=e5m2,scale=tensor,acc=fp32,out=bf16",
    "x=e5m2,w=e4m3,dy=e4m3,scale=row,acc=fp32,out=fp32,bias=fused",
    "bf16,bias=fused",
    "fp16,bias=fused",
    "fp32,bias=separate",
    "fp8,bias=fused",
    "fp64,bias=separate",
    "x=bf16,w=fp16,dy=fp32,acc=fp32,out=fp32",
]


@pytest.mark.parametrize("order", em.ORDERS)
@pytest.mark.parametrize("spec", KEYS)
def test_key_combinations_correct_results_pass(spec, order):
    for shape in SMALL.values():
        X, W, B, dY, r = case(spec, *shape, order)
        assert_pass(run(spec, X, W, B, dY, r.cast()), spec, X, W, B, dY)


# A kernel the preset says it covers: truncating fp32 accumulation covers rounding, rounded
# products cover exact ones, a separate bias covers a fused one, tf32 rz covers rn.
COVERED = [
    ("tf32", "tf32,convert=rn"),
    ("tf32", "tf32,convert=rn,acc=fp32"),
    ("bf16", "bf16,products=exact,acc=fp32,bias=fused"),
    ("bf16", "bf16,acc=fp32"),
    ("fp16", "fp16,products=exact,acc=fp32,bias=fused"),
    ("fp8", "fp8,acc=fp32,bias=fused"),
    ("fp8-blockwise", "fp8-blockwise,bias=fused"),
]


@pytest.mark.parametrize("order", ["sequential", "tree"])
@pytest.mark.parametrize(("preset", "kernel"), COVERED)
def test_presets_cover_the_kernels_they_claim(preset, kernel, order):
    for shape in SMALL.values():
        X, W, B, dY, r = case(kernel, *shape, order)
        assert_pass(run(preset, X, W, B, dY, r.cast()), preset, X, W, B, dY)


@pytest.mark.parametrize(
    "spec", ["fp32,acc=bf16", "fp32,acc=14bit/16", "fp32,acc=fp16", "fp32,acc=fp32-rz"]
)
def test_terms_wider_than_the_accumulator(spec):
    # fp32 products (48 bits) are rounded as they enter an accumulator they do not fit, the
    # first one too: a sum of k terms has k roundings, not k − 1. With D_out = 1, dX = g·w
    # rounded to bf16 (then stored in fp32) is off by up to 2⁻⁹ of |dX|; cut to fp32's 24
    # bits, by up to 2⁻²³ (the fp32 result rounding allows 2⁻²⁴).
    X, W, _, dY = inputs(spec, (256,), 4, 1, seed=1)
    for order in em.ORDERS:
        r = em.emulate(X, W, None, dY, spec, order, tensors=("Y", "dX", "dW"))
        subjects = {"Y": r.cast()["Y"], "dX": r.cast()["dX"]}
        assert_pass(run(spec, X, W, None, dY, subjects), spec, X, W, None, dY)


@pytest.mark.parametrize("scale", ["tensor", "row", "block128", "mx32"])
def test_given_scales(scale):
    # Scales handed in (Transformer Engine's scale_inv), larger than the recipe's: bfloat16
    # numbers (mx32: powers of two) from 1.25 to 3 times the amax recipe.
    spec = f"fp8,scale={scale}"
    m = em.parse(spec)
    rng = np.random.default_rng(5)
    lead, D_in, D_out = (2, 20), 150, 130  # two column blocks, two W row blocks
    X, W = rng.standard_normal(lead + (D_in,)), rng.standard_normal((D_out, D_in))
    B, dY = rng.standard_normal(D_out), rng.standard_normal(lead + (D_out,)) * 1e-2
    if scale == "mx32":
        X, W, dY = (
            operand(rng, a.reshape(-1, a.shape[-1]).shape, n, f, m, 1.0).reshape(a.shape)
            for a, n, f in [(X, "X", m.x), (W, "W", m.w), (dY, "dY", m.dy)]
        )
    scales = {}
    for name, a, fmt in [("X", X, m.x), ("W", W, m.w), ("dY", dY, m.dy)]:
        s = em.recipe_scales(a.reshape(-1, a.shape[-1]), fmt, scale, name)
        if scale == "mx32":
            s = s * 2.0 ** rng.integers(0, 2, s.shape)
        else:
            s = em.convert(s * rng.uniform(1.25, 3, s.shape), "bf16")
        scales[name] = s
    given = {"X_scale": scales["X"], "W_scale": scales["W"], "dY_scale": scales["dY"]}
    for order in ("sequential", "tree"):
        r = em.emulate(X, W, B, dY, spec, order, **given)
        assert_pass(run(spec, X, W, B, dY, r.cast(), **given), spec, X, W, B, dY)


# ---------------------------------------------------------------------------
# N = 200,000 (D_in = 8, D_out = 4)

# A full check for fp32, bf16, fp16 and fp8 (Y and dX too: 800,000 and 1,600,000 entries,
# their largest error against tolerance), the order rotating; dW and dB, the sums of
# 200,000 terms, in every order for fp32 and in another order or preset for the others.
# (About 3 s a full check.)
BIG_FULL = {
    "fp32": "sequential",
    "bf16": "pairwise",
    "fp16": "blocked",
    "fp8": "tree",
}
BIG_SUMS = [("fp32", "pairwise"), ("fp32", "blocked"), ("fp32", "tree"), ("bf16", "sequential")]
BIG_SUMS += [("fp8-blockwise", "sequential"), ("fp16-acc16", "pairwise")]
N_BIG = BIG[0][0]


def _big_inconclusive(preset: str) -> tuple[str, ...]:
    """Where the model cannot resolve the gradient at N = 200,000 (checked against
    :func:`resolvable` too): fp16 accumulation of 200,000 terms (u·N ≈ 100); bf16's dB,
    a tree of 32-term windows in bfloat16 (99 additions deep, (1 + 2⁻⁸)⁹⁹ − 1 ≈ 0.47 of
    Σ|dY| against |Σ dY| ≈ √N); and fp8 operands, whose conversion error (2⁻³ for e5m2,
    2⁻⁴ for e4m3, relative, per term) over 200,000 random-sign terms is far larger than
    their sum."""
    return {
        "fp16-acc16": ("dW", "dB"),
        "bf16": ("dB",),
        "fp8": ("dW",),
        "fp8-blockwise": ("dW",),
    }.get(preset, ())


def assert_big(preset, report, X, W, B, dY):
    allowed = _big_inconclusive(preset)
    for name, c in checks(report).items():
        if name in allowed:
            assert c.verdict == "inconclusive", (name, c.verdict, c.bound_ratio)
            assert not resolvable(preset, X, W, B, dY, name)
        else:
            assert c.verdict == "pass", (name, c.verdict, c.tier, c.bound_ratio, c.message)


@functools.lru_cache(maxsize=16)
def big_case(preset, order, full=True):
    X, W, B, dY = inputs(preset, *BIG)
    tensors = ("Y", "dX", "dW", "dB") if full else ("dW", "dB")
    return X, W, B, dY, em.emulate(X, W, B, dY, preset, order, tensors=tensors)


@pytest.mark.parametrize("preset", BIG_FULL)
def test_large_n_correct_results(preset):
    X, W, B, dY, r = big_case(preset, BIG_FULL[preset])
    assert_big(preset, run(preset, X, W, B, dY, r.cast()), X, W, B, dY)


@pytest.mark.parametrize(("preset", "order"), BIG_SUMS)
def test_large_n_sums_in_other_orders(preset, order):
    X, W, B, dY, r = big_case(preset, order, full=False)
    c = r.cast()
    report = run(preset, X, W, B, dY, {"dW": c["dW"], "dB": c["dB"]})
    assert_big(preset, report, X, W, B, dY)


# ---------------------------------------------------------------------------
# Planted mistakes


BUG_SETS = [
    {"dX": lambda v: 0 * v, "dW": lambda v: -v, "dB": lambda v: v / 2, "Y": lambda v: -v},
    {"dX": lambda v: -v, "dW": lambda v: v / 2, "dB": lambda v: 0 * v, "Y": lambda v: v / 2},
    {"dX": lambda v: v / 2, "dW": lambda v: 0 * v, "dB": lambda v: -v, "Y": lambda v: 0 * v},
]


def planted(r: em.Result, bugs: dict) -> dict:
    out = {}
    for name in TENSORS:
        v = getattr(r, name)
        if v is not None:
            out[name] = (bugs[name](v) if name in bugs else v).astype(r.dtype)
    return out


def assert_caught(report, names):
    found = checks(report)
    for name in names:
        c = found[name]
        assert c.verdict in ("fail", "inconclusive") and not c.passed, (name, c.verdict)
    assert not report.passed


@pytest.mark.parametrize("preset", PRESETS)
def test_planted_mistakes_fail_small(preset):
    for shape in SMALL.values():
        X, W, B, dY, r = case(preset, *shape, "sequential")
        N = int(np.prod(shape[0]))
        for bugs in BUG_SETS:
            assert_caught(run(preset, X, W, B, dY, planted(r, bugs)), TENSORS)
        if N > 1:
            bugs = {"dB": lambda v, N=N: v / N}  # the mean for the sum
            assert_caught(run(preset, X, W, B, dY, planted(r, bugs)), ["dB"])
    # Square W: dW transposed.
    X, W, B, dY, r = case(preset, (24,), 16, 16, "sequential")
    assert_caught(run(preset, X, W, B, dY, planted(r, {"dW": lambda v: v.T})), ["dW"])


BIG_BUGS = [  # zero, sign-flipped, halved for dW and dB; the mean for the sum in dB
    {"dW": lambda v: 0 * v, "dB": lambda v: -v},
    {"dW": lambda v: -v, "dB": lambda v: v / 2},
    {"dW": lambda v: v / 2, "dB": lambda v: v / N_BIG},
    {"dB": lambda v: 0 * v},
]


@pytest.mark.parametrize("preset", ["fp32", "bf16", "fp16", "fp8"])
def test_planted_mistakes_fail_large_n(preset):
    X, W, B, dY, r = big_case(preset, BIG_FULL[preset])
    bugs_all = BIG_BUGS
    if preset == "bf16":  # dX and Y too (a check of them costs about 3 s)
        bugs_all = bugs_all + [{"dX": lambda v: v / 2, "Y": lambda v: -v}]
    for bugs in bugs_all:
        subjects = {k: v for k, v in planted(r, bugs).items() if k in bugs}
        assert_caught(run(preset, X, W, B, dY, subjects), list(bugs))


# ---------------------------------------------------------------------------
# Structured data


def structured(kind: str, rng, N, D_in, D_out):
    X = rng.standard_normal((N, D_in))
    W = rng.standard_normal((D_out, D_in))
    B = rng.standard_normal(D_out)
    dY = rng.standard_normal((N, D_out))
    if kind == "mean-loss":
        dY = np.full((N, D_out), 1.0 / N)
    elif kind == "one-hot":
        dY = np.zeros((N, D_out))
        dY[np.arange(N), rng.integers(0, D_out, N)] = 1.0
    elif kind == "positive-x":
        X = np.abs(X) + 0.5
    elif kind == "all-positive":  # every product > 0: truncation errors all of one sign
        X, dY = np.abs(X) + 0.5, np.abs(dY)
    elif kind == "constant-columns":
        X[:, ::2] = rng.standard_normal(X[:, ::2].shape[1])
    return X, W, B, dY


def _given_scales(spec, X, W, dY):
    """Power-of-two scales (bias-free exact emulation for any data) for the fp8 presets."""
    m = em.parse(spec)
    if m.scale == "none":
        return {}
    out = {}
    for key, name, a, fmt in [("X_scale", "X", X, m.x), ("W_scale", "W", W, m.w)] + [
        ("dY_scale", "dY", dY, m.dy)
    ]:
        s = em.recipe_scales(a.reshape(-1, a.shape[-1]), fmt, m.scale, name)
        out[key] = np.exp2(np.ceil(np.log2(s)))  # ≥ the recipe's: no overflow
    return out


STRUCTURED = ["mean-loss", "one-hot", "positive-x", "all-positive", "constant-columns"]


@pytest.mark.parametrize("kind", STRUCTURED)
@pytest.mark.parametrize("preset", PRESETS)
def test_structured_data_no_false_alarm(preset, kind):
    rng = np.random.default_rng(9)
    X, W, B, dY = structured(kind, rng, 96, 40, 12)
    scales = _given_scales(preset, X, W, dY)
    for order in em.ORDERS:
        r = em.emulate(X, W, B, dY, preset, order, **scales)
        assert_pass(run(preset, X, W, B, dY, r.cast(), **scales), preset, X, W, B, dY)


@pytest.mark.parametrize(
    ("preset", "kind"), [("fp32", "mean-loss"), ("bf16", "mean-loss"), ("bf16", "all-positive")]
)
def test_structured_data_large_n(preset, kind):
    # The mean loss's dY = 1/N summed sequentially: every rounding of dB's sum has one sign
    # (in fp32 the sum drifts far from 1 over 200,000 terms). All-positive terms in a
    # truncating accumulator: every error of one sign too.
    rng = np.random.default_rng(10)
    X, W, B, dY = structured(kind, rng, N_BIG, *BIG[1:])
    r = em.emulate(X, W, B, dY, preset, "sequential", tensors=("dW", "dB"))
    c = r.cast()
    report = run(preset, X, W, B, dY, {"dW": c["dW"], "dB": c["dB"]})
    assert_pass(report, preset, X, W, B, dY)
    assert checks(report)["dB"].verdict == "pass"
