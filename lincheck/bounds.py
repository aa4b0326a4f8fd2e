"""Rigorous rounding-error bounds of the witness, one function per equation.

Each function is one bound derived in ``docs/numerics.md``, named after it;
the witness schemes (:mod:`lincheck.witness`) and the streaming witnesses
(:mod:`lincheck.streaming`) evaluate them. The bounds of the *subjects*
(gradients computed in some arithmetic) are :func:`lincheck.precision.subject_bound`.

Notation: u is the unit roundoff (2⁻⁵³ for float64), η the smallest
subnormal, γ_k = k u / (1 − k u) the factor of Higham's inner-product bound
|fl(aᵀb) − aᵀb| ≤ γ_k |a|ᵀ|b| for k terms, any summation order, with or
without fused multiply-add [Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., SIAM 2002, §3.1 (Lemma 3.1, 3.3) and §3.5].
"""

from __future__ import annotations

import numpy as np

from .precision import FLOAT64, gamma

U64 = FLOAT64.u
ETA64 = FLOAT64.eta


def upper_sum(computed, k: int):
    """An upper bound on an exact sum of k non-negative products, from its float64 value.

    A computed non-negative sum is at least (1 − γ_k) times the exact one
    less 2kη for underflow (see :func:`lincheck.precision.subject_bound`),
    and 1/(1 − γ) ≤ 1 + 2γ for γ ≤ 1/2.
    """
    return computed * (1.0 + 2.0 * gamma(k + 1, U64)) + 4 * (k + 1) * ETA64


def central_difference_bound(n_ops: int, A, delta, M, G_mass=0.0, k_Y: int = 0):
    """(worst, typical) error of a central difference read from a loss share.

    (1 + γ₃) γ_c (2A/Δ + M) + γ₃ M for the rounding (see :func:`witness_block`);
    each loss value is also off by at most 2·c·η from underflow in its own
    operations (see :func:`lincheck.precision.subject_bound`), and by
    k_Y·η·Σ|G| from underflow inside the forward pass: each entry of Y sums
    k_Y = D_in + 1 terms whose products may each be off by η/2, and the loss
    multiplies Y by G, so ``G_mass`` = Σ|G| over the share's terms scales it
    (X = 0.1, W = 3e-316, dY = 1e3 makes it the largest term); the quotient
    adds one more η; (1 + 2⁻⁵⁰) covers evaluating the bound in float64. The
    typical scale replaces γ_c by √c·u.
    """
    g3 = gamma(3, U64)
    loss = 2.0 * A / delta + M  # the loss values' share of the error, and the perturbation's
    rest = g3 * M
    roundoff = (1.0 + g3) * gamma(n_ops, U64) * loss + rest
    per_pass = 2.0 * n_ops * ETA64 + (1.0 + g3) * k_Y * ETA64 * G_mass
    underflow = (1.0 + g3) * 2.0 * per_pass / delta + 3.0 * ETA64
    typical = (1.0 + g3) * np.sqrt(n_ops) * U64 * loss + rest
    return (roundoff + underflow) * (1.0 + 2.0**-50), typical


def complex_step_bound(n_ops: int, h: float, M, G_mass=0.0, k_Y: int = 0):
    """(worst, typical) error of a complex-step estimate Im L(θ + ih)/h.

    With standard complex arithmetic the imaginary part carries only the
    perturbation, so there is no cancellation: γ_c M for the rounding, with
    c the operations in the imaginary part's sums (see
    :func:`lincheck.witness.witness_block`), 2c·η/h for underflow in them,
    k_Y·η·Σ|G|/h for underflow inside Y's imaginary part (as for
    :func:`central_difference_bound`) and η for the quotient; (1 + 2⁻⁵⁰)
    covers evaluating the bound. The typical scale replaces γ_c by √c·u.
    """
    underflow = (2 * n_ops * ETA64 + 2.0 * k_Y * ETA64 * G_mass) / h + ETA64
    bound = (gamma(n_ops, U64) * M + underflow) * (1.0 + 2.0**-50)
    return bound, np.sqrt(n_ops) * U64 * M


def block_sum_bound(bounds_sum, magnitudes_sum, typical_squares_sum, m: int):
    """(worst, typical) error of a witness summed over m row blocks.

    Each block's estimate is within its own bound; adding m of them in
    float64 adds at most γ_{m−1} Σ|estimate_b|. The sums given were formed
    in float64 themselves, so each is bounded up (:func:`upper_sum`). The
    typical scales add as independent errors do: the root of the sum of
    their squares.
    """
    rounding = gamma(m - 1, U64) * upper_sum(magnitudes_sum, m) if m > 1 else 0.0
    bound = (upper_sum(bounds_sum, m) + rounding) * (1.0 + 2.0**-50)
    return bound, np.sqrt(typical_squares_sum)


ABS32_WORK = 2**24
"""Multiply-adds from which a product of absolute values (the magnitudes M that scale every
bound) is computed in float32 (:func:`abs_product`): about half the time of float64, for an
upper bound looser by at most 1 + 2.5·10⁻⁴ (γ_k of float32 at k ≤ ABS32_TERMS)."""

ABS32_TERMS = 2**12
"""The most terms per entry for which a magnitude is summed in float32."""

_U32, _TINY32, _MAX32 = 2.0**-24, 2.0**-126, float(np.finfo(np.float32).max)


def abs_product(a: np.ndarray, b: np.ndarray, a32=None, b32=None) -> tuple[np.ndarray, bool]:
    """(a @ b, whether in float32) for non-negative a and b, to be bounded up by
    :func:`upper_product`: in float32 when the product is large (ABS32_WORK multiply-adds)
    and its k ≤ ABS32_TERMS, unless a value or the result overflows float32; else in
    float64. ``a32``, ``b32``: functions giving a and b converted to float32, if kept
    elsewhere (a value too large for float32 becomes infinite there, and so does, or
    NaN, every product it meets)."""
    k = a.shape[-1]
    work = a.shape[0] * k * b.shape[-1]
    if work >= ABS32_WORK and k <= ABS32_TERMS:
        with np.errstate(over="ignore", invalid="ignore"):
            product = (a.astype(np.float32) if a32 is None else a32()) @ (
                b.astype(np.float32) if b32 is None else b32()
            )
            if np.isfinite(product.max(initial=0.0)):  # NaN and ∞ both show in the max
                return product, True
    return a @ b, False


def upper_product(computed, k: int, in32: bool, sums, k_gamma: int | None = None):
    """An upper bound on an exact product of absolute values Σ |a||b| (k terms per entry)
    from its computed value (:func:`abs_product`).

    In float64, :func:`upper_sum`. In float32, with u = 2⁻²⁴ and t = 2⁻¹²⁶ (float32's
    smallest normal): each operand a' = fl(|a|) has |a| ≤ a'/(1 − u) + t (below t it
    may be flushed to zero, if the processor does); each product is within a relative u
    or an absolute t; and the computed sum ŝ of k_gamma products (k by default) in any
    order, with or without FMA, is at least (1 − γ_k)(Σ a'b' − k t) [Higham 2002, §3.1].
    So, with ``sums`` = (upper bounds on Σ|a|, on Σ|b|) over each entry's terms, arrays
    that broadcast to the entries (a row and a column: Σ a' ≤ (1 + u) Σ|a| + k t),

        Σ|a||b| ≤ (ŝ + k t) / ((1 − u)² (1 − γ_k)) + t (1 + u)/(1 − u) · (Σ|a| + Σ|b|) + 3 k t²,

    times 1 + 2⁻⁵⁰ for evaluating this in float64 (a few roundings; each coefficient is
    computed with the factor in). The sums stay each entry's own: one number for all,
    the largest entry's, would raise an entry 10⁶⁰ smaller than it to some 2⁻¹²⁶ of it.
    """
    if not in32:
        return upper_sum(computed, k)
    kg = k if k_gamma is None else k_gamma
    grow = 1.0 / (1.0 - _U32) ** 2  # ≥ (1 + u)/(1 − u) as well
    scale = grow / (1.0 - kg * _U32 / (1.0 - kg * _U32))
    safety = 1.0 + 2.0**-50
    out = np.multiply(computed, scale * safety, dtype=np.float64)
    on_sums = grow * _TINY32 * safety
    # The row and the column first (small), then one broadcast pass over the entries each.
    out += on_sums * sums[0] + (k * _TINY32 * scale + 3 * k * _TINY32 * _TINY32) * safety
    out += on_sums * sums[1]
    return out
