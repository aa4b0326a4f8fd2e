"""The float64 workspace of a layer: its arrays, cached magnitudes and column blocks.

:class:`Workspace` holds X, W, B, G as float64 and, from first use, the
absolute values and sums every bound needs; everything per entry (the
magnitudes, the reference, the witness) is computed from it a block of
columns at a time, so a full check never holds more than one block of
intermediate values beside its inputs (:meth:`Workspace.blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import numpy as np

from . import tensors
from .bounds import abs_product, upper_product, upper_sum
from .core import forward

BLOCK_BYTES = 32 * 2**20
"""Memory for one block of perturbed forward passes (their inputs and outputs)."""

BLOCK_WORK = 10**9
"""Multiply-adds of one block's forward passes at most (0.02 s at the nominal 5·10¹⁰ per
second, about 0.1 s on a loaded laptop core), so the progress of a long check advances in
small steps; a column whose passes take more makes a block of its own."""


class Workspace(tensors.Sizes):
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

    def row_chunks(self, entries: int = 2**16) -> Iterator[tuple[slice, Workspace]]:
        """The layer cut into blocks of whole rows of about ``entries`` values of dX each
        (one block if it is no larger), each a Workspace of its rows that shares what this
        one computed already: W's values and sums, and row slices of |X|, |G|, MY and dX's
        reference. The per-entry work of a check (tolerances, comparisons) runs in
        temporaries a few times the size of one row chunk, which stay in the processor's
        cache: measured about three times faster than the same work on 2¹⁹ entries at once.
        """
        per = max(1, entries // max(self.D_in, self.D_out, 1))
        if per >= self.N:
            yield slice(0, self.N), self
            return
        for start in range(0, self.N, per):
            rows = slice(start, min(start + per, self.N))
            view = Workspace(self.X[rows], self.W, self.B, self.G[rows])
            shared = view.__dict__
            shared.update(self.of_W())
            for name in ("aX", "aG", "MY", "_dX", "sum_G_rows", "sum_X_rows"):
                if name in self.__dict__:
                    shared[name] = self.__dict__[name][rows]
            yield rows, view

    def of_W(self) -> dict:
        """What this workspace has computed of W alone (|W|, its sums and maxima, |W| in
        float32, W²), for another workspace of the same W to start with."""
        have = self.__dict__
        names = ("aW", "sum_W_rows", "sum_W_cols", "max_W_cols")
        out = {name: have[name] for name in names if name in have}
        for cache in ("_abs32", "_squares"):
            if "W" in have.get(cache, {}):
                out[cache] = {"W": have[cache]["W"]}
        return out

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

    def abs32(self, name: str) -> np.ndarray:
        """|X|, |W| or |G| in float32, kept once computed (for :func:`abs_product`)."""
        cache = self.__dict__.setdefault("_abs32", {})
        if name not in cache:
            with np.errstate(over="ignore"):
                cache[name] = getattr(self, "a" + name).astype(np.float32)
        return cache[name]

    @cached_property
    def MY(self) -> np.ndarray:
        MY = self.aX @ self.aW.T
        if self.B is not None:
            MY += np.abs(self.B)
        return upper_sum(MY, self.D_in + 1)

    @cached_property
    def _shares(self) -> tuple[np.ndarray, np.ndarray, float]:
        shares = self.aG * self.MY
        return (
            upper_sum(shares.sum(axis=1), self.D_out),
            upper_sum(shares.sum(axis=0), self.N),
            float(upper_sum(shares.sum(), self.N * self.D_out)),
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
    def max_W_cols(self) -> np.ndarray:
        return self.aW.max(axis=0, initial=0.0)

    @cached_property
    def scale(self) -> dict[str, float]:
        """The scale of the values each tensor's perturbation competes with (step_sizes)."""
        return {
            "dX": float(self.aX.max(initial=0.0)),
            "dW": float(self.aW.max(initial=0.0)),
            "dB": float(self.MY.max(initial=0.0)),
        }

    def reach(self, tensor: str) -> float:
        """How far a unit change of one entry of X, W or B moves an entry of Y at most:
        the largest |W|, the largest |X|, or 1 (see :func:`lincheck.witness.step_sizes`)."""
        return {"dX": self.scale["dW"], "dW": self.scale["dX"]}.get(tensor, 1.0)

    def magnitude(self, tensor: str, cols: np.ndarray | None = None):
        """(M, S) for a block: M = Σ|terms| per entry; S, per operand of the product, the sum
        of the *other* operand's |values| over the entry's terms (Σ|b| for a, Σ|a| for b;
        for dB, whose terms are G alone, the count N).

        M scales every rounding bound; an operand that underflows when converted is off
        by its η in absolute terms, which moves each product by η times the other
        operand: S scales that. ``cols`` selects columns of dX or dW (all if None); dB
        and Y come whole.
        """
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        k = max(self.N, self.D_in, self.D_out) + 1
        whole = cols is None

        def G32():
            return self.abs32("G")

        if tensor == "dX":  # operands G, W
            W32 = (lambda: self.abs32("W")) if whole else None
            M, in32 = abs_product(self.aG, self.aW[:, sel], G32, W32)
            S = (self.sum_W_cols[None, sel], self.sum_G_rows[:, None])
        elif tensor == "dW":  # operands G, X
            X32 = (lambda: self.abs32("X")) if whole else None
            M, in32 = abs_product(self.aG.T, self.aX[:, sel], lambda: G32().T, X32)
            S = (self.sum_X_cols[None, sel], self.sum_G_cols[:, None])
        elif tensor == "dB":
            return self.sum_G_cols, (float(self.N),)
        else:  # operands X, W
            S = (self.sum_W_rows[None, :], self.sum_X_rows[:, None])
            return self.MY, tuple(upper_sum(x, k) for x in S)
        S = tuple(upper_sum(x, k) for x in S)
        return upper_product(M, self.terms(tensor), in32, S), S

    def largest(self, tensor: str, cols: np.ndarray | None = None):
        """An upper bound on each entry's largest |term|, from row and column maxima: for
        dW[o, i] = Σₙ G[n, o] X[n, i], maxₙ|G[n, o]| · maxₙ|X[n, i]| (for Y the bias is a
        term too). It scales the statistical tier's bound (docs/numerics.md §2.3)."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dX":
            return np.outer(self.aG.max(axis=1, initial=0.0), self.max_W_cols[sel])
        if tensor == "dW":
            return np.outer(self.aG.max(axis=0, initial=0.0), self.aX.max(axis=0, initial=0.0)[sel])
        if tensor == "dB":
            return self.aG.max(axis=0, initial=0.0)
        big = np.outer(self.aX.max(axis=1, initial=0.0), self.aW.max(axis=1, initial=0.0))
        return big if self.B is None else np.maximum(big, np.abs(self.B))

    def squares(self, tensor: str, cols: np.ndarray | None = None):
        """Σ terms² per entry (for dW, Σₙ G[n, o]² X[n, i]²): the scale of independent
        per-term errors in the statistical tier (docs/numerics.md §2.3). Products of squares,
        as costly as the magnitudes: computed only for arithmetics that convert operands
        or round products."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dB":
            return upper_sum(np.einsum("no,no->o", self.G, self.G), self.N)
        k = self.terms(tensor)
        if tensor == "dX":
            return upper_sum(self._sq("G") @ self._sq("W")[:, sel], k)
        if tensor == "dW":
            return upper_sum(self._sq("G").T @ self._sq("X")[:, sel], k)
        Q = self._sq("X") @ self._sq("W").T
        return upper_sum(Q if self.B is None else Q + self.B**2, k)

    def _sq(self, name: str) -> np.ndarray:
        """X², W² or G², kept once computed."""
        cache = self.__dict__.setdefault("_squares", {})
        if name not in cache:
            a = getattr(self, name)
            cache[name] = a * a
        return cache[name]

    def ordered(self, tensor: str, w: np.ndarray, cols: np.ndarray | None = None, offset: int = 0):
        """Σᵢ wᵢ tᵢ per entry, the terms weighted by their position along the summed axis
        (``offset``: this block's first row in the batch, for dW and dB)."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dX":
            return (self.G * w[None, : self.D_out]) @ self.W[:, sel]
        if tensor in ("dW", "dB"):
            wn = w[offset : offset + self.N]
            return wn @ self.G if tensor == "dB" else (self.G * wn[:, None]).T @ self.X[:, sel]
        Y = (self.X * w[None, : self.D_in]) @ self.W.T
        return Y if self.B is None else Y + w[self.D_in] * self.B

    def tree_squares(self, K: int):
        """Σ over the additions of a tree of K-term windows (rows in order, level on level,
        as XLA reduces) of R², for each entry of dB: R is an addition's partial sum less
        its share of the value, |node|/N · dB. The statistical tier's scale for dB's
        rounding errors in such a tree, with no assumption about the data (§2.3)."""
        R = self.G - self.G.sum(axis=0) / self.N  # each term's fluctuation r = t − v/N
        return upper_sum(tree_levels(R, K), 2 * self.N)

    def reference(self, tensor: str, cols: np.ndarray | None = None) -> np.ndarray:
        """The analytic values of a block, in float64: G W, Gᵀ X, Σₙ G or X Wᵀ + B."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dX" and cols is None:  # a row block's: its check and witness share it
            if "_dX" not in self.__dict__:
                self.__dict__["_dX"] = self.G @ self.W
            return self.__dict__["_dX"]
        if tensor == "dX":
            return self.G @ self.W[:, sel]
        if tensor == "dW":
            return self.G.T @ self.X[:, sel]
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
        if witness:  # a column's passes: 2 per entry (dense), 2, or 1 complex (4 real)
            passes = {"dense": 2 * rows, "central": 2}.get(method, 4)
            size = max(1, min(size, BLOCK_WORK // (passes * self.N * self.D_in * self.D_out)))
        for start in range(0, self.D_in, size):
            yield np.arange(start, min(start + size, self.D_in))

    def passes(self, tensor: str, method: str) -> int:
        """Forward passes a full witness of one tensor takes."""
        return full_passes(self.N, self.D_in, self.D_out, tensor, method)


def tree_window(R: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(Σ over the additions of R's rows summed in windows of K, level 0 of a tree, of the
    running sums squared; each window's sum): R's rows padded with zeros to whole windows."""
    pad = -R.shape[0] % K
    blocks = np.concatenate([R, np.zeros((pad, R.shape[1]))]).reshape(-1, K, R.shape[1])
    partial = np.cumsum(blocks, axis=1)[:, 1:, :]  # every addition's running sum
    return np.einsum("wjo,wjo->o", partial, partial), partial[:, -1, :]


def tree_levels(R: np.ndarray, K: int) -> np.ndarray:
    """Σ over every addition of a tree of K-term windows over R's rows (level on level) of
    the running sums squared, per column (:meth:`Workspace.tree_squares`)."""
    total = np.zeros(R.shape[1])
    while R.shape[0] > 1:
        squares, R = tree_window(R, K)
        total += squares
    return total


def full_passes(N: int, D_in: int, D_out: int, tensor: str, method: str) -> int:
    """Forward passes a full witness of dX, dW or dB takes with ``method``."""
    if method == "dense":
        return 2 * {"dX": N * D_in, "dW": D_out * D_in, "dB": D_out}[tensor]
    columns = 1 if tensor == "dB" else D_in
    return columns * (1 if method == "complex-step" else 2)
