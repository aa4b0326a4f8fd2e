"""Terminal heatmaps: the planted mistake shows where it is, at any width, without colour."""

import numpy as np
import pytest
from conftest import layer, loop_gradients
from rich.console import Console

from lincheck import check
from lincheck.report import LEVELS, render

OVER = LEVELS[-1][1]  # the character of an entry over its tolerance


def text_of(renderable, width):
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(renderable)
    console.file.close()
    return console.export_text()


def heatmap(text: str, tensor: str) -> list[tuple[str, str]]:
    """(row label, cells) of the heatmap of ``tensor`` in rendered text."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith(f"{tensor} error / tolerance")
    )
    rows = []
    for line in lines[start + 1 :]:
        if "│" not in line:
            if rows:
                break
            continue  # the title's continuation and the ruler
        label, cells, _ = line.split("│")
        rows.append((label.strip(), cells))
    return rows


def covers(label: str, index: int) -> bool:
    first, _, last = label.partition("-")
    return int(first) <= index <= int(last or first)


@pytest.fixture
def grads(rng):
    def make(N, D_in, D_out):
        X, W, B, G = layer(rng, N, D_in, D_out)
        dX, dW, dB = loop_gradients(X, W, G)
        return (X, W, B, G), {"dX": dX, "dW": dW, "dB": dB}

    return make


@pytest.mark.parametrize("width", [80, 200])
def test_a_bad_row_of_dX_is_one_hot_line(grads, width):
    inputs, good = grads(40, 30, 5)
    good["dX"][13] += 1e-3
    text = text_of(render(check(*inputs, **good)), width)
    assert max(len(line) for line in text.splitlines()) <= width
    rows = heatmap(text, "dX")
    hot = [label for label, cells in rows if OVER in cells]
    assert len(hot) == 1 and covers(hot[0], 13), rows
    assert all(set(cells) == {OVER} for label, cells in rows if label == hot[0])
    assert [c for c in text.splitlines() if c.startswith("dW error")] == []  # dW passed
    assert text.splitlines()[-1].startswith("FAIL")  # the verdict is the last line


def test_a_transposed_dW_is_hot_everywhere_but_the_diagonal(grads):
    inputs, good = grads(20, 12, 12)
    good["dW"] = good["dW"].T.copy()
    rows = heatmap(text_of(render(check(*inputs, **good)), 80), "dW")
    assert [label for label, _ in rows] == [str(i) for i in range(12)]
    for i, (_, cells) in enumerate(rows):
        assert len(cells) == 12
        assert cells[i] != OVER  # dWᵀ[i, i] = dW[i, i]
        assert all(c == OVER for j, c in enumerate(cells) if j != i)


@pytest.mark.parametrize("width", [80, 200])
def test_one_bad_entry_of_a_large_tensor_survives_pooling(grads, width):
    inputs, good = grads(1000, 300, 4)
    good["dX"][731, 205] *= 1.0 + 1e-9
    text = text_of(render(check(*inputs, **good, mode="sample")), width)
    assert max(len(line) for line in text.splitlines()) <= width
    rows = heatmap(text, "dX")
    assert len(rows) <= 32 and all(len(cells) <= width for _, cells in rows)
    hot = [(label, cells.index(OVER), len(cells)) for label, cells in rows if OVER in cells]
    assert len(hot) == 1 and covers(hot[0][0], 731)
    label, at, chars = hot[0]
    per_char = 300 / chars
    assert int(at * per_char) <= 205 < int((at + 1) * per_char) + 1
    assert "a line covers about" in text and "(the largest shown)" in text


def test_heatmaps_of_passing_checks_only_on_request(grads):
    inputs, good = grads(6, 5, 3)
    report = check(*inputs, **good)
    assert " error / tolerance (" not in text_of(render(report), 80)
    shown = text_of(render(report, heatmap="all"), 80)
    assert [len(heatmap(shown, t)) for t in ("dX", "dW", "dB")] == [6, 3, 1]
    assert OVER not in "".join(c for t in ("dX", "dW", "dB") for _, c in heatmap(shown, t))
    legend = [line for line in shown.splitlines() if "exact" in line and "over tol" in line]
    assert len(legend) == 1
    assert " error / tolerance (" not in text_of(
        render(check(*inputs, dW=good["dW"] * 2), heatmap="none"), 80
    )


def test_directions_have_no_map(grads):
    inputs, good = grads(6, 5, 3)
    report = check(*inputs, mode="directions")
    assert all(c.error_map is None for c in report.checks if c.mode == "directions")
    shown = text_of(render(report, heatmap="all"), 80)
    titles = [line.split()[0] for line in shown.splitlines() if " error / tolerance (" in line]
    assert titles == ["dB"]  # dB's witness is whole in every mode


def test_error_map_pools_the_largest_ratio(rng):
    from lincheck.tally import MAP_CELLS, RATIO_BINS, Positions, Tally

    tally = Tally(shape=(1000, 7))
    ratio = rng.uniform(0, 1, size=(1000, 7))
    ratio[617, 3] = 50.0
    tally.add(ratio, np.zeros_like(ratio), np.ones_like(ratio), 1.0, Positions())
    R = tally.map.shape[0]
    assert tally.map.shape == (min(1000, MAP_CELLS[0]), 7)
    assert tally.map[617 * R // 1000, 3] == 50.0
    cells = np.arange(1000) * R // 1000
    want = np.array([ratio[cells == c].max(axis=0) for c in range(R)])
    want[617 * R // 1000, 3] = 50.0
    assert np.array_equal(tally.map, want)
    assert tally.histogram.sum() == 7000
    assert np.array_equal(tally.histogram, np.histogram(ratio, RATIO_BINS)[0])


def _feed(tally, blocks, cuts, subject, oracle, tol, last_first=False):
    """Feed a tally whole rows at a time (``cuts``: the blocks' row boundaries) or columns
    at a time (``cuts`` groups of columns; ``last_first``: the last group first)."""
    from lincheck.tally import Positions

    shape = subject.shape
    if blocks == "rows":
        for start, stop in zip(cuts, cuts[1:]):
            rows = slice(start, stop)
            where = Positions.of_block(shape, None, rows)
            tally.add(subject[rows], oracle[rows], tol[rows], 1.0, where)
        return
    groups = np.array_split(np.arange(shape[1]), cuts)
    for cols in groups[::-1] if last_first else groups:
        where = Positions.of_block(shape, cols)
        tally.add(subject[:, cols], oracle[:, cols], tol[:, cols], 1.0, where)


@pytest.mark.parametrize("blocks", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(1000, 700), (1000, 512), (1024, 512)])
def test_error_map_pools_cells_of_many_rows_and_columns(rng, blocks, shape):
    """A map smaller than the tensor both ways, filled by blocks of whole rows (pooled in two
    reductions) or of columns (entry by entry): each cell is the largest ratio of its entries;
    the histogram counts every entry in its octave, zeros, subnormals and infinities too.
    1000 rows make cells of 7 or 8 rows; 1024, of 8, which the blocks of rows cut whole
    (16 to 40, 40 to the end), in part (0 to 3) and across (3 to 16: 5 rows, then 8)."""
    from lincheck.tally import MAP_CELLS, RATIO_BINS, Tally

    ratio = rng.exponential(size=shape) * 2.0 ** rng.integers(-60, 80, size=shape)
    ratio.flat[:6] = [0.0, 5e-324, 2.0**-40, 2.0**67, 1e300, np.inf]
    tally = Tally(shape=shape)
    cuts = (
        ([0, 3, 300, 301, 1000] if shape[0] == 1000 else [0, 3, 16, 40, 1024])
        if blocks == "rows"
        else 3
    )
    _feed(tally, blocks, cuts, ratio, np.zeros(shape), np.ones(shape))
    R, C = MAP_CELLS
    want = np.zeros((R, C))  # the cells by their definition, entry by entry
    cells = (np.arange(shape[0])[:, None] * R // shape[0], np.arange(shape[1]) * C // shape[1])
    np.maximum.at(want, np.broadcast_arrays(*cells), ratio)
    assert np.array_equal(tally.map, want)
    assert np.array_equal(tally.histogram, np.histogram(ratio, RATIO_BINS)[0])


@pytest.mark.parametrize("blocks", ["rows", "columns"])
def test_worst_entries_across_blocks_are_the_top_ranks_ties_to_the_lowest_index(rng, blocks):
    """The kept entries of a tensor fed in blocks are its `top` entries by rank (error /
    tolerance cut to RANK_BITS), ties to the lowest index, whichever block they came in: a
    brute-force sort of every entry is the oracle. Ratios take a few values (many ties),
    and later blocks hold entries that tie with, beat and lose to those kept so far."""
    from lincheck.tally import Tally, rank

    shape = (300, 40)
    ratio = rng.choice(
        [0.5, 1.5, 3.0, 3.0 * (1 + 2.0**-30), 7.0], size=shape, p=[0.6, 0.3, 0.07, 0.02, 0.01]
    )
    ratio[250:, :] = rng.choice([0.5, 7.0], size=(50, 40))  # a late block full of the largest
    tol = rng.uniform(0.5, 2.0, size=shape)
    err = ratio * tol
    tally = Tally(top=5, shape=shape)
    cuts = [0, 7, 120, 250, 300] if blocks == "rows" else 4
    _feed(tally, blocks, cuts, err, np.zeros(shape), tol, last_first=True)
    ranks = rank((err / tol).ravel())
    want = sorted(range(ranks.size), key=lambda i: (-ranks[i], i))[:5]
    assert [b[0] for b in tally.best] == want
    assert tally.max_ratio == (err / tol).max()


def test_quadrature_is_hypot_and_skips_it_only_where_it_rounds_to_the_larger():
    from lincheck.plan import quadrature

    a = np.array([1.0, 3.0, 0.0, 1e-300, 1e300])
    small = a * 2.0**-27
    assert quadrature(a, small) is a  # every b ≤ 2⁻²⁷ a: hypot rounds to a
    assert np.array_equal(np.hypot(a, small), a)
    b = small.copy()
    b[1] = 4.0  # one entry where b matters: hypot everywhere
    got = quadrature(a, b)
    assert got[1] == 5.0 and np.array_equal(got, np.hypot(a, b))
    near = np.array([1.0, 1.0]), np.array([2.0**-20, 0.0])  # (b/a)² = 2⁻⁴⁰ shows
    assert quadrature(*near)[0] == np.hypot(1.0, 2.0**-20) > 1.0
