"""The numerical witness: every entry of dX, dW, dB from forward passes of L = Σ G ⊙ Y.

The schemes (grouped central differences, one entry at a time, the complex
step, chosen entries) and their step sizes; each returns its estimates with
their rigorous and typical error bounds (:mod:`lincheck.bounds`). The
derivation of every bound is in ``docs/numerics.md`` §4.

Notation: u is the unit roundoff (2⁻⁵³ for float64), η the smallest
subnormal, γ_k = k u / (1 − k u) the factor of Higham's inner-product bound
|fl(aᵀb) − aᵀb| ≤ γ_k |a|ᵀ|b| for k terms, any summation order, with or
without fused multiply-add [Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., SIAM 2002, §3.1 (Lemma 3.1, 3.3) and §3.5].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .bounds import central_difference_bound, complex_step_bound, upper_sum
from .core import forward, surrogate_loss
from .workspace import Workspace

DEFAULT_REL_STEP = 2.0**10
"""How far past the cancellation threshold the step goes; see :func:`step_sizes`."""

_MAX_STEP_FACTOR = 2.0**64
"""The step of an entry whose perturbation moves nothing (M = 0), in units of its array's
scale."""

_STEP_ROOM = 2.0**1000
"""How large a value of the forward pass, or the loss's change, a step may make (float64
overflows past 2¹⁰²⁴): see :func:`step_sizes`."""

METHODS = ("central", "dense", "complex-step")
"""Witness methods: grouped central differences, one entry at a time, the complex step."""


def _scale(values: np.ndarray) -> float:
    """2^⌈log₂ max |values|⌉ (1 if all are zero): a power-of-two step at the data's scale."""
    scale = float(np.max(np.abs(values), initial=0.0))
    if not np.isfinite(scale) or scale == 0.0:
        return 1.0
    return float(np.ldexp(1.0, int(np.frexp(scale)[1])))


def step_sizes(
    values: np.ndarray | float,
    A: np.ndarray | float,
    M: np.ndarray,
    rel_step: float = DEFAULT_REL_STEP,
    reach: float = 1.0,
) -> np.ndarray:
    """Per-entry central-difference steps h = rel_step · 2^⌈log₂ max(s, A/M)⌉.

    The estimate's rounding error (see :func:`witness_block`) has two parts:
    γ·2A/(θ⁺ − θ⁻), the cancellation between two loss values of size about
    A, which falls as h grows, and γ·M, the rounding of the perturbation's
    own effect, which does not. At h = A/M the two are equal; ``rel_step``
    = 1024 times that makes the cancellation part about 1/1000 of the rest,
    so the witness is as accurate as the forward pass allows. L is linear
    in each entry, so a large h adds no truncation error. The step is never
    below s = max |values| (a number may be given instead of the values;
    s = 1 if all are zero), so it is meaningful for arrays of any scale,
    and a power of two. It is never so large that a value of the forward
    pass could overflow: a unit change of θ moves an entry of Y by at most
    ``reach`` (the largest |W| for X, the largest |X| for W, 1 for B) and
    the loss by M, so h ≤ 2¹⁰⁰⁰ / max(reach, M, 1) / rel_step. (An entry
    with M = 0, whose perturbation moves nothing, takes 2⁶⁴·s.) A step far
    above s is fine: L is linear, and θ± = fl(θ ± h) is measured, not
    assumed (X = 1e-300 beside dY = 1e100 needs h ≈ 1e3).
    """
    scale = float(np.max(np.abs(values), initial=0.0))
    if not np.isfinite(scale) or scale == 0.0:
        scale = 1.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        threshold = np.where(M > 0, A / M, np.inf)
        # (minimum and maximum rather than np.clip, whose Python wrapper costs more than
        # the arithmetic for the small blocks of small layers)
        limit = _STEP_ROOM / np.maximum(np.maximum(M, reach), 1.0) / rel_step
    target = np.where(M > 0, np.maximum(threshold, scale), scale * _MAX_STEP_FACTOR)
    target = np.minimum(target, limit)
    return rel_step * np.ldexp(1.0, np.frexp(target)[1])


@dataclass(frozen=True)
class Block:
    """The witness for one block: estimates with worst-case and typical error bounds."""

    estimate: np.ndarray
    bound: np.ndarray
    typical: np.ndarray
    passes: float  # in forward passes of the whole layer (a row block counts its share)
    steps: tuple[float, float]


def witness_block(
    layer: Workspace,
    tensor: str,
    cols: np.ndarray | None,
    M: np.ndarray,
    method: str = "central",
    rel_step: float = DEFAULT_REL_STEP,
    h: float | None = None,
) -> Block:
    """Estimate a block of dX, dW or dB from forward passes of L = Σ G ⊙ Y alone.

    Parameters
    ----------
    layer : Workspace
    tensor : {"dX", "dW", "dB"}
    cols : ndarray of int, or None
        The columns of dX or dW (None for dB).
    M : ndarray
        The block's magnitudes, from ``layer.magnitude``.
    method : {"central", "dense", "complex-step"}
        ``"central"``: central differences, grouped. Y[n, :] depends only on
        X[n, :], and Y[:, i] only on W[i, :] and B[i]. So perturbing a whole
        column X[:, j] in one forward pass and reading each row's share of
        the loss, ℓₙ = Σᵢ G[n, i] Y[n, i], gives N independent central
        differences at once; likewise a column W[:, j] with the column
        shares ℓᵢ = Σₙ G[n, i] Y[n, i], and all of B at once. The other
        rows' terms of L are unchanged by the perturbation, so each estimate
        is exactly the central difference of L for its entry, at
        2·(2·D_in + 1) forward passes in all: the grouping of Curtis, Powell
        and Reid (1974), which scipy's ``approx_derivative(sparsity=...)``
        also uses. The perturbed passes of a block go through one BLAS call.
        ``"dense"``: one entry at a time, the whole of L each time: the
        textbook check, 2 passes per entry. ``"complex-step"``: Im L(θ + ih)/h,
        grouped, one complex pass per column.
    rel_step : float
        See :func:`step_sizes`.
    h : float, optional
        One step for every entry instead of :func:`step_sizes`'s (central
        differences only; for studies of the step, see :func:`step_study`).

    Notes
    -----
    Central differences: for one entry θ with θ± = fl(θ ± h), the estimate is
    (L(θ⁺) − L(θ⁻)) / (θ⁺ − θ⁻); dividing by the perturbation actually
    applied removes the error of forming θ ± h. L is linear in every single
    entry, so L(θ⁺) − L(θ⁻) = (θ⁺ − θ⁻)·∂L/∂θ exactly: no truncation error
    for any h. What is left is rounding: with A the sum of absolute terms
    of the loss share read (A_rows for X, A_cols for W and B, the whole
    loss for the dense method) and M the entry's magnitude,

        |estimate − ∂L/∂θ| ≤ (1 + γ₃) γ_c (2A/(θ⁺ − θ⁻) + M) + γ₃ M + underflow

    with c = D_in + 1 + D_out for X, D_in + 1 + N for W and B
    (D_in + 1 + N·D_out dense). The 2A/(θ⁺ − θ⁻) term is the cancellation and
    falls as h grows; γ_c M, the rounding of the perturbation's own effect,
    stays. In float64 at (32, 64, 16) the worst error of the dense method
    falls from 2.3e-7 at h = 1e-8 to 3.0e-12 at h = 1e-3 and 7.1e-15 at the
    default steps (``benchmarks/step_study.py``), which put the first term
    at about 1/1000 of the second, entry by entry (:func:`step_sizes`).

    Complex step [Squire and Trapp 1998]: with standard complex arithmetic
    (BLAS ``zgemm``, NumPy) the imaginary part of the forward pass carries
    only the perturbation, every other imaginary term being an exact zero,
    so there is no subtraction: |estimate − ∂L/∂θ| ≤ γ_c M with
    c = 2·D_in + 2·D_out for X, 2·D_in + 2·N for W, 2·N for B, for any h.
    (A "3M" complex product would void this; BLAS offers it only as
    ``zgemm3m``, which NumPy does not call.)

    The typical bound replaces γ_c by √c·u (Higham and Mary 2019). See
    ``docs/numerics.md`` §4 for the derivation.

    References
    ----------
    A. R. Curtis, M. J. D. Powell, J. K. Reid, "On the estimation of sparse
    Jacobian matrices", IMA J. Appl. Math. 13 (1974) 117–119.
    W. Squire, G. Trapp, "Using complex variables to estimate derivatives of
    real functions", SIAM Review 40 (1998) 110–112.
    W. H. Press et al., *Numerical Recipes*, 3rd ed., §5.7.
    """
    if method == "complex-step":
        return _complex_block(layer, tensor, cols, M)
    if method not in ("central", "dense"):
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    L = layer
    A: Any  # the loss share's sum of absolute terms: one number, or one per row or column
    G_mass: Any  # Σ|G| over the same share (underflow inside Y is multiplied by G)
    if method == "dense":
        A, G_mass = L.A_all, float(L.sum_G_cols.sum())
        n_ops = L.D_in + 1 + L.N * L.D_out
    elif tensor == "dX":
        A, G_mass, n_ops = L.A_rows[:, None], L.sum_G_rows[:, None], L.D_in + 1 + L.D_out
    else:
        A = L.A_cols[:, None] if tensor == "dW" else L.A_cols
        G_mass = L.sum_G_cols[:, None] if tensor == "dW" else L.sum_G_cols
        n_ops = L.D_in + 1 + L.N
    if h is None:
        steps = step_sizes(L.scale[tensor], A, M, rel_step, L.reach(tensor))
    else:
        steps = np.broadcast_to(float(h), np.shape(M)).copy()
    run = _dense_block if method == "dense" else _central_block
    estimate, delta, passes = run(L, tensor, cols, steps)
    bound, typical = central_difference_bound(n_ops, A, delta, M, G_mass, L.D_in + 1)
    return Block(estimate, bound, typical, passes, (float(steps.min()), float(steps.max())))


def _central_block(L: Workspace, tensor: str, cols, h):
    """Grouped central differences; returns (estimate, θ⁺ − θ⁻, passes)."""
    if tensor == "dX" and L.column_at_a_time:
        # One perturbed copy of X, a column changed and restored at a time: no copies
        # of X per pass, each pass exactly the floor's matrix product.
        Xp = L.X.copy()
        estimate, delta = np.empty(h.shape), np.empty(h.shape)
        for jj, j in enumerate(cols):
            Xp[:, j] = L.X[:, j] + h[:, jj]
            plus, L_plus = Xp[:, j].copy(), np.einsum("ni,ni->n", forward(Xp, L.W, L.B), L.G)
            Xp[:, j] = L.X[:, j] - h[:, jj]
            minus, L_minus = Xp[:, j], np.einsum("ni,ni->n", forward(Xp, L.W, L.B), L.G)
            delta[:, jj] = plus - minus
            estimate[:, jj] = (L_plus - L_minus) / delta[:, jj]
            Xp[:, j] = L.X[:, j]
        return estimate, delta, 2 * len(cols)
    if tensor == "dX":
        # Small layers: all perturbed copies of a block through one matrix product.
        c, k = len(cols), np.arange(len(cols))
        plus, minus = L.X[:, cols] + h, L.X[:, cols] - h  # θ± = fl(θ ± h), (N, c)
        Xs = np.broadcast_to(L.X, (2, c, L.N, L.D_in)).copy()
        Xs[0, k, :, cols] = plus.T
        Xs[1, k, :, cols] = minus.T
        Y = forward(Xs.reshape(-1, L.D_in), L.W, L.B).reshape(2, c, L.N, L.D_out)
        shares = np.einsum("scni,ni->scn", Y, L.G)
        delta = plus - minus
        return (shares[0] - shares[1]).T / delta, delta, 2 * c
    if tensor == "dW":
        c, k = len(cols), np.arange(len(cols))
        plus, minus = L.W[:, cols] + h, L.W[:, cols] - h  # θ± = fl(θ ± h), (D_out, c)
        Ws = np.broadcast_to(L.W, (2, c, L.D_out, L.D_in)).copy()
        Ws[0, k, :, cols] = plus.T
        Ws[1, k, :, cols] = minus.T
        Bs = None if L.B is None else np.tile(L.B, 2 * c)
        Y = forward(L.X, Ws.reshape(-1, L.D_in), Bs).reshape(L.N, 2, c, L.D_out)
        shares = np.einsum("nsci,ni->sci", Y, L.G)
        delta = plus - minus
        return (shares[0] - shares[1]).T / delta, delta, 2 * c
    Bp, Bm = L.B + h, L.B - h
    plus, minus = (np.einsum("ni,ni->i", forward(L.X, L.W, b), L.G) for b in (Bp, Bm))
    delta = Bp - Bm
    return (plus - minus) / delta, delta, 2


def _dense_block(L: Workspace, tensor: str, cols, h):
    """One entry at a time, the whole loss each time: the literal textbook check."""
    name = {"dX": "X", "dW": "W", "dB": "B"}[tensor]
    params: dict[str, Any] = {
        "X": L.X.copy(),
        "W": L.W.copy(),
        "B": None if L.B is None else L.B.copy(),
    }
    theta = params[name]
    shape = h.shape
    estimate, delta = np.empty(shape), np.empty(shape)
    for local in np.ndindex(shape):
        idx = local if cols is None else (local[0], int(cols[local[1]]))
        original = theta[idx]
        theta[idx] = original + h[local]
        plus, L_plus = theta[idx], surrogate_loss(params["X"], params["W"], params["B"], L.G)
        theta[idx] = original - h[local]
        minus, L_minus = theta[idx], surrogate_loss(params["X"], params["W"], params["B"], L.G)
        theta[idx] = original
        delta[local] = plus - minus
        estimate[local] = (L_plus - L_minus) / delta[local]
    return estimate, delta, 2 * estimate.size


def _complex_block(L: Workspace, tensor: str, cols, M) -> Block:
    """Grouped complex step, Im L(θ + ih)/h, with h a power of two at the data's scale."""
    h = _scale(np.array(L.scale[tensor]))
    if tensor == "dX":
        c, k = len(cols), np.arange(len(cols))
        Xs = np.broadcast_to(L.X, (c, L.N, L.D_in)).astype(np.complex128)
        Xs[k, :, cols] += 1j * h
        Y = forward(Xs.reshape(-1, L.D_in), L.W, L.B).reshape(c, L.N, L.D_out)
        estimate = (np.einsum("cni,ni->cn", Y, L.G).imag / h).T
        n_ops, passes, G_mass = 2 * (L.D_in + L.D_out), c, L.sum_G_rows[:, None]
    elif tensor == "dW":
        c, k = len(cols), np.arange(len(cols))
        Ws = np.broadcast_to(L.W, (c, L.D_out, L.D_in)).astype(np.complex128)
        Ws[k, :, cols] += 1j * h
        Bs = None if L.B is None else np.tile(L.B, c)
        Y = forward(L.X, Ws.reshape(-1, L.D_in), Bs).reshape(L.N, c, L.D_out)
        estimate = (np.einsum("nci,ni->ci", Y, L.G).imag / h).T
        n_ops, passes, G_mass = 2 * (L.D_in + L.N), c, L.sum_G_cols[:, None]
    else:
        Y = forward(L.X, L.W, cast(np.ndarray, L.B) + 1j * h)  # dB: there is a bias
        estimate = np.einsum("ni,ni->i", Y, L.G).imag / h
        n_ops, passes, G_mass = 2 * L.N, 1, L.sum_G_cols
    bound, typical = complex_step_bound(n_ops, h, M, G_mass, L.D_in + 1)
    return Block(estimate, bound, typical, passes, (h, h))


def entry_values(layer: Workspace, tensor: str, rows: np.ndarray, cols: np.ndarray):
    """(reference, M, S) at chosen entries of dX or dW (rows, cols) or dB (cols).

    S is Σ(|a| + |b|) over each entry's terms (the term count for dB): the
    reference's bound, which is all these entries are checked with, needs no
    more (a subject's splits it by operand: :meth:`Workspace.magnitude`).

    Each is an inner product of one row or column pair, so any number of
    entries of a layer of any size cost O(entries × terms).
    """
    L = layer
    if tensor == "dX":
        a, b, aa, ab = L.G[rows], L.W[:, cols].T, L.aG[rows], L.aW[:, cols].T
        S = L.sum_G_rows[rows] + L.sum_W_cols[cols]
    elif tensor == "dW":
        a, b, aa, ab = L.G[:, rows].T, L.X[:, cols].T, L.aG[:, rows].T, L.aX[:, cols].T
        S = L.sum_G_cols[rows] + L.sum_X_cols[cols]
    else:
        ref = L.G[:, cols].sum(axis=0)
        return ref, upper_sum(L.sum_G_cols[cols], L.N), np.full(len(cols), float(L.N))
    k = L.terms(tensor)
    kmax = max(L.N, L.D_in, L.D_out) + 1
    return (
        np.einsum("ek,ek->e", a, b),
        upper_sum(np.einsum("ek,ek->e", aa, ab), k),
        upper_sum(S, kmax),
    )


def witness_entries(
    layer: Workspace,
    tensor: str,
    rows: np.ndarray | None,
    cols: np.ndarray,
    M: np.ndarray,
    rel_step: float = DEFAULT_REL_STEP,
) -> Block:
    """Central differences at chosen entries, each from its own row or column of the layer.

    The same estimate and bound as the grouped method (:func:`witness_block`)
    gives for those entries: X[n, j] is perturbed in a copy of row n alone,
    which goes through the layer as a batch of one; W[i, j] or B[i] in a
    copy of output unit i alone, through which the whole batch goes. The
    loss share read (ℓₙ or ℓᵢ) is the same, so is the rounding analysis.
    """
    L = layer
    if tensor == "dX":
        A, G_mass, n_ops = L.A_rows[rows], L.sum_G_rows[rows], L.D_in + 1 + L.D_out
    else:
        units = rows if tensor == "dW" else cols
        A, G_mass, n_ops = L.A_cols[units], L.sum_G_cols[units], L.D_in + 1 + L.N
    h = step_sizes(L.scale[tensor], A, M, rel_step, L.reach(tensor))
    e = np.arange(len(cols))
    if tensor == "dX":
        Xs = np.stack([L.X[rows], L.X[rows]])  # (2, E, D_in)
        Xs[0, e, cols] += h
        Xs[1, e, cols] -= h
        Y = forward(Xs.reshape(-1, L.D_in), L.W, L.B).reshape(2, len(e), L.D_out)
        shares = np.einsum("sei,ei->se", Y, L.G[rows])
        delta = Xs[0, e, cols] - Xs[1, e, cols]
    else:
        units = rows if tensor == "dW" else cols
        Ws = np.concatenate([L.W[units], L.W[units]])  # (2E, D_in)
        Bs: Any = None if L.B is None else np.concatenate([L.B[units], L.B[units]])
        if tensor == "dW":
            Ws[e, cols] += h
            Ws[len(e) + e, cols] -= h
            delta = Ws[e, cols] - Ws[len(e) + e, cols]
        else:
            Bs[: len(e)] += h
            Bs[len(e) :] -= h
            delta = Bs[: len(e)] - Bs[len(e) :]
        Y = forward(L.X, Ws, Bs).reshape(L.N, 2, len(e))
        shares = np.einsum("nse,ne->se", Y, L.G[:, units])
    estimate = (shares[0] - shares[1]) / delta
    bound, typical = central_difference_bound(n_ops, A, delta, M, G_mass, L.D_in + 1)
    # Rows (or output units) through the layer, in units of whole forward passes.
    passes = 2 * len(e) / (L.N if tensor == "dX" else L.D_out)
    steps = (float(h.min()), float(h.max())) if len(e) else (0.0, 0.0)
    return Block(estimate, bound, typical, passes, steps)


@dataclass(frozen=True)
class Directions:
    """Directional checks of a reference r: L(θ⁺) − L(θ⁻) against ⟨r, θ⁺ − θ⁻⟩.

    Per direction: the witness ``difference`` L̂(θ⁺) − L̂(θ⁻), the reference's
    ``predicted`` ⟨r, Δ⟩ with Δ = θ⁺ − θ⁻, the rigorous ``tolerance`` on
    their distance, its ``typical`` scale, and ``step`` = min |Δ| over the
    entries, which converts a distance into a per-entry error (see
    :class:`DirectionsWitness`).
    """

    difference: np.ndarray
    predicted: np.ndarray
    tolerance: np.ndarray
    typical: np.ndarray
    step: np.ndarray
    passes: int


def step_study(layer: Workspace, columns: int = 2, points: int = 33) -> dict[str, np.ndarray]:
    """Witness error and bound against the step h, on a few columns of dW.

    For ``points`` steps h, log-spaced from 10⁻¹² times the scale of W to
    four times the largest default step (one step for every entry), and for
    the default per-entry steps: the largest |estimate − reference| and the
    largest rigorous bound over the first ``columns`` columns of dW. L is
    linear in every entry, so the error is pure rounding: it falls like 1/h
    while cancellation dominates, then levels off at the rounding of the
    perturbation's own effect; the default steps sit on the level part.

    Returns ``{"h", "error", "bound"}`` for the steps, and ``"default_h"``
    (the median default step), ``"default_error"``, ``"default_bound"``.
    """
    cols = np.arange(min(columns, layer.D_in))
    M, _ = layer.magnitude("dW", cols)
    reference = layer.reference("dW", cols)
    h_default = step_sizes(
        layer.scale["dW"], layer.A_cols[:, None], M, DEFAULT_REL_STEP, layer.reach("dW")
    )
    scale = max(layer.scale["dW"], float(np.finfo(float).tiny))
    steps = np.geomspace(1e-12 * scale, 4 * float(h_default.max()), points)
    out: dict[str, list] = {"h": [], "error": [], "bound": []}
    for h in steps:
        block = witness_block(layer, "dW", cols, M, h=h)
        out["h"].append(float(h))
        out["error"].append(float(np.max(np.abs(block.estimate - reference))))
        out["bound"].append(float(np.max(block.bound)))
    default = witness_block(layer, "dW", cols, M)
    result = {name: np.array(values) for name, values in out.items()}
    result["default_h"] = np.array(float(np.median(h_default)))
    result["default_error"] = np.array(float(np.max(np.abs(default.estimate - reference))))
    result["default_bound"] = np.array(float(np.max(default.bound)))
    return result
