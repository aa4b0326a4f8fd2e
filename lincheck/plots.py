"""PNG plots of a report: error heatmaps, histograms of error / tolerance, the witness step.

Needs matplotlib, an optional extra (``pip install 'lincheck[plot]'``); only
the CLI's ``--plot`` and callers who ask import this module. Figures are
drawn with matplotlib's object API (no pyplot, no window, no global state)
and returned as PNG bytes: writing them is :mod:`lincheck.arrays`' job.

File names are predictable: ``<tensor>-<oracle>-heatmap.png`` and
``<tensor>-<oracle>-histogram.png`` per compared tensor (``dW-reference-…``
for your gradients against the float64 reference, ``dW-witness-…`` for the
reference against the numerical witness), and ``step-size.png`` for
``lincheck run``.
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

INSTALL = "pip install 'lincheck[plot]'"


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


def _plot_title(check: TensorCheck) -> str:
    subject = {"supplied": "your", "analytic": "analytic", "reference": "float64 reference"}
    verdict = "PASS" if check.passed else "FAIL"
    return (
        f"{check.tensor}: {subject.get(check.subject, check.subject)} vs {check.oracle} "
        f"({check.precision}) — {verdict}, max error / tolerance {check.bound_ratio:.2g}"
    )


def heatmap_png(check: TensorCheck) -> bytes:
    """Error / tolerance of every entry, pooled by maximum into at most tally.MAP_CELLS
    cells, on a log colour scale from 1e-4 to at least 10, the same for every plot: the
    bound (1) sits at the same colour, and the largest error is the brightest cell."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    grid = check.require_map()
    rows, cols = check.shape2d
    fig = _figure()
    ax = fig.add_axes(HEATMAP_AXES)
    norm = LogNorm(vmin=1e-4, vmax=max(float(grid.max()), 10.0))
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
    fig.text(0.85, 0.03, "black: under 1e-4, or exact", fontsize=8, ha="center")
    names = AXES[check.tensor]
    ax.set_xlabel(names[1])
    ax.set_ylabel(names[0])
    ax.set_title(_plot_title(check), fontsize=10, loc="left")
    return _png(fig)


def histogram_png(check: TensorCheck) -> bytes:
    """How many entries have each error / tolerance, an octave (a factor of 2) per bar,
    the bound at 1.

    The x axis is log₂(error / tolerance), labelled in powers of ten; the first bar
    (left of the axis' range) holds exact entries and those under its lowest octave,
    the last everything over its highest.
    """
    counts = check.histogram
    if counts is None:
        raise ValueError(f"{check.tensor}: no histogram (not compared entry by entry)")
    lo, hi = RATIO_OCTAVES
    fig = _figure()
    ax = fig.add_axes((0.1, 0.14, 0.85, 0.74))
    ax.bar(np.arange(lo, hi), counts[1:-1], width=1.0, align="edge", color="#4c72b0")
    ax.bar([lo - 4], counts[:1], width=3.0, align="edge", color="#8c8c8c")
    ax.bar([hi + 1], counts[-1:], width=3.0, align="edge", color="#c44e52")
    ax.axvline(0.0, color="#c44e52", linewidth=2, label="the bound (error = tolerance)")
    decades = range(-8, 20, 4)
    ax.set_xticks(
        [lo - 2.5, *(k * np.log2(10) for k in decades), hi + 2.5],
        [f"<2^{lo}", *(f"1e{k}" for k in decades), f">2^{hi}"],
        fontsize=8,
    )
    ax.set_xlim(lo - 5, hi + 5)
    ax.set_xlabel("error / tolerance (log scale, a bar per factor of 2)")
    ax.set_ylabel("entries")
    ax.set_title(_plot_title(check), fontsize=10, loc="left")
    ax.legend(loc="upper right", fontsize=9)
    return _png(fig)


def step_png(study: dict[str, Any]) -> bytes:
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
    return _png(fig)


def plot_report(report: Report, study: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Every plot of a report, by file name (see the module docstring)."""
    files = {}
    for check in report.checks:
        if check.error_map is None:
            continue  # directions, or nothing comparable
        stem = f"{check.tensor}-{check.oracle}"
        files[f"{stem}-heatmap.png"] = heatmap_png(check)
        files[f"{stem}-histogram.png"] = histogram_png(check)
    if study is not None:
        files["step-size.png"] = step_png(study)
    return files
