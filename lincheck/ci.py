"""Reports for CI systems: JUnit XML and GitHub Actions annotations.

Both take a list of ``(case name, report or None, error or None)``: one case
for a single check, one per layer or per sweep case otherwise. Nothing here
prints or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.etree import ElementTree as ET

from .results import Report

Outcome = tuple[str, Report | None, str | None] | tuple[str, Report | None, str | None, bool]
"""(case name, report, error[, bad input]): an error with bad input is a JUnit ``bad input``."""


def _hints_for(report: Report, tensor: str) -> list[str]:
    return [f"[{h.code}] {h.message}" for h in report.hints if h.tensor == tensor]


def _failure_text(check, report: Report) -> str:
    lines = [check.message or "failed"]
    if check.max_abs_error is not None:
        lines.append(
            f"max |error| {check.max_abs_error:.3g} at {list(check.worst_index or [])}, "
            f"{check.bound_ratio:.3g} × its tolerance {check.tolerance:.3g} "
            f"({check.tolerance_rule})"
        )
    return "\n".join(lines + _hints_for(report, check.tensor))


def junit_xml(outcomes: Sequence[Outcome], suite: str = "lincheck", skipped=()) -> str:
    """A JUnit XML report: one test case per tensor check per case, and a ``<skipped>``
    test case per case of ``skipped`` (the :class:`lincheck.api.Case` objects not checked).

    The layout is the one JUnit's Ant task writes and Jenkins, GitLab and
    GitHub test-report actions read: ``<testsuites>`` holding one
    ``<testsuite name tests failures errors skipped time>``, whose
    ``<testcase classname name time>`` elements carry a ``<failure message
    type>`` (a check failed) or an ``<error message type>`` (the user's
    function raised, or the input was bad) with details as text.
    """
    root = ET.Element("testsuites")
    tests = failures = errors = 0
    cases = []
    for name, report, error, *bad in outcomes:
        bad_input = bool(bad and bad[0])
        classname = f"{suite}.{name}"
        if report is None:  # an error stopped the case
            error = error or "no report"
            case = ET.Element("testcase", classname=classname, name="run", time="0")
            kind = "bad input" if bad_input else "error"
            ET.SubElement(case, "error", message=error.splitlines()[0], type=kind).text = error
            cases.append(case)
            tests, errors = tests + 1, errors + 1
            continue
        for check in report.checks:
            label = f"{check.tensor} ({check.subject} vs {check.oracle})"
            case = ET.Element("testcase", classname=classname, name=label, time="0")
            if not check.passed:
                failures += 1
                ET.SubElement(
                    case, "failure", message=check.message or "failed", type="gradient"
                ).text = _failure_text(check, report)
            cases.append(case)
            tests += 1
    for c in skipped:
        case = ET.Element("testcase", classname=f"{suite}.{c.name}", name="run", time="0")
        ET.SubElement(case, "skipped", message=f"not checked: case {c.kind} not chosen (--cases)")
        cases.append(case)
    tests += len(skipped)
    testsuite = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(tests),
        failures=str(failures),
        errors=str(errors),
        skipped=str(len(skipped)),
        time="0",
    )
    testsuite.extend(cases)
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    root.set("skipped", str(len(skipped)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _escape_data(text: str) -> str:
    """GitHub's workflow-command escaping of a message: %, CR and LF."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    """GitHub's escaping of a property value (title, file): also ':' and ','."""
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(outcomes: Sequence[Outcome]) -> list[str]:
    """``::error title=...::message`` lines, one per failed check or failed case.

    GitHub Actions turns each such line on a step's output into an error
    annotation on the run's summary page.
    """
    lines = []
    for name, report, error, *_ in outcomes:
        if report is None:  # an error stopped the case
            error = error or "no report"
            title = _escape_property(f"lincheck {name}")
            lines.append(f"::error title={title}::{_escape_data(error)}")
            continue
        for check in report.failed:
            title = _escape_property(f"lincheck {name}: {check.tensor} ({check.subject})")
            lines.append(f"::error title={title}::{_escape_data(_failure_text(check, report))}")
    return lines
