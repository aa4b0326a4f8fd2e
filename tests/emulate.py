"""Emulated kernels: a linear layer's forward and backward computed in an arithmetic model.

Written from the contract (``precision=SPEC``: operand formats, conversion, scaling,
products, accumulator, output format, bias) and independent of lincheck's code: it
imports nothing from lincheck. Every result is exact for the model: each value the
kernel would hold is computed exactly, as a float64 number (all the formats here are
subsets of float64).

How each step is made exact
---------------------------
* Conversions (:func:`round_bits`) work on the float64 bit pattern: the integer
  significand is cut (rz) or rounded half to even (rn) at the format's quantum
  ``2^(max(E, emin) − p + 1)``, subnormals included. RN conversions to formats NumPy
  or ml_dtypes hold (fp32, fp16, bf16, e4m3, e5m2) use their ``astype``; the tests
  check both against each other.
* Products of converted operands are exact in float64 when their significands have
  at most 53 bits together; :func:`products` checks that and raises otherwise
  (fp64 operands are the exception: their products are float64-rounded, as in a
  non-FMA dgemm).
* One accumulator step ``a ← acc(a + t)`` rounds the *exact* sum: TwoSum gives
  ``a + t = s + e`` exactly, ``s`` is moved to its odd neighbour towards ``e`` when
  ``e ≠ 0`` (round to odd, RO₆₄), and RO₆₄ followed by RN or RZ to any format of at
  most 51 significand bits equals RN or RZ of the exact sum: the target's grid points
  and midpoints have at most 52 bits, so they are float64 numbers with an even last
  bit, and an inexact sum and its odd neighbour lie strictly between the same two of
  them (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved
  algorithms using rounding to odd", IEEE TC 2008).
* fp32-rz and BITS-bit accumulators truncate by clearing float64 significand bits.
  That is RZ to the format when the value is a normal number of the format:
  :func:`sum_terms` checks that every term is a multiple of a power of two ≥ the
  format's smallest normal number, so every nonzero partial sum is at least that.
* Long sequential sums take a fast path: the float64 sum of each step, rounded, checked
  afterwards for every step (exact in float64, or not on a decision point of the
  rounding); the sum is redone with exact steps if any step fails the check.
* Scaled fp8 operands: ``s · q(a / s)`` must be exact in float64 (power-of-two scales,
  or scales of few bits, such as bfloat16 numbers); ``a / s`` may be rounded unless it
  lands on a decision point of the conversion. Both are checked, raising ValueError
  otherwise, as does a value beyond the format's range (the contract does not say
  whether conversions saturate).

Summation orders (:data:`ORDERS`): ``sequential``, ``pairwise`` (halving tree),
``blocked`` (sequential in blocks of 16, then sequential over the blocks) and
``tree`` (a random binary tree: random pairings level by level, from a seeded
Generator). Each loops over the summed index with vector operations over every
output entry, so sums of 200,000 terms over a few dozen entries take seconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Fmt:
    """A binary format: p significand bits (implicit bit included), smallest normal 2^emin."""

    name: str
    p: int
    emin: int
    max: float
    dtype: np.dtype  # the NumPy dtype that stores the format's values (tf32: float32)


FORMATS = {
    f.name: f
    for f in (
        Fmt("fp64", 53, -1022, float(np.finfo(np.float64).max), np.dtype(np.float64)),
        Fmt("fp32", 24, -126, float(np.finfo(np.float32).max), np.dtype(np.float32)),
        Fmt("tf32", 11, -126, (2 - 2.0**-10) * 2.0**127, np.dtype(np.float32)),
        Fmt("bf16", 8, -126, (2 - 2.0**-7) * 2.0**127, np.dtype(ml_dtypes.bfloat16)),
        Fmt("fp16", 11, -14, 65504.0, np.dtype(np.float16)),
        Fmt("e4m3", 4, -6, 448.0, np.dtype(ml_dtypes.float8_e4m3fn)),
        Fmt("e5m2", 3, -14, 57344.0, np.dtype(ml_dtypes.float8_e5m2)),
    )
}
FP8 = ("e4m3", "e5m2")
# "The wider of the two operand formats" for rounded products: more significand bits first,
# then more range (tf32 over fp16). fp16 against bf16 is read as fp16 (11 bits against 8).
_WIDTH = ["e5m2", "e4m3", "bf16", "fp16", "tf32", "fp32", "fp64"]


# ---------------------------------------------------------------------------
# Conversions


def _parts(x: np.ndarray):
    """Integer significand M (uint64) and exponent E with x = ±M · 2^(E − 52)."""
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    field = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    M = bits & np.uint64((1 << 52) - 1)
    normal = field != 0
    M = np.where(normal, M | np.uint64(1 << 52), M)
    E = np.where(normal, field - 1023, -1022)
    return M, E


def round_bits(x, p: int, emin: int, mode: str, maxval: float = math.inf) -> np.ndarray:
    """x rounded to p significand bits with smallest normal 2^emin (rn: half to even; rz: cut).

    Beyond ``maxval`` rz saturates at ±maxval and rn gives ±inf. Returns float64.
    """
    x = np.asarray(x, dtype=np.float64)
    M, E = _parts(x)
    quantum = np.maximum(E, emin) - p + 1
    shift = np.clip(quantum - (E - 52), 0, 60).astype(np.uint64)
    if mode == "rz":
        R = (M >> shift) << shift
    elif mode == "rn":
        lsb = (M >> shift) & np.uint64(1)
        some = shift > 0
        half = np.where(some, (np.uint64(1) << np.maximum(shift, 1) - np.uint64(1)) - 1, 0)
        R = ((M + half.astype(np.uint64) + lsb * some) >> shift) << shift
    else:
        raise ValueError(f"rounding mode {mode!r}")
    r = np.copysign(np.ldexp(R.astype(np.float64), E - 52), x)
    big = np.abs(r) > maxval
    if big.any():
        r = np.where(big, np.copysign(maxval if mode == "rz" else math.inf, x), r)
    return np.where(np.isfinite(x), r, x)


def convert(x, fmt: str, mode: str = "rn") -> np.ndarray:
    """x converted to ``fmt`` (rn or rz), as float64. RN to a NumPy/ml_dtypes type uses astype."""
    f = FORMATS[fmt]
    x = np.asarray(x, dtype=np.float64)
    if fmt == "fp64":
        return x.copy()
    if mode == "rn" and fmt != "tf32":
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(f.dtype).astype(np.float64)
    return round_bits(x, f.p, f.emin, mode, f.max)


def sigbits_each(x) -> np.ndarray:
    """The significand bits each value of x needs (0 for 0)."""
    x = np.asarray(x, dtype=np.float64)
    m, _ = np.frexp(x)
    n = np.abs(np.ldexp(m, 53)).astype(np.int64)
    low = np.where(n == 0, 1 << 53, n & -n)
    return 54 - np.frexp(low.astype(np.float64))[1]


def sigbits(x) -> int:
    """The most significand bits any value of x needs (0 for an all-zero x)."""
    return int(sigbits_each(x).max(initial=0))


# ---------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Model:
    """An arithmetic model, as the contract's keys name it."""

    x: str = "fp64"
    w: str = "fp64"
    dy: str = "fp64"
    convert: str = "rn"
    scale: str = "none"
    products: str = "exact"
    acc: str = "fp64"
    out: str = "fp64"
    bias: str = "fused"
    reduce: str | None = None  # dB's accumulator, if not acc

    @property
    def dtype(self) -> np.dtype:
        """The dtype the results are stored in."""
        return FORMATS[self.out].dtype


def _preset(fmt: str, **keys) -> Model:
    return Model(x=fmt, w=fmt, dy=fmt, acc=fmt, out=fmt, **keys)


_LOW = dict(products="rounded", acc="fp32-rz", bias="separate")
PRESETS = {
    "fp64": _preset("fp64"),
    "fp32": _preset("fp32"),
    "tf32": replace(_preset("tf32", convert="rz"), acc="fp32-rz", out="fp32"),
    "bf16": replace(_preset("bf16"), **_LOW, reduce="bf16/32"),
    "fp16": replace(_preset("fp16"), **_LOW, reduce="fp16/32"),
    "fp16-acc16": replace(_preset("fp16"), **dict(_LOW, acc="fp16")),
    "fp8": Model(
        x="e4m3", w="e4m3", dy="e5m2", scale="tensor", acc="fp32-rz", out="bf16", bias="separate"
    ),
    "fp8-blockwise": Model(
        x="e4m3",
        w="e4m3",
        dy="e4m3",
        scale="block128",
        acc="14bit/128",
        out="bf16",
        bias="separate",
    ),  # fmt: skip
}
_KEYS = {f.name for f in fields(Model)}


def parse(spec: str | Model) -> Model:
    """A SPEC string (preset, then key=value overrides; keys alone: on top of fp32)."""
    if isinstance(spec, Model):
        return spec
    model = PRESETS["fp32"]
    for i, item in enumerate(s.strip() for s in spec.split(",")):
        if "=" not in item:
            if i:
                raise ValueError(f"a preset comes first: {item!r}")
            model = PRESETS[item]
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in _KEYS:
            raise ValueError(f"unknown key {key!r}")
        model = replace(model, **{key: value})
    return model


# ---------------------------------------------------------------------------
# Accumulators: exact one-step adds


def _round_to_odd_sum(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """RO₆₄(a + t): the float64 sum, moved to its odd neighbour towards the exact sum if inexact."""
    s = a + t
    bb = s - a
    e = (a - (s - bb)) + (t - bb)  # TwoSum: a + t = s + e exactly
    si = s.view(np.int64)
    d = (e != 0).astype(np.int64)
    up = (e > 0) == (s > 0)  # the exact sum is farther from 0 than s
    return np.where(up, si | d, (si - d) | d).view(np.float64)


def _cut(v: np.ndarray, p: int) -> np.ndarray:
    """RZ to p bits of normal float64 values: clear the low 53 − p significand bits."""
    mask = np.int64(~((1 << (53 - p)) - 1))
    return (v.view(np.int64) & mask).view(np.float64)


@dataclass(frozen=True)
class Acc:
    """One accumulator: ``add(a, t)`` is acc(a + t) for an accumulator value a and a term t."""

    name: str
    p: int
    emin: int
    mode: str

    def round(self, v: np.ndarray) -> np.ndarray:
        """v (float64) rounded to the accumulator."""
        if self.name == "fp64":
            return v
        if self.mode == "rz":
            return _cut(v, self.p)
        return v.astype(FORMATS[self.name].dtype).astype(np.float64)

    def add(self, a: np.ndarray, t: np.ndarray) -> np.ndarray:
        if self.name == "fp64":
            return a + t
        return self.round(_round_to_odd_sum(a, t))

    def leaf(self, t: np.ndarray) -> np.ndarray:
        """A term entering the accumulator: acc(0 + t), the term rounded to the accumulator."""
        return self.round(t)

    def decision(self, v: np.ndarray) -> np.ndarray:
        """Where v may be a decision point of the rounding (rz: a value of the format; rn: a
        midpoint). Values with few bits are flagged too (subnormal ranges): a superset."""
        if self.mode == "rz":
            return _cut(v, self.p) == v
        return (_cut(v, self.p + 1) == v) & (_cut(v, self.p) != v)


_ACCS = {
    "fp64": Acc("fp64", 53, -1022, "rn"),
    "fp32": Acc("fp32", 24, -126, "rn"),
    "fp32-rz": Acc("fp32", 24, -126, "rz"),
    "bf16": Acc("bf16", 8, -126, "rn"),
    "fp16": Acc("fp16", 11, -14, "rn"),
}


def quantum(x) -> float:
    """The largest power of two that every value of x is a multiple of (inf for all zeros)."""
    x = np.asarray(x, dtype=np.float64)
    nz = x[x != 0]
    if nz.size == 0:
        return math.inf
    m, e = np.frexp(nz)
    n = np.abs(np.ldexp(m, 53)).astype(np.int64)
    return math.ldexp(1.0, int((np.frexp((n & -n).astype(np.float64))[1] - 54 + e).min()))


# ---------------------------------------------------------------------------
# Summation orders over T (k terms × E entries)

ORDERS = ("sequential", "pairwise", "blocked", "tree")
BLOCK = 16


def _sequential(T, acc: Acc, rng):
    """Each term added in turn. Fast path: the float64 sum, rounded; it is the rounded exact
    sum wherever the float64 sum was exact or is not a decision point of the rounding (s is
    RN₆₄ of the exact sum, so no float64 number lies strictly between them). Every step is
    checked afterwards; if any may be wrong, the sum is redone with exact steps."""
    if acc.name == "fp64" or len(T) < 64:
        a = acc.leaf(T[0])
        for i in range(1, len(T)):
            a = acc.add(a, T[i])
        return a
    A = np.empty_like(T)
    S = np.empty_like(T)
    A[0] = acc.leaf(T[0])
    if acc.mode == "rz":
        mask = np.int64(~((1 << (53 - acc.p)) - 1))
        Ai, Si = A.view(np.int64), S.view(np.int64)
        for i in range(1, len(T)):
            np.add(A[i - 1], T[i], out=S[i])
            np.bitwise_and(Si[i], mask, out=Ai[i])
    else:
        dtype = FORMATS[acc.name].dtype
        for i in range(1, len(T)):
            np.add(A[i - 1], T[i], out=S[i])
            A[i] = S[i].astype(dtype)
    prev, t, s = A[:-1], T[1:], S[1:]
    bb = s - prev
    e = (prev - (s - bb)) + (t - bb)
    if np.any((e != 0) & acc.decision(s)):
        a = acc.leaf(T[0])
        for i in range(1, len(T)):
            a = acc.add(a, T[i])
        return a
    return A[-1]


def _pairwise(T, acc: Acc, rng):
    nodes = acc.leaf(T)
    while len(nodes) > 1:
        odd = nodes[-1:] if len(nodes) % 2 else nodes[:0]
        even = len(nodes) - len(odd)
        nodes = np.concatenate([acc.add(nodes[0:even:2], nodes[1:even:2]), odd])
    return nodes[0]


def _tree(T, acc: Acc, rng):
    nodes = acc.leaf(T)
    while len(nodes) > 1:
        nodes = nodes[rng.permutation(len(nodes))]
        odd = nodes[-1:] if len(nodes) % 2 else nodes[:0]
        even = len(nodes) - len(odd)
        nodes = np.concatenate([acc.add(nodes[0:even:2], nodes[1:even:2]), odd])
    return nodes[0]


def _chunks(T, size: int):
    """T (k, E) as (size, chunks·E): chunk c's terms in column block c (zero-padded)."""
    k, E = T.shape
    size = min(size, k)  # one chunk: no padding
    n = -(-k // size)
    P = np.zeros((n * size, E))
    P[:k] = T
    return P.reshape(n, size, E).transpose(1, 0, 2).reshape(size, n * E), n


def _blocked(T, acc: Acc, rng):
    k, E = T.shape
    C, n = _chunks(T, BLOCK)
    return _sequential(_sequential(C, acc, rng).reshape(n, E), acc, rng)


_ORDER_FUNCS = {
    "sequential": _sequential,
    "pairwise": _pairwise,
    "blocked": _blocked,
    "tree": _tree,
}


def sum_terms(T, acc: str, order: str = "sequential", rng=None, q=None) -> np.ndarray:
    """Σ over axis 0 of T (k terms × E entries) in accumulator ``acc`` and ``order``, exactly.

    ``acc``: fp64, fp32, fp32-rz, bf16, fp16; ``BITSbit/K`` (K-term chunks in a
    BITS-bit truncating accumulator, summed in ``order``, each added in turn into an
    fp32 RN accumulator); or ``FMT/K`` for FMT in fp32, bf16, fp16 (a tree of windows of
    K consecutive terms, level on level, in FMT: XLA's reductions on CPUs; ``order``
    within each window). ``q``: a power of two every term is a multiple of (default:
    computed from T), which keeps truncating accumulators in their normal range.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.ndim == 1:
        T = T[:, None]
    rng = rng if rng is not None else np.random.default_rng(0)
    k, E = T.shape
    if k == 0:
        return np.zeros(E)
    fn = _ORDER_FUNCS[order]
    m = re.fullmatch(r"(\d+)bit/(\d+)", acc)
    if m:
        bits, K = int(m[1]), int(m[2])
        if not 2 <= bits <= 51:
            raise ValueError(f"accumulator {acc!r}: 2 to 51 bits")
        chunk_acc = Acc(acc, bits, -1022, "rz")
        C, n = _chunks(T, K)
        partial = fn(C, chunk_acc, rng).reshape(n, E)
        return _sequential(partial, _ACCS["fp32"], rng)
    m = re.fullmatch(r"(fp32|bf16|fp16)/(\d+)", acc)
    if m:
        a, K = _ACCS[m[1]], int(m[2])
        if k == 1:
            return a.leaf(T[0])
        while len(T) > 1:
            C, n = _chunks(T, K)
            T = fn(C, a, rng).reshape(n, E)
        return T[0]
    a = _ACCS[acc]
    if a.mode == "rz" and (quantum(T) if q is None else q) < 2.0**a.emin:
        raise ValueError(f"{acc}: terms below 2^{a.emin} (subnormal partial sums not emulated)")
    return fn(T, a, rng)


# ---------------------------------------------------------------------------
# Scaling


def _fmax_exp(fmt: str) -> int:
    return {"e4m3": 8, "e5m2": 15}[fmt]


def _group_amax(A: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """max |A| over blocks of rows × cols (edge blocks smaller)."""
    R, C = A.shape
    nr, nc = -(-R // rows), -(-C // cols)
    P = np.zeros((nr * rows, nc * cols))
    P[:R, :C] = np.abs(A)
    return P.reshape(nr, rows, nc, cols).max(axis=(1, 3))


def _block_shape(kind: str, role: str, A: np.ndarray) -> tuple[int, int]:
    R, C = A.shape
    if kind == "tensor":
        return R, C
    if kind == "row":
        return 1, C
    if kind == "block128":
        return (128, 128) if role == "W" else (1, 128)
    if kind == "mx32":
        return 1, 32
    raise ValueError(f"scale {kind!r}")


def recipe_scales(A, fmt: str, kind: str, role: str) -> np.ndarray:
    """The recipe's dequantization factors s per block (row blocks × column blocks)."""
    A = np.asarray(A, dtype=np.float64)
    amax = _group_amax(A, *_block_shape(kind, role, A))
    if kind == "mx32":
        _, e = np.frexp(amax)
        s = np.ldexp(1.0, e - 1 - _fmax_exp(fmt))
    else:
        s = amax / FORMATS[fmt].max
    return np.where(amax > 0, s, 1.0)


def _expand(s: np.ndarray, kind: str, role: str, A: np.ndarray) -> np.ndarray:
    rows, cols = _block_shape(kind, role, A)
    R, C = A.shape
    s = np.asarray(s, dtype=np.float64).reshape(-(-R // rows), -(-C // cols))
    return np.repeat(np.repeat(s, rows, axis=0)[:R], cols, axis=1)[:, :C]


@dataclass
class Operand:
    """conv(A): the values, a bound on their significand bits, a power of two dividing them."""

    values: np.ndarray
    fmt: str
    bits: int
    q: float
    scales: np.ndarray | None


def quantize(A, fmt: str, model: Model, role: str, scales=None) -> Operand:
    """conv(a) for every a of A (2-D): ``s · q(a / s)`` for scaled fp8, else q(a). Exact."""
    A = np.asarray(A, dtype=np.float64)
    f = FORMATS[fmt]
    if model.scale == "none" or fmt not in FP8:
        v = convert(A, fmt, model.convert)
        return Operand(v, fmt, f.p, quantum(v), None)
    s = recipe_scales(A, fmt, model.scale, role) if scales is None else np.asarray(scales)
    S = _expand(s, model.scale, role, A)
    ratio = A / S
    q = convert(ratio, fmt, model.convert)
    if not np.all(np.abs(q) <= f.max):
        # mx32's recipe maps a block's amax up to 2^(emax+1)·(1 − ε), beyond e4m3's 448 and
        # e5m2's 57344; the contract does not say whether such values saturate.
        raise ValueError(f"{role}: a / s beyond {fmt}'s range")
    # a / s may be rounded in float64: harmless unless it lands on a decision point of the
    # conversion (rn: a midpoint, p + 1 bits but not p; rz: a grid point).
    exact = (sigbits_each(S) + sigbits_each(ratio) <= 53) & (ratio * S == A)
    on_grid = round_bits(ratio, f.p, f.emin, "rz") == ratio
    if model.convert == "rn":
        edge = (round_bits(ratio, f.p + 1, f.emin, "rz") == ratio) & ~on_grid
    else:
        edge = on_grid
    if np.any(~exact & edge & (ratio != 0)):
        raise ValueError(f"{role}: a / s rounded onto a decision point of {fmt}")
    bits = sigbits(s) + f.p
    if bits > 53:
        raise ValueError(f"{role}: s · q not exact in float64 (scales with too many bits)")
    v = S * q
    return Operand(v, fmt, bits, quantum(v), np.asarray(s))


# ---------------------------------------------------------------------------
# Products and the layer


def _wider(a: str, b: str) -> str:
    return max(a, b, key=_WIDTH.index)


def products(a: Operand, b: Operand, va, vb, model: Model) -> tuple[np.ndarray, float]:
    """va · vb (arrangements of a's and b's values, broadcast) and a power of two dividing
    them: exact, or rounded (RN) to the wider operand format."""
    t = va * vb
    q = a.q * b.q
    if "fp64" in (a.fmt, b.fmt):
        return t, 0.0  # float64 products, as a non-FMA float64 kernel rounds them
    if a.bits + b.bits > 53:
        raise ValueError("products not exact in float64")
    if model.products == "rounded":
        t = convert(t, _wider(a.fmt, b.fmt), "rn")  # a multiple of q still (see sum_terms)
    elif model.products != "exact":
        raise ValueError(f"products {model.products!r}")
    return t, q


@dataclass
class Result:
    """The model's Y, dX, dW, dB (float64 holding exact values; None without B) and dtype."""

    Y: np.ndarray
    dX: np.ndarray
    dW: np.ndarray
    dB: np.ndarray | None
    dtype: np.dtype
    scales: dict

    def cast(self) -> dict[str, np.ndarray | None]:
        """The four results in their storage dtype (exact: they are values of it)."""
        out = {}
        for name in ("Y", "dX", "dW", "dB"):
            v = getattr(self, name)
            out[name] = None if v is None else v.astype(self.dtype)
        return out


def emulate(
    X, W, B, dY, spec, order: str = "sequential", *, X_scale=None, W_scale=None,
    dY_scale=None, seed: int = 0, tensors=("Y", "dX", "dW", "dB"),
) -> Result:  # fmt: skip
    """Y = X Wᵀ + B and its gradients dX, dW, dB computed in the model ``spec``, exactly.

    X (*, D_in), W (D_out, D_in), B (D_out,) or None, dY (*, D_out). Scales: per block
    as :func:`recipe_scales` lays them out (tensor: a scalar; row: one per row; block128
    and mx32: rows × column blocks, W 128×128 blocks for block128); None: the recipe.
    ``order`` applies to every sum; ``seed`` draws the random trees. Results not in
    ``tensors`` (Y and dX cost the most at large N) are None.
    """
    m = parse(spec)
    rng = np.random.default_rng(seed)
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    dY = np.asarray(dY, dtype=np.float64)
    lead = X.shape[:-1]
    D_out, D_in = W.shape
    X2, G2 = X.reshape(-1, D_in), dY.reshape(-1, D_out)
    N = X2.shape[0]

    def flat(s):
        if s is None or m.scale == "tensor":
            return s
        s = np.asarray(s, dtype=np.float64)
        return s.reshape(N) if m.scale == "row" else s.reshape(N, -1)

    x = quantize(X2, m.x, m, "X", flat(X_scale))
    w = quantize(W, m.w, m, "W", W_scale)
    g = quantize(G2, m.dy, m, "dY", flat(dY_scale))

    def total(T, q):
        return convert(sum_terms(T, m.acc, order, rng, q), m.out, "rn")

    Y = dX = None
    if B is not None:
        B = np.asarray(B, dtype=np.float64)
        if m.bias not in ("fused", "separate"):
            raise ValueError(f"bias {m.bias!r}")
    if "Y" in tensors:
        Y = _forward(x, w, B, m, total, N, D_in, D_out).reshape(lead + (D_out,))
    if "dX" in tensors:
        # dX: k = D_out, entries (n, i).
        T, q = products(g, w, g.values.T[:, :, None], w.values[:, None, :], m)
        dX = total(T.reshape(D_out, N * D_in), q).reshape(lead + (D_in,))
    # dW and dB: k = N, entries (o, i) and o, summed together.
    # (in one accumulation when dB has dW's accumulator).
    T, q = products(g, x, g.values[:, :, None], x.values[:, None, :], m)
    T = T.reshape(N, D_out * D_in)
    dB = None
    if B is not None:
        bias_terms = G2 if m.dy in FP8 else g.values
        if m.reduce is None or m.reduce == m.acc:
            T = np.concatenate([T, bias_terms], axis=1)
            q = min(q, quantum(bias_terms))
        else:
            dB = convert(sum_terms(bias_terms, m.reduce, order, rng), m.out, "rn")
    S = total(T, q)
    dW = S[: D_out * D_in].reshape(D_out, D_in)
    if B is not None and dB is None:
        dB = S[D_out * D_in :]
    return Result(
        Y=Y,
        dX=dX,
        dW=dW,
        dB=dB,
        dtype=m.dtype,
        scales={"X": x.scales, "W": w.scales, "dY": g.scales},
    )


def _forward(x, w, B, m, total, N, D_in, D_out):
    """Y: k = D_in products (+ the bias, first, when fused), entries (n, o)."""
    T, q = products(x, w, x.values.T[:, :, None], w.values.T[:, None, :], m)
    T = T.reshape(D_in, N * D_out)
    if B is not None and m.bias == "fused":
        T = np.concatenate([np.tile(B, N)[None, :], T])
        q = min(q, quantum(B))
    Y = total(T, q)
    if B is not None and m.bias == "separate":
        Y = convert(_round_to_odd_sum(Y, np.tile(B, N)), m.out, "rn")
    return Y
