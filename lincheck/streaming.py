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

from collections.abc import Iterator
from typing import cast

import numpy as np

from . import tensors
from .bounds import block_sum_bound, directions_tolerance, upper_sum
from .core import forward
from .witness import (
    DEFAULT_REL_STEP,
    Block,
    Directions,
    entry_values,
    step_sizes,
    witness_block,
    witness_entries,
)
from .workspace import Workspace

ROW_BLOCK_BYTES = 128 * 2**20
"""Memory for one block of rows in the partial modes (:func:`row_blocks`). Larger than a
column block: each row block repeats W-sized work per direction (perturbing W), which
fewer, taller blocks amortize (at (1024, 1024, 1024), 16 directions take 2.9 s in
blocks of 32 MiB, 2.1 s in blocks of 128 MiB)."""


def row_blocks(N: int, D_in: int, D_out: int) -> list[slice]:
    """Row blocks of about ROW_BLOCK_BYTES of float64 work each, fixed by the shapes alone.

    Per row a block holds X and G as float64 with their absolute values,
    MY and the loss shares (:class:`Workspace`), a subject's row and some
    twenty-five per-entry arrays of its check (its certain and statistical
    tolerances, and those of the arithmetics a failure is tested against),
    and two perturbed copies with their outputs: about 30·D_in + 15·D_out
    float64 values. The blocks
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
        for rows in self.slices:
            yield rows, Workspace(self.X[rows], self.W, self.B, self.G[rows])


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
        D_out, D_in = self.D_out, self.D_in
        self.blocks = 0
        self.dW = np.zeros((D_out, D_in))
        # |G|ᵀ|X|, a product as costly as a forward pass: only for checking a dW subject.
        self.M_dW = np.zeros((D_out, D_in)) if dW_magnitudes else None
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
        self.sum_X_cols, self.A_cols = np.zeros(D_in), np.zeros(D_out)
        self.A_all = self.sum_M_dX = self.sum_M_dW = 0.0
        self.scale = {"dX": 0.0, "dW": float(np.abs(rows.W).max(initial=0.0))}
        self.most_rows = 0
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
        self.most_rows = max(self.most_rows, block.N)
        self.dW += block.G.T @ block.X
        if self.M_dW is not None:
            self.M_dW += upper_sum(block.aG.T @ block.aX, block.N)
        if self.Q_dW is not None:
            self.Q_dW += block.squares("dW")
        self.dB += block.G.sum(axis=0)
        self.sum_G_cols += block.sum_G_cols
        self.sum_X_cols += block.sum_X_cols
        self.A_cols += block.A_cols
        self.A_all += block.A_all
        self.sum_M_dX += float(block.sum_G_cols @ block.sum_W_rows)  # Σₙⱼ Σᵢ |G||W|
        self.sum_M_dW += float(block.sum_G_rows @ block.sum_X_rows)  # Σᵢⱼ Σₙ |G||X|
        self.scale["dX"] = max(self.scale["dX"], block.scale["dX"])

    def _outer(self, x):
        """An upper bound on an exact sum over the blocks of upper bounds summed in float64."""
        return upper_sum(x, self.blocks)

    def reference(self, tensor: str, cols: np.ndarray | None = None) -> np.ndarray:
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        return self.dW[:, sel] if tensor == "dW" else self.dB

    def squares(self, tensor: str, cols: np.ndarray | None = None):
        """Σ terms² per entry of dW or dB, as :meth:`Workspace.squares` gives them (dW's only
        if the totals were asked to keep them)."""
        if tensor == "dB":
            return self._outer(self.squares_G_cols)
        if self.Q_dW is None:
            return None
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        return self._outer(self.Q_dW[:, sel])

    def conversion_shift(self, tensor: str, cols: np.ndarray | None = None):
        """dW or dB from the converted inputs less the reference (None if not kept)."""
        if self.dW_conv is None or self.dB_conv is None:
            return None
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dW":
            return self.dW_conv[:, sel] - self.dW[:, sel]
        return self.dB_conv - self.dB

    def ordered(self, tensor: str, w: np.ndarray, cols: np.ndarray | None = None, offset: int = 0):
        """Σₙ wₙ tₙ of dW or dB, kept as the blocks went by (None if weights were not set)."""
        if self.weights is None or not np.array_equal(w, self.weights):
            return None
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        return self.dW_w[:, sel] if tensor == "dW" else self.dB_w

    def tree_squares(self, K: int):
        """None: a tree's partial sums need the rows in order, which the row blocks split
        (the bound then takes the worst case over the additions, docs/numerics.md §2.3)."""
        return None

    def largest(self, tensor: str, cols: np.ndarray | None = None):
        """Each entry's largest |term| at most, as :meth:`Workspace.largest` gives it."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        if tensor == "dW":
            return np.outer(self.max_G_cols, self.max_X_cols[sel])
        return self.max_G_cols

    def magnitude(self, tensor: str, cols: np.ndarray | None = None):
        """(M, S) of dW or dB, as :meth:`Workspace.magnitude` gives them for the whole batch."""
        sel: slice | np.ndarray = slice(None) if cols is None else cols
        k = max(self.N, self.D_in, self.D_out) + 1
        if tensor == "dW":
            S = (self._outer(self.sum_X_cols)[None, sel], self._outer(self.sum_G_cols)[:, None])
            M_dW = cast(np.ndarray, self.M_dW)  # kept whenever a dW subject is checked
            return self._outer(M_dW[:, sel]), tuple(upper_sum(x, k) for x in S)
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
    """dB's whole witness, all of B perturbed at once (:func:`witness_block`), summed over
    row blocks (:class:`BlockSum`): two forward passes."""

    passes = 2

    def __init__(self, N: int):
        self.sum = BlockSum(N)

    def add(self, rows: slice, block: Workspace) -> None:
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
            step_sizes(
                totals.scale[tensor],
                totals.A_all,
                np.array(self.sum_M),
                rel_step,
                totals.scale["dW" if tensor == "dX" else "dX"],
            )
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

    def add(self, rows: slice, block: Workspace) -> None:
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
        T = self.totals
        if self.tensor == "dW":
            self.sum_r = float(np.sum(np.abs(self.reference)))
            n_ops, parts = T.D_in + 1 + T.most_rows, T.D_out * T.blocks
        else:
            n_ops, parts = T.D_in + 1 + T.D_out, T.N
        tolerance, typical, small = directions_tolerance(
            h=self.h,
            scale=T.scale[self.tensor],
            A_all=T.A_all,
            sum_M=self.sum_M,
            sum_r=self.sum_r,
            share_magnitude=self.share_magnitude,
            n_ops=n_ops,
            parts=parts,
            P=T.D_in * (T.N if self.tensor == "dX" else T.D_out),
            k=T.terms(self.tensor),
            blocks=T.blocks,
            G_mass=float(upper_sum(np.array(float(T.sum_G_cols.sum())), T.D_out * T.blocks)),
            k_Y=T.D_in + 1,
        )
        return Directions(
            difference=self.difference.copy(),
            predicted=self.predicted.copy(),
            tolerance=tolerance,
            typical=np.full(self.count, typical),
            step=np.full(self.count, small),
            passes=2 * self.count,
        )
