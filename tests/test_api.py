"""The Python API's failures read well: a sweep's cases a layer does not take, a sweep in a
failed assertion, and assert_gradients' bounded message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lincheck

TEXTBOOK = """


def textbook(X, W, B, dY):  # 2-D only: dY.T @ X fails on leading batch dimensions
    return dY @ W, dY.T @ X, None if B is None else dY.sum(0)


def textbook_mean(X, W, B, dY):  # 2-D only, and dB averaged over the batch
    return dY @ W, dY.T @ X, None if B is None else dY.mean(0)
"""

SIZES = dict(N=6, D_in=4, D_out=3, dtypes=["float64"])


def _module(tmp_path):
    (tmp_path / "textbook_layers.py").write_text(TEXTBOOK)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        return importlib.import_module("textbook_layers")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("textbook_layers", None)


def test_a_2d_only_backward_is_unsupported_on_the_batched_case_not_wrong(tmp_path):
    """The textbook backward raises on X of shape (2, 3, D_in) and is right on every 2-D
    case: the batched case is UNSUPPORTED (never a pass), with how to leave it out."""
    layers = _module(tmp_path)
    sweep = lincheck.check_backward(layers.textbook, **SIZES)
    assert not sweep.passed
    status = {r.case.kind: r.status for r in sweep.results}
    assert status.pop("batched") == "UNSUPPORTED"
    assert set(status.values()) == {"PASS"}
    (batched,) = sweep.failed
    assert batched.unsupported and "leading batch dimensions" in batched.error
    assert "--cases=-batched" in batched.error and "ValueError" in batched.error
    table = str(sweep)  # the table of cases, the details, the verdict line last
    assert "UNSUPPORTED" in table and table.rstrip().endswith("--cases=-batched leaves them out")
    counts = sweep.as_dict()["counts"]
    assert (counts["failed"], counts["unsupported"]) == (0, 1)
    assert lincheck.check_backward(layers.textbook, cases="-batched", **SIZES).passed


def test_a_backward_wrong_in_2d_too_is_an_error_on_the_batched_case(tmp_path):
    layers = _module(tmp_path)
    sweep = lincheck.check_backward(layers.textbook_mean, **SIZES)
    batched = next(r for r in sweep.results if r.case.kind == "batched")
    assert batched.status == "ERROR" and not batched.unsupported
    assert sweep.as_dict()["counts"]["unsupported"] == 0


def _cli(cwd, *args):
    exe = str(Path(sys.executable).with_name("lincheck"))
    env = {**os.environ, "COLUMNS": "200", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def test_run_impl_names_the_unsupported_case_exit_1_and_how_to_leave_it_out(tmp_path):
    (tmp_path / "textbook_layers.py").write_text(TEXTBOOK)
    sizes = ("--n", "6", "--din", "4", "--dout", "3", "--dtype", "float64")
    done = _cli(tmp_path, "run", "--impl", "textbook_layers:textbook", *sizes, "--json", "r.json")
    assert done.returncode == 1, done.stdout + done.stderr
    verdict = done.stdout.rstrip().splitlines()[-1]
    assert verdict.startswith("FAIL") and "no gradient wrong" in verdict
    assert "1 of 7 cases not supported" in verdict and "--cases=-batched" in verdict
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["kind"] for c in report["cases"] if c["unsupported"]] == ["batched"]
    again = _cli(tmp_path, "run", "--impl", "textbook_layers:textbook", *sizes, "--cases=-batched")
    assert again.returncode == 0, again.stdout


def test_a_failed_sweep_reads_well_in_pytest(tmp_path):
    """`assert check_backward(fn).passed` and `assert_backward(fn)` in a user's test: pytest
    shows the case that failed and its hint, not a dataclass dump."""
    (tmp_path / "textbook_layers.py").write_text(TEXTBOOK)
    (tmp_path / "test_user.py").write_text(
        "import lincheck\n"
        "from textbook_layers import textbook_mean\n\n"
        "def test_passed():\n"
        "    assert lincheck.check_backward(textbook_mean, N=6, D_in=4, D_out=3,\n"
        "                                   dtypes=['float64'], cases='main').passed\n\n"
        "def test_assert_backward():\n"
        "    lincheck.assert_backward(textbook_mean, N=6, D_in=4, D_out=3,\n"
        "                             dtypes=['float64'], cases='main')\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 1 and "2 failed" in out, out
    assert "CaseResult(" not in out and "results=(" not in out
    assert "def assert_backward" not in out  # lincheck's own frame is hidden
    where = next(line for line in out.splitlines() if "where False = Sweep(FAIL" in line)
    assert "dB (mean_instead_of_sum)" in where and "..." not in where  # not truncated
    raised = next(line for line in out.splitlines() if "AssertionError: FAIL" in line)
    assert "float64 N=6 D_in=4 D_out=3" in raised  # the verdict line, naming the case
    assert "hint [mean_instead_of_sum] dB = dY.mean(0)" in out


def test_assert_gradients_message_is_bounded_and_the_whole_report_on_request(rng):
    """A dB averaged over the batch of a (32, 64, 16) layer: the first line names it, the
    hint and worst entries follow, in a screenful (it was 46 lines: every table, the
    witness's too, and a heatmap); full=True gives everything."""
    X, W, B, G = (rng.standard_normal(s) for s in ((32, 64), (16, 64), (16,), (32, 16)))
    grads = dict(dX=G @ W, dW=G.T @ X, dB=G.mean(0))
    try:
        lincheck.assert_gradients(X, W, B, G, **grads)
    except AssertionError as caught:
        lines = str(caught).splitlines()
    else:
        raise AssertionError("a dB averaged over the batch passed")
    assert lines[0] == "lincheck: 1 of 6 checks failed: dB (supplied)"
    assert any(line.startswith("hint [mean_instead_of_sum]") for line in lines[:6])
    assert sum(line.lstrip().startswith("dB      [") for line in lines) == 3  # worst entries
    assert not any("witness" in line or "dX" in line for line in lines)  # passing checks
    assert len(lines) <= 25
    try:
        lincheck.assert_gradients(X, W, B, G, full=True, **grads)
    except AssertionError as caught:
        full = str(caught)
    assert full.splitlines()[0] == lines[0] and "numerical witness" in full
    assert len(full.splitlines()) > len(lines)
    assert lincheck.assert_gradients(X, W, B, G, dX=G @ W, dW=G.T @ X, dB=G.sum(0)).passed
