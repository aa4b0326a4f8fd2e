"""The numerical witness, its rounding-error bounds, and entry-by-entry error tallies.

Everything here is deterministic float64 NumPy. Work is done in *column
blocks*: a block of columns of dX (or dW) is estimated, bounded and compared
at once, so a full check never holds more than one block of intermediate
values beside its inputs (see :class:`Layer` and :func:`witness_block`). The
derivation of every bound is in ``docs/numerics.md``.

Notation: u is the unit roundoff (2⁻⁵³ for float64), η the smallest
subnormal, γ_k = k u / (1 − k u) the factor of Higham's inner-product bound
|fl(aᵀb) − aᵀb| ≤ γ_k |a|ᵀ|b| for k terms, any summation order, with or
without fused multiply-add [Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., SIAM 2002, §3.1 (Lemma 3.1, 3.3) and §3.5].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .core import CHUNK, Gradients, forward, surrogate_loss
from .precision import FLOAT64, gamma

U64 = FLOAT64.u
ETA64 = FLOAT64.eta

DEFAULT_REL_STEP = 2.0**10
"""How far past the cancellation threshold the step goes; see :func:`step_sizes`."""

_MAX_STEP_FACTOR = 2.0**64
"""Cap on a step, in units of its array's scale, so perturbed values stay far from overflow."""

BLOCK_BYTES = 32 * 2**20
"""Memory for one block of perturbed forward passes (their inputs and outputs)."""

ROW_BLOCK_BYTES = 128 * 2**20
"""Memory for one block of rows in the partial modes (:func:`row_blocks`). Larger than a
column block: each row block repeats W-sized work per direction (perturbing W), which
fewer, taller blocks amortize (at (1024, 1024, 1024), 16 directions take 2.9 s in
blocks of 32 MiB, 2.1 s in blocks of 128 MiB)."""

METHODS = ("central", "dense", "complex-step")
"""Witness methods: grouped central differences, one entry at a time, the complex step."""


def _upper(computed: np.ndarray, k: int) -> np.ndarray:
    """An upper bound on an exact sum of k non-negative products, from its float64 value.

    A computed non-negative sum is at least (1 − γ_k) times the exact one
    less 2kη for underflow (see :func:`lincheck.precision.product_error`),
    and 1/(1 − γ) ≤ 1 + 2γ for γ ≤ 1/2.
    """
    return computed * (1.0 + 2.0 * gamma(k + 1, U64)) + 4 * (k + 1) * ETA64


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
    never above 2⁶⁴·s (far from overflow), and a power of two.
    """
    scale = float(np.max(np.abs(values), initial=0.0))
    if not np.isfinite(scale) or scale == 0.0:
        scale = 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        threshold = np.where(M > 0, A / M, np.inf)
    # (minimum and maximum rather than np.clip, whose Python wrapper costs more than the
    # arithmetic for the small blocks of small layers)
    target = np.minimum(np.maximum(threshold, scale), scale * _MAX_STEP_FACTOR)
    return rel_step * np.ldexp(1.0, np.frexp(target)[1])


class Layer:
    """A float64 layer prepared for block-wise checking.

    Holds the inputs as float64 (views when they already are) and, from
    first use, their absolute values, ``MY = |X| |W|ᵀ + |B|`` and the
    per-row and per-column sums of absolute terms of the loss,
    ``A_rows[n] = Σᵢ |G[n, i]| MY[n, i]`` and
    ``A_cols[i] = Σₙ |G[n, i]| MY[n, i]``: memory of about twice the
    inputs. Everything per entry (magnitudes, the reference, the witness) is
    computed a block of columns at a time from these.

    Parameters
    ----------
    X : ndarray, shape (N, D_in)
    W : ndarray, shape (D_out, D_in)
    B : ndarray, shape (D_out,), or None
    G : ndarray, shape (N, D_out)
    """

    def __init__(self, X, W, B, G):
        self.X, self.W, self.G = (np.asarray(a, dtype=np.float64) for a in (X, W, G))
        self.B = None if B is None else np.asarray(B, dtype=np.float64)
        self.N, self.D_in = self.X.shape
        self.D_out = self.W.shape[0]
        # Past about a million multiply-adds per pass, a tall stacked product of perturbed
        # copies of X runs slower than the passes one by one (measured at (256, 512, 256):
        # 27 ms against 17 ms for 20 passes), so dX's columns then go one at a time.
        self.column_at_a_time = self.N * self.D_in * self.D_out >= 2**20

    # Everything below is computed on first use: a block of rows that only goes through
    # perturbed forward passes (random directions) needs none of it.

    @cached_property
    def aX(self) -> np.ndarray:
        return np.abs(self.X)

    @cached_property
    def aW(self) -> np.ndarray:
        return np.abs(self.W)

    @cached_property
    def aG(self) -> np.ndarray:
        return np.abs(self.G)

    @cached_property
    def MY(self) -> np.ndarray:
        MY = self.aX @ self.aW.T
        if self.B is not None:
            MY += np.abs(self.B)
        return _upper(MY, self.D_in + 1)

    @cached_property
    def _shares(self) -> tuple[np.ndarray, np.ndarray, float]:
        shares = self.aG * self.MY
        return (
            _upper(shares.sum(axis=1), self.D_out),
            _upper(shares.sum(axis=0), self.N),
            float(_upper(shares.sum(), self.N * self.D_out)),
        )

    @property
    def A_rows(self) -> np.ndarray:
        return self._shares[0]

    @property
    def A_cols(self) -> np.ndarray:
        return self._shares[1]

    @property
    def A_all(self) -> float:
        return self._shares[2]

    @cached_property
    def sum_G_rows(self) -> np.ndarray:
        return self.aG.sum(axis=1)

    @cached_property
    def sum_G_cols(self) -> np.ndarray:
        return self.aG.sum(axis=0)

    @cached_property
    def sum_X_cols(self) -> np.ndarray:
        return self.aX.sum(axis=0)

    @cached_property
    def sum_X_rows(self) -> np.ndarray:
        return self.aX.sum(axis=1)

    @cached_property
    def sum_W_cols(self) -> np.ndarray:
        return self.aW.sum(axis=0)

    @cached_property
    def sum_W_rows(self) -> np.ndarray:
        return self.aW.sum(axis=1)

    @cached_property
    def scale(self) -> dict[str, float]:
        """The scale of the values each tensor's perturbation competes with (step_sizes)."""
        return {
            "dX": float(self.aX.max(initial=0.0)),
            "dW": float(self.aW.max(initial=0.0)),
            "dB": float(self.MY.max(initial=0.0)),
        }

    @property
    def bias(self) -> bool:
        return self.B is not None

    def inner(self, tensor: str) -> int:
        """Terms per entry: D_out for dX, N for dW and dB, D_in + 1 (with bias) for Y."""
        return {"dX": self.D_out, "dW": self.N, "dB": self.N, "Y": self.D_in + self.bias}[tensor]

    def shape(self, tensor: str) -> tuple[int, int] | tuple[int]:
        return {
            "dX": (self.N, self.D_in),
            "dW": (self.D_out, self.D_in),
            "dB": (self.D_out,),
            "Y": (self.N, self.D_out),
        }[tensor]

    def magnitude(self, tensor: str, cols: np.ndarray | None = None):
        """(M, S) for a block: M = Σ|terms| per entry, S = Σ(|a| + |b|) over its terms.

        M scales every rounding bound (γ_k times it); S scales the error of
        operands that underflow when rounded to a narrow format. ``cols``
        selects columns of dX or dW (all if None); dB and Y come whole.
        """
        cols = slice(None) if cols is None else cols
        if tensor == "dX":
            M = self.aG @ self.aW[:, cols]
            S = self.sum_G_rows[:, None] + self.sum_W_cols[None, cols]
        elif tensor == "dW":
            M = self.aG.T @ self.aX[:, cols]
            S = self.sum_G_cols[:, None] + self.sum_X_cols[None, cols]
        elif tensor == "dB":
            M, S = self.sum_G_cols, float(self.N)
        else:
            return self.MY, _upper(self.sum_X_rows[:, None] + self.sum_W_rows[None, :] + 1.0, 1)
        k = max(self.N, self.D_in, self.D_out) + 1
        return _upper(M, self.inner(tensor)), _upper(S, k)

    def reference(self, tensor: str, cols: np.ndarray | None = None) -> np.ndarray:
        """The analytic values of a block, in float64: G W, Gᵀ X, Σₙ G or X Wᵀ + B."""
        cols = slice(None) if cols is None else cols
        if tensor == "dX":
            return self.G @ self.W[:, cols]
        if tensor == "dW":
            return self.G.T @ self.X[:, cols]
        if tensor == "dB":
            return self.G.sum(axis=0)
        return forward(self.X, self.W, self.B)

    def blocks(
        self, tensor: str, method: str = "central", witness: bool = True
    ) -> Iterator[np.ndarray | None]:
        """Column blocks of dX or dW sized so one block's work fits BLOCK_BYTES.

        With ``witness``, a block's perturbed forward passes count; without,
        only its per-entry arrays. dB and Y come as one block (None).
        """
        if tensor in ("dB", "Y"):
            yield None
            return
        rows = self.N if tensor == "dX" else self.D_out
        # Per column: the perturbed copies of X or W and their outputs, plus about
        # thirty arrays of one value per row (magnitudes, reference, witness, bounds,
        # tolerances, errors and their ratios).
        item = 16 if method == "complex-step" else 8
        copies = 1 if method == "complex-step" else 2
        per_col = 240 * rows
        stacked = not (tensor == "dX" and method == "central" and self.column_at_a_time)
        if witness and stacked:
            per_col += copies * item * (rows * self.D_in + self.N * self.D_out)
        size = max(1, BLOCK_BYTES // per_col)
        for start in range(0, self.D_in, size):
            yield np.arange(start, min(start + size, self.D_in))

    def passes(self, tensor: str, method: str) -> int:
        """Forward passes a full witness of one tensor takes."""
        return full_passes(self.N, self.D_in, self.D_out, tensor, method)


def full_passes(N: int, D_in: int, D_out: int, tensor: str, method: str) -> int:
    """Forward passes a full witness of dX, dW or dB takes with ``method``."""
    if method == "dense":
        return 2 * {"dX": N * D_in, "dW": D_out * D_in, "dB": D_out}[tensor]
    columns = 1 if tensor == "dB" else D_in
    return columns * (1 if method == "complex-step" else 2)


@dataclass(frozen=True)
class Block:
    """The witness for one block: estimates with worst-case and typical error bounds."""

    estimate: np.ndarray
    bound: np.ndarray
    typical: np.ndarray
    passes: int
    steps: tuple[float, float]


def witness_block(
    layer: Layer,
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
    layer : Layer
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
    if method == "dense":
        A = L.A_all
        n_ops = L.D_in + 1 + L.N * L.D_out
    elif tensor == "dX":
        A, n_ops = L.A_rows[:, None], L.D_in + 1 + L.D_out
    else:
        A = L.A_cols[:, None] if tensor == "dW" else L.A_cols
        n_ops = L.D_in + 1 + L.N
    if h is None:
        h = step_sizes(L.scale[tensor], A, M, rel_step)
    else:
        h = np.broadcast_to(float(h), np.shape(M)).copy()
    run = _dense_block if method == "dense" else _central_block
    estimate, delta, passes = run(L, tensor, cols, h)
    bound, typical = _central_bound(n_ops, A, delta, M)
    return Block(estimate, bound, typical, passes, (float(h.min()), float(h.max())))


def _central_bound(n_ops: int, A, delta, M):
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


def _central_block(L: Layer, tensor: str, cols, h):
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


def _dense_block(L: Layer, tensor: str, cols, h):
    """One entry at a time, the whole loss each time: the literal textbook check."""
    name = {"dX": "X", "dW": "W", "dB": "B"}[tensor]
    params = {"X": L.X.copy(), "W": L.W.copy(), "B": None if L.B is None else L.B.copy()}
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


def _complex_block(L: Layer, tensor: str, cols, M) -> Block:
    """Grouped complex step, Im L(θ + ih)/h, with h a power of two at the data's scale."""
    h = _scale(np.array(L.scale[tensor]))
    if tensor == "dX":
        c, k = len(cols), np.arange(len(cols))
        Xs = np.broadcast_to(L.X, (c, L.N, L.D_in)).astype(np.complex128)
        Xs[k, :, cols] += 1j * h
        Y = forward(Xs.reshape(-1, L.D_in), L.W, L.B).reshape(c, L.N, L.D_out)
        estimate = (np.einsum("cni,ni->cn", Y, L.G).imag / h).T
        n_ops, passes = 2 * (L.D_in + L.D_out), c
    elif tensor == "dW":
        c, k = len(cols), np.arange(len(cols))
        Ws = np.broadcast_to(L.W, (c, L.D_out, L.D_in)).astype(np.complex128)
        Ws[k, :, cols] += 1j * h
        Bs = None if L.B is None else np.tile(L.B, c)
        Y = forward(L.X, Ws.reshape(-1, L.D_in), Bs).reshape(L.N, c, L.D_out)
        estimate = (np.einsum("nci,ni->ci", Y, L.G).imag / h).T
        n_ops, passes = 2 * (L.D_in + L.N), c
    else:
        Y = forward(L.X, L.W, L.B + 1j * h)
        estimate = np.einsum("ni,ni->i", Y, L.G).imag / h
        n_ops, passes = 2 * L.N, 1
    bound = (gamma(n_ops, U64) * M + 2 * n_ops * ETA64 / h + ETA64) * (1.0 + 2.0**-50)
    typical = np.sqrt(n_ops) * U64 * M
    return Block(estimate, bound, typical, passes, (h, h))


# ---------------------------------------------------------------------------
# Sampled entries and random directions (layers too big for every entry)


def entry_values(layer: Layer, tensor: str, rows: np.ndarray, cols: np.ndarray):
    """(reference, M, S) at chosen entries of dX or dW (rows, cols) or dB (cols).

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
        return ref, _upper(L.sum_G_cols[cols], L.N), np.full(len(cols), float(L.N))
    k = L.inner(tensor)
    kmax = max(L.N, L.D_in, L.D_out) + 1
    return np.einsum("ek,ek->e", a, b), _upper(np.einsum("ek,ek->e", aa, ab), k), _upper(S, kmax)


def witness_entries(
    layer: Layer,
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
        A, n_ops = L.A_rows[rows], L.D_in + 1 + L.D_out
    else:
        A, n_ops = L.A_cols[rows if tensor == "dW" else cols], L.D_in + 1 + L.N
    h = step_sizes(L.scale[tensor], A, M, rel_step)
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
        Bs = None if L.B is None else np.concatenate([L.B[units], L.B[units]])
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
    bound, typical = _central_bound(n_ops, A, delta, M)
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


# ---------------------------------------------------------------------------
# Row streaming: the partial modes read X and G a block of rows at a time


def row_blocks(N: int, D_in: int, D_out: int) -> list[slice]:
    """Row blocks of about ROW_BLOCK_BYTES of float64 work each, fixed by the shapes alone.

    Per row a block holds X and G as float64 with their absolute values,
    MY and the loss shares (:class:`Layer`), a subject's row and some
    fifteen per-entry arrays of its check, and two perturbed copies with
    their outputs: about 20·D_in + 10·D_out float64 values. The blocks
    depend only on the shapes, so the same inputs always give the same
    blocks, and therefore the same report.
    """
    size = max(1, ROW_BLOCK_BYTES // (8 * (20 * D_in + 10 * D_out)))
    return [slice(start, min(start + size, N)) for start in range(0, N, size)]


class Rows:
    """A layer read a block of rows at a time.

    X and G are 2-D arrays of any real dtype, typically memory-mapped files
    (:func:`lincheck.arrays.load`) that may be larger than memory; only W
    and B are held as float64. Iterating gives ``(rows, block)`` pairs: a
    slice of the batch and the :class:`Layer` of those rows alone, so
    memory stays at about ROW_BLOCK_BYTES beside W whatever N is.

    Parameters
    ----------
    X : array_like, shape (N, D_in)
    W : ndarray, shape (D_out, D_in)
    B : ndarray, shape (D_out,), or None
    G : array_like, shape (N, D_out)
    """

    def __init__(self, X, W, B, G):
        self.X, self.G = X, G
        self.W = np.asarray(W, dtype=np.float64)
        self.B = None if B is None else np.asarray(B, dtype=np.float64)
        self.N, self.D_in = X.shape
        self.D_out = self.W.shape[0]
        self.slices = row_blocks(self.N, self.D_in, self.D_out)

    def __iter__(self) -> Iterator[tuple[slice, Layer]]:
        for rows in self.slices:
            yield rows, Layer(self.X[rows], self.W, self.B, self.G[rows])


class Totals:
    """What the partial modes need of the whole layer, summed over row blocks.

    dW = Gᵀ X and dB = Σₙ G are sums over the batch, so their references
    and magnitudes add up block by block: the reference is Σ_b G_bᵀ X_b,
    one summation order of its N products per entry, so Higham's γ_N bound
    holds for it unchanged; magnitudes are summed from per-block upper
    bounds and bounded again for the outer sum (:func:`_upper`). Also kept:
    the sums of absolute terms of the whole loss (A_all) and of each column
    share (A_cols), ΣM for dX and for dW, and the scales of X and W, which
    set the steps of the partial witnesses.

    Offers the part of :class:`Layer`'s interface that checks of dW and dB
    use: ``reference``, ``magnitude``, ``inner``, ``shape``.
    """

    def __init__(self, rows: Rows, dW_magnitudes: bool = True):
        self.N, self.D_in, self.D_out = rows.N, rows.D_in, rows.D_out
        self.B = rows.B
        D_out, D_in = self.D_out, self.D_in
        self.blocks = 0
        self.dW = np.zeros((D_out, D_in))
        # |G|ᵀ|X|, a product as costly as a forward pass: only for checking a dW subject.
        self.M_dW = np.zeros((D_out, D_in)) if dW_magnitudes else None
        self.dB, self.sum_G_cols = np.zeros(D_out), np.zeros(D_out)
        self.sum_X_cols, self.A_cols = np.zeros(D_in), np.zeros(D_out)
        self.A_all = self.sum_M_dX = self.sum_M_dW = 0.0
        self.scale = {"dX": 0.0, "dW": float(np.abs(rows.W).max(initial=0.0))}
        self.most_rows = 0

    def add(self, block: Layer) -> None:
        self.blocks += 1
        self.most_rows = max(self.most_rows, block.N)
        self.dW += block.G.T @ block.X
        if self.M_dW is not None:
            self.M_dW += _upper(block.aG.T @ block.aX, block.N)
        self.dB += block.G.sum(axis=0)
        self.sum_G_cols += block.sum_G_cols
        self.sum_X_cols += block.sum_X_cols
        self.A_cols += block.A_cols
        self.A_all += block.A_all
        self.sum_M_dX += float(block.sum_G_cols @ block.sum_W_rows)  # Σₙⱼ Σᵢ |G||W|
        self.sum_M_dW += float(block.sum_G_rows @ block.sum_X_rows)  # Σᵢⱼ Σₙ |G||X|
        self.scale["dX"] = max(self.scale["dX"], block.scale["dX"])

    @property
    def bias(self) -> bool:
        return self.B is not None

    inner = Layer.inner
    shape = Layer.shape

    def _outer(self, x):
        """An upper bound on an exact sum over the blocks of upper bounds summed in float64."""
        return _upper(x, self.blocks)

    def reference(self, tensor: str, cols: np.ndarray | None = None) -> np.ndarray:
        cols = slice(None) if cols is None else cols
        return self.dW[:, cols] if tensor == "dW" else self.dB

    def magnitude(self, tensor: str, cols: np.ndarray | None = None):
        """(M, S) of dW or dB, as :meth:`Layer.magnitude` gives them for the whole batch."""
        cols = slice(None) if cols is None else cols
        k = max(self.N, self.D_in, self.D_out) + 1
        if tensor == "dW":
            S = self._outer(self.sum_G_cols)[:, None] + self._outer(self.sum_X_cols)[None, cols]
            return self._outer(self.M_dW[:, cols]), _upper(S, k)
        return _upper(self._outer(self.sum_G_cols), self.N), _upper(float(self.N), k)

    def sum_M(self, tensor: str) -> float:
        """An upper bound on Σ M over the entries of dX or dW."""
        P = self.N * self.D_in if tensor == "dX" else self.D_out * self.D_in
        total = self.sum_M_dX if tensor == "dX" else self.sum_M_dW
        return float(_upper(np.array(self._outer(total)), P * self.inner(tensor)))


class BlockSum:
    """A witness of dW, dB or sampled entries summed over row blocks.

    Each block gives central differences of its own part of the loss
    (Σ over its rows), with its own steps and bounds (:func:`witness_block`,
    :func:`witness_entries`); the whole estimate is their sum. Its error is
    at most the sum of the blocks' bounds plus the rounding of the sum over
    m blocks, γ_{m−1} Σ|estimate_b|. The typical scales add as independent
    errors do (root of the sum of squares). The reference values, magnitudes
    and operand sums of sampled entries add up the same way.
    """

    def __init__(self, N: int):
        self.N = N
        self.blocks = 0
        self.passes = 0.0
        self.steps = (np.inf, 0.0)
        self.parts: dict[str, np.ndarray] = {}

    def _add(self, name: str, value) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + value

    def add(self, block: Block, rows: int, values: tuple | None = None) -> None:
        """Add one block's witness (and, for sampled entries, its (reference, M, S))."""
        self.blocks += 1
        self._add("estimate", block.estimate)
        self._add("magnitude", np.abs(block.estimate))
        self._add("bound", block.bound)
        self._add("typical2", block.typical**2)
        if values is not None:
            for name, value in zip(("reference", "M", "S"), values):
                self._add(name, value)
        self.passes += block.passes * rows / self.N  # in units of whole forward passes
        self.steps = (min(self.steps[0], block.steps[0]), max(self.steps[1], block.steps[1]))

    def block(self) -> Block:
        m = self.blocks
        rounding = gamma(m - 1, U64) * _upper(self.parts["magnitude"], m) if m > 1 else 0.0
        bound = (_upper(self.parts["bound"], m) + rounding) * (1.0 + 2.0**-50)
        typical = np.sqrt(self.parts["typical2"])
        return Block(self.parts["estimate"], bound, typical, self.passes, self.steps)

    def values(self, k: int) -> tuple:
        """(reference, M, S) of sampled dW entries over the whole batch (k = max dimension + 1)."""
        m = self.blocks
        return self.parts["reference"], _upper(self.parts["M"], m), _upper(self.parts["S"], k)


class BiasWitness:
    """dB's whole witness, all of B perturbed at once (:func:`witness_block`), summed over
    row blocks (:class:`BlockSum`): two forward passes."""

    passes = 2

    def __init__(self, N: int):
        self.sum = BlockSum(N)

    def add(self, rows: slice, block: Layer) -> None:
        M, _ = block.magnitude("dB")
        self.sum.add(witness_block(block, "dB", None, M), block.N)

    def result(self) -> Block:
        return self.sum.block()


class SampleWitness:
    """Central differences at chosen entries of dX or dW, streamed over row blocks.

    An entry of dX lives in one row, so its block alone gives its value,
    magnitude and witness (:func:`entry_values`, :func:`witness_entries`);
    an entry of dW sums over every row, so each block gives a part
    (:class:`BlockSum`).
    """

    def __init__(self, tensor: str, rows: np.ndarray, cols: np.ndarray, totals: Totals):
        self.tensor, self.rows, self.cols = tensor, rows, cols
        self.k = max(totals.N, totals.D_in, totals.D_out) + 1
        self.sum = BlockSum(totals.N)
        self.found: list[tuple[tuple, Block]] = []
        # Rows (or output units) through the layer, in units of whole forward passes.
        self.passes = 2 * len(rows) / (totals.N if tensor == "dX" else totals.D_out)

    def add(self, rows: slice, block: Layer) -> None:
        if self.tensor == "dW":
            values = entry_values(block, "dW", self.rows, self.cols)
            self.sum.add(
                witness_entries(block, "dW", self.rows, self.cols, values[1]), block.N, values
            )
            return
        here = (self.rows >= rows.start) & (self.rows < rows.stop)
        if np.any(here):
            local, cols = self.rows[here] - rows.start, self.cols[here]
            values = entry_values(block, "dX", local, cols)
            self.found.append((values, witness_entries(block, "dX", local, cols, values[1])))

    def result(self) -> tuple[tuple, Block]:
        """((reference, M, S), witness Block) at the entries, in the order given."""
        if self.tensor == "dW":
            return self.sum.values(self.k), self.sum.block()
        values = tuple(np.concatenate([v[i] for v, _ in self.found]) for i in range(3))
        blocks = [b for _, b in self.found]
        joined = Block(
            *(
                np.concatenate([getattr(b, f) for b in blocks])
                for f in ("estimate", "bound", "typical")
            ),
            passes=self.passes,
            steps=(min(b.steps[0] for b in blocks), max(b.steps[1] for b in blocks)),
        )
        return values, joined


def _sign_words(generator: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random bits for ``shape[0]`` rows of ``shape[1]`` signs: whole 64-bit words per row,
    so rows drawn in blocks get the same bits as rows drawn at once."""
    words = generator.bit_generator.random_raw((shape[0], -(-shape[1] // 64)))
    return words.astype("<u8", copy=False)


class DirectionsWitness:
    """``count`` random ±1 directions of dX or dW, streamed over row blocks.

    For a direction v with entries ±1 (Rademacher), θ± = fl(θ ± h v) and
    Δ = θ⁺ − θ⁻, L is linear in θ (the other arrays held fixed), so
    L(θ⁺) − L(θ⁻) = ⟨∇L, Δ⟩ exactly: no truncation error, as for one entry.
    The loss difference is summed from m *share* differences, each share
    differenced first (d̂ the share differences), so its rounding scales
    with one share's terms, not the whole loss's: for X the row shares
    ℓₙ = Σᵢ G[n,i] Y[n,i] (m = N, c = D_in + 1 + D_out terms each); for W
    the shares of output unit i within a row block b, Σ_{n∈b} G[n,i] Y[n,i]
    (m = D_out × blocks, c = D_in + 1 + rows per block). With A the sum of
    absolute terms of the whole loss, M_k the entries' magnitudes, E_k the
    reference's bound and P the number of entries,

        |L̂(θ⁺) − L̂(θ⁻) − ⟨r, Δ̂⟩| ≤ (1 + u) γ_c (2A + 2 max|θ± − θ| ΣM)
                                   + (2u + γ_m)(1 + u) Σ|d̂|
                                   + max|Δ̂|(1 + u) (ΣE + (u + 2γ_P) Σ|r|) + underflow

    h is one step for the whole tensor, chosen as for single entries with A
    and ΣM in place of A and M (:func:`step_sizes`), from the
    :class:`Totals` of a first pass over the rows.

    Sensitivity: for any error vector e in r, a ±1 direction gives
    |⟨e, v⟩| ≥ max |e_k| with probability at least 1/2 (flipping the sign of
    v at the largest entry moves ⟨e, v⟩ by 2 max |e_k|, so at most one of the
    two values lies within max |e_k| of zero). So an error whose largest
    entry exceeds (tolerance + current distance) / step is caught by each
    direction with probability ≥ 1/2, and by at least one of K directions
    with probability ≥ 1 − 2⁻ᴷ.

    Direction d is drawn from its own generator, seeded by (seed, tensor,
    d), as raw random bits, whole 64-bit words per row: a block of rows
    takes the next words of each generator, so the directions do not depend
    on the blocks. W's directions are drawn once and kept as bits
    (count·D_out·D_in/8 bytes), since every block needs all of them.
    """

    def __init__(
        self,
        tensor: str,
        totals: Totals,
        W,
        count: int,
        seed: int,
        reference=None,
        rel_step: float = DEFAULT_REL_STEP,
    ):
        self.tensor, self.count, self.seed = tensor, count, seed
        self.passes = 2 * count
        self.totals, self.W = totals, W
        self.reference = reference  # whole (dW's from the totals); dX's otherwise block by block
        self.sum_M = totals.sum_M(tensor)
        self.h = float(
            step_sizes(totals.scale[tensor], totals.A_all, np.array(self.sum_M), rel_step)
        )
        self.generators = [np.random.default_rng([seed, 0, d]) for d in range(count)]
        if tensor == "dW":  # every block needs all of each direction: kept as bits
            self.words = [
                _sign_words(np.random.default_rng([seed, 1, d]), W.shape) for d in range(count)
            ]
        self.difference = np.zeros(count)
        self.predicted = np.zeros(count)
        self.share_magnitude = np.zeros(count)  # Σ|d̂|
        self.sum_r = 0.0  # Σ|r| (dX, block by block)

    def _steps(self, d: int, shape) -> np.ndarray:
        """h·v for direction d: X's next rows from its generator; all of W, the same each time."""
        words = self.words[d] if self.tensor == "dW" else _sign_words(self.generators[d], shape)
        bits = np.unpackbits(words.view(np.uint8), axis=1, count=shape[1], bitorder="little")
        return np.where(bits.view(bool), self.h, -self.h)

    def add(self, rows: slice, block: Layer) -> None:
        if self.tensor == "dX":
            ref = block.reference("dX") if self.reference is None else self.reference[rows]
            self.sum_r += float(np.sum(np.abs(ref)))
            for d in range(self.count):
                hv = self._steps(d, block.X.shape)
                plus, minus = block.X + hv, block.X - hv
                diffs = np.einsum("ni,ni->n", forward(plus, block.W, block.B), block.G)
                diffs -= np.einsum("ni,ni->n", forward(minus, block.W, block.B), block.G)
                plus -= minus  # Δ, in place
                # einsum's own loop, not a BLAS dot product, whose order depends on the threads.
                self.predicted[d] += float(np.einsum("ij,ij->", ref, plus))
                self._add_shares(d, diffs)
            return
        for d in range(self.count):
            hv = self._steps(d, self.W.shape)
            plus, minus = self.W + hv, self.W - hv
            diffs = np.einsum("ni,ni->i", forward(block.X, plus, block.B), block.G)
            diffs -= np.einsum("ni,ni->i", forward(block.X, minus, block.B), block.G)
            self._add_shares(d, diffs)
            if rows.start == 0:  # Δ is the same for every block
                plus -= minus
                self.predicted[d] = float(np.einsum("ij,ij->", self.reference, plus))

    def _add_shares(self, d: int, diffs: np.ndarray) -> None:
        self.difference[d] += float(np.sum(diffs))
        self.share_magnitude[d] += float(np.sum(np.abs(diffs)))

    def result(self) -> Directions:
        T, u, h = self.totals, U64, self.h
        if self.tensor == "dW":
            self.sum_r = float(np.sum(np.abs(self.reference)))
            n_ops, parts = T.D_in + 1 + T.most_rows, T.D_out * T.blocks
        else:
            n_ops, parts = T.D_in + 1 + T.D_out, T.N
        P, k = T.D_in * (T.N if self.tensor == "dX" else T.D_out), T.inner(self.tensor)
        sum_E = gamma(k, u) * self.sum_M + 2 * k * ETA64 * P
        sum_r = float(_upper(np.array(self.sum_r), P))
        g_c, g_m, g_P = gamma(n_ops, u), gamma(parts, u), gamma(P, u)
        A_all = float(_upper(np.array(T.A_all), T.blocks))
        # θ± = fl(θ ± h v) is off from θ ± h v by at most u(|θ| + h) per entry, so every
        # entry moved by at most `moved`, and Δ = fl(θ⁺ − θ⁻) lies within [small, big].
        slack = 2.0 * u * (T.scale[self.tensor] + h)
        moved = h + slack / 2.0
        big, small = (2.0 * h + slack) * (1.0 + u), (2.0 * h - slack) * (1.0 - u)
        loss_part = 2.0 * A_all + 2.0 * moved * self.sum_M
        fixed = (1.0 + u) * g_c * loss_part + 4 * n_ops * parts * ETA64
        fixed += big * (sum_E + (u + 2.0 * g_P) * sum_r)
        typical = np.sqrt(n_ops) * u * loss_part + big * np.sqrt(k) * u * self.sum_M
        tolerance = fixed + (2.0 * u + g_m) * self.share_magnitude * (1.0 + u)
        return Directions(
            difference=self.difference.copy(),
            predicted=self.predicted.copy(),
            tolerance=tolerance * (1.0 + 2.0**-50),
            typical=np.full(self.count, typical),
            step=np.full(self.count, small),
            passes=2 * self.count,
        )


def witness_directions(layer: Layer, tensor: str, reference, count: int, seed: int) -> Directions:
    """:class:`DirectionsWitness` of an in-memory layer (``reference`` whole, dX or dW)."""
    rows = Rows(layer.X, layer.W, layer.B, layer.G)
    totals = Totals(rows)
    blocks = list(rows)
    for _, block in blocks:
        totals.add(block)
    witness = DirectionsWitness(tensor, totals, rows.W, count, seed, reference)
    for r, block in blocks:
        witness.add(r, block)
    return witness.result()


def step_study(layer: Layer, columns: int = 2, points: int = 33) -> dict[str, np.ndarray]:
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
    h_default = step_sizes(layer.scale["dW"], layer.A_cols[:, None], M, DEFAULT_REL_STEP)
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


# ---------------------------------------------------------------------------
# Whole-tensor conveniences (small layers, tests, studies)


@dataclass(frozen=True)
class Magnitudes:
    """Whole-tensor magnitudes M (``dX``, ``dW``, ``dB``, ``Y``) and operand sums S (``sums``)."""

    dX: np.ndarray
    dW: np.ndarray
    dB: np.ndarray | None
    Y: np.ndarray
    sums: dict[str, np.ndarray | float]

    @classmethod
    def of(cls, X, W, B, G) -> Magnitudes:
        L = Layer(X, W, B, G)
        pairs = {t: L.magnitude(t) for t in ("dX", "dW", "dB", "Y")}
        return cls(
            dX=pairs["dX"][0],
            dW=pairs["dW"][0],
            dB=pairs["dB"][0] if L.bias else None,
            Y=pairs["Y"][0],
            sums={t: S for t, (_, S) in pairs.items()},
        )

    def of_tensor(self, name: str):
        """(M, S) for "dX", "dW", "dB" or "Y"."""
        return getattr(self, name), self.sums[name]


@dataclass(frozen=True)
class Witness:
    """Whole-tensor witness: estimates, worst-case bounds, typical bounds, cost."""

    grads: Gradients
    bounds: Gradients
    typical: Gradients
    method: str
    forward_passes: int
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)


def witness(X, W, B, G, *, method: str = "central", rel_step: float = DEFAULT_REL_STEP) -> Witness:
    """Estimate every entry of dX, dW (and dB) with :func:`witness_block`, whole tensors."""
    L = Layer(X, W, B, G)
    parts: dict[str, list[Block]] = {}
    for tensor in ("dX", "dW", "dB") if L.bias else ("dX", "dW"):
        for cols in L.blocks(tensor, method):
            M, _ = L.magnitude(tensor, cols)
            parts.setdefault(tensor, []).append(witness_block(L, tensor, cols, M, method, rel_step))

    def join(attr):
        out = {
            t: np.concatenate([getattr(b, attr) for b in blocks], axis=-1)
            for t, blocks in parts.items()
        }
        return Gradients(out["dX"], out["dW"], out.get("dB"))

    steps = {
        t[1:]: (min(b.steps[0] for b in blocks), max(b.steps[1] for b in blocks))
        for t, blocks in parts.items()
    }
    passes = sum(b.passes for blocks in parts.values() for b in blocks)
    return Witness(join("estimate"), join("bound"), join("typical"), method, passes, steps)


def central_differences(X, W, B, G, *, grouped: bool = True, rel_step: float = DEFAULT_REL_STEP):
    """Every entry by central differences (grouped, or one at a time if not ``grouped``)."""
    return witness(X, W, B, G, method="central" if grouped else "dense", rel_step=rel_step)


def complex_step(X, W, B, G) -> Witness:
    """Every entry by the complex step, grouped."""
    return witness(X, W, B, G, method="complex-step")


# ---------------------------------------------------------------------------
# Comparing


MAP_CELLS = (128, 256)
"""Rows × columns of cells of an error map at most (see :class:`Tally`)."""

RATIO_OCTAVES = (-40, 67)
RATIO_BINS = np.concatenate(
    ([0.0], 2.0 ** np.arange(RATIO_OCTAVES[0], RATIO_OCTAVES[1] + 1), [np.inf])
)
"""Bin edges of the histograms of error / tolerance: zero and below 2⁻⁴⁰ (9e-13), then one
bin per factor of two (an octave, read off the exponent: cheap) up to 2⁶⁷ (1.5e20; a
transposed or unscaled gradient lands near 1e14 in float64), then everything beyond. The
tolerance is at 1 = 2⁰."""


def _flat_like(values, like: np.ndarray) -> np.ndarray:
    """``values`` broadcast to ``like``'s shape, flattened (a view where it can be)."""
    if np.shape(values) == np.shape(like):
        return np.ravel(values)
    return np.broadcast_to(values, np.shape(like)).ravel()


class Tally:
    """A running entry-by-entry comparison of a subject with an oracle, block by block.

    Each block brings subject and oracle values, per-entry tolerances and
    typical error scales, and a map from the block's flat positions to flat
    indices of the whole tensor. The tally keeps only summaries: whether
    every entry was within its tolerance and how many were not, the largest
    absolute and relative errors, the largest error / tolerance and where it
    was, the largest error / typical scale, the largest tolerance + error
    (the smallest single-entry change certain to be caught), the ``top``
    entries by error / tolerance, and, for each named alternative
    tolerance, whether every entry fit it and the largest ratio to it.

    Relative error is |error| / |oracle|, taken as 0 where both are 0 and as
    infinite where only the oracle is 0; ratios are likewise 0 where the
    error is 0.

    Given the tensor's 2-D ``shape``, the tally also keeps an *error map*:
    the tensor cut into at most MAP_CELLS rows × columns of cells, each
    holding the largest error / tolerance of its entries (so one bad entry
    is never averaged away, however large the tensor), and a histogram of
    error / tolerance over RATIO_BINS.
    """

    def __init__(self, top: int = 5, shape: tuple[int, ...] | None = None):
        self.top = top
        self.shape = None if shape is None else (1, *shape)[-2:]
        if self.shape is not None:
            self.map = np.zeros(tuple(min(n, c) for n, c in zip(self.shape, MAP_CELLS)))
            self.histogram = np.zeros(len(RATIO_BINS) - 1, dtype=np.int64)
        self.count = 0
        self.exceeded = 0
        self.unbounded = 0  # entries whose tolerance is infinite: nothing can be concluded
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.max_ratio = 0.0
        self.max_typical_ratio = 0.0
        self.detectable = 0.0
        self._best: list[tuple] = []  # (−ratio, flat index, subject, oracle, tolerance)
        self.alternatives: dict[str, list] = {}  # name -> [all fit, max ratio]

    def add(
        self,
        subject: np.ndarray,
        oracle: np.ndarray,
        tolerance: np.ndarray,
        typical: np.ndarray,
        flat: Callable[[np.ndarray], np.ndarray],
        alternatives: dict[str, np.ndarray] | None = None,
    ) -> None:
        s, o = np.ravel(subject), np.ravel(oracle)
        tol, typ = (_flat_like(a, subject) for a in (tolerance, typical))
        err = np.abs(s - o)
        exact = err == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(exact, 0.0, err / tol)
            rel = np.where(exact, 0.0, err / np.abs(o))
            typ_ratio = np.where(exact, 0.0, err / typ)
        self.count += s.size
        self.exceeded += s.size - int(np.count_nonzero(err <= tol))
        self.unbounded += int(np.count_nonzero(np.isinf(tol)))
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        self.max_rel = max(self.max_rel, float(rel.max(initial=0.0)))
        self.max_typical_ratio = max(self.max_typical_ratio, float(typ_ratio.max(initial=0.0)))
        self.detectable = max(self.detectable, float((tol + err).max(initial=0.0)))
        # The block's best few, merged with those kept so far.
        k = min(self.top, ratio.size)
        if k:
            local = np.argpartition(-ratio, k - 1)[:k] if k < ratio.size else np.arange(k)
            found = zip(
                (-ratio[local]).tolist(),
                np.asarray(flat(local)).tolist(),
                s[local].tolist(),
                o[local].tolist(),
                tol[local].tolist(),
            )
            # A few entries: sorted as Python tuples, largest ratio first, then by index.
            self._best = sorted([*self._best, *found])[: self.top]
            self.max_ratio = -self._best[0][0]
        if self.shape is not None:
            self._map(ratio, flat)

        for name, alt in (alternatives or {}).items():
            alt = _flat_like(alt, subject)
            with np.errstate(divide="ignore", invalid="ignore"):
                alt_ratio = float(np.max(np.where(err == 0, 0.0, err / alt), initial=0.0))
            fit, worst = self.alternatives.get(name, [True, 0.0])
            self.alternatives[name] = [fit and bool(np.all(err <= alt)), max(worst, alt_ratio)]

    def _map(self, ratio: np.ndarray, flat) -> None:
        """Pool a block's error / tolerance into the map and the histogram, a chunk at a time
        (a few temporaries of CHUNK entries, whatever the block's size)."""
        R, C = self.map.shape
        whole = (R, C) == self.shape  # a cell per entry: no pooling to do
        bins = len(RATIO_BINS) - 1
        for start in range(0, ratio.size, CHUNK):
            r = ratio[start : start + CHUNK]
            cells = self.map.reshape(-1)  # a view: the map is contiguous
            first = getattr(flat, "first", None)  # set when the block's entries are contiguous
            if whole and first is not None:
                run = cells[first + start : first + start + r.size]
                np.maximum(run, r, out=run)
            elif whole:
                where = flat(np.arange(start, start + r.size))
                cells[where] = np.maximum(cells[where], r)
            else:
                rows, cols = np.divmod(flat(np.arange(start, start + r.size)), self.shape[1])
                np.maximum.at(self.map, (rows * R // self.shape[0], cols * C // self.shape[1]), r)
            # Bin i holds [RATIO_BINS[i], RATIO_BINS[i + 1]): r = m·2ᵉ with ½ ≤ m < 1 lies in
            # [2ᵉ⁻¹, 2ᵉ), bin e − RATIO_OCTAVES[0]; zero joins the first bin, infinity the last.
            index = np.frexp(r)[1] - RATIO_OCTAVES[0]
            np.minimum(np.maximum(index, 0, out=index), bins - 1, out=index)
            index[r == 0] = 0
            index[np.isinf(r)] = bins - 1
            self.histogram += np.bincount(index, minlength=bins)

    @property
    def passed(self) -> bool:
        """Every entry within a finite tolerance. An infinite tolerance (a worst-case bound
        that does not exist, k·u ≥ 1) cannot certify anything, so it does not pass."""
        return self.exceeded == 0 and self.unbounded == 0

    @property
    def best(self) -> list[tuple[int, float, float, float]]:
        """The kept entries, worst first: (flat index, subject, oracle, tolerance)."""
        return [(int(w), float(s), float(o), float(t)) for _, w, s, o, t in self._best]


@dataclass(frozen=True)
class Comparison:
    """Whole-array comparison: see :class:`Tally` (``order``: flat indices, worst first)."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    bound_ratio: float
    worst: int
    order: tuple[int, ...]
    tolerance_at_worst: float


def compare(subject, oracle, tolerance, top: int = 5) -> Comparison:
    """Compare two float64 arrays of one shape entry by entry (one :class:`Tally` block)."""
    tally = Tally(top)
    tally.add(subject, oracle, tolerance, np.inf, lambda local: local)
    best = tally.best
    return Comparison(
        passed=tally.passed,
        max_abs_error=tally.max_abs,
        max_rel_error=tally.max_rel,
        bound_ratio=tally.max_ratio,
        worst=best[0][0] if best else 0,
        order=tuple(b[0] for b in best),
        tolerance_at_worst=best[0][3] if best else 0.0,
    )
