"""PNG plots of a report: error heatmaps, histograms of error / tolerance, the witness step.

Needs matplotlib, an optional extra (``pip install matplotlib``, lincheck's [plot]); only
the CLI's ``--plot`` and callers who ask import this module. Figures are
drawn with matplotlib's object API (no pyplot, no window, no global state)
and returned as PNG bytes: writing them is :mod:`lincheck.arrays`' job.

File names are predictable: ``<tensor>-<oracle>-heatmap.png`` and
``<tensor>-<oracle>-histogram.png`` per compared tensor (``dW-reference-…``
for your gradients against the float64 reference, ``dW-witness-…`` for the
reference against the numerical witness), and ``step-size.png`` for a
``lincheck run`` whose checks all pass. A failed check's pictures are about
its failure: the hints named in the title, the worst entries circled. A 1-D
tensor (dB) is a strip of bars, one per entry, not a heatmap.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .errors import LincheckError
from .results import Report, TensorCheck
from .tally import RATIO_OCTAVES
from .tensors import AXES

PLOT_NAMES = r"((dX|dW|dB|Y)-(reference|witness)-(heatmap|histogram)|step-size)\.png"
"""The names of the files ``--plot`` writes (a regular expression)."""

SIZE = (8.0, 5.0)
DPI = 100
"""Every plot is SIZE inches at DPI: 800 × 500 pixels."""

HEATMAP_AXES = (0.09, 0.12, 0.72, 0.76)
"""Where a heatmap's image sits in its figure: (left, bottom, width, height), fractions."""

INSTALL = "pip install matplotlib (lincheck's [plot] extra)"


def require_matplotlib() -> None:
    """Raise LincheckError, saying how to install it, if matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LincheckError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from None


def _figure():
    from matplotlib.figure import Figure

    return Figure(figsize=SIZE, dpi=DPI)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


_SUBJECT = {"supplied": "your gradient", "reference": "the float64 reference"}
_ORACLE = {"reference": "the float64 reference", "witness": "the numerical witness"}


def _plot_title(check: TensorCheck, hints: tuple[str, ...] = ()) -> str:
    """What is compared with what, the verdict, and for a failure the hints' codes."""
    subject = _SUBJECT.get(check.subject, f"the {check.subject} gradient")
    oracle = _ORACLE.get(check.oracle, check.oracle)
    verdict = "PASS" if check.passed else "FAIL"
    title = (
        f"{check.tensor}: {subject} vs {oracle} ({check.precision}): {verdict}, "
        f"largest error / tolerance {_ratio(check.bound_ratio)}"
    )
    if hints:
        title += f"\nhint: {', '.join(hints)} (the report says why)"
    return title


def _ratio(x: float | None) -> str:
    """A ratio in the plots' one notation (2.9e14, 0.17)."""
    if x is None or not np.isfinite(x):
        return "—" if x is None else str(x)
    text = f"{x:.2g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _hints(report: Report | None, check: TensorCheck) -> tuple[str, ...]:
    """The codes of the hints about a failed subject's tensor (hints are about subjects;
    a reference checked against the witness has none)."""
    if report is None or check.passed or check.subject == "reference":
        return ()
    return tuple(h.code for h in report.hints if h.tensor == check.tensor)


def _worst_cells(check: TensorCheck) -> list[tuple[float, float]]:
    """The failed check's worst entries as (column, row) centres in the 2-D view the map
    covers (leading dimensions flattened, as the map's rows)."""
    shape = tuple(check.expected_shape)
    out = []
    for e in check.worst_entries:
        if e.abs_error <= e.tolerance or len(e.index) != len(shape):
            continue  # only entries over their tolerance are marked
        lead = e.index[:-1]
        row = int(np.ravel_multi_index(lead, shape[:-1])) if lead else 0
        out.append((e.index[-1] + 0.5, row + 0.5))
    return out


CIRCLE = "#7fffff"
"""The colour of the circles around the worst entries: light cyan, distinct from the
colour map's black-red-yellow and bright on its hottest cells."""

FLOOR = 1e-4
"""The smallest error / tolerance a plot shows (the colour scale's, the strips' floor):
a ten-thousandth of the tolerance is as good as exact for every verdict."""


def heatmap_figure(check: TensorCheck, hints: tuple[str, ...] = ()):
    """Error / tolerance of every entry, pooled by maximum into at most tally.MAP_CELLS
    cells, on a log colour scale from FLOOR to at least 10, the same for every plot: the
    bound (1) sits at the same colour, and the largest error is the brightest cell. The
    worst entries over their tolerance are circled. A 1-D tensor (dB) is a strip of bars
    instead (:func:`strip_figure`)."""
    if len(check.expected_shape) == 1:
        return strip_figure(check, hints)
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    grid = check.require_map()
    rows, cols = check.shape2d
    fig = _figure()
    ax = fig.add_axes(HEATMAP_AXES)
    norm = LogNorm(vmin=FLOOR, vmax=max(float(grid.max()), 10.0))
    cmap = colormaps["inferno"].with_extremes(under="black", bad="black")
    image = ax.imshow(
        np.where(grid > 0, grid, np.nan),
        cmap=cmap,
        norm=norm,
        aspect="auto",
        interpolation="nearest",
        extent=(0, cols, rows, 0),
    )
    bar = fig.colorbar(image, cax=fig.add_axes((0.85, 0.12, 0.03, 0.76)), extend="min")
    bar.set_label("error / tolerance (the white line: the bound)")
    bar.ax.axhline(1.0, color="white", linewidth=2)
    fig.text(0.85, 0.03, f"black: under {FLOOR:.0e}, or exact", fontsize=8, ha="center")
    worst = _worst_cells(check)
    if worst:
        x, y = zip(*worst)
        # Circles bright enough to read on the hottest cells, and a legend outside the
        # image: neither may hide an entry.
        ax.plot(x, y, "o", ms=12, mfc="none", mec=CIRCLE, mew=2, label="worst entries")
        fig.legend(loc="lower left", bbox_to_anchor=(0.005, 0.005), fontsize=8)
    names = AXES[check.tensor]
    ax.set_xlabel(names[1])
    ax.set_ylabel(names[0])
    ax.set_title(_plot_title(check, hints), fontsize=10, loc="left")
    return fig


def strip_figure(check: TensorCheck, hints: tuple[str, ...] = ()):
    """A 1-D tensor's error / tolerance as one bar per entry (pooled by maximum, like the
    heatmap, when there are more entries than map cells), on a log scale from FLOOR, the
    tolerance a line at 1: bars over it are red, and the worst entries are circled."""
    grid = check.require_map().reshape(-1)
    (n,) = check.expected_shape
    width = n / grid.size
    left = np.arange(grid.size) * width
    heights = np.maximum(grid, FLOOR)
    over = grid > 1.0
    fig = _figure()
    ax = fig.add_axes((0.1, 0.14, 0.62, 0.72))
    for mask, colour, label in (
        (~over, "#4c72b0", "within the tolerance"),
        (over, "#c44e52", "over the tolerance"),
    ):
        if mask.any():
            ax.bar(left[mask], heights[mask], width=width, align="edge", color=colour, label=label)
    ax.axhline(1.0, color="black", linewidth=1.5, label="the tolerance\n(error / tolerance = 1)")
    worst = _worst_cells(check)
    if worst:
        x = [c for c, _ in worst]
        y = [max(float(grid[int(c // width)]), FLOOR) for c in x]
        ax.plot(x, y, "o", ms=12, mfc="none", mec=CIRCLE, mew=2, label="worst entries")
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 2, max(float(heights.max()), 10.0) * 20)  # room for the circles
    ax.set_xlim(0, n)
    ax.xaxis.get_major_locator().set_params(integer=True)  # entries: no 0.5 ticks
    ax.set_xlabel(f"{AXES[check.tensor][1]} (entry of {check.tensor})")
    ax.set_ylabel(f"error / tolerance (floor {FLOOR:.0e})")
    ax.set_title(_plot_title(check, hints), fontsize=10, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return fig


def heatmap_png(check: TensorCheck, hints: tuple[str, ...] = ()) -> bytes:
    """:func:`heatmap_figure` as PNG bytes."""
    return _png(heatmap_figure(check, hints))


def _sci(x: float) -> str:
    """A power of ten or two in the histogram's one notation: 1e-8, 9.1e-13."""
    mantissa, exponent = f"{x:.1e}".split("e")
    mantissa = mantissa.removesuffix(".0")
    return f"{mantissa}e{int(exponent)}"


def histogram_figure(check: TensorCheck, hints: tuple[str, ...] = ()):
    """How many entries have each error / tolerance, an octave (a factor of 2) per bar,
    the bound at 1.

    The x axis is log₂(error / tolerance), labelled in powers of ten, one notation
    throughout; the first bar (left of the axis' range, grey) holds exact entries and
    those under its lowest octave, the last (red) everything over its highest, each
    with its legend entry.
    """
    counts = check.histogram
    if counts is None:
        raise ValueError(f"{check.tensor}: no histogram (not compared entry by entry)")
    lo, hi = RATIO_OCTAVES
    fig = _figure()
    ax = fig.add_axes((0.1, 0.14, 0.85, 0.72))
    ax.bar(
        np.arange(lo, hi),
        counts[1:-1],
        width=1.0,
        align="edge",
        color="#4c72b0",
        label="entries, per factor of 2",
    )
    ax.bar(
        [lo - 4],
        counts[:1],
        width=3.0,
        align="edge",
        color="#8c8c8c",
        label=f"exact, or under {_sci(2.0**lo)}",
    )
    over = f"over {_sci(2.0**hi)}"
    ax.bar([hi + 1], counts[-1:], width=3.0, align="edge", color="#c44e52", label=over)
    ax.axvline(0.0, color="#c44e52", linewidth=2, label="the bound (error = tolerance)")
    decades = range(-8, 20, 4)
    ax.set_xticks(
        [lo - 2.5, *(k * np.log2(10) for k in decades), hi + 2.5],
        [f"<{_sci(2.0**lo)}", *(_sci(10.0**k) for k in decades), f">{_sci(2.0**hi)}"],
        fontsize=8,
    )
    ax.set_xlim(lo - 5, hi + 5)
    ax.set_xlabel("error / tolerance (log scale, a bar per factor of 2)")
    ax.set_ylabel("entries")
    ax.set_title(_plot_title(check, hints), fontsize=10, loc="left")
    ax.legend(loc="upper right", fontsize=9)
    return fig


def histogram_png(check: TensorCheck, hints: tuple[str, ...] = ()) -> bytes:
    """:func:`histogram_figure` as PNG bytes."""
    return _png(histogram_figure(check, hints))


def step_figure(study: dict[str, Any]):
    """Witness error and its bound against the step h (:func:`lincheck.witness.step_study`)."""
    fig = _figure()
    ax = fig.add_axes((0.1, 0.12, 0.85, 0.76))
    error = np.maximum(study["error"], 1e-300)
    ax.loglog(study["h"], error, "o-", label="largest |witness − reference|")
    ax.loglog(study["h"], study["bound"], "s--", label="largest rigorous bound")
    h = float(study["default_h"])
    ax.axvline(h, color="#c44e52", label=f"lincheck's steps (median h = {h:.2g})")
    ax.plot([h], [max(float(study["default_error"]), 1e-300)], "*", color="#c44e52", ms=14)
    ax.set_xlabel("step h")
    ax.set_ylabel("error in dW (first columns)")
    ax.set_title(
        "L is linear in each entry: no truncation error; rounding falls as h grows, then levels",
        fontsize=10,
        loc="left",
    )
    ax.legend(loc="upper right", fontsize=9)
    return fig


def step_png(study: dict[str, Any]) -> bytes:
    """:func:`step_figure` as PNG bytes."""
    return _png(step_figure(study))


def figures(report: Report, study: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of a report, by file name (see the module docstring). A failed check's
    pictures name its hints and circle its worst entries; the step study, which is about
    lincheck's witness rather than the case, is drawn only when every check passed."""
    out = {}
    for check in report.checks:
        if check.error_map is None:
            continue  # directions, or nothing comparable
        stem = f"{check.tensor}-{check.oracle}"
        hints = _hints(report, check)
        out[f"{stem}-heatmap.png"] = heatmap_figure(check, hints)
        out[f"{stem}-histogram.png"] = histogram_figure(check, hints)
    if study is not None and report.passed:
        out["step-size.png"] = step_figure(study)
    return out


def plot_report(report: Report, study: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Every plot of a report as PNG bytes, by file name (:func:`figures`)."""
    return {name: _png(fig) for name, fig in figures(report, study).items()}
