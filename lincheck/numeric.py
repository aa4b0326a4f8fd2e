"""Finite differences of the surrogate loss, rounding-error bounds and error metrics.

Everything here is deterministic float64 NumPy. The derivation of every bound
is in ``docs/numerics.md``; the docstrings give the formulas.

Notation: u is the unit roundoff of a precision (2⁻⁵³ for float64) and
γ_k = k u / (1 − k u) the factor of Higham's inner-product bound
|fl(aᵀb) − aᵀb| ≤ γ_k |a|ᵀ|b| for k terms, any summation order, with or
without fused multiply-add [Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., SIAM 2002, §3.1 (Lemma 3.1, 3.3) and §3.5].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .core import Gradients, forward, surrogate_loss
from .precision import FLOAT64, gamma

U64 = FLOAT64.u
ETA64 = FLOAT64.eta

DEFAULT_REL_STEP = 2.0**10
"""How far past the cancellation threshold the step goes; see :func:`step_sizes`."""

_MAX_STEP_FACTOR = 2.0**64
"""Cap on a step, in units of its array's scale, so perturbed values stay far from overflow."""

_CHUNK_BYTES = 32 * 2**20
"""Memory for one batch of perturbed forward passes (inputs plus outputs)."""


def _upper(computed: np.ndarray, k: int) -> np.ndarray:
    """An upper bound on an exact sum of k non-negative products, from its float64 value.

    A computed non-negative sum is at least (1 − γ_k) times the exact one
    less 2kη for underflow (see :func:`lincheck.precision.product_error`), and 1/(1 − γ) ≤
    1 + 2γ for γ ≤ 1/2.
    """
    return computed * (1.0 + 2.0 * gamma(k + 1, U64)) + 4 * (k + 1) * ETA64


@dataclass(frozen=True)
class Magnitudes:
    """Per-entry sums of absolute terms: the scale of each entry's rounding error.

    ``dX = |G| |W|``, ``dW = |G|ᵀ |X|``, ``dB = Σₙ |G[n]|`` and
    ``Y = |X| |W|ᵀ + |B|``, each an upper bound on the exact value (float64
    evaluation rounding included). Every rounding bound in lincheck is a
    multiple of one of these, because an inner product's error is bounded by
    γ_k times the inner product of the absolute values, not of the result:
    a gradient entry that cancels to near zero still carries the rounding of
    its large terms.

    ``sums`` holds, per tensor, Σ(|a| + |b|) over each entry's terms (e.g.
    Σᵢ |G[n, i]| + Σᵢ |W[i, j]| for dX[n, j]): the scale of the error of
    operands that underflow when rounded to a narrow format.
    """

    dX: np.ndarray
    dW: np.ndarray
    dB: np.ndarray | None
    Y: np.ndarray
    sums: dict[str, np.ndarray | float]

    @classmethod
    def of(cls, X: np.ndarray, W: np.ndarray, B: np.ndarray | None, G: np.ndarray):
        """Compute them for float64 X (N, D_in), W (D_out, D_in), B (D_out,), G (N, D_out)."""
        N, D_in = X.shape
        D_out = W.shape[0]
        aX, aW, aG = np.abs(X), np.abs(W), np.abs(G)
        Y = aX @ aW.T
        if B is not None:
            Y = Y + np.abs(B)
        sums = {
            "dX": aG.sum(1)[:, None] + aW.sum(0)[None, :],
            "dW": aG.sum(0)[:, None] + aX.sum(0)[None, :],
            "dB": float(N),
            "Y": aX.sum(1)[:, None] + aW.sum(1)[None, :] + 1.0,
        }
        return cls(
            dX=_upper(aG @ aW, D_out),
            dW=_upper(aG.T @ aX, N),
            dB=_upper(aG.sum(axis=0), N) if B is not None else None,
            Y=_upper(Y, D_in + 1),
            sums={k: _upper(v, max(N, D_in, D_out) + 1) for k, v in sums.items()},
        )

    def of_tensor(self, name: str) -> tuple[np.ndarray, np.ndarray | float]:
        """(M, S) for "dX", "dW", "dB" or "Y"."""
        return getattr(self, name), self.sums[name]


def step_sizes(
    values: np.ndarray, A: np.ndarray | float, M: np.ndarray, rel_step: float = DEFAULT_REL_STEP
) -> np.ndarray:
    """Per-entry central-difference steps h = rel_step · 2^⌈log₂ max(s, A/M)⌉.

    The estimate's rounding error (see :func:`central_differences`) has two
    parts: γ·2A/(θ⁺ − θ⁻), the cancellation between two loss values of size
    about A, which falls as h grows, and γ·M, the rounding of the
    perturbation's own effect, which does not. At h = A/M the two are equal;
    ``rel_step`` = 1024 times that makes the cancellation part about 1/1000
    of the rest, so the witness is as accurate as the forward pass allows.
    L is linear in each entry, so a large h adds no truncation error. The
    step is never below s = max |values| (so it is meaningful for arrays of
    any scale; s = 1 if all are zero), never above 2⁶⁴·s (far from
    overflow), and a power of two.
    """
    scale = float(np.max(np.abs(values), initial=0.0))
    if not np.isfinite(scale) or scale == 0.0:
        scale = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        threshold = np.where(M > 0, A / M, np.inf)
    target = np.clip(threshold, scale, scale * _MAX_STEP_FACTOR)
    return rel_step * np.ldexp(1.0, np.frexp(target)[1])


@dataclass(frozen=True)
class Witness:
    """Numerical estimates of dX, dW, dB with a rigorous bound on each entry's error.

    Attributes
    ----------
    grads : Gradients
        The estimates, float64, shapes as in ``backward``.
    bounds : Gradients
        Per entry, an upper bound on |estimate − exact gradient|.
    typical : Gradients
        Per entry, the probabilistic scale of the error (√c in place of c
        roundings; see :class:`lincheck.precision.ErrorBound`).
    method : str
        ``"central"`` or ``"complex-step"``.
    grouped : bool
        Whether whole columns were perturbed per pass (see below).
    forward_passes : int
        Forward passes of the whole layer evaluated.
    steps : dict
        The smallest and largest step h used for each of "X", "W", "B".
    """

    grads: Gradients
    bounds: Gradients
    typical: Gradients
    method: str
    grouped: bool
    forward_passes: int
    steps: dict[str, tuple[float, float]]


def witness(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None,
    G: np.ndarray,
    *,
    method: str = "central",
    grouped: bool = True,
    magnitudes: Magnitudes | None = None,
) -> Witness:
    """The numerical witness by ``method``: "central" (default) or "complex-step"."""
    if method == "central":
        return central_differences(X, W, B, G, grouped=grouped, magnitudes=magnitudes)
    if method == "complex-step":
        if not grouped:
            raise ValueError("the complex step is only implemented grouped")
        return complex_step(X, W, B, G, magnitudes=magnitudes)
    raise ValueError(f"method must be 'central' or 'complex-step', not {method!r}")


def central_differences(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None,
    G: np.ndarray,
    *,
    grouped: bool = True,
    rel_step: float = DEFAULT_REL_STEP,
    magnitudes: Magnitudes | None = None,
) -> Witness:
    """Estimate every entry of dX, dW, dB by central differences of L = Σ G ⊙ Y.

    For one entry θ of X, W or B, with θ± = fl(θ ± h)::

        ∂L/∂θ ≈ (L(θ⁺) − L(θ⁻)) / (θ⁺ − θ⁻)

    Only forward passes are evaluated. Dividing by the perturbation actually
    applied, θ⁺ − θ⁻, rather than by 2h, removes the error of forming θ ± h.

    Parameters
    ----------
    X : ndarray, shape (N, D_in), float64
    W : ndarray, shape (D_out, D_in), float64
    B : ndarray, shape (D_out,), float64, or None
    G : ndarray, shape (N, D_out), float64
    grouped : bool
        False perturbs one entry at a time and evaluates the whole L,
        2·(N·D_in + D_out·D_in + D_out) forward passes: the textbook check.
        True (default) uses the structure of the layer: Y[n, :]
        depends only on X[n, :], and Y[:, i] only on W[i, :] and B[i]. So
        perturbing a whole column X[:, j] in one forward pass and reading
        each row's share of the loss, ℓₙ = Σᵢ G[n, i] Y[n, i], gives N
        independent central differences at once, one per entry of that
        column; likewise a column W[:, j] with the column shares
        ℓᵢ = Σₙ G[n, i] Y[n, i], and all of B at once. The other rows'
        terms of L are unchanged by the perturbation, so each estimate is
        still exactly the central difference of L for that entry, at
        2·(2·D_in + 1) forward passes in all. This is the grouping of
        Curtis, Powell and Reid (1974), which scipy's
        ``approx_derivative(sparsity=...)`` also uses.
    rel_step : float
        Steps are chosen per entry by :func:`step_sizes`. For B the scale is
        that of |X| |W|ᵀ + |B|, the values B is added to.

    Notes
    -----
    L is linear in every single entry, so L(θ⁺) − L(θ⁻) = (θ⁺ − θ⁻)·∂L/∂θ
    exactly and the estimate has no truncation error for any h. Its error is
    the rounding of the two forward passes: with A the sum of absolute terms
    of the loss share read (A = Σᵢ |G[n, i]| (|X||W|ᵀ + |B|)[n, i] for a row)
    and M the entry's gradient magnitude (e.g. Σᵢ |G[n, i]| |W[i, j]|),

        |estimate − ∂L/∂θ| ≤ (1 + γ₃) γ_c (2A/(θ⁺ − θ⁻) + M) + γ₃ M

    with c = D_in + 1 + D_out for X, D_in + 1 + N for W and B (D_in + 1 +
    N·D_out when not grouped, where A sums over the whole loss). The
    2A/(θ⁺ − θ⁻) term is the cancellation in L(θ⁺) − L(θ⁻) and falls as h
    grows; the γ_c M term is the rounding of the perturbation's own
    contribution and stays. In float64 at (32, 64, 16) the worst error of
    the dense method falls from 2.3e-7 at h = 1e-8 to 3.0e-12 at h = 1e-3
    and 7.1e-15 at the default steps (``benchmarks/step_study.py``), which
    put the first term at about 1/1000 of the second, entry by entry
    (:func:`step_sizes`), and so stay accurate for badly scaled inputs too.
    See ``docs/numerics.md`` for the derivation.

    References
    ----------
    A. R. Curtis, M. J. D. Powell, J. K. Reid, "On the estimation of sparse
    Jacobian matrices", IMA J. Appl. Math. 13 (1974) 117–119.
    W. H. Press et al., *Numerical Recipes*, 3rd ed., §5.7.
    """
    mags = magnitudes if magnitudes is not None else Magnitudes.of(X, W, B, G)
    N, D_in = X.shape
    D_out = W.shape[0]
    aG = np.abs(G)
    # A: the sum of absolute terms of each loss share read off, and c the
    # number of roundings in it (forward pass, bias, then the share's sum).
    if grouped:
        A_X = _upper(np.sum(aG * mags.Y, axis=1), D_out)[:, None]  # row shares
        A_B = _upper(np.sum(aG * mags.Y, axis=0), N)  # column shares
        A_W = A_B[:, None]
        k_X, k_W = D_in + 1 + D_out, D_in + 1 + N
        estimate = _grouped
    else:
        A_X = A_W = A_B = float(_upper(np.sum(aG * mags.Y), N * D_out))
        k_X = k_W = D_in + 1 + N * D_out
        estimate = _dense
    h = {"X": step_sizes(X, A_X, mags.dX, rel_step), "W": step_sizes(W, A_W, mags.dW, rel_step)}
    if B is not None:
        h["B"] = step_sizes(mags.Y, A_B, mags.dB, rel_step)
    (dX, DX), (dW, DW), (dB, DB), passes = estimate(X, W, B, G, h)

    g3 = gamma(3, U64)

    def bound(n_ops, A, delta, M, typical=False):
        # Each loss value is also off by at most 2·n_ops·η from underflow
        # (see lincheck.precision.product_error), the quotient by one more η;
        # (1 + 2⁻⁵⁰) covers evaluating this expression in float64.
        c = np.sqrt(n_ops) * U64 if typical else gamma(n_ops, U64)
        roundoff = (1.0 + g3) * c * (2.0 * A / delta + M) + g3 * M
        if typical:
            return roundoff
        underflow = (1.0 + g3) * 4.0 * n_ops * ETA64 / delta + 3.0 * ETA64
        return (roundoff + underflow) * (1.0 + 2.0**-50)

    def bounds(typical):
        return Gradients(
            bound(k_X, A_X, DX, mags.dX, typical),
            bound(k_W, A_W, DW, mags.dW, typical),
            bound(k_W, A_B, DB, mags.dB, typical) if B is not None else None,
        )

    steps = {name: (float(v.min()), float(v.max())) for name, v in h.items()}
    return Witness(
        Gradients(dX, dW, dB), bounds(False), bounds(True), "central", grouped, passes, steps
    )


def _grouped(X, W, B, G, steps):
    """Column-grouped central differences; returns (estimate, θ⁺ − θ⁻) per array."""
    N, D_in = X.shape
    D_out = W.shape[0]
    passes = 0

    # dX: perturb X[:, j] for every row n at once; row shares ℓₙ = Σᵢ G[n, i] Y[n, i].
    dX, DX = np.empty_like(X), np.empty_like(X)
    per_col = 2 * 8 * N * (D_in + D_out)
    for cols in _chunks(D_in, per_col):
        c = len(cols)
        Xs = np.broadcast_to(X, (2, c, N, D_in)).copy()
        k = np.arange(c)
        Xs[0, k, :, cols] += steps["X"][:, cols].T
        Xs[1, k, :, cols] -= steps["X"][:, cols].T
        Y = forward(Xs.reshape(-1, D_in), W, B).reshape(2, c, N, D_out)
        shares = np.einsum("scni,ni->scn", Y, G)
        delta = Xs[0, k, :, cols] - Xs[1, k, :, cols]  # (c, N)
        dX[:, cols] = ((shares[0] - shares[1]) / delta).T
        DX[:, cols] = delta.T
        passes += 2 * c

    # dW: perturb W[:, j] for every output i at once; column shares ℓᵢ = Σₙ G[n, i] Y[n, i].
    dW, DW = np.empty_like(W), np.empty_like(W)
    per_col = 2 * 8 * D_out * (N + D_in)
    Bs = None
    for cols in _chunks(D_in, per_col):
        c = len(cols)
        Ws = np.broadcast_to(W, (2, c, D_out, D_in)).copy()
        k = np.arange(c)
        Ws[0, k, :, cols] += steps["W"][:, cols].T
        Ws[1, k, :, cols] -= steps["W"][:, cols].T
        if B is not None:
            Bs = np.tile(B, 2 * c)
        Y = forward(X, Ws.reshape(-1, D_in), Bs).reshape(N, 2, c, D_out)
        shares = np.einsum("nsci,ni->sci", Y, G)
        delta = Ws[0, k, :, cols] - Ws[1, k, :, cols]  # (c, D_out)
        dW[:, cols] = ((shares[0] - shares[1]) / delta).T
        DW[:, cols] = delta.T
        passes += 2 * c

    # dB: perturb all of B at once; column shares again.
    dB = DB = None
    if B is not None:
        Bp, Bm = B + steps["B"], B - steps["B"]
        delta = Bp - Bm
        shares = [np.einsum("ni,ni->i", forward(X, W, Bpm), G) for Bpm in (Bp, Bm)]
        dB, DB = (shares[0] - shares[1]) / delta, delta
        passes += 2
    return (dX, DX), (dW, DW), (dB, DB), passes


def _dense(X, W, B, G, steps):
    """One entry at a time, the whole loss each time: the literal textbook check."""
    params = {"X": X.copy(), "W": W.copy()}
    if B is not None:
        params["B"] = B.copy()
    results = []
    for name, theta in params.items():
        est, delta = np.empty_like(theta), np.empty_like(theta)
        for idx in np.ndindex(theta.shape):
            original = theta[idx]
            theta[idx] = original + steps[name][idx]
            plus, L_plus = theta[idx], surrogate_loss(params["X"], params["W"], params.get("B"), G)
            theta[idx] = original - steps[name][idx]
            minus, L_minus = (
                theta[idx],
                surrogate_loss(params["X"], params["W"], params.get("B"), G),
            )
            theta[idx] = original
            delta[idx] = plus - minus
            est[idx] = (L_plus - L_minus) / delta[idx]
        results.append((est, delta))
    if B is None:
        results.append((None, None))
    return (*results, 2 * sum(p.size for p in params.values()))


def complex_step(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None,
    G: np.ndarray,
    *,
    magnitudes: Magnitudes | None = None,
) -> Witness:
    """Estimate every entry of dX, dW, dB by the complex step, Im L(θ + i h) / h.

    Column-grouped like :func:`central_differences` (one complex forward
    pass per column of X and of W, one for all of B: 2·D_in + 1 in all),
    with h a power of two at the scale of the perturbed array.

    Notes
    -----
    The complex step [Squire and Trapp 1998] has no subtraction, hence no
    cancellation: with standard complex arithmetic (as BLAS ``zgemm`` and
    NumPy use), the imaginary part of the forward pass carries only the
    perturbation, h·W[i, j] for X[n, j], and every other imaginary term is
    an exact zero. So for dX[n, j]

        |Im L̂ / h − ∂L/∂θ| ≤ γ_{2·D_in + 2·D_out} · M

    (γ_{2·D_in + 2·N} for dW, γ_{2·N} for dB, M the entry's magnitude), with
    no term in the size of L and no dependence on h, which only has to keep
    h·M clear of overflow and underflow. For a nonlinear function this lets
    h be tiny without cancellation, its classic advantage. L is linear, so
    central differences have no truncation error either and reach the same
    floor with a large h; the complex step costs about twice as much (one
    complex pass is about four real matrix products). It is offered as a
    second, independent witness. A "3M" complex product (Gauss's trick) would
    mix real parts into the imaginary one and void this bound; BLAS uses it
    only in separately named routines (``zgemm3m``), which NumPy does not call.

    References
    ----------
    W. Squire, G. Trapp, "Using complex variables to estimate derivatives of
    real functions", SIAM Review 40 (1998) 110–112.
    """
    mags = magnitudes if magnitudes is not None else Magnitudes.of(X, W, B, G)
    N, D_in = X.shape
    D_out = W.shape[0]
    h = {"X": _scale(X), "W": _scale(W)}
    if B is not None:
        h["B"] = _scale(mags.Y)
    passes = 0

    dX = np.empty_like(X)
    for cols in _chunks(D_in, 16 * N * (D_in + D_out)):
        c, k = len(cols), np.arange(len(cols))
        Xs = np.broadcast_to(X, (c, N, D_in)).astype(np.complex128)
        Xs[k, :, cols] += 1j * h["X"]
        Y = forward(Xs.reshape(-1, D_in), W, B).reshape(c, N, D_out)
        dX[:, cols] = (np.einsum("cni,ni->cn", Y, G).imag / h["X"]).T
        passes += c

    dW = np.empty_like(W)
    Bs = None
    for cols in _chunks(D_in, 16 * D_out * (N + D_in)):
        c, k = len(cols), np.arange(len(cols))
        Ws = np.broadcast_to(W, (c, D_out, D_in)).astype(np.complex128)
        Ws[k, :, cols] += 1j * h["W"]
        if B is not None:
            Bs = np.tile(B, c)
        Y = forward(X, Ws.reshape(-1, D_in), Bs).reshape(N, c, D_out)
        dW[:, cols] = (np.einsum("nci,ni->ci", Y, G).imag / h["W"]).T
        passes += c

    dB = None
    if B is not None:
        Y = forward(X, W, B + 1j * h["B"])
        dB = np.einsum("ni,ni->i", Y, G).imag / h["B"]
        passes += 1

    def bound(n_ops, M, step, typical):
        if typical:
            return np.sqrt(n_ops) * U64 * M
        return (gamma(n_ops, U64) * M + 2 * n_ops * ETA64 / step + ETA64) * (1.0 + 2.0**-50)

    def bounds(typical):
        return Gradients(
            bound(2 * (D_in + D_out), mags.dX, h["X"], typical),
            bound(2 * (D_in + N), mags.dW, h["W"], typical),
            bound(2 * N, mags.dB, h["B"], typical) if B is not None else None,
        )

    steps = {name: (v, v) for name, v in h.items()}
    return Witness(
        Gradients(dX, dW, dB), bounds(False), bounds(True), "complex-step", True, passes, steps
    )


def _scale(values: np.ndarray) -> float:
    """2^⌈log₂ max |values|⌉ (1 if all are zero): a power-of-two step at the data's scale."""
    scale = float(np.max(np.abs(values), initial=0.0))
    if not np.isfinite(scale) or scale == 0.0:
        return 1.0
    return float(np.ldexp(1.0, int(np.frexp(scale)[1])))


def _chunks(count: int, bytes_per_item: int):
    size = max(1, _CHUNK_BYTES // max(bytes_per_item, 1))
    for start in range(0, count, size):
        yield np.arange(start, min(start + size, count))


@dataclass(frozen=True)
class Comparison:
    """Entry-by-entry errors of a subject against an oracle, under per-entry tolerances.

    ``bound_ratio`` is max |error| / tolerance; the comparison passes iff it is
    ≤ 1 (every entry within its tolerance). ``worst`` is the flat index of
    the entry with the largest ratio, ``order`` the flat indices of the
    largest few ratios, worst first.
    """

    passed: bool
    max_abs_error: float
    max_rel_error: float
    bound_ratio: float
    worst: int
    order: tuple[int, ...]
    tolerance_at_worst: float


def compare(
    subject: np.ndarray, oracle: np.ndarray, tolerance: np.ndarray, top: int = 5
) -> Comparison:
    """Compare two finite float64 arrays of one shape entry by entry.

    Relative error is |error| / |oracle|, taken as 0 where both are 0 and as
    infinite where only the oracle is 0. The ratio error / tolerance is
    likewise 0 where both are 0.
    """
    err = np.abs(subject - oracle).ravel()
    tol = np.broadcast_to(tolerance, subject.shape).ravel()
    ref = np.abs(oracle).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / tol)
        rel = np.where(err == 0, 0.0, err / ref)
    k = min(top, ratio.size)
    candidates = np.argpartition(-ratio, k - 1)[:k] if 0 < k < ratio.size else np.arange(k)
    order = candidates[np.lexsort((candidates, -ratio[candidates]))]
    worst = int(order[0]) if k else 0
    return Comparison(
        passed=bool(np.all(err <= tol)),
        max_abs_error=float(err.max(initial=0.0)),
        max_rel_error=float(rel.max(initial=0.0)),
        bound_ratio=float(ratio.max(initial=0.0)),
        worst=worst,
        order=tuple(int(i) for i in order),
        tolerance_at_worst=float(tol[worst]) if tol.size else 0.0,
    )
