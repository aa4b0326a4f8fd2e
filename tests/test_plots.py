"""PNG plots: the files, their size, and the planted mistake where the picture says it is."""

import sys

import numpy as np
import pytest
from conftest import layer, loop_gradients
from typer.testing import CliRunner

from lincheck import witness, workspace
from lincheck.cli import app

image = pytest.importorskip("matplotlib.image")
plots = pytest.importorskip("lincheck.plots")
runner = CliRunner()
WIDTH, HEIGHT = int(plots.SIZE[0] * plots.DPI), int(plots.SIZE[1] * plots.DPI)


def dump(path, rng, N=32, D_in=24, D_out=24, change=None):
    X, W, B, G = layer(rng, N, D_in, D_out)
    dX, dW, dB = loop_gradients(X, W, G)
    arrays = {"X": X, "W": W, "B": B, "dY": G, "dX": dX, "dW": dW, "dB": dB}
    if change:
        change(arrays)
    path.mkdir()
    for name, a in arrays.items():
        np.save(path / f"{name}.npy", a)
    return path


def heatmap_pixels(png):
    """Luminance of the heatmap's image area, rows top to bottom."""
    rgba = image.imread(png)
    assert rgba.shape == (HEIGHT, WIDTH, 4)
    left, bottom, width, height = plots.HEATMAP_AXES
    x0, x1 = round(left * WIDTH) + 2, round((left + width) * WIDTH) - 2
    y0, y1 = round((1 - bottom - height) * HEIGHT) + 2, round((1 - bottom) * HEIGHT) - 2
    area = rgba[y0:y1, x0:x1, :3]
    return area @ np.array([0.2126, 0.7152, 0.0722])


def test_verify_plots_a_bad_row_where_it_is(tmp_path, rng):
    def bad_row(a):
        a["dX"][13] += 1e-3

    d = dump(tmp_path / "case", rng, change=bad_row)
    out = tmp_path / "plots"
    result = runner.invoke(app, ["verify", str(d), "--plot", str(out)])
    assert result.exit_code == 1, result.output
    expected = {
        f"{t}-{o}-{kind}.png"
        for t in ("dX", "dW", "dB")
        for o in ("reference", "witness")
        for kind in ("heatmap", "histogram")
    }
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out / name) in "".join(result.stdout.split())  # listed (long paths wrap)
    assert result.stdout.rstrip().splitlines()[-1].startswith("FAIL")  # the verdict last
    lum = heatmap_pixels(out / "dX-reference-heatmap.png")
    hot_rows = np.nonzero(lum.max(axis=1) >= lum.max() - 0.05)[0]
    rows = (hot_rows + 0.5) / lum.shape[0] * 32  # image rows → batch rows
    assert int(np.median(rows)) == 13 and np.ptp(rows) < 1.1  # one batch row's band
    hot_cols = lum[hot_rows].min(axis=0)
    assert np.all(hot_cols >= lum.max() - 0.3)  # the whole row is hot


def test_a_transposed_dW_is_dark_on_the_diagonal_only(tmp_path, rng):
    d = dump(tmp_path / "case", rng, change=lambda a: a.update(dW=a["dW"].T.copy()))
    out = tmp_path / "plots"
    assert runner.invoke(app, ["verify", str(d), "--plot", str(out)]).exit_code == 1
    lum = heatmap_pixels(out / "dW-reference-heatmap.png")
    n = 24
    centres = lambda size: ((np.arange(n) + 0.5) * size / n).astype(int)  # noqa: E731
    cells = lum[np.ix_(centres(lum.shape[0]), centres(lum.shape[1]))]
    diagonal = np.eye(n, dtype=bool)
    assert cells[diagonal].max() < 0.1  # exact: black
    assert cells[~diagonal].min() > 0.5  # far over the bound: bright


def test_run_plots_the_step_study(tmp_path):
    out = tmp_path / "plots"
    result = runner.invoke(
        app, ["run", "--n", "8", "--din", "6", "--dout", "4", "--plot", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "step-size.png").exists()
    assert image.imread(out / "step-size.png").shape == (HEIGHT, WIDTH, 4)
    assert {p.name for p in out.iterdir()} == {
        "step-size.png",
        *(f"{t}-witness-{k}.png" for t in ("dX", "dW", "dB") for k in ("heatmap", "histogram")),
    }


def test_step_study_errors_stay_within_their_bounds(rng):
    L = workspace.Workspace(*layer(rng, 16, 12, 8))
    study = witness.step_study(L)
    assert np.all(study["error"] <= study["bound"])
    assert study["default_error"] <= study["default_bound"]
    # Cancellation: tiny steps are far worse than the default ones, which sit on the floor.
    assert study["error"][0] > 1e6 * study["default_error"]
    assert study["default_bound"] <= 2 * study["bound"].min()


def test_plot_files_are_not_replaced_without_force(tmp_path, rng):
    d = dump(tmp_path / "case", rng)
    out = tmp_path / "plots"
    out.mkdir()
    (out / "dX-reference-heatmap.png").write_bytes(b"mine")
    result = runner.invoke(app, ["verify", str(d), "--plot", str(out)])
    assert result.exit_code == 2 and result.stdout == ""  # refused before any work
    assert result.stderr == (
        f"lincheck: error: --plot {out}: already holds plots ({out / 'dX-reference-heatmap.png'}"
        "); nothing was written (use --force to replace them, or another folder)\n"
    )
    assert (out / "dX-reference-heatmap.png").read_bytes() == b"mine"
    assert [p.name for p in out.iterdir()] == ["dX-reference-heatmap.png"]
    forced = runner.invoke(app, ["verify", str(d), "--plot", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "dX-reference-heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_without_matplotlib_plot_says_how_to_install_it(tmp_path, rng, monkeypatch):
    d = dump(tmp_path / "case", rng)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    result = runner.invoke(app, ["verify", str(d), "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 2
    assert result.stderr == (
        "lincheck: error: --plot needs matplotlib, which is not installed: "
        "pip install matplotlib (lincheck's [plot] extra)\n"
    )
    assert not (tmp_path / "plots").exists()


def test_several_cases_plot_the_failed_ones_in_a_folder_each(tmp_path, rng):
    cases = tmp_path / "model"
    cases.mkdir()
    dump(cases / "layer1", rng)
    dump(cases / "layer2", rng, change=lambda a: a["dB"].__imul__(2.0))
    out = tmp_path / "plots"
    result = runner.invoke(app, ["verify", str(cases), "--plot", str(out), "--jobs", "1"])
    assert result.exit_code == 1, result.output
    (folder,) = out.iterdir()
    assert folder.name.endswith("layer2")
    assert (folder / "dB-reference-heatmap.png").exists()
    assert len(list(folder.iterdir())) == 12


def _failed(report, tensor):
    return next(c for c in report.checks if c.tensor == tensor and c.subject == "supplied")


def test_the_histogram_names_every_bar_in_its_legend_and_uses_one_notation(rng):
    import re

    import lincheck

    X, W, B, G = layer(rng, 8, 5, 3)
    report = lincheck.check(X, W, B, G, dB=G.mean(0))
    ax = plots.histogram_figure(_failed(report, "dB")).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "exact, or under 9.1e-13" in labels and "over 1.5e20" in labels  # 2⁻⁴⁰, 2⁶⁷
    assert "the bound (error = tolerance)" in labels and len(labels) == 4
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert all(re.fullmatch(r"[<>]?\d(\.\d)?e-?\d+", t) for t in ticks), ticks
    assert ax.get_title(loc="left").startswith("dB: your gradient vs the float64 reference")


def test_a_failed_bias_is_a_strip_of_bars_titled_with_its_hint(rng):
    import lincheck

    X, W, B, G = layer(rng, 8, 5, 3)
    report = lincheck.check(X, W, B, G, dB=G.mean(0))
    ax = plots.heatmap_figure(_failed(report, "dB"), ("mean_instead_of_sum",)).axes[0]
    assert not ax.images and len(ax.patches) == 3  # a bar per output unit, no image
    assert ax.get_yscale() == "log" and ax.get_xlabel().startswith("output unit")
    assert ax.get_xlim() == (0.0, 3.0)
    ax.figure.canvas.draw()  # ticks are placed when drawn: entries are whole numbers
    assert all(float(t).is_integer() for t in ax.get_xticks() if 0 <= t <= 3)
    assert "hint: mean_instead_of_sum" in ax.get_title(loc="left")
    files = plots.figures(report)  # the same from the report: its hints, in the title
    title = files["dB-reference-heatmap.png"].axes[0].get_title(loc="left")
    assert "mean_instead_of_sum" in title


def test_a_failed_heatmap_circles_the_wrong_entry_and_the_step_study_gives_way(rng):
    """One wrong entry of dX, at [1, 2, 4] with leading dimensions (2, 3): circled at
    batch row 5 (= 1·3 + 2), input feature 4. A failed report's plots are about the
    failure: no step study, which a passing one still gets."""
    import lincheck

    X, W, B, G = layer(rng, None, 6, 4, batch=(2, 3))
    dX = G @ W
    dX[1, 2, 4] += 1.0
    report = lincheck.check(X, W, B, G, dX=dX)
    ax = plots.heatmap_figure(_failed(report, "dX")).axes[0]
    (circles,) = [line for line in ax.get_lines() if line.get_label() == "worst entries"]
    assert list(circles.get_xdata()) == [4.5] and list(circles.get_ydata()) == [5.5]
    study = witness.step_study(workspace.Workspace(*layer(rng, 8, 6, 4)))
    assert "step-size.png" not in plots.figures(report, study)
    passed = lincheck.check(X, W, B, G, dX=G @ W)
    assert "step-size.png" in plots.figures(passed, study)
