"""The tally: an entry-by-entry comparison kept as summaries, block by block.

:class:`Tally` takes a subject, an oracle and per-entry tolerances a block
at a time and keeps only what a report needs: counts, maxima, the worst few
entries, an error map pooled by maximum and a histogram of error / tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from .core import CHUNK

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


@dataclass(frozen=True)
class Positions:
    """Where a block's entries sit in the whole 2-D tensor: a map from a block's flat
    positions to the tensor's flat indices.

    A block of whole rows (or the whole tensor) is contiguous: ``first`` is
    the flat index of its first entry, and the map a shift, so the error map
    can be written by slices. A block of some columns (``cols`` of a tensor
    ``width`` wide) or of chosen entries (``entries``, flat indices) is not.
    """

    first: int | None = 0
    cols: np.ndarray | None = None
    width: int = 0
    entries: np.ndarray | None = None

    def __call__(self, local) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        if self.first is not None:
            return local + self.first
        if self.entries is not None:
            return self.entries[local]
        rows, j = np.divmod(local, len(self.cols))  # type: ignore[arg-type]
        return rows * self.width + self.cols[j]  # type: ignore[index]

    @classmethod
    def of_block(cls, shape: tuple[int, ...], cols, rows: slice | None = None) -> Positions:
        """The positions of a block of ``cols`` (None: all) or of ``rows`` of a 2-D tensor."""
        if rows is not None:
            return cls(first=rows.start * shape[1])
        if cols is None or (len(shape) == 2 and len(cols) == shape[1]):
            return cls(first=0)  # every column: the block is the whole tensor
        return cls(first=None, cols=np.asarray(cols), width=shape[1])


RESOLVE = 2.0
"""A check is conclusive when some entry's |value| exceeds RESOLVE times its tolerance
(:attr:`Tally.conclusive`)."""

RANK_BITS = 16
"""Significand bits of error / tolerance that order the worst entries (about 5 digits)."""


def rank(ratio: np.ndarray) -> np.ndarray:
    """error / tolerance cut to RANK_BITS significand bits (toward zero), to order entries.

    Entries tied in exact arithmetic (a column of dW whose entries are all
    the same sum, say) have ratios that differ only in the last bits of the
    float64 reference and bound, and those bits follow the BLAS's summation
    order, which changes with the CPU and the thread count; the magnitudes
    of large products are summed in float32 (:func:`lincheck.bounds.abs_product`),
    whose last bits are 2⁻²⁴ of the value. Cut to 16 bits, such ratios are
    equal (unless they straddle one of the cut's steps, a chance of about
    2⁻⁸ for float32 noise, 2⁻³⁶ for float64's), and the lowest index among
    them is named the worst: the same entry on every machine. The ratios
    reported are never cut.
    """
    bits = np.ascontiguousarray(ratio, dtype=np.float64).view(np.int64)
    return (bits & ~np.int64((1 << (52 - RANK_BITS)) - 1)).view(np.float64)


def _flat_like(values, like: np.ndarray) -> np.ndarray:
    """``values`` broadcast to ``like``'s shape, flattened (a view where it can be)."""
    if np.shape(values) == np.shape(like):
        return np.ravel(values)
    return np.broadcast_to(values, np.shape(like)).ravel()


class Tally:
    """A running entry-by-entry comparison of a subject with an oracle, block by block.

    Each block brings subject and oracle values, per-entry tolerances and
    typical error scales, and a map from the block's flat positions to flat
    indices of the whole tensor (:class:`Positions`). The tally keeps only summaries: whether
    every entry was within its tolerance and how many were not, the largest
    absolute and relative errors, the largest error / tolerance and where it
    was, the largest error / typical scale, the largest tolerance + error
    (the smallest single-entry change certain to be caught), the ``top``
    entries by error / tolerance (ranked by :func:`rank`, ties to the lowest
    index).

    Relative error is |error| / |oracle|, taken as 0 where both are 0 and as
    infinite where only the oracle is 0; ratios are likewise 0 where the
    error is 0.

    Given the tensor's 2-D ``shape``, the tally also keeps an *error map*:
    the tensor cut into at most MAP_CELLS rows × columns of cells, each
    holding the largest error / tolerance of its entries (so one bad entry
    is never averaged away, however large the tensor), and a histogram of
    error / tolerance over RATIO_BINS.
    """

    def __init__(self, top: int = 5, shape: tuple[int, ...] | None = None, resolve: bool = False):
        self.top = top
        self.resolve = resolve  # whether a pass needs the check to be conclusive
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
        self.certain_exceeded = 0  # entries beyond the rigorous bound (the certain tier)
        self.max_certain_ratio = 0.0
        self.resolution = 0.0  # the largest |oracle| / tolerance: what the check can resolve
        self.largest = 0.0  # the largest |oracle|
        self._best: list[tuple] = []  # (−ratio, flat index, subject, oracle, tolerance)

    def add(
        self,
        subject: np.ndarray,
        oracle: np.ndarray,
        tolerance: np.ndarray,
        typical: np.ndarray,
        flat: Positions,
        certain: np.ndarray | None = None,
    ) -> None:
        """Compare one block. ``tolerance`` is the one that decides (the statistical tier's,
        or the certain one's); ``certain``, the rigorous bound, if it is larger (never
        smaller, entry by entry: an entry within ``tolerance`` is within ``certain``)."""
        s, o = np.ravel(subject), np.ravel(oracle)
        tol, typ = (_flat_like(a, subject) for a in (tolerance, typical))
        if certain is tolerance:
            certain = None  # the certain tier decides: one set of ratios
        cert = tol if certain is None else _flat_like(certain, subject)
        # Few passes over the block: this runs on every entry of every check.
        err = np.subtract(s, o)
        np.abs(err, out=err)
        a_o = np.abs(o)
        scratch = np.empty_like(err)

        def largest_of(values) -> float:
            return float(np.fmax.reduce(values, initial=0.0)) if values.size else 0.0

        # Ratios are 0 where the error is 0 (even against a zero tolerance), else err / x: a
        # plain divide where every tolerance is positive (0 / tol is 0), else a divide where
        # the error is not 0 into zeros; where only the largest is wanted, a plain divide
        # whose 0/0 (NaN) the NaN-ignoring maximum passes over.
        with np.errstate(divide="ignore", invalid="ignore"):
            if tol.size and tol.min() > 0:
                ratio = np.divide(err, tol)
            else:
                ratio = np.zeros_like(err)
                np.divide(err, tol, out=ratio, where=err != 0)
            self.max_rel = max(self.max_rel, largest_of(np.divide(err, a_o, out=scratch)))
            typical_max = largest_of(np.divide(err, typ, out=scratch))
            self.max_typical_ratio = max(self.max_typical_ratio, typical_max)
            by_cert = ratio if certain is None else np.divide(err, cert, out=scratch)
            certain_max = largest_of(by_cert)
            self.max_certain_ratio = max(self.max_certain_ratio, certain_max)
            self.resolution = max(self.resolution, largest_of(np.divide(a_o, tol, out=scratch)))
        self.count += s.size
        exceeded = s.size - int(np.count_nonzero(err <= tol))
        self.exceeded += exceeded
        if certain is not None and exceeded:  # within tol is within certain
            exceeded = s.size - int(np.count_nonzero(err <= cert))
        self.certain_exceeded += exceeded
        self.largest = max(self.largest, float(a_o.max(initial=0.0)))
        self.max_abs = max(self.max_abs, float(err.max(initial=0.0)))
        detectable = float(np.add(tol, err, out=scratch).max(initial=0.0))
        self.detectable = max(self.detectable, detectable)
        if detectable == np.inf and tol.max() == np.inf:  # the errors are finite
            self.unbounded += int(np.count_nonzero(np.isinf(tol)))
        # The block's best few by rank (:func:`rank`), merged with those kept so far: only
        # entries that can displace a kept one (rank at least the last kept's; rank(r) ≥ g
        # exactly when r ≥ g, for g a rank) are ranked.
        k = min(self.top, ratio.size)
        if k:
            self.max_ratio = max(self.max_ratio, float(ratio.max()))
            if len(self._best) == self.top:
                # (the negated rank of the last kept entry; never NaN: ranks are of ratios)
                candidates = np.flatnonzero(ratio >= -self._best[-1][0])
            else:
                candidates = None
            ranks = rank(ratio if candidates is None else ratio[candidates])
            n = ranks.size
            k = min(k, n)
            if k < n:
                # The k largest ranks; among equal ranks at the cut, the first positions
                # (flatnonzero is in order), so which entries are kept never depends on ties.
                cut = np.partition(ranks, n - k)[n - k]
                above = np.flatnonzero(ranks > cut)
                local = np.concatenate([above, np.flatnonzero(ranks == cut)[: k - above.size]])
            else:
                local = np.arange(k)
            picked = local if candidates is None else candidates[local]
            found = zip(
                (-ranks[local]).tolist(),
                np.asarray(flat(picked)).tolist(),
                s[picked].tolist(),
                o[picked].tolist(),
                tol[picked].tolist(),
            )
            # A few entries: sorted as Python tuples, largest rank first, then by index.
            self._best = sorted([*self._best, *found])[: self.top]
        if self.shape is not None:
            self._map(ratio, flat)

    def _map(self, ratio: np.ndarray, flat: Positions) -> None:
        """Pool a block's error / tolerance into the map and the histogram, a chunk at a time
        (a few temporaries of CHUNK entries, whatever the block's size)."""
        R, C = self.map.shape
        rows_all, cols_all = self.shape or (R, C)  # set whenever there is a map
        whole = (R, C) == (rows_all, cols_all)  # a cell per entry: no pooling to do
        bins = len(RATIO_BINS) - 1
        first = flat.first  # set when the block's entries are contiguous
        rows_only = first is not None and first % cols_all == 0 and ratio.size % cols_all == 0
        if not whole and rows_only and first is not None:  # whole rows: pooled at once
            self._pool_rows(ratio.reshape(-1, cols_all), first // cols_all)
        for start in range(0, ratio.size, CHUNK):
            r = ratio[start : start + CHUNK]
            cells = self.map.reshape(-1)  # a view: the map is contiguous
            if not whole and rows_only:
                pass  # pooled above
            elif whole and first is not None:
                run = cells[first + start : first + start + r.size]
                np.maximum(run, r, out=run)
            elif whole:
                where = flat(np.arange(start, start + r.size))
                cells[where] = np.maximum(cells[where], r)
            else:
                rows, cols = np.divmod(flat(np.arange(start, start + r.size)), cols_all)
                np.maximum.at(self.map, (rows * R // rows_all, cols * C // cols_all), r)
            # Bin i holds [RATIO_BINS[i], RATIO_BINS[i + 1]): r = m·2ᵉ with ½ ≤ m < 1 lies in
            # [2ᵉ⁻¹, 2ᵉ), bin e − RATIO_OCTAVES[0], and e is the stored exponent less 1022:
            # read off the bits. Zero and subnormals (stored exponent 0) clip to the first
            # bin, infinity (2047) to the last.
            # Counted by stored exponent (sign dropped: −0 is 0), then folded into the bins.
            exponent = np.ascontiguousarray(r).view(np.int64) >> 52
            np.bitwise_and(exponent, 0x7FF, out=exponent)
            counts = np.bincount(exponent, minlength=2048)
            low, high = 1022 + RATIO_OCTAVES[0], 1022 + RATIO_OCTAVES[0] + bins - 1
            self.histogram[0] += counts[: low + 1].sum()
            self.histogram[1:-1] += counts[low + 1 : high]
            self.histogram[-1] += counts[high:].sum()

    def _pool_rows(self, ratio: np.ndarray, row: int) -> None:
        """Pool whole rows (``ratio``, rows ``row`` on of the tensor) into the map: the
        largest of each run of rows that shares a cell, then of each run of columns.

        Rows first, each run reduced along its rows (contiguous inner loops; one reduction
        for the block where its runs are equally long), so that the columns' pooling,
        strided, sees one row per cell: ``maximum.reduceat`` along the rows is some ten
        times slower per entry than either."""
        R, C = self.map.shape
        rows_all, cols_all = cast(tuple[int, int], self.shape)
        row_cells = (row + np.arange(ratio.shape[0])) * R // rows_all
        row_starts = np.flatnonzero(np.diff(row_cells, prepend=-1))
        runs = np.diff(row_starts, append=ratio.shape[0])
        if runs.size == ratio.shape[0]:  # a cell per row
            by_rows = ratio
        elif np.all(runs == runs[0]):
            by_rows = ratio.reshape(runs.size, int(runs[0]), cols_all).max(axis=1)
        else:
            by_rows = np.empty((runs.size, cols_all))
            for i, (start, run) in enumerate(zip(row_starts.tolist(), runs.tolist())):
                np.maximum.reduce(ratio[start : start + run], axis=0, out=by_rows[i])
        if cols_all == C:  # a cell per column
            pooled = by_rows
        elif cols_all % C == 0:  # cells of equal width w: the maximum of w strided slices
            w = cols_all // C
            pooled = by_rows[:, ::w].copy()
            for t in range(1, w):
                np.maximum(pooled, by_rows[:, t::w], out=pooled)
        else:
            col_cells = np.arange(cols_all) * C // cols_all
            col_starts = np.flatnonzero(np.diff(col_cells, prepend=-1))
            pooled = np.maximum.reduceat(by_rows, col_starts, axis=1)  # runs × C
        cells = row_cells[row_starts]
        self.map[cells] = np.maximum(self.map[cells], pooled)

    @property
    def conclusive(self) -> bool:
        """Whether the check could catch an error the size of the gradient itself somewhere.

        A zero or sign-flipped gradient is off by at least |v| − tol at each entry (its
        own rounding error is within the tolerance): caught wherever |v| > 2·tol. A halved
        one, off by |v − r|/2, is caught for certain wherever |v| > 3·tol, and in
        practice well before (rounding errors sit far inside the tolerance); the report's
        ``resolution`` (the largest |v|/tol) says how far. A gradient that is zero
        everywhere has no size to resolve: any error beyond its tolerance is caught.
        """
        return not self.resolve or self.largest == 0 or self.resolution > RESOLVE

    @property
    def passed(self) -> bool:
        """Every entry within a finite tolerance, and the check conclusive (a tolerance
        that cannot resolve the gradient's own size certifies nothing)."""
        return self.exceeded == 0 and self.unbounded == 0 and self.conclusive

    @property
    def verdict(self) -> str:
        """ "fail" (some entry beyond its tolerance), "inconclusive" or "pass"."""
        if self.exceeded:
            return "fail"
        return "pass" if self.passed else "inconclusive"

    @property
    def tier(self) -> str | None:
        """Which tier decided a failure: "certain" (beyond the rigorous bound) or "statistical"."""
        if not self.exceeded:
            return None
        return "certain" if self.certain_exceeded else "statistical"

    @property
    def best(self) -> list[tuple[int, float, float, float]]:
        """The kept entries, worst first: (flat index, subject, oracle, tolerance)."""
        return [(int(w), float(s), float(o), float(t)) for _, w, s, o, t in self._best]
