"""W stored as (D_in, D_out) (--layout in_out) and choosing a sweep's cases (--cases)."""

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from lincheck import api, check
from lincheck.cli import app

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
SIZES = ["--n", "6", "--din", "4", "--dout", "3", "--dtype", "float64"]


def flax_dump(d: Path, rng, N=6, D_in=4, D_out=3, **changes) -> Path:
    """A layer as Flax stores it: kernel (D_in, D_out), y = x @ kernel + bias, dW = Xᵀ dY."""
    X, W = rng.standard_normal((N, D_in)), rng.standard_normal((D_in, D_out))
    B, G = rng.standard_normal(D_out), rng.standard_normal((N, D_out))
    arrays = {"X": X, "W": W, "B": B, "dY": G, "dX": G @ W.T, "dW": X.T @ G, "dB": G.sum(0)}
    d.mkdir()
    for name, a in {**arrays, **changes}.items():
        np.save(d / f"{name}.npy", a)
    return d


def verify(*args):
    return runner.invoke(app, ["verify", *map(str, args)])


# ---------------------------------------------------------------------------
# verify, check


def test_a_flax_kernel_dump_passes_with_in_out(tmp_path, rng):
    d = flax_dump(tmp_path / "dump", rng)
    result = verify(d, "--layout", "in_out", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "in_out"
    dW = next(c for c in report["checks"] if c["tensor"] == "dW" and c["subject"] == "supplied")
    assert dW["shape"] == [4, 3] and dW["expected_shape"] == [4, 3]


def test_a_flax_kernel_dump_without_in_out_is_bad_input_that_names_the_option(tmp_path, rng):
    d = flax_dump(tmp_path / "dump", rng)
    result = verify(d)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"lincheck: error: W ({d}/W.npy): shape (4, 3) does not fit X (6, 4): expected "
        "(D_out, 4); it fits as (D_in, D_out) = (4, 3): was W saved transposed? If your "
        "layer stores it so (Y = X W + B), pass --layout in_out\n"
    )


def test_the_python_api_advises_the_keyword(rng):
    X, W, G = rng.standard_normal((6, 4)), rng.standard_normal((3, 4)), rng.standard_normal((6, 3))
    with pytest.raises(ValueError, match=r'pass layout="out_in"$'):
        check(X, W, None, G, layout="in_out")
    with pytest.raises(ValueError, match=r'pass layout="in_out"$'):
        check(X, W.T, None, G)
    with pytest.raises(ValueError, match="layout must be one of"):
        check(X, W, None, G, layout="io")


def test_worst_index_and_entries_index_the_dw_as_supplied(rng):
    """Oracle: an error planted at (j, i) of a (D_in, D_out) dW is reported at [j, i]."""
    X, W = rng.standard_normal((6, 5)), rng.standard_normal((5, 3))
    G = rng.standard_normal((6, 3))
    dW = X.T @ G
    j, i = 4, 1
    dW[j, i] += 1.0
    report = check(X, W, None, G, dW=dW, layout="in_out")
    (c,) = [c for c in report.checks if c.subject == "supplied"]
    assert not c.passed
    assert c.worst_index == (j, i)
    assert c.worst_entries[0].index == (j, i)
    assert c.worst_entries[0].subject == dW[j, i]
    assert c.shape == (5, 3) and c.expected_shape == (5, 3)
    assert c.require_map().shape == (5, 3)  # the heatmap is in the user's layout too
    (hint,) = report.hints
    assert hint.code == "localized" and hint.evidence["entries"] == [[j, i]]
    assert report.as_dict()["layout"] == "in_out"
    # The same values in torch's layout put the error at [i, j].
    torch_like = check(X, W.T, None, G, dW=dW.T)
    assert next(c for c in torch_like.checks if c.subject == "supplied").worst_index == (i, j)


def test_a_square_w_in_the_wrong_layout_gets_the_layout_hint(tmp_path, rng):
    d = flax_dump(tmp_path / "dump", rng, D_in=4, D_out=4)
    result = verify(d, "--json", "-")
    assert result.exit_code == 1, result.output
    hints = json.loads(result.stdout)["hints"]
    assert {(h["tensor"], h["code"]) for h in hints} == {("dX", "layout"), ("dW", "layout")}
    assert all(h["message"].endswith("Check with --layout in_out.") for h in hints)
    assert "transposed" not in {h["code"] for h in hints}
    assert verify(d, "--layout", "in_out").exit_code == 0


def test_torch_data_read_as_in_out_gets_the_converse_hint(rng):
    X, W, G = rng.standard_normal((6, 4)), rng.standard_normal((4, 4)), rng.standard_normal((6, 4))
    B = rng.standard_normal(4)
    report = check(X, W, B, G, dX=G @ W, dW=G.T @ X, Y=X @ W.T + B, layout="in_out")
    codes = {(h.tensor, h.code) for h in report.hints}
    assert codes == {("dX", "layout"), ("dW", "layout"), ("Y", "layout")}
    assert all(h.message.endswith('Check with layout="out_in".') for h in report.hints)


def test_dw_transposed_within_a_consistent_layout_is_the_transposed_bug(rng):
    """dX right in in_out: the layout is right, and a transposed dW is a bug."""
    X, W, G = rng.standard_normal((6, 4)), rng.standard_normal((4, 4)), rng.standard_normal((6, 4))
    report = check(X, W, None, G, dX=G @ W.T, dW=G.T @ X, layout="in_out")
    (hint,) = report.hints
    assert (hint.tensor, hint.code) == ("dW", "transposed")
    assert "dW = Xᵀ dY has W's shape (D_in, D_out)" in hint.message
    assert "layout" not in hint.evidence
    # Non-square: the wrong shape, named as supplied.
    W = rng.standard_normal((4, 3))
    G = rng.standard_normal((6, 3))
    report = check(X, W, None, G, dW=G.T @ X, layout="in_out")
    (c,) = [c for c in report.checks if c.subject == "supplied"]
    assert c.message == "wrong shape: expected (4, 3), got (3, 4)"
    (hint,) = report.hints
    assert hint.code == "transposed" and hint.evidence["shape"] == [3, 4]


def test_dw_alone_cannot_tell_the_layouts_apart_and_the_hint_says_so(rng):
    X, W, G = rng.standard_normal((6, 4)), rng.standard_normal((4, 4)), rng.standard_normal((6, 4))
    (hint,) = check(X, W, None, G, dW=X.T @ G).hints
    assert hint.code == "transposed" and hint.evidence["layout"] == "in_out"


def test_a_file_backed_dw_is_transposed_without_being_read_whole(tmp_path, rng, monkeypatch):
    from lincheck import arrays

    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 50)  # W and dW (96 bytes) are read as used
    d = flax_dump(tmp_path / "dump", rng)
    loaded = arrays.load(d)
    dW = loaded.arrays["dW"]
    assert isinstance(dW, arrays.FileArray)
    T = dW.T
    assert isinstance(T, arrays.FileArray) and T.shape == (3, 4)
    expected = np.load(d / "dW.npy").T
    np.testing.assert_array_equal(T[1:3], expected[1:3])
    np.testing.assert_array_equal(np.asarray(T), expected)
    np.testing.assert_array_equal(np.asarray(T.T), expected.T)
    assert verify(d, "--layout", "in_out", "--mode", "sample").exit_code == 0


# ---------------------------------------------------------------------------
# explain, generate, run


def test_explain_reads_an_in_out_dump(tmp_path, rng):
    d = flax_dump(tmp_path / "dump", rng, D_in=5, D_out=3)
    result = runner.invoke(app, ["explain", str(d), "--layout", "in_out"])
    assert result.exit_code == 0, result.output
    page = " ".join(result.stdout.split())
    assert "D_in = 5 input features, D_out = 3 output features" in page
    assert "Your W is stored as (D_in, D_out) = (5, 3)" in page
    bad = runner.invoke(app, ["explain", str(d)])
    assert bad.exit_code == 2 and "pass --layout in_out" in bad.stderr


def test_generate_writes_w_and_dw_in_the_layout_and_verify_reads_them(tmp_path):
    d = tmp_path / "case"
    args = ["generate", str(d), "--n", "5", "--din", "4", "--dout", "3", "--with-grads"]
    assert runner.invoke(app, [*args, "--layout", "in_out"]).exit_code == 0
    W, dW = np.load(d / "W.npy"), np.load(d / "dW.npy")
    X, G = np.load(d / "X.npy"), np.load(d / "dY.npy")
    assert W.shape == dW.shape == (4, 3) and W.flags.c_contiguous
    np.testing.assert_allclose(dW, X.T @ G, rtol=1e-12)
    assert verify(d, "--layout", "in_out").exit_code == 0
    assert verify(d).exit_code == 2


def test_run_saves_w_in_the_layout(tmp_path):
    d = tmp_path / "saved"
    result = runner.invoke(app, ["run", *SIZES, "--layout", "in_out", "--save", str(d)])
    assert result.exit_code == 0, result.output
    assert np.load(d / "W.npy").shape == np.load(d / "dW.npy").shape == (4, 3)


# ---------------------------------------------------------------------------
# CS231n's affine layers through run --impl, and --cases


@pytest.fixture
def in_tests(monkeypatch):
    monkeypatch.chdir(TESTS)  # the worker imports cs231n_layers from the working folder


def run_impl(function, *args):
    return runner.invoke(
        app, ["run", "--impl", f"cs231n_layers:{function}", *SIZES, "--layout", "in_out", *args]
    )


def test_cs231n_affine_backward_passes_with_in_out_and_its_cases(in_tests):
    result = run_impl("backward", "--cases=-batched,-no-bias", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["layout"] == "in_out"
    assert [c["kind"] for c in report["cases"]] == ["main", "n1", "din1", "dout1", "swapped"]
    assert [s["kind"] for s in report["skipped"]] == ["batched", "no-bias"]
    assert report["counts"]["cases"] == 5 and report["counts"]["skipped"] == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "all 5 cases checked passed; 2 skipped, not checked (batched, no-bias)" in last


def test_cs231n_with_a_planted_bug_fails(in_tests):
    result = run_impl("backward_db_not_summed", "--cases", "main,n1", "--json", "-")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    failed = {(h["case"], h["tensor"], h["code"]) for h in report["hints"]}
    assert ("float64 N=6 D_in=4 D_out=3", "dB", "bias_not_summed") in failed
    assert not report["cases"][1]["passed"]  # N = 1: dB has dY's shape (1, 3)


def test_the_batched_case_is_not_cs231n_s_to_pass(in_tests):
    result = run_impl("backward", "--cases", "batched", "--json", "-")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["counts"]["skipped"] == 6


def test_skipped_cases_are_junit_skipped_elements(in_tests, tmp_path):
    junit = tmp_path / "r.xml"
    result = run_impl("backward", "--cases", "main", "--junit", str(junit), "--quiet")
    assert result.exit_code == 0, result.output
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("skipped") == "6"
    skipped = [c for c in root.iter("testcase") if c.find("skipped") is not None]
    assert len(skipped) == 6
    assert "1 cases checked passed; 6 skipped" in result.stdout.replace("all ", "")


def test_no_bias_reports_the_cases_with_a_bias_as_skipped(in_tests):
    result = run_impl("backward", "--no-bias", "--json", "-", "--quiet")
    report = json.loads(result.stdout)
    assert [c["kind"] for c in report["cases"]] == ["no-bias"]
    kinds = ["main", "n1", "din1", "dout1", "swapped", "batched"]
    assert [s["kind"] for s in report["skipped"]] == kinds
    last = " ".join(result.stderr.split())  # the line as one, however the terminal wraps it
    assert "; 6 skipped, not checked (main, n1, din1, dout1, swapped, batched)" in last


def test_a_function_that_cannot_take_no_bias_is_told_how_to_leave_the_case_out(in_tests):
    result = run_impl("backward", "--cases", "no-bias", "--json", "-")
    [case] = json.loads(result.stdout)["cases"]
    assert "raised TypeError" in case["error"] and "--cases=-no-bias" in case["error"]


def test_repeated_cases_add_up(in_tests):
    result = run_impl("backward", "--cases", "main", "--cases", "n1", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    assert [c["kind"] for c in json.loads(result.stdout)["cases"]] == ["main", "n1"]


def test_run_precision_holds_your_functions_to_it(in_tests):
    result = run_impl("backward", "--cases", "main", "--precision", "bf16", "--json", "-")
    checks = json.loads(result.stdout)["cases"][0]["report"]["checks"]
    assert {c["precision"] for c in checks if c["subject"] == "supplied"} == {"bf16"}
    alone = runner.invoke(app, ["run", "--precision", "bf16"])
    assert alone.exit_code == 2 and "--precision needs --impl or --forward" in alone.stderr


def test_save_with_impl_is_refused_before_any_case(in_tests, tmp_path):
    result = run_impl("backward", "--save", str(tmp_path / "out"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "--save-failures DIR" in result.stderr and not (tmp_path / "out").exists()


def test_cases_list_and_bad_names():
    listed = runner.invoke(app, ["run", "--cases", "list"])
    assert listed.exit_code == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:-1]]
    assert names == list(api.CASES)
    bad = runner.invoke(app, ["run", "--impl", "m:f", "--cases", "main,nope"])
    assert bad.exit_code == 2
    assert bad.stderr.count("\n") == 1
    assert "unknown case 'nope'; the cases are main, n1, din1, dout1, swapped" in bad.stderr
    alone = runner.invoke(app, ["run", "--cases", "main"])
    assert alone.exit_code == 2 and "--cases needs --impl or --forward" in alone.stderr


def test_select_cases():
    assert api.select_cases(None) == tuple(api.CASES)
    assert api.select_cases("n1,main") == ("main", "n1")
    assert api.select_cases(["-batched", "-no-bias"]) == ("main", "n1", "din1", "dout1", "swapped")
    assert api.select_cases("main,n1,-n1") == ("main",)
    for bad in ("", "main,bogus", "-main,-n1,-din1,-dout1,-swapped,-batched,-no-bias"):
        with pytest.raises(ValueError):
            api.select_cases(bad)


def test_the_api_sweeps_in_out_and_reports_what_it_skipped():
    from cs231n_layers import backward, backward_db_not_summed, forward

    kw = dict(N=5, D_in=4, D_out=3, dtypes=["float64"], layout="in_out")
    result = api.check_backward(backward, cases="-batched,-no-bias", forward=forward, **kw)
    assert result.passed and len(result.results) == 5
    assert [c.kind for c in result.skipped] == ["batched", "no-bias"]
    assert result.as_dict()["counts"]["skipped"] == 2
    assert not api.check_backward(backward_db_not_summed, cases="main", **kw).passed
    assert api.check_forward(forward, cases="main,swapped", **kw).passed
    # A case keeps its data whichever others are chosen.
    one = api.sweep(5, 4, 3, ["float64"], cases="swapped")[0]
    assert one == next(c for c in api.sweep(5, 4, 3, ["float64"]) if c.kind == "swapped")


def test_an_in_out_function_without_the_option_is_told_which_layout(in_tests):
    """CS231n's forward (x @ w + b) handed W as (D_out, D_in) raises on its shape; the same
    layer with W as (D_in, D_out) passes, so the case's error names --layout in_out."""
    report = runner.invoke(
        app,
        ["run", "--forward", "cs231n_layers:forward", *SIZES, "--cases", "main", "--json", "-"],
    )
    assert report.exit_code == 1, report.output
    [case] = json.loads(report.stdout)["cases"]
    assert "takes W in the in_out layout; use --layout in_out" in case["error"], case
    # A correct function in its own layout gets no such advice: its failure is elsewhere.
    wrong = runner.invoke(
        app, ["run", "--impl", "cs231n_layers:backward_db_not_summed", *SIZES, "--json", "-"]
    )
    assert "in_out layout" not in wrong.stdout


def test_an_nn_module_in_the_in_out_layout_is_refused_in_one_line(in_tests):
    pytest.importorskip("torch")
    result = runner.invoke(app, ["run", "--impl", "torch_layers:Linear", "--layout", "in_out"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "nn.Module" in result.stderr
    assert "(out_features, in_features)" in result.stderr
