"""Presentation: a :class:`~lincheck.checks.Report` as Rich renderables or JSON text.

Nothing here prints; the CLI decides where output goes.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .checks import Report, TensorCheck

_SUBJECT = {
    "supplied": "Your gradients",
    "analytic": "Analytic gradients",
    "reference": "The float64 analytic formulas",
}
_ORACLE = {
    "reference": "the float64 analytic reference",
    "witness": "the numerical witness",
}
_METHOD = {
    "central": "central differences",
    "dense": "central differences, one entry at a time",
    "complex-step": "complex step",
}


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return "0" if x == 0 else f"{x:.{digits - 1}e}"


def _short(x: float | None) -> str:
    """Two significant digits, compact exponent: 0.17, 54, 1.1e-7, 3.6e14."""
    if x is None:
        return "—"
    if x == 0:
        return "0"
    text = f"{x:.2g}"
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else text


def _index(index: tuple[int, ...] | None) -> str:
    return "—" if index is None else "[" + ", ".join(map(str, index)) + "]"


def _result(check: TensorCheck) -> Text:
    return Text("PASS", style="bold green") if check.passed else Text("FAIL", style="bold red")


def _ratio(x: float | None) -> str:
    return _short(x)


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _compact_index(index: tuple[int, ...] | None) -> str:
    return "—" if index is None else "[" + ",".join(map(str, index)) + "]"


def _title(check: TensorCheck, report: Report) -> str:
    subject = _SUBJECT.get(check.subject, check.subject)
    if check.subject != "reference":
        subject += f" ({check.precision})"
    title = f"{subject} vs {_ORACLE.get(check.oracle, check.oracle)}"
    if check.oracle == "witness":
        method = _METHOD.get(report.witness["method"], report.witness["method"])
        if check.mode == "directions":
            title += f" ({method} along {check.checked} random directions of dX and dW)"
        elif check.mode == "sample":
            title += f" ({method} at {check.checked} sampled entries)"
        elif report.witness.get("mode") != "full":
            title += f" ({method}, every entry)"
        else:
            title += f" ({method}, {report.witness['forward_passes']:,} forward passes)"
    return title


def _caption(checks: list[TensorCheck]) -> str:
    """Which rule set the tolerances, and the smallest single-entry change each check catches."""
    rule = checks[0].rule
    how = "rounding-error bounds" if rule == "bound" else checks[0].tolerance_rule
    caught = " · ".join(
        f"{c.tensor} {_short(c.min_detectable_error)}"
        for c in checks
        if c.min_detectable_error is not None
    )
    text = f"Tolerance: {how}."
    if caught:
        text += f" Any single entry changed by more than this is caught: {caught}."
    return text


def _table(title: str) -> Table:
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )


def summary_tables(report: Report, only_failed: bool = False) -> list[Table]:
    """One table per (subject, oracle) pair: a row per tensor with its verdict."""
    tables = []
    shown = report.failed if only_failed else report.checks
    for _, group in groupby(shown, key=lambda c: (c.subject, c.oracle, c.mode)):
        checks = list(group)
        table = _table(_title(checks[0], report))
        table.caption = _caption(checks)
        table.caption_justify = "left"
        table.add_column("Tensor", style="bold", no_wrap=True, min_width=6)
        table.add_column("Shape", no_wrap=True)
        table.add_column("Max abs", justify="right", no_wrap=True)
        table.add_column("Max rel", justify="right", no_wrap=True)
        table.add_column("Worst at", no_wrap=True)
        table.add_column("Tol", justify="right", no_wrap=True)
        table.add_column("Err/tol", justify="right", no_wrap=True)
        table.add_column("Err/typ", justify="right", no_wrap=True)
        table.add_column("", no_wrap=True, min_width=4)
        for c in checks:
            table.add_row(
                c.tensor,
                _dims(c.shape),
                _short(c.max_abs_error),
                _short(c.max_rel_error),
                "—" if c.max_abs_error == 0 else _compact_index(c.worst_index),
                _short(c.tolerance),
                _ratio(c.bound_ratio),
                _ratio(c.typical_ratio),
                _result(c),
            )
        tables.append(table)
    return tables


def worst_entries_table(report: Report, per_tensor: int = 3, per_failed: int = 5) -> Table | None:
    """The entries closest to (or past) their tolerance, with both values.

    Shown for the checks of the subjects (the first group) and for any failed check.
    """
    primary = report.checks[0].subject if report.checks else None
    table = _table("Worst entries (largest error / tolerance first)")
    for name, justify in (
        ("Tensor", "left"),
        ("Index", "left"),
        ("Checked", "right"),
        ("Against", "right"),
        ("|error|", "right"),
        ("Tolerance", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    rows = 0
    for c in report.checks:
        if c.passed and c.subject != primary:
            continue
        for e in c.worst_entries[: per_tensor if c.passed else per_failed]:
            if e.abs_error == 0:
                continue
            over = e.abs_error > e.tolerance
            table.add_row(
                c.tensor,
                _index(e.index),
                f"{e.subject:.9g}",
                f"{e.oracle:.9g}",
                Text(_num(e.abs_error), style="red" if over else ""),
                _num(e.tolerance),
            )
            rows += 1
    return table if rows else None


def problems(report: Report) -> Text | None:
    """One line per failed check that carries a message (shape, NaN, entries over tolerance)."""
    lines = [
        f"{c.tensor} ({c.subject} vs {c.oracle}): {c.message}" for c in report.failed if c.message
    ]
    lines += [f"hint [{h.code}] {h.message}" for h in report.hints]
    return Text("\n".join(lines), style="red") if lines else None


def verdict(report: Report) -> Text:
    n = len(report.checks)
    if report.passed:
        return Text.assemble(("PASS", "bold green"), f"  all {n} checks passed")
    failed = ", ".join(f"{c.tensor} ({c.subject})" for c in report.failed)
    return Text.assemble(
        ("FAIL", "bold red"), f"  {len(report.failed)} of {n} checks failed: {failed}"
    )


def render(report: Report, header: RenderableType | None = None) -> Group:
    """Everything a terminal shows for one report, in order."""
    parts: list[RenderableType] = [] if header is None else [header]
    if "reason" in report.witness:
        parts.append(Text(f"Witness mode {report.witness['mode']}: {report.witness['reason']}."))
    for table in summary_tables(report):
        parts += [table, Text("")]
    worst = worst_entries_table(report)
    if worst is not None:
        parts.append(worst)
    extra = problems(report)
    if extra is not None:
        parts.append(extra)
    parts.append(verdict(report))
    return Group(*parts)


def to_json(report: Report, **context: Any) -> str:
    """The JSON report, with ``context`` (command, inputs) merged in at the top level."""
    return report.to_json(**context)


def to_text(report: Report, header: RenderableType | None = None, width: int = 100) -> str:
    """The tables as plain text (no colour), as an assertion message or a log shows them."""
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=width, color_system=None, highlight=False)
    console.print(render(report, header))
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _case_failures(result) -> str:
    if result.error is not None:
        return result.error.splitlines()[0]
    parts = []
    for c in result.report.failed:
        codes = [h.code for h in result.report.hints if h.tensor == c.tensor]
        parts.append(c.tensor + (f" ({', '.join(codes)})" if codes else ""))
    return ", ".join(parts)


def cases_table(results) -> Table:
    """One row per case: how many checks passed, the verdict, what failed and why."""
    table = _table(f"{len(results)} cases")
    table.add_column("Case", overflow="fold")
    table.add_column("Checks", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=4)
    table.add_column("Failed (hints)", overflow="fold")
    for r in results:
        if r.report is None:
            checks = "—"
            mark = Text("BAD" if r.bad_input else "ERROR", style="bold red")
        else:
            n = len(r.report.checks)
            checks = f"{n - len(r.report.failed)}/{n}"
            mark = Text("PASS", style="bold green") if r.passed else Text("FAIL", style="bold red")
        table.add_row(r.name, checks, mark, _case_failures(r))
    return table


def verdict_cases(results) -> Text:
    failed = [r for r in results if not r.passed]
    if not failed:
        return Text.assemble(("PASS", "bold green"), f"  all {len(results)} cases passed")
    names = ", ".join(r.name for r in failed)
    return Text.assemble(
        ("FAIL", "bold red"), f"  {len(failed)} of {len(results)} cases failed: {names}"
    )


def render_cases(results, header: RenderableType | None = None) -> Group:
    """A summary table of all cases, then each failure: the first in full, the rest with
    only their failed rows, problems and hints."""
    from rich.rule import Rule

    parts: list[RenderableType] = [] if header is None else [header]
    parts += [cases_table(results), Text("")]
    shown_in_full = False
    for r in results:
        if r.passed:
            continue
        parts.append(Rule(r.name, align="left"))
        if r.report is None:
            kind = "bad input" if r.bad_input else "error"
            parts.append(Text(f"{kind}: {r.error}", style="red"))
        elif not shown_in_full:
            parts.append(render(r.report))
            shown_in_full = True
        else:  # the rest more briefly: the failed rows, the problems and the hints
            for table in summary_tables(r.report, only_failed=True):
                parts += [table, Text("")]
            parts.append(problems(r.report))
        parts.append(Text(""))
    parts.append(verdict_cases(results))
    return Group(*parts)
