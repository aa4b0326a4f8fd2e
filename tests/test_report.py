"""Rendering: tables on a fixed-width console, and strict JSON."""

import json

import numpy as np
import pytest
from rich.console import Console

from lincheck import check
from lincheck.report import render, to_json


def text_of(renderable, width=80):
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(renderable)
    console.file.close()
    return console.export_text()


@pytest.fixture
def failing_report(rng):
    X, W, B, G = (rng.standard_normal(s) for s in ((8, 5), (3, 5), (3,), (8, 3)))
    dW = G.T @ X
    dW[1, 4] += 0.5
    dX = G @ W
    dX[0, 0] = np.nan
    return check(X, W, B, G, dX=dX, dW=dW, dB=G.mean(0))


def test_failing_report_renders_every_verdict_within_80_columns(failing_report):
    out = text_of(render(failing_report, header="HEADER"))
    lines = out.splitlines()
    assert lines[0] == "HEADER"
    assert max(len(line) for line in lines) <= 80
    flat = " ".join(out.split())
    assert "Your gradients (fp64) vs the float64 analytic reference" in flat
    assert "The float64 analytic formulas vs the numerical witness (central differences" in flat
    assert "Tolerance: rounding-error bounds. Any single entry changed by more than" in flat
    rows = [line.split() for line in lines if line.split()[:1] in (["dX"], ["dW"], ["dB"])]
    summary = [r for r in rows if r[-1] in ("PASS", "FAIL")]
    assert [(r[0], r[-1]) for r in summary] == [
        ("dX", "FAIL"),
        ("dW", "FAIL"),
        ("dB", "FAIL"),
        ("dX", "PASS"),
        ("dW", "PASS"),
        ("dB", "PASS"),
    ]
    assert "dX (supplied vs reference): contains 1 NaN, first at [0, 0]" in out
    assert "dW (supplied vs reference): 1 of 15 entries exceed their tolerance" in out
    # The worst dW entry is listed with its index and both values.
    worst = [r for r in rows if r[0] == "dW" and r[1:3] == ["[1,", "4]"]]
    assert worst, out
    assert lines[-1] == "FAIL  3 of 6 checks failed: dX (supplied), dW (supplied), dB (supplied)"


def test_json_is_strict_and_keeps_the_contract(failing_report):
    text = to_json(failing_report, command="verify")
    report = json.loads(
        text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")
    )
    assert report["passed"] is False and report["command"] == "verify"
    checks = {(c["tensor"], c["subject"]): c for c in report["checks"]}
    assert checks[("dX", "supplied")]["max_abs_error"] is None  # NaN subject: no error to report
    assert checks[("dW", "supplied")]["worst_index"] == [1, 4]
    assert checks[("dW", "supplied")]["max_abs_error"] == pytest.approx(0.5)
    assert checks[("dB", "supplied")]["passed"] is False
    assert [(h["code"], h["tensor"]) for h in report["hints"]] == [
        ("non_finite", "dX"),
        ("localized", "dW"),
        ("mean_instead_of_sum", "dB"),
    ]
    assert report["hints"][0]["evidence"] == {"nan": 1, "inf": 0, "first": [[0, 0]]}


def test_json_of_a_path_whose_bytes_are_not_utf8_is_strict_json(tmp_path):
    """A file name with a byte that is not UTF-8 reaches Python with a lone surrogate;
    the report writes it as an escape that strict parsers read."""
    import json
    import os

    from lincheck.results import json_text

    name = os.fsdecode(b"caf\xff")
    text = json_text({"path": name, "other": "\ud800", "nested": [{"k": name}]})
    assert json.loads(text) == {
        "path": "caf\\xff",
        "other": "\\ud800",
        "nested": [{"k": "caf\\xff"}],
    }
    text.encode("utf-8")  # strict UTF-8 throughout


def test_the_cases_table_prints_case_names_and_errors_as_they_are():
    """A case's path is text, not Rich markup: brackets in it ("x[/y]" a closing tag,
    "[a]" a style) are printed, in the table and in the failure's rule, never read."""
    from lincheck.api import CaseResult
    from lincheck.report import render_cases

    results = [
        CaseResult(name, None, f"W ({name}/W.npy): not a .npy file", bad_input=True)
        for name in ("m/x[/y]", "m/[a]")
    ]
    console = Console(width=200, record=True, color_system=None)
    console.print(render_cases(results, header="2 cases"))
    text = console.export_text()
    for name in ("m/x[/y]", "m/[a]"):
        assert f" {name} " in text and f"W ({name}/W.npy): not a .npy file" in text
        assert f"{name} ─" in text  # the rule
