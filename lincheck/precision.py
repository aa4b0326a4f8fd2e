"""Arithmetic models: number formats, how a kernel computed a product, and its error bounds.

A model (:class:`Arithmetic`) says how a subject (the user's Y, dX, dW or
dB) was computed from the given arrays: the format each operand was
converted to and how (:data:`FORMATS`, round to nearest or toward zero,
with or without scales), whether products were rounded, the accumulator
(:class:`Accumulator`), the format of the result and whether the bias was
added in the same rounding. ``--precision SPEC`` names one (:func:`parse`):
a preset of :data:`PRESETS`, or ``key=value`` pairs.

:func:`subject_bound` turns a model and the per-entry magnitudes of a
product into two tolerances, derived in ``docs/numerics.md`` §2:

- ``worst``, the *certain* tier: |computed − exact| ≤ worst for any
  summation order, always (products of (1 + u) factors, valid at every k);
- ``statistical``: beyond it an error is implausible for rounding, under
  the assumptions of Higham and Mary's probabilistic analysis applied to
  the part of the errors that can average out (§2.3); the part that cannot
  (every error of one sign, as in summing a constant) is bounded rigorously.

References: N. J. Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., SIAM 2002, §2.2, §3.1; N. J. Higham and T. Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from .core import FileBacked, leading_chunks


@dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Attributes
    ----------
    name : str
        The name in a precision spec (``bf16``, ``e4m3``, ...).
    bits : int
        Significand precision p, the implicit bit included; u = 2⁻ᵖ is the
        unit roundoff of rounding to nearest.
    emin : int
        Exponent of the smallest normal number, 2^emin.
    max : float
        The largest finite number.
    description : str
    """

    name: str
    bits: int
    emin: int
    max: float
    description: str

    @property
    def u(self) -> float:
        """Unit roundoff of round to nearest, 2⁻ᵖ."""
        return 2.0**-self.bits

    @property
    def eta(self) -> float:
        """The smallest positive subnormal, 2^(emin − p + 1): the spacing below 2^emin."""
        return 2.0 ** (self.emin - self.bits + 1)


FLOAT64 = Format("fp64", 53, -1022, float(np.finfo(np.float64).max), "float64")
FLOAT32 = Format("fp32", 24, -126, float(np.finfo(np.float32).max), "float32")
# TF32 and bfloat16 keep float32's exponent range (and its subnormals, with their own spacing).
TF32 = Format("tf32", 11, -126, float(np.finfo(np.float32).max), "TF32")
BFLOAT16 = Format("bf16", 8, -126, float(np.finfo(np.float32).max), "bfloat16")
FLOAT16 = Format("fp16", 11, -14, 65504.0, "float16")
# OCP 8-bit floating point (v1.0): E4M3 has no infinities and reaches 448; E5M2 is IEEE-like.
E4M3 = Format("e4m3", 4, -6, 448.0, "fp8 e4m3")
E5M2 = Format("e5m2", 3, -14, 57344.0, "fp8 e5m2")

FORMATS = {f.name: f for f in (FLOAT64, FLOAT32, TF32, BFLOAT16, FLOAT16, E4M3, E5M2)}

_DTYPE_FORMATS = {
    "float64": FLOAT64,
    "float32": FLOAT32,
    "float16": FLOAT16,
    "bfloat16": BFLOAT16,
    "float8_e4m3fn": E4M3,
    "float8_e5m2": E5M2,
}
"""NumPy dtype names (``ml_dtypes`` supplies the last three) and the formats they store."""


def storage_format(dtype: np.dtype) -> Format:
    """The format an array of this dtype stores its values in (integers: float64)."""
    return _DTYPE_FORMATS.get(np.dtype(dtype).name, FLOAT64)


def gamma(k: float, u: float) -> float:
    """γ_k = k u / (1 − k u); infinite when k u ≥ 1. Used for float64 sums only (k u ≪ 1)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1.0 else math.inf


def growth(n: float, c: float) -> float:
    """(1 + c)ⁿ − 1: the largest relative error of n roundings of relative error ≤ c.

    Valid for every n (Higham, Lemma 3.1 without its n c < 1 condition:
    |Π(1 + δᵢ) − 1| ≤ (1 + c)ⁿ − 1 whenever every |δᵢ| ≤ c); infinite once
    it exceeds float64's range.
    """
    if n <= 0 or c == 0:
        return 0.0
    with np.errstate(over="ignore"):
        x = n * math.log1p(c)
    return math.expm1(x) if x < 709.0 else math.inf


def round_to(values: np.ndarray, fmt: Format, mode: str = "rn") -> np.ndarray:
    """``values`` converted to ``fmt``, returned as float64.

    ``mode`` is "rn" (to nearest, ties to even) or "rz" (toward zero).
    Below the format's smallest normal number, 2^emin, the spacing stays
    at the smallest subnormal (:attr:`Format.eta`): 2⁻¹⁴⁰, a float32
    subnormal, is not a bfloat16 number (it rounds to 0). Beyond the range
    the result is rounded as if the exponent went on (overflow is the
    caller's to detect, against :attr:`Format.max`).
    """
    a = np.asarray(values, dtype=np.float64)
    if fmt is FLOAT64:
        return a
    if mode == "rn" and fmt in (FLOAT32, FLOAT16):
        with np.errstate(over="ignore"):
            return a.astype("float32" if fmt is FLOAT32 else "float16").astype(np.float64)
    _, e = np.frexp(a)
    # frexp writes 2^emin as 0.5 · 2^(emin + 1): below it the exponent of the spacing stays put.
    e = np.maximum(e, fmt.emin + 1)
    scaled = np.ldexp(a, fmt.bits - e)
    return np.ldexp(np.rint(scaled) if mode == "rn" else np.trunc(scaled), e - fmt.bits)


def representable(values: np.ndarray, fmt: Format) -> bool:
    """Whether every value is exactly a value of ``fmt`` (within its range)."""
    a = values if isinstance(values, FileBacked) else np.asarray(values)  # scanned by chunks
    if a.dtype.kind == "b":
        return True
    if a.dtype.kind == "f" or a.dtype.name in _DTYPE_FORMATS:
        have = storage_format(a.dtype)
        # A format holds another if it has as many bits and at least its range.
        if have is fmt or (fmt.bits >= have.bits and fmt.emin <= have.emin and fmt.max >= have.max):
            return True
    for part in leading_chunks(a):  # a chunk at a time: a may be a file larger than memory
        chunk = a[part]
        a64 = np.asarray(chunk, dtype=np.float64)
        if a.dtype.kind in "iu" and not np.array_equal(a64.astype(a.dtype), chunk):
            return False  # an integer beyond 2⁵³ is not even a float64
        if fmt is not FLOAT64 and np.max(np.abs(a64), initial=0.0) > fmt.max:
            return False
        if not np.array_equal(round_to(a64, fmt), a64):
            return False
    return True


# ---------------------------------------------------------------------------
# Accumulators and models


@dataclass(frozen=True)
class Accumulator:
    """Where a kernel adds its products up.

    ``fmt`` and ``truncates`` give each addition's relative error, at most
    2⁻ᵖ rounding to nearest and 2¹⁻ᵖ truncating (toward zero). With
    ``chunk`` = K, partial sums of K consecutive terms are kept in that
    format and each is added into a float32 accumulator rounding to nearest
    (FP8 tensor cores keep about 14 bits [DeepSeek-AI, DeepSeek-V3
    Technical Report, 2024, §3.3.2], which promote every 128 terms).
    """

    name: str
    fmt: Format
    truncates: bool = False
    chunk: int = 0
    window: int = 0

    @property
    def c(self) -> float:
        """The relative error of one addition."""
        return self.fmt.u * (2.0 if self.truncates else 1.0)

    def depth(self, k: int) -> int:
        """Additions a term goes through at most, in a sum of k terms: k − 1 in some order;
        with ``window`` = K, a tree of sums of K consecutive terms, level on level (XLA's
        reductions on CPUs: windows of 32), at most K − 1 per level."""
        if not self.window:
            return max(k - 1, 0)
        depth, n = 0, k
        while n > 1:
            depth += min(self.window, n) - 1
            n = -(-n // self.window)
        return depth

    def mean_depth(self, k: int) -> float:
        """Additions a term goes through on average, at most (Σ over the additions of the
        terms under each, over k): (k + 1)/2 in a sequential sum, the worst order; about
        (K + 1)/2 per level in a tree of K-term windows."""
        if not self.window:
            return (k + 1) / 2
        total, n = 0.0, k
        while n > 1:
            w = min(self.window, n)
            total += (w + 1) / 2
            n = -(-n // self.window)
        return total


def _accumulator(text: str) -> Accumulator:
    fixed = {
        "fp64": Accumulator("fp64", FLOAT64),
        "fp32": Accumulator("fp32", FLOAT32),
        "fp32-rz": Accumulator("fp32-rz", FLOAT32, truncates=True),
        "bf16": Accumulator("bf16", BFLOAT16),
        "fp16": Accumulator("fp16", FLOAT16),
    }
    if text in fixed:
        return fixed[text]
    name, _, K = text.partition("/")
    if name in ("fp32", "bf16", "fp16") and K.isdigit() and int(K) >= 2:
        return Accumulator(text, fixed[name].fmt, window=int(K))
    bits, _, K = text.partition("bit/")
    if bits.isdigit() and K.isdigit() and 2 <= int(bits) <= 24 and int(K) >= 1:
        fmt = Format(f"{bits}bit", int(bits), -126, FLOAT32.max, f"{bits}-bit")
        return Accumulator(text, fmt, truncates=True, chunk=int(K))
    raise ValueError(
        f"{text!r}: accumulators are fp64, fp32, fp32-rz, bf16, fp16, FORMAT/K (a tree of "
        "K-term sums in fp32, bf16 or fp16, e.g. bf16/32) or BITSbit/K (e.g. 14bit/128)"
    )


SCALES = ("none", "tensor", "row", "block128", "mx32")
OPERAND_KEYS = ("x", "w", "dy")
KEYS = (*OPERAND_KEYS, "convert", "scale", "products", "acc", "out", "bias", "reduce")


@dataclass(frozen=True)
class Arithmetic:
    """How a kernel computed Y = X Wᵀ + B, dX = G W, dW = Gᵀ X and dB = Σₙ G.

    Operand ``x``, ``w`` and ``dy`` formats (dX uses dy and w, dW dy and x,
    Y x and w; dB sums dY, converted to the dy format unless that is an
    fp8 format: frameworks sum the unquantized upstream gradient), their
    conversion (``convert``: "rn" or "rz") and ``scale`` ("none", "tensor",
    "row", "block128", "mx32": the kernel used s · q(a / s)), whether
    ``products`` were "exact" or "rounded" (to nearest, in the wider
    operand format), the accumulator, the ``out`` format of the result and
    whether the ``bias`` was "fused" into Y's sum or added "separate"ly
    after rounding X Wᵀ; ``reduce`` is dB's accumulator, if not ``acc``.
    """

    name: str
    x: Format
    w: Format
    dy: Format
    convert: str
    scale: str
    products: str
    acc: Accumulator
    out: Format
    bias: str
    description: str = ""
    reduce: Accumulator | None = None

    def accumulator(self, tensor: str) -> Accumulator:
        """The accumulator of ``tensor``: ``reduce`` for dB (the bias gradient is a reduction,
        not a matrix product, and frameworks run it apart), else ``acc``."""
        return self.reduce if tensor == "dB" and self.reduce is not None else self.acc

    def operand(self, name: str) -> Format:
        """The format of input ``name`` ("X", "W", "dY") as the kernel used it."""
        return {"X": self.x, "W": self.w, "dY": self.dy}[name]

    def quantized(self, name: str) -> bool:
        """Whether input ``name`` goes through a scaled (fp8) format."""
        return self.scale != "none" and self.operand(name) in (E4M3, E5M2)

    @property
    def spec(self) -> str:
        """The model in full, as ``key=value`` pairs (what :func:`parse` reads back)."""
        return ",".join(
            [
                f"x={self.x.name}",
                f"w={self.w.name}",
                f"dy={self.dy.name}",
                f"convert={self.convert}",
                f"scale={self.scale}",
                f"products={self.products}",
                f"acc={self.acc.name}",
                f"out={self.out.name}",
                f"bias={self.bias}",
                f"reduce={self.accumulator('dB').name}",
            ]
        )


def _model(name, operands, out, acc, description, **keys) -> Arithmetic:
    x, w, dy = (FORMATS[f] for f in operands)
    return Arithmetic(
        name=name,
        x=x,
        w=w,
        dy=dy,
        convert=keys.get("convert", "rn"),
        scale=keys.get("scale", "none"),
        products=keys.get("products", "exact"),
        acc=_accumulator(acc),
        out=FORMATS[out],
        bias=keys.get("bias", "fused"),
        description=description,
        reduce=_accumulator(keys["reduce"]) if "reduce" in keys else None,
    )


PRESETS = {
    m.name: m
    for m in (
        _model("fp64", ("fp64",) * 3, "fp64", "fp64", "float64 arithmetic"),
        _model("fp32", ("fp32",) * 3, "fp32", "fp32", "float32 arithmetic"),
        _model(
            "tf32",
            ("tf32",) * 3,
            "fp32",
            "fp32-rz",
            "TF32 tensor cores (operands truncated or rounded, fp32 accumulation)",
            convert="rz",
        ),
        _model(
            "bf16",
            ("bf16",) * 3,
            "bf16",
            "fp32-rz",
            "bfloat16 operands, fp32 accumulation, bfloat16 result",
            products="rounded",
            bias="separate",
            reduce="bf16/32",
        ),
        _model(
            "fp16",
            ("fp16",) * 3,
            "fp16",
            "fp32-rz",
            "float16 operands, fp32 accumulation, float16 result",
            # Exact products: a product of two float16 numbers is exact in the float32
            # accumulator (22 significant bits, and float16's exponent range lies inside
            # float32's), as torch, JAX and tinygrad compute it; rounding it to float16
            # would add up to η/2 = 2⁻²⁵ per product below float16's normal range, a
            # bound that made correct layers with |X|, |dY| ~ 1e-3 inconclusive.
            products="exact",
            bias="separate",
            reduce="fp16/32",
        ),
        _model(
            "fp16-acc16",
            ("fp16",) * 3,
            "fp16",
            "fp16",
            "float16 operands and accumulation",
            products="rounded",
            bias="separate",
        ),
        _model(
            "fp8",
            ("e4m3", "e4m3", "e5m2"),
            "bf16",
            "fp32-rz",
            "fp8 (e4m3 X and W, e5m2 dY) with per-tensor scales, fp32 accumulation",
            scale="tensor",
            bias="separate",
        ),
        _model(
            "fp8-blockwise",
            ("e4m3",) * 3,
            "bf16",
            "14bit/128",
            "fp8 e4m3 in 1×128 and 128×128 blocks, 14-bit accumulation promoted every 128",
            scale="block128",
            bias="separate",
        ),
    )
}
"""The named models. Each covers what the frameworks do on CPUs and on tensor cores: a
truncating fp32 accumulator bounds a rounding one too, rounded products bound exact ones,
and a separately added bias bounds a fused one (docs/numerics.md §2.1)."""

PRECISIONS = PRESETS  # the name the API and the CLI have always used

_BY_DTYPE = {
    "float64": "fp64",
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
}


def precision_for(dtype: np.dtype) -> Arithmetic:
    """The model a gradient of this dtype is presumed computed in (integers: fp64)."""
    return PRESETS[_BY_DTYPE.get(np.dtype(dtype).name, "fp64")]


def parse(spec: str | Arithmetic) -> Arithmetic:
    """The model a ``--precision`` spec names.

    A spec is a preset name, or comma-separated items each a preset name or
    ``key=value`` (keys :data:`KEYS`), later items overriding earlier ones
    on top of fp32: ``bf16,bias=fused``, ``x=e4m3,w=e4m3,dy=e5m2,scale=tensor``.

    Raises
    ------
    ValueError
        naming the item that is not understood and what is allowed.

    Examples
    --------
    >>> parse("bf16").spec
    'x=bf16,w=bf16,dy=bf16,convert=rn,scale=none,products=rounded,acc=fp32-rz,out=bf16,bias=separate,reduce=bf16/32'
    >>> parse("fp16,acc=fp16").spec == parse("fp16-acc16").spec
    True
    """
    if isinstance(spec, Arithmetic):
        return spec
    text = str(spec).strip()
    if text in PRESETS:
        return PRESETS[text]
    model = PRESETS["fp32"]
    choices = {
        "convert": ("rn", "rz"),
        "scale": SCALES,
        "products": ("exact", "rounded"),
        "bias": ("fused", "separate"),
    }
    for item in (t.strip() for t in text.split(",")):
        if item in PRESETS:
            model = PRESETS[item]
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or key not in KEYS:
            raise ValueError(
                f"precision {text!r}: {item!r} is neither a preset ({', '.join(PRESETS)}) "
                f"nor key=value with a key of {', '.join(KEYS)}"
            )
        new: Format | Accumulator | str
        if key in (*OPERAND_KEYS, "out"):
            if value not in FORMATS:
                raise ValueError(
                    f"precision {text!r}: {key}={value!r}: formats are {', '.join(FORMATS)}"
                )
            new = FORMATS[value]
        elif key in ("acc", "reduce"):
            try:
                new = _accumulator(value)
            except ValueError as exc:
                raise ValueError(f"precision {text!r}: {exc}") from None
        else:
            if value not in choices[key]:
                allowed = ", ".join(choices[key])
                raise ValueError(f"precision {text!r}: {key}={value!r}: expected one of {allowed}")
            new = value
        model = replace(model, **{key: new})  # type: ignore[arg-type]  # checked above
    return replace(model, name=text, description=f"the arithmetic {text}")


# ---------------------------------------------------------------------------
# Bounds

LAMBDA = 8.0
"""The statistical tier's multiple λ of the error's scale (docs/numerics.md §2.3): by
Azuma–Hoeffding each of a sum's three random parts exceeds λ times its scale with
probability at most 2·exp(−λ²/2) = 2.5e-14, so a correct entry exceeds the statistical
tolerance with probability below 10⁻¹³ under the model's assumptions: below 10⁻⁴ over
10⁹ entries."""

SAFETY = 1.0 + 2.0**-50
"""Covers evaluating a bound in float64 (a few roundings of 2⁻⁵³ each)."""


@dataclass(frozen=True)
class Operand:
    """What a bound needs of one operand of a product: its format in the kernel, whether the
    given values had to be converted to it, and the largest scale it was converted with."""

    fmt: Format
    converted: bool
    scale: float = 1.0
    overflows: bool = False
    c: float | None = None  # a relative conversion error beyond the format's (MX clamping)
    values: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The converted values, 2-D, when the inputs are in memory and had to be converted."""


@dataclass(frozen=True)
class ErrorBound:
    """Per-entry tolerances of a computed tensor.

    ``worst`` is rigorous (the certain tier): |computed − exact| ≤ worst,
    always. ``statistical`` ≤ worst is where rounding stops being plausible
    (docs/numerics.md §2.3). ``typical`` is the statistical scale without
    λ: errors near it are ordinary.
    """

    worst: np.ndarray
    statistical: np.ndarray
    typical: np.ndarray
    rule: str


def _conversion(op: Operand, convert: str) -> tuple[float, float]:
    """(relative, absolute) error of converting one value: 2⁻ᵖ (RN) or 2¹⁻ᵖ (RZ), plus 2⁻²⁴
    for a first rounding through float32 of a narrower format's conversion; underflow
    s·η (the spacing below the smallest normal, times the scale)."""
    if not op.converted:
        return 0.0, 0.0
    if op.overflows:
        return math.inf, math.inf
    c = op.fmt.u * (2.0 if convert == "rz" else 1.0)
    if op.fmt.bits < FLOAT32.bits:
        c += 2.0**-24
    return max(c, op.c or 0.0), op.fmt.eta * op.scale


def subject_bound(
    model: Arithmetic,
    tensor: str,
    k: int,
    M,
    S,
    value,
    largest,
    operands: tuple[Operand, ...],
    storage: Format,
    squares=None,
    bias=None,
    tree=None,
    shift=None,
    ordered=None,
) -> ErrorBound:
    """The certain and statistical tolerances of a tensor computed under ``model``.

    Parameters
    ----------
    model : Arithmetic
    tensor : {"dX", "dW", "dB", "Y"}
    k : int
        Terms per entry (D_out for dX, N for dW and dB, D_in + 1 for Y with a bias).
    M : ndarray
        Σ|terms| per entry (|a||b| summed; for Y, + |b|).
    S : tuple
        Per operand, the sum over the entry's terms of the other operand's |values|
        (Σ|b| for a, Σ|a| for b; the term count for dB's one operand): an operand
        off by η in absolute terms moves its products by η times these.
    value : ndarray
        The exact value per entry, whose sign is ignored (the float64 reference;
        its own error is below 10⁻¹⁵ of M, covered by the reference's bound).
    largest : ndarray, float, or a function giving one
        An upper bound on max |term| per entry (a function is called only where the
        statistical tier needs it: a chunked accumulator, or conversions without
        ``squares``).
    operands : tuple of Operand
        The product's operands (one for dB).
    storage : Format
        The format the subject was stored in (its dtype).
    squares : ndarray, optional
        Σ terms² per entry; M · largest bounds it otherwise.
    tree : ndarray, optional
        For a window-tree accumulator, Σ over its additions of the fluctuating partial
        sums squared (:meth:`lincheck.workspace.Workspace.tree_squares`); without it, the
        worst case over the additions.
    ordered : ndarray, optional
        For a truncating accumulator, |Σᵢ wᵢ rᵢ| with wᵢ the additions term i goes
        through in order (:func:`order_weights`): truncation errors share a sign, so
        their mean times the fluctuations' running sums does not average out (a batch
        sorted by class); bounded by c times it.
    shift : ndarray, optional
        |the reference from the converted operands − the reference|: what the model's
        conversions move each entry by, exactly. Where given, the statistical tier allows
        the larger of it and the estimate for independent conversion errors (inputs with
        few distinct values make those errors anything but independent).
    bias : ndarray, optional
        B, for Y with a separate bias: X Wᵀ = Y − B is rounded first.

    Notes
    -----
    Every term passes through the conversion of its operands (relative c_a,
    c_b), a rounded product (c_p), at most k − 1 additions (c each; a K-term
    chunk's K − 1 and ⌈k/K⌉ promotions for a chunked accumulator) and the
    rounding to ``out`` (one more for a separate bias, one for a narrower
    storage). With F the accumulation's growth and P the output's, the
    certain tier is

        worst = [(1 + e) F P − 1] · M + underflow,   e = (1+c_a)(1+c_b)(1+c_p) − 1

    and the statistical tier (docs/numerics.md §2.3), with v the exact value,

        max(e_c |v| + λ e_c √Q, |shift|) + c_p (|v| + λ √Q)   conversions, products
        + (1 + e)(1 + F) [d |v| + λ c √(k − 1) (M + |v|)/2       additions
                          + c |ordered|]                        (truncating only)
        + P (|v| + the above)                                 output roundings
        + underflow,  at most ``worst``,

    with Q = Σ terms² (``squares``, else M · largest) and d = c times the mean
    depth of a term ((k + 1)/2 in any order). A window tree uses its own partial
    sums, λ c √tree, where given; a chunked accumulator bounds each chunk's
    fluctuation by its mass, K · (largest + |v|/k). Derivations and assumptions:
    docs/numerics.md §2.3.
    """
    c_ops = [_conversion(op, model.convert) for op in operands]
    c_p, eta_p = 0.0, 0.0
    if model.products == "rounded" and len(operands) >= 2:
        wider = max((op.fmt for op in operands[:2]), key=lambda f: f.bits)
        c_p, eta_p = wider.u, wider.eta
    # Products of (1 + c) factors minus 1, in logarithms: 1 + 2⁻⁵³ is 1 in float64.
    e = math.expm1(sum(math.log1p(c) for c, _ in c_ops) + math.log1p(c_p))
    acc = model.accumulator(tensor)
    c = acc.c
    # A term wider than the accumulator is rounded as it enters, the first one too (an
    # FMA's k roundings, Higham's γ_k): products of operands whose significands together
    # exceed the accumulator's, unless rounded to a format it holds.
    if len(operands) >= 2:
        wide = sum(op.fmt.bits for op in operands[:2]) > acc.fmt.bits
        if c_p:
            wide = max(op.fmt.bits for op in operands[:2]) > acc.fmt.bits
    else:  # dB's terms are dY's values: rounded on entry if wider than the accumulator
        wide = bool(operands) and operands[0].fmt.bits > acc.fmt.bits
    first = 1 if wide else 0
    D = acc.depth(k) + first
    if acc.window:
        F = growth(D, c)
        drift, chunked = c * (acc.mean_depth(k) + first), False
        spread = c * math.sqrt(max(k - 1 + first, 0))  # without the tree's sums: every addition
    elif acc.chunk and k > acc.chunk:
        K, m = acc.chunk, -(-k // acc.chunk)
        F = math.expm1(math.log1p(growth(K - 1 + first, c)) + math.log1p(growth(m, FLOAT32.u)))
        drift = c * ((K + 1) / 2 + first) + FLOAT32.u * (m + 1) / 2
        spread = c * math.sqrt((K - 1 + first) * K) + FLOAT32.u * math.sqrt(m - 1)
        chunked = True
    else:
        F = growth(D, c)
        drift, spread = c * ((k + 1) / 2 + first), c * math.sqrt(max(D, 0))
        chunked = False
    # Output roundings: to `out` if it is narrower than the sum's format (a float32 sum for a
    # chunked accumulator); Y's separate bias addition, in `out`; a narrower storage dtype.
    summed = FLOAT32 if acc.chunk else acc.fmt
    outs = [model.out] if model.out.bits < summed.bits else []
    if tensor == "Y" and model.bias == "separate":
        outs.append(model.out)
    if storage.bits < min(o.bits for o in [summed, *outs]):
        outs.append(storage)
    P = math.expm1(sum(math.log1p(o.u) for o in outs))
    whole = math.inf if math.isinf(F) else math.expm1(math.log1p(e) + math.log1p(F) + math.log1p(P))
    # Conversion underflow: operand j off by η_j moves the entry by η_j·S_j (and by k·η_a·η_b
    # when both operands are off), each product then rounded and summed.
    etas = [eta for _, eta in c_ops[:2]]
    sums = S if isinstance(S, tuple) else (S,) * len(etas)
    under_conv = sum(eta * Sj for eta, Sj in zip(etas, sums) if eta)
    if len(etas) == 2:
        under_conv = under_conv + k * etas[0] * etas[1]
    under_conv = under_conv + sum(eta for _, eta in c_ops[2:])  # a converted bias
    eta_acc = acc.fmt.eta
    with np.errstate(over="ignore", invalid="ignore"):
        # Few passes over the entries (this runs on every entry of every check): each
        # tier is a sum of arrays times scalars, the scalar factors applied to the whole
        # sum (1 + P for the output roundings, SAFETY for evaluating it) folded into each
        # coefficient.
        grow = (1.0 + F) * (1.0 + P)
        under = grow * ((1.0 + e) * under_conv + k * eta_p)
        under = under + (1.0 + P) * k * eta_acc + sum(o.eta for o in outs)
        worst = np.multiply(M, whole * SAFETY)
        worst += under * SAFETY
        v = np.abs(value)
        g = (1.0 + e) * (1.0 + F)  # the partial sums are computed values
        outer = (1.0 + P) * SAFETY
        on_v = g * drift + P  # |v|'s coefficient, before the outer factor
        if chunked:
            # A chunk's mass is at most K · (largest + |v|/k): √((K−1)K) · √(that · M) per chunk.
            largest = largest() if callable(largest) else largest
            adds = np.sqrt((largest + v / k) * (M + v))
            adds *= outer * g * LAMBDA * spread
        elif acc.window and tree is not None:
            # The tree's own partial sums (docs/numerics.md §2.3): Azuma over its additions.
            adds = np.sqrt(tree)
            adds *= outer * g * LAMBDA * c
        else:
            # A fluctuating partial sum is at most half the mass: R = −(the rest), Σr = 0.
            adds = np.multiply(M, outer * g * LAMBDA * spread / 2)
            on_v += g * LAMBDA * spread / 2
        stat = adds
        if e:
            if squares is None:
                largest = largest() if callable(largest) else largest
            root = np.sqrt(M * largest if squares is None else squares)
            e_conv = math.expm1(sum(math.log1p(c) for c, _ in c_ops))
            if shift is not None:
                conv = root * (LAMBDA * e_conv)
                conv += e_conv * v
                conv = np.maximum(conv, np.abs(shift) * (1.0 + 2.0**-40))
                conv *= outer
                stat += conv
            else:
                stat += root * (outer * LAMBDA * e_conv)
                on_v += e_conv
            if c_p:
                stat += root * (outer * LAMBDA * c_p * (1.0 + e_conv))
                on_v += c_p * (1.0 + e_conv)
        if ordered is not None and acc.truncates:
            stat += np.abs(ordered) * (outer * c * g)
        if tensor == "Y" and model.bias == "separate" and bias is not None:
            # X Wᵀ is rounded before B is added: that rounding sees |X Wᵀ| ≤ |v| + |b|.
            stat += np.abs(bias) * (outer * model.out.u)
        stat += v * (outer * on_v)
        stat += under * SAFETY
        statistical = np.minimum(stat, worst, out=stat) if np.ndim(stat) else min(stat, worst)
        # At least `under` (every part above is), so never negative.
        typical = np.subtract(statistical, under)
        typical *= 1.0 / LAMBDA
    if math.isinf(whole):
        # An unbounded factor (an operand beyond its format's range, or sums so long that
        # every digit can be lost) bounds nothing, where it meets a zero magnitude, value or
        # spread too: ∞ · 0 is NaN, a tolerance no error is within (a failure, not the
        # inconclusive check it is). Only then: a finite `whole` keeps every factor finite.
        worst, statistical, typical = map(_unbounded_where_nan, (worst, statistical, typical))
    return ErrorBound(worst, statistical, typical, _rule(model, tensor, operands, c_p, outs))


def _unbounded_where_nan(a):
    """``a`` with its NaN entries infinite (in place for an array)."""
    if np.ndim(a):
        np.copyto(a, np.inf, where=np.isnan(a))
        return a
    return math.inf if math.isnan(a) else a


def _rule(model: Arithmetic, tensor: str, operands, c_p: float, outs) -> str:
    """How the tolerance was built, in words, for the report."""
    parts = [
        f"operands converted to {op.fmt.name}"
        for op in operands
        if op.converted and op.fmt.bits < 53
    ]
    if c_p:
        parts.append("products rounded")
    parts.append(f"sums in {model.accumulator(tensor).name}")
    if model.out.bits < 53:
        parts.append(f"result rounded to {model.out.name}")
    if tensor == "Y" and model.bias == "separate":
        parts.append("bias added separately")
    if outs and outs[-1] is not model.out:
        parts.append(f"stored as {outs[-1].name}")
    return f"{model.name}: " + ", ".join(parts)


def reference_bound(M, S, k: int) -> ErrorBound:
    """The float64 reference's error bound: γ_k(2⁻⁵³) M plus 2kη for underflow, any order.

    (Operands are exact in float64; k u ≪ 1 for any k lincheck meets, so
    Higham's γ_k applies.)
    """
    g = gamma(k, FLOAT64.u)
    worst = np.multiply(M, g * SAFETY)  # SAFETY folded in: two passes over M, not three
    worst += 2 * k * FLOAT64.eta * SAFETY
    typical = math.sqrt(k) * FLOAT64.u * M
    return ErrorBound(worst, worst, typical, f"fp64: γ_{k}(fp64) × Σ|terms|")


def order_weights(k: int, acc: Accumulator) -> np.ndarray:
    """wᵢ: the additions term i (of k, in order) goes through when summed in order (in
    chunks of K for a chunked accumulator): k − max(i, 1) for 0-based i (the first two
    terms meet in the first addition)."""
    i = np.arange(k)
    if acc.chunk:
        start = (i // acc.chunk) * acc.chunk
        length = np.minimum(start + acc.chunk, k) - start
        return (length - np.maximum(i - start, 1)).astype(np.float64)
    return (k - np.maximum(i, 1)).astype(np.float64)


def needs_squares(model: Arithmetic, operands: tuple[Operand, ...]) -> bool:
    """Whether the statistical tier has per-term errors to scale by Σ terms² (operands
    converted, or products rounded)."""
    return any(op.converted for op in operands) or (
        model.products == "rounded" and len(operands) >= 2
    )


def model_operands(
    model: Arithmetic, tensor: str, seen: Mapping[str, Operand]
) -> tuple[Operand, ...]:
    """The :class:`Operand` s of ``tensor`` under ``model``, from how the kernel saw each
    input (:func:`lincheck.scaling.prepare`). For Y a bias that is not a number of the
    ``out`` format adds its conversion; dB sums dY as given when dY was quantized to fp8
    (frameworks sum the unquantized upstream gradient)."""
    from .tensors import OPERANDS

    out = []
    for name in OPERANDS[tensor]:
        if name == "B":
            if seen.get("B", Operand(model.out, False)).converted:
                out.append(seen["B"])
            continue
        if tensor == "dB" and model.quantized("dY"):
            out.append(Operand(FLOAT64, False))
            continue
        out.append(seen.get(name, Operand(model.operand(name), False)))
    return tuple(out)
