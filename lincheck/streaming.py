"""Row streaming: the partial modes read X and G a block of rows at a time.

:class:`Rows` cuts the batch into blocks of about ROW_BLOCK_BYTES of work,
each a small :class:`~lincheck.workspace.Workspace`; :class:`Totals` sums
what dW, dB and the directions need over the blocks; :class:`BlockSum`,
:class:`BiasWitness`, :class:`SampleWitness` and :class:`DirectionsWitness`
are the witnesses that go block by block, with the bounds for their sums
(``docs/numerics.md`` §4, "Layers too big for every entry").

Notation: u is the unit roundoff (2⁻⁵³ for float64), η the smallest
subnormal, γ_k = k u / (1 − k u) the factor of Higham's inner-product bound
|fl(aᵀb) − aᵀb| ≤ γ_k |a|ᵀ|b| for k terms, any summation order, with or
without fused multiply-add [Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., SIAM 2002, §3.1 (Lemma 3.1, 3.3) and §3.5].
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import cast

import numpy as np

from . import tensors
from .bounds import ETA64, U64, abs_product, block_sum_bound, upper_product, upper_sum
from .core import forward
from .precision import gamma
from .witness import (
    Block,
    Directions,
    entry_values,
    witness_block,
    witness_entries,
)
from .workspace import Workspace, tree_levels, tree_window

ROW_BLOCK_BYTES = 128 * 2**20
"""Memory for one block of rows in the partial modes (:func:`row_blocks`). Larger than a
column block: each row block adds W-sized products into W-sized totals (dW and its
magnitudes, :class:`Totals`), which fewer, taller blocks amortize; the per-entry work of
a block runs in smaller chunks of its rows (:meth:`Workspace.row_chunks`)."""


def row_blocks(N: int, D_in: int, D_out: int) -> list[slice]:
    """Row blocks of about ROW_BLOCK_BYTES of float64 work each, fixed by the shapes alone.

    Per row a block holds X and G as float64 with their absolute values
    (and these in float32), MY and the loss shares where a sampled witness
    needs them (:class:`Workspace`), dX's reference and magnitudes, a
    subject's row and some twenty-five per-entry arrays of its check (its
    certain and statistical tolerances, and those of the arithmetics a
    failure is tested against): at most about 30·D_in + 15·D_out float64
    values. The blocks
    depend only on the shapes, so the same inputs always give the same
    blocks, and therefore the same report.
    """
    size = max(1, ROW_BLOCK_BYTES // (8 * (30 * D_in + 15 * D_out)))
    return [slice(start, min(start + size, N)) for start in range(0, N, size)]


class Rows:
    """A layer read a block of rows at a time.

    X and G are 2-D arrays of any real dtype, typically memory-mapped files
    (:func:`lincheck.arrays.load`) that may be larger than memory; only W
    and B are held as float64. Iterating gives ``(rows, block)`` pairs: a
    slice of the batch and the :class:`Workspace` of those rows alone, so
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

    def __iter__(self) -> Iterator[tuple[slice, Workspace]]:
        shared: dict = {}  # what the blocks compute of W alone: computed once
        for rows in self.slices:
            block = Workspace(self.X[rows], self.W, self.B, self.G[rows])
            block.__dict__.update(shared)
            yield rows, block
            shared = block.of_W()


class Totals(tensors.Sizes):
    """What the partial modes need of the whole layer, summed over row blocks.

    dW = Gᵀ X and dB = Σₙ G are sums over the batch, so their references
    and magnitudes add up block by block: the reference is Σ_b G_bᵀ X_b,
    one summation order of its N products per entry, so Higham's γ_N bound
    holds for it unchanged; magnitudes are summed from per-block upper
    bounds and bounded again for the outer sum (:func:`~lincheck.bounds.upper_sum`). Also kept:
    the sums of absolute terms of the whole loss (A_all) and of each column
    share (A_cols), ΣM for dX and for dW, and the scales of X and W, which
    set the steps of the partial witnesses.

    Offers the part of :class:`Workspace`'s interface that checks of dW and dB
    use: ``reference``, ``magnitude``, ``terms``, ``shape``.
    """

    def __init__(
        self,
        rows: Rows,
        dW_magnitudes: bool = True,
        dW_squares: bool = False,
        converted: dict | None = None,
        weights: np.ndarray | None = None,
    ):
        self.N, self.D_in, self.D_out = rows.N, rows.D_in, rows.D_out
        self.B = rows.B
        self.rows = rows  # read again, for a windowed tree's partial sums (tree_squares)
        D_out, D_in = self.D_out, self.D_in
        self.blocks = 0
        self.dW = np.zeros((D_out, D_in))
        # |G|ᵀ|X|, a product as costly as a forward pass: only for checking a dW subject.
        self.M_dW = np.zeros((D_out, D_in)) if dW_magnitudes else None
        self.M_dW_in32, self.most_rows = False, 0  # (abs_product, the rows of its sums)
        self.Q_dW = np.zeros((D_out, D_in)) if dW_squares else None  # Σₙ G² X², if asked
        # dW and dB from the inputs as a model's kernel converted them ("dY", "X": 2-D
        # arrays), for the conversions' exact shift (plan.conversion_shift).
        self.converted = converted or {}
        self.dW_conv = np.zeros((D_out, D_in)) if self.converted else None
        self.dB_conv = np.zeros(D_out) if self.converted else None
        # Σₙ wₙ G[n]ᵀ X[n] and Σₙ wₙ G[n] for a truncating accumulator's order bias (if set).
        self.weights = weights
        self.dW_w, self.dB_w = np.zeros((D_out, D_in)), np.zeros(D_out)
        self.dB, self.sum_G_cols = np.zeros(D_out), np.zeros(D_out)
        self.sum_X_cols = np.zeros(D_in)
        self.sum_M_dX = self.sum_M_dW = 0.0
        self.max_G_cols, self.max_X_cols = np.zeros(D_out), np.zeros(D_in)
        self.squares_G_cols = np.zeros(D_out)

    def add(self, block: Workspace, rows: slice | None = None) -> None:
        self.blocks += 1
        if self.weights is not None and rows is not None:
            self.dW_w += block.ordered("dW", self.weights, offset=rows.start)
            self.dB_w += block.ordered("dB", self.weights, offset=rows.start)
        if self.dW_conv is not None and self.dB_conv is not None and rows is not None:
            G = self.converted.get("dY")
            G = block.G if G is None else G[rows]
            X = self.converted.get("X")
            self.dW_conv += G.T @ (block.X if X is None else X[rows])
            self.dB_conv += G.sum(axis=0)
        np.maximum(self.max_G_cols, block.aG.max(axis=0, initial=0.0), out=self.max_G_cols)
        np.maximum(self.max_X_cols, block.aX.max(axis=0, initial=0.0), out=self.max_X_cols)
        self.squares_G_cols += block.squares("dB")
        self.dW += block.G.T @ block.X
        if self.M_dW is not None:  # bounded up once summed (magnitude)
            M, in32 = abs_product(
                block.aG.T, block.aX, lambda: block.abs32("G").T, lambda: block.abs32("X")
            )
            self.M_dW += M
            self.M_dW_in32 = self.M_dW_in32 or in32
            self.most_rows = max(self.most_rows, block.N)
        if self.Q_dW is not None:
            self.Q_dW += block.squares("dW")
        self.dB += block.G.sum(axis=0)
        self.sum_G_cols += block.sum_G_cols
        self.sum_X_cols += block.sum_X_cols
        self.sum_M_dX += float(block.sum_G_cols @ block.sum_W_rows)  # Σₙⱼ Σᵢ |G||W|
        self.sum_M_dW += float(block.sum_G_rows @ block.sum_X_rows)  # Σᵢⱼ Σₙ |G||X|

    units: slice = slice(None)
    """The output units (rows of dW) that ``reference``, ``largest``, ``squares``,
    ``conversion_shift`` and ``ordered`` give dW's values for (:meth:`row_chunks`)."""

    def row_chunks(self, entries: int = 2**16) -> Iterator[tuple[slice, Totals]]:
        """dW cut into blocks of whole rows (output units) of about ``entries`` values each,
        each a view of these totals that gives those rows' values, so that checking dW
        runs in temporaries that stay in the processor's cache (see
        :meth:`lincheck.workspace.Workspace.row_chunks`)."""
        per = max(1, entries // max(self.D_in, 1))
        for start in range(0, self.D_out, per):
            view = copy.copy(self)
            view.units = slice(start, min(start + per, self.D_out))
            yield view.units, view

    def _outer(self, x):
        """An upper bound on an exact sum over the blocks of upper bounds summed in float64."""
        return upper_sum(x, self.blocks)

    def reference(self, tensor: str, cols: np.ndarray | None = None) -> np.ndarray:
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        return self.dW[self.units, sel] if tensor == "dW" else self.dB

    def squares(self, tensor: str, cols: np.ndarray | None = None):
        """Σ terms² per entry of dW or dB, as :meth:`Workspace.squares` gives them (dW's only
        if the totals were asked to keep them)."""
        if tensor == "dB":
            return self._outer(self.squares_G_cols)
        if self.Q_dW is None:
            return None
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        return self._outer(self.Q_dW[self.units, sel])

    def conversion_shift(self, tensor: str, cols: np.ndarray | None = None):
        """dW or dB from the converted inputs less the reference (None if not kept)."""
        if self.dW_conv is None or self.dB_conv is None:
            return None
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dW":
            return self.dW_conv[self.units, sel] - self.dW[self.units, sel]
        return self.dB_conv - self.dB

    def ordered(self, tensor: str, w: np.ndarray, cols: np.ndarray | None = None, offset: int = 0):
        """Σₙ wₙ tₙ of dW or dB, kept as the blocks went by (None if weights were not set)."""
        if self.weights is None or not np.array_equal(w, self.weights):
            return None
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        return self.dW_w[self.units, sel] if tensor == "dW" else self.dB_w

    def tree_squares(self, K: int):
        """:meth:`Workspace.tree_squares` of the whole batch, from a second pass over dY's
        rows in order (no product: a cumulative sum per window), kept once computed.

        Level 0's windows run across the row blocks: the rows left over from a block
        wait for the next one's. The windows' sums, N/K rows, make the next levels.
        """
        trees = self.__dict__.setdefault("_trees", {})
        if K not in trees:
            G, N, D_out = self.rows.G, self.N, self.D_out
            mean = self.dB / N  # the reference's Σₙ G, as the whole layer's G.sum(axis=0)
            total = np.zeros(D_out)
            if N > 1:
                sums, carry = [], np.zeros((0, D_out))
                for rows in self.rows.slices:
                    R = np.concatenate([carry, np.asarray(G[rows], dtype=np.float64) - mean])
                    whole = R.shape[0] - R.shape[0] % K
                    if whole:
                        squares, window = tree_window(R[:whole], K)
                        total += squares
                        sums.append(window)
                    carry = R[whole:]
                if carry.shape[0]:  # the last window, padded with zeros
                    squares, window = tree_window(carry, K)
                    total += squares
                    sums.append(window)
                total += tree_levels(np.concatenate(sums), K)
            trees[K] = upper_sum(total, 2 * N)
        return trees[K]

    def largest(self, tensor: str, cols: np.ndarray | None = None):
        """Each entry's largest |term| at most, as :meth:`Workspace.largest` gives it."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dW":
            return np.outer(self.max_G_cols[self.units], self.max_X_cols[sel])
        return self.max_G_cols

    def magnitude(self, tensor: str, cols: np.ndarray | None = None):
        """(M, S) of dW or dB, as :meth:`Workspace.magnitude` gives them for the whole batch."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        k = max(self.N, self.D_in, self.D_out) + 1
        if tensor == "dW":
            S = (self._outer(self.sum_X_cols)[None, sel], self._outer(self.sum_G_cols)[:, None])
            S = tuple(upper_sum(x, k) for x in S)
            M_dW = cast(np.ndarray, self.M_dW)  # kept whenever a dW subject is checked
            # The blocks' products, each of its own rows, summed in float64 (one order of
            # the N terms, like dW's own sum): one bound for all, γ over a block's rows.
            M = upper_product(
                upper_sum(M_dW[:, sel], self.blocks),
                self.N,
                self.M_dW_in32,
                S,
                k_gamma=self.most_rows,
            )
            return M, S
        return upper_sum(self._outer(self.sum_G_cols), self.N), (float(self.N),)

    def sum_M(self, tensor: str) -> float:
        """An upper bound on Σ M over the entries of dX or dW."""
        P = self.N * self.D_in if tensor == "dX" else self.D_out * self.D_in
        total = self.sum_M_dX if tensor == "dX" else self.sum_M_dW
        return float(upper_sum(np.array(self._outer(total)), P * self.terms(tensor)))


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
        parts = self.parts
        bound, typical = block_sum_bound(
            parts["bound"], parts["magnitude"], parts["typical2"], self.blocks
        )
        return Block(parts["estimate"], bound, typical, self.passes, self.steps)

    def values(self, k: int) -> tuple:
        """(reference, M, S) of sampled dW entries over the whole batch (k = max dimension + 1)."""
        m = self.blocks
        return self.parts["reference"], upper_sum(self.parts["M"], m), upper_sum(self.parts["S"], k)


class BiasWitness:
    """dB's witness in the partial modes: the forward pass's slope in each bias entry,
    times the batch's sums of dY.

    Y[n, i] depends on B[i] alone and in the same way for every row, so
    ∂L/∂B[i] = sᵢ Σₙ G[n, i] with sᵢ = ∂Y[n, i]/∂B[i] for any row. sᵢ is measured
    by central differences of the first row alone, all of B perturbed at once
    (:func:`witness_block` of that row with dY = 1: two passes of one row),
    within its bound βᵢ of the exact slope. With Ĉᵢ the float64 sum of
    G[:, i] (within γ_N Sᵢ of the exact one, Sᵢ = Σₙ|G[n, i]|), the estimate
    fl(ŝᵢ Ĉᵢ) is within βᵢ|Ĉᵢ| + γ_N Sᵢ + 2u|estimate| + η of ∂L/∂B[i]. (The
    whole batch through the layer at B ± h, two full forward passes, would
    measure the same slope N times over.)
    """

    def __init__(self, N: int):
        self.N = N
        self.slope: Block | None = None
        self.passes = 0.0
        self.C: np.ndarray | float = 0.0
        self.S: np.ndarray | float = 0.0

    def add(self, rows: slice, block: Workspace) -> None:
        if self.slope is None:
            one = Workspace(block.X[:1], block.W, block.B, np.ones((1, block.D_out)))
            self.slope = witness_block(one, "dB", None, one.magnitude("dB")[0])
            self.passes = 2.0 / self.N
        self.C = self.C + block.G.sum(axis=0)
        self.S = self.S + block.sum_G_cols

    def result(self) -> Block:
        slope = cast(Block, self.slope)
        C, S = np.asarray(self.C), upper_sum(np.asarray(self.S), self.N)
        estimate = slope.estimate * C
        bound = slope.bound * np.abs(C) + gamma(self.N, U64) * S
        bound = (bound + 2 * U64 * np.abs(estimate) + ETA64) * (1.0 + 2.0**-50)
        typical = slope.typical * np.abs(C) + np.sqrt(self.N) * U64 * S
        return Block(estimate, bound, typical, self.passes, slope.steps)


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

    def add(self, rows: slice, block: Workspace) -> None:
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
        estimate, bound, typical = (
            np.concatenate([getattr(b, f) for b in blocks])
            for f in ("estimate", "bound", "typical")
        )
        joined = Block(
            estimate,
            bound,
            typical,
            passes=self.passes,
            steps=(min(b.steps[0] for b in blocks), max(b.steps[1] for b in blocks)),
        )
        return values, joined


def _signs(generator: np.random.Generator, rows: int, count: int) -> np.ndarray:
    """``rows`` rows of ``count`` random ±1 values, from whole 64-bit words of random bits
    per row, so rows drawn in blocks get the same signs as rows drawn at once."""
    words = generator.bit_generator.random_raw((rows, -(-count // 64))).astype("<u8", copy=False)
    bits = np.unpackbits(words.view(np.uint8), axis=1, count=count, bitorder="little")
    return np.where(bits.view(bool), 1.0, -1.0)


class DirectionsWitness:
    """``count`` random rank-one ±1 directions of dX or dW, streamed over row blocks.

    A direction of dX is V = a bᵀ (a: N signs, b: D_in signs); of dW,
    V = u vᵀ (u: D_out signs, v: D_in signs). Every entry of V is ±1, and
    the witness is the derivative of L = Σ G ⊙ Y along V read from the forward
    pass, compared with ⟨r, V⟩ from the reference r.

    The forward pass is linear in X and in W and works row by row and unit by
    unit: Y[n] depends on X[n] alone, Y[:, i] on W[i] and B[i] alone. So
    F(X + hV) − F(X − hV) = 2h · a F₀(b) for X, F₀ the forward pass without a
    bias applied to the single row b; and F(W + hV) − F(W − hV) =
    2h · F₀(X; v) uᵀ for W, F₀(X; v) = X v the forward pass of a layer of one
    unit with weights v and no bias. Both are exact identities, so the central
    difference needs no step: the derivative along V is

        dX: ⟨∇L, a bᵀ⟩ = (Gᵀ a) · F₀(b)          one forward pass of ``count`` rows
        dW: ⟨∇L, u vᵀ⟩ = (G u) · F₀(X; v)        one forward pass of ``count`` units

    at a cost of about ``count`` of the N rows (D_out units) of one forward
    pass, instead of the two whole passes per direction that perturbing every
    entry at once takes. Computed in float64 with any order of the sums, each
    product of a value with a sign is exact and, with c_i = Σₙ|G[n, i]|,
    m_i = Σⱼ|W[i, j]|, σₙ = Σᵢ|G[n, i]|, ρₙ = Σⱼ|X[n, j]| [Higham 2002, §3.1]:

        dX: |ŵ − ⟨∇L, V⟩| ≤ γ_N Σᵢ cᵢ|f̂ᵢ| + γ_{D_in} Σᵢ (|ĝᵢ| + γ_N cᵢ) mᵢ
                             + γ_{D_out} Σᵢ |ĝᵢ f̂ᵢ| + D_out η
        dW: |ŵ − ⟨∇L, V⟩| ≤ γ_{D_out} Σₙ σₙ|p̂ₙ| + γ_{D_in} Σₙ (|q̂ₙ| + γ_{D_out} σₙ) ρₙ
                             + γ_N Σₙ |q̂ₙ p̂ₙ| + N η

    (ĝ = fl(Gᵀa), f̂ = fl(F₀(b)); q̂ = fl(G u), p̂ = fl(F₀(X; v))), and the
    reference's side, aᵀ r b or uᵀ r v summed in float64, is within
    γ_{P₁ + P₂} Σ|r| ≤ γ_{P₁ + P₂} ΣM of its exact value, plus the reference's
    own bound ΣE = γ_k ΣM + 2kηP along V (P₁ × P₂ the tensor's shape, ΣM the
    sum of its magnitudes, :meth:`Totals.sum_M`). The tolerance is the sum of
    the two, each sum bounded up for its own rounding (:func:`upper_sum`).

    Sensitivity: for an error matrix E in r with its largest entry at (n*, j*),
    a fixed b, and the other signs of a fixed, flipping a at n* moves aᵀ(E b)
    by 2|(E b)ₙ*|, so |aᵀ E b| ≥ |(E b)ₙ*| with probability ≥ 1/2; likewise
    |(E b)ₙ*| ≥ |E[n*, j*]| with probability ≥ 1/2 over b. So each direction
    sees |⟨E, V⟩| ≥ max|E| with probability at least 1/4, and one of K
    directions with probability at least 1 − (3/4)ᴷ; a single wrong entry e
    always gives |⟨E, V⟩| = |e|.

    The signs come from generators seeded by (seed, tensor): a and the rows'
    signs as whole 64-bit words per row, so the directions do not depend on
    the blocks.
    """

    def __init__(self, tensor: str, rows: Rows, count: int, seed: int, sum_M, reference=None):
        self.tensor, self.count = tensor, count
        self.N, self.D_in, self.D_out = rows.N, rows.D_in, rows.D_out
        self.sum_M = sum_M  # (tensor) -> an upper bound on Σ M over the entries, once summed
        self.reference = reference  # dW's, whole, once the rows are summed (a callable)
        code = 0 if tensor == "dX" else 1
        self.row_signs = np.random.default_rng([seed, 2, code])  # a, block by block (dX)
        self.b = _signs(np.random.default_rng([seed, 3, code]), count, self.D_in)
        self.estimate = np.zeros(count)
        self.predicted = np.zeros(count)
        self.terms = np.zeros((3, count))  # the witness bound's three sums, as named above
        if tensor == "dX":
            self.passes = count / self.N
            self.f = forward(self.b, rows.W, None)  # F₀(b): count × D_out
            self.m = np.abs(rows.W).sum(axis=1)
            self.g = np.zeros((count, self.D_out))  # Gᵀ a, summed over the blocks
            self.c = np.zeros(self.D_out)  # Σₙ |G[n, i]|
        else:
            self.passes = count / self.D_out
            self.u = _signs(np.random.default_rng([seed, 4, code]), count, self.D_out)

    def add(self, rows: slice, block: Workspace) -> None:
        if self.tensor == "dX":
            a = _signs(self.row_signs, block.N, self.count)  # block.N × count
            self.g += a.T @ block.G
            self.c += block.sum_G_cols
            self.predicted += np.einsum("nk,nk->k", a, block.reference("dX") @ self.b.T)
            return
        g_D_out = gamma(self.D_out, U64)
        p = forward(block.X, self.b, None)  # F₀(X; v): block.N × count
        q = block.G @ self.u.T
        # σₙ and ρₙ bounded up: their float64 sums may fall short of the exact ones.
        sigma = upper_sum(block.sum_G_rows, self.D_out)
        rho = upper_sum(block.sum_X_rows, self.D_in)
        self.estimate += np.einsum("nk,nk->k", q, p)
        ap, aq = np.abs(p), np.abs(q)
        self.terms[0] += sigma @ ap
        self.terms[1] += rho @ aq + g_D_out * float(sigma @ rho)
        self.terms[2] += np.einsum("nk,nk->k", aq, ap)

    def result(self) -> Directions:
        g, N, D_in, D_out = gamma, self.N, self.D_in, self.D_out
        if self.tensor == "dX":
            c = upper_sum(self.c, N)
            self.estimate = np.einsum("ki,ki->k", self.g, self.f)
            af, ag = np.abs(self.f), np.abs(self.g)
            m = upper_sum(self.m, D_in)
            sums = (af @ c, (ag + g(N, U64) * c) @ m, np.einsum("ki,ki->k", ag, af))
            sums = tuple(upper_sum(s, D_out) for s in sums)  # each a float64 sum of D_out
            ks = (N, D_in, D_out)
            count, P, k = D_out, N * D_in, D_out
        else:
            reference = self.reference()
            self.predicted = np.einsum("ki,ik->k", self.u, reference @ self.b.T)
            sums = tuple(upper_sum(t, N) for t in self.terms)
            ks = (D_out, D_in, N)
            count, P, k = N, D_out * D_in, N
        worst = sum(g(kk, U64) * s for kk, s in zip(ks, sums)) + count * ETA64
        typical = sum(np.sqrt(kk) * U64 * s for kk, s in zip(ks, sums))
        sum_M = self.sum_M(self.tensor)
        shape_sum = N + D_in if self.tensor == "dX" else D_out + D_in
        # aᵀ r̂ b within γ Σ|r̂| ≤ γ (1 + γ_k) ΣM, and r̂ within ΣE of the exact along V
        along = g(shape_sum, U64) * (1.0 + g(k, U64)) * sum_M
        reference = along + g(k, U64) * sum_M + 2 * k * ETA64 * P
        tolerance = (worst + reference) * (1.0 + 2.0**-50)
        return Directions(
            difference=self.estimate.copy(),
            predicted=self.predicted.copy(),
            tolerance=tolerance,
            typical=typical + np.sqrt(k) * U64 * sum_M,
            step=np.ones(self.count),
            passes=self.passes,
        )
