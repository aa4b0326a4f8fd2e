"""Rigorous rounding-error bounds of the witness, one function per equation.

Each function is one bound derived in ``docs/numerics.md``, named after it;
the witness schemes (:mod:`lincheck.witness`) and the streaming witnesses
(:mod:`lincheck.streaming`) evaluate them. The bounds of the *subjects*
(gradients computed in some arithmetic) are :func:`lincheck.precision.product_error`.

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


def upper_sum(computed: np.ndarray, k: int) -> np.ndarray:
    """An upper bound on an exact sum of k non-negative products, from its float64 value.

    A computed non-negative sum is at least (1 − γ_k) times the exact one
    less 2kη for underflow (see :func:`lincheck.precision.product_error`),
    and 1/(1 − γ) ≤ 1 + 2γ for γ ≤ 1/2.
    """
    return computed * (1.0 + 2.0 * gamma(k + 1, U64)) + 4 * (k + 1) * ETA64


def central_difference_bound(n_ops: int, A, delta, M):
    """(worst, typical) error of a central difference read from a loss share.

    (1 + γ₃) γ_c (2A/Δ + M) + γ₃ M for the rounding (see :func:`witness_block`);
    each loss value is also off by at most 2·c·η from underflow (see
    :func:`lincheck.precision.product_error`) and the quotient by one more η;
    (1 + 2⁻⁵⁰) covers evaluating the bound in float64. The typical scale
    replaces γ_c by √c·u.
    """
    g3 = gamma(3, U64)
    loss = 2.0 * A / delta + M  # the loss values' share of the error, and the perturbation's
    rest = g3 * M
    roundoff = (1.0 + g3) * gamma(n_ops, U64) * loss + rest
    underflow = (1.0 + g3) * 4.0 * n_ops * ETA64 / delta + 3.0 * ETA64
    typical = (1.0 + g3) * np.sqrt(n_ops) * U64 * loss + rest
    return (roundoff + underflow) * (1.0 + 2.0**-50), typical
