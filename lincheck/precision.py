"""Arithmetic models: number formats, precisions, and the rounding-error bound of a product.

A *precision* says how a gradient was computed: the format its operands were
rounded to, the format its sums were accumulated in, and the format its result
was rounded to. From that and the per-entry magnitudes
(:class:`lincheck.oracles.Magnitudes`), :func:`product_error` bounds the
distance of every entry from the exact value. The derivation is in
``docs/numerics.md`` §2.

Notation: u is a format's unit roundoff, γ_k = k u / (1 − k u) [Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, §3.1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .core import FileBacked, leading_chunks


@dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Attributes
    ----------
    name : str
    bits : int
        Significand precision p, the implicit bit included.
    u : float
        Bound on the relative error of converting a number into the format:
        the unit roundoff 2⁻ᵖ for round-to-nearest (see TF32 and BFLOAT16
        for the two that allow more).
    eta : float
        The smallest positive subnormal number. A conversion that underflows
        has an absolute error of at most η/2; lincheck uses η.
    """

    name: str
    bits: int
    u: float
    eta: float


FLOAT64 = Format("float64", 53, 2.0**-53, 2.0**-1074)
FLOAT32 = Format("float32", 24, 2.0**-24, 2.0**-149)
# TF32 tensor cores read only the first 10 explicit significand bits of an
# fp32 operand (truncation on some hardware, rounding on others), so the
# conversion error is below one unit in the last place, 2⁻¹⁰, not 2⁻¹¹.
# bfloat16 conversions round to nearest (PyTorch, JAX, CUDA): 2⁻⁸. Both also
# allow for a first rounding of a float64 value to float32 (+2⁻²³).
TF32 = Format("tf32", 11, 2.0**-10 + 2.0**-23, 2.0**-136)
BFLOAT16 = Format("bfloat16", 8, 2.0**-8 + 2.0**-23, 2.0**-133)
FLOAT16 = Format("float16", 11, 2.0**-11, 2.0**-24)

FORMATS = {f.name: f for f in (FLOAT64, FLOAT32, TF32, BFLOAT16, FLOAT16)}


@dataclass(frozen=True)
class Precision:
    """How a gradient was computed: operand, accumulation and result formats."""

    name: str
    operands: Format
    accumulate: Format
    result: Format
    description: str


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp64", FLOAT64, FLOAT64, FLOAT64, "float64 arithmetic"),
        Precision("fp32", FLOAT32, FLOAT32, FLOAT32, "float32 arithmetic"),
        Precision(
            "tf32",
            TF32,
            FLOAT32,
            FLOAT32,
            "TF32 arithmetic",
        ),
        Precision(
            "bf16",
            BFLOAT16,
            FLOAT32,
            BFLOAT16,
            "bfloat16 arithmetic",
        ),
        Precision("fp16", FLOAT16, FLOAT16, FLOAT16, "float16 arithmetic"),
    )
}
"""The precisions lincheck knows, from most to least accurate operands."""

_BY_DTYPE = {"float64": "fp64", "float32": "fp32", "float16": "fp16"}


def precision_for(dtype: np.dtype) -> Precision:
    """The precision a gradient of this dtype is presumed computed in (integers: fp64)."""
    return PRECISIONS[_BY_DTYPE.get(np.dtype(dtype).name, "fp64")]


def storage_format(dtype: np.dtype) -> Format:
    """The format an array of this dtype stores its values in (integers: float64)."""
    return FORMATS.get(np.dtype(dtype).name, FLOAT64)


def gamma(k: float, u: float) -> float:
    """γ_k = k u / (1 − k u); infinite when k u ≥ 1 (no worst-case bound exists)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1.0 else math.inf


def round_to(values: np.ndarray, fmt: Format) -> np.ndarray:
    """``values`` rounded to nearest (ties to even) in ``fmt``, returned as float64.

    float32 and float16 use NumPy's conversions (with their exponent ranges);
    tf32 and bfloat16 round the significand to ``fmt.bits`` bits and keep
    float32's exponent range, as the hardware formats do, subnormals
    included: below float32's smallest normal number, 2⁻¹²⁶, their spacing
    is fixed at ``fmt.eta`` (2⁻¹³³ for bfloat16, 2⁻¹³⁶ for tf32), so 2⁻¹⁴⁰,
    a float32 subnormal, is not a bfloat16 number (it rounds to 0).
    """
    a = np.asarray(values, dtype=np.float64)
    if fmt is FLOAT64:
        return a
    if fmt in (FLOAT32, FLOAT16):
        with np.errstate(over="ignore"):
            return a.astype(fmt.name).astype(np.float64)
    m, e = np.frexp(a.astype(np.float32).astype(np.float64))
    # frexp writes 2⁻¹²⁶ as 0.5 · 2⁻¹²⁵: below it, the exponent of the spacing stays put.
    e = np.maximum(e, -125)
    return np.ldexp(
        np.rint(np.ldexp(a.astype(np.float32).astype(np.float64), fmt.bits - e)), e - fmt.bits
    )


def representable(values: np.ndarray, fmt: Format) -> bool:
    """Whether every value is exactly a value of ``fmt``."""
    a = values if isinstance(values, FileBacked) else np.asarray(values)  # scanned by chunks
    if a.dtype.kind == "b":
        return True
    if a.dtype.kind == "f":
        have = storage_format(a.dtype)
        # A format holds another if it has as many bits and at least its range.
        if fmt.bits >= have.bits and (fmt is FLOAT64 or fmt is have or have is FLOAT16):
            return True
    for part in leading_chunks(a):  # a chunk at a time: a may be a file larger than memory
        chunk = a[part]
        a64 = chunk.astype(np.float64)
        if a.dtype.kind in "iu" and not np.array_equal(a64.astype(a.dtype), chunk):
            return False  # an integer beyond 2⁵³ is not even a float64
        if not np.array_equal(round_to(a64, fmt), a64):
            return False
    return True


@dataclass(frozen=True)
class ErrorBound:
    """Per-entry error bounds of a computed tensor.

    ``worst`` is rigorous: |computed − exact| ≤ worst, always. ``typical`` is
    the probabilistic scale of Higham and Mary (2019): with independent
    rounding errors, |computed − exact| ≲ √k u · Σ|terms|; errors near it
    are normal, errors far below ``worst`` but far above ``typical`` are
    possible but unusual.
    """

    worst: np.ndarray
    typical: np.ndarray
    rule: str


def product_error(
    M: np.ndarray,
    S: np.ndarray | float,
    k: int,
    precision: Precision,
    storage: Format,
    operands_rounded: bool,
) -> ErrorBound:
    """Bound the error of k-term inner products computed in ``precision``.

    Parameters
    ----------
    M : ndarray
        Σ|a||b| per entry, the magnitude of the terms.
    S : ndarray or float
        Σ(|a| + |b|) per entry, which scales the error of operands that
        underflow when rounded (only used if ``operands_rounded``).
    k : int
        Terms per entry (D_out for dX, N for dW and dB, D_in + 1 for Y).
    precision : Precision
    storage : Format
        The format the result was stored in (the subject's dtype).
    operands_rounded : bool
        Whether the inputs, as given, had to be rounded to the operand
        format (False when they are already representable in it).

    Notes
    -----
    With u₀ the operand conversion error (0 if not rounded), u the
    accumulation roundoff, and u₁… the roundoffs of any narrower result or
    storage format,

        |fl(aᵀb) − aᵀb| ≤ [(1 + u₀)² (1 + γ_k(u)) Π(1 + u_r) − 1] · M
                           + underflow terms

    (Higham Lemmas 3.1 and 3.3; each product of two rounded operands has
    two conversion errors, each sum k roundings in any order, each result
    conversion one). Underflow adds at most η per rounding, and η₀(1 + u₀)·S
    for operands that underflow when rounded.
    """
    acc = precision.accumulate
    u0 = precision.operands.u if operands_rounded else 0.0
    outs = [f for f in (precision.result, storage) if f.u > acc.u]
    outs = [f for i, f in enumerate(outs) if f not in outs[:i]]
    g = gamma(k, acc.u)
    grow = (1.0 + g) * math.prod(1.0 + f.u for f in outs)
    alpha = (1.0 + u0) ** 2 * grow - 1.0
    under = 2 * k * acc.eta + sum(f.eta for f in outs)
    worst = alpha * M + under
    if operands_rounded:
        eta0 = precision.operands.eta
        worst = worst + grow * (1.0 + u0) * eta0 * (S + k * eta0)
    # (1 + 8·2⁻⁵³) covers evaluating this bound in float64.
    worst = worst * (1.0 + 2.0**-50)
    typical = (math.sqrt(2 * k) * u0 + math.sqrt(k) * acc.u + sum(f.u for f in outs)) * M
    parts = [f"γ_{k}({acc.name})"]
    if u0:
        parts.insert(0, f"operands rounded to {precision.operands.name}")
    parts += [f"result rounded to {f.name}" for f in outs]
    rule = f"{precision.name}: " + ", ".join(parts) + " × Σ|terms|"
    return ErrorBound(worst, typical, rule)
