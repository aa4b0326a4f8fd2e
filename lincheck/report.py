"""Presentation: a :class:`~lincheck.results.Report` as Rich renderables or JSON text.

Nothing here prints; the CLI decides where output goes.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any, Literal

import numpy as np
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .results import Report, TensorCheck
from .tensors import AXES

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


def _index_text(index: tuple[int, ...] | None) -> str:
    return "—" if index is None else "[" + ", ".join(map(str, index)) + "]"


def _result(check: TensorCheck) -> Text:
    if check.verdict == "inconclusive":
        return Text("INCONCLUSIVE", style="bold yellow")
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
            title += f" (the forward pass along {check.checked} random rank-one directions)"
        elif check.mode == "sample":
            title += f" ({method} at {check.checked} sampled entries)"
        elif report.witness.get("mode") != "full":
            title += f" ({method}, every entry)"
        else:
            title += f" ({method}, {report.witness['forward_passes']:,} forward passes)"
    return title


def _caption(checks: list[TensorCheck]) -> str:
    """Which rule set the tolerances, and the smallest single-entry change each passed check
    catches (a failed check has caught one already: its figure would be its own error)."""
    rule = checks[0].rule
    how = "rounding-error bounds" if rule == "bound" else checks[0].tolerance_rule
    caught = " · ".join(
        f"{c.tensor} {_short(c.min_detectable_error)}"
        for c in checks
        if c.min_detectable_error is not None and c.passed
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
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("Tensor", "left"),
        ("Index", "left"),
        ("Checked", "right"),
        ("Against", "right"),
        ("|error|", "right"),
        ("Tolerance", "right"),
    )
    for name, justify in columns:
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
                _index_text(e.index),
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


# ---------------------------------------------------------------------------
# Error heatmaps


LEVELS = (
    # (largest error / tolerance of the level, character, colour)
    (0.0, " ", ""),
    (0.01, "·", "grey50"),
    (0.1, "░", "blue"),
    (0.5, "▒", "cyan"),
    (1.0, "▓", "yellow"),
    (float("inf"), "█", "bold red"),
)
"""How an error map's cells are drawn: characters carry the level, colour only repeats
it, so the map reads the same with NO_COLOR. ``█`` is over the tolerance."""

MAP_LINES = 32
"""Lines a heatmap takes at most; its width is the terminal's."""


def _groups(cells: int, entries: int, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``cells`` map cells (covering ``entries`` rows or columns) into at most ``most``
    groups of whole cells: (first cell of each group, first entry of each group, then
    ``entries``). Map cell c covers the entries i with i·cells // entries == c."""
    per = -(-cells // most)
    first_cells = np.arange(0, cells, per)
    first_entries = (np.append(first_cells, cells) * entries + cells - 1) // cells
    return first_cells, first_entries


def _span(first: int, stop: int) -> str:
    return str(first) if stop - first <= 1 else f"{first}-{stop - 1}"


def _level(ratio: float) -> tuple[str, str]:
    for upper, char, style in LEVELS:
        if ratio <= upper:
            return char, style
    return LEVELS[-1][1:]


def legend() -> Text:
    text = Text("  ")
    names = ("exact", "< 1% of tol", "< 10%", "< 50%", "≤ tol", "over tol")
    for (_, char, style), name in zip(LEVELS, names):
        text.append(f"[{char}]", style=style)
        text.append(f" {name}  ")
    return text


class Heatmap:
    """The error map of one check (:attr:`TensorCheck.error_map`), drawn to fit the width.

    The map comes pooled into at most ``tally.MAP_CELLS`` cells; it is
    pooled again, by maximum, into at most MAP_LINES lines and as many
    characters as the width allows, so each character shows the largest
    error / tolerance of the entries it covers: a single bad entry of a
    large tensor still shows. Rows of dX and Y are batch rows (leading
    dimensions flattened), columns input features or output units.
    """

    def __init__(self, check: TensorCheck):
        self.check = check

    def __rich_console__(self, console, options):
        c = self.check
        shape = c.shape2d
        grid = c.require_map()
        row_cells, row_starts = _groups(grid.shape[0], shape[0], MAP_LINES)
        labels = [_span(a, b) for a, b in zip(row_starts[:-1], row_starts[1:])]
        if shape[0] == 1:
            labels = [""]
        label_width = max(len(label) for label in labels) + 1
        room = max(1, options.max_width - label_width - 3)
        col_cells, col_starts = _groups(grid.shape[1], shape[1], room)
        cells = np.maximum.reduceat(np.maximum.reduceat(grid, row_cells, 0), col_cells, 1)
        what = [f"{axis}s" for axis in AXES[c.tensor]]
        scale = []
        if len(row_cells) < shape[0]:
            scale.append(f"a line covers about {shape[0] / len(row_cells):.3g} {what[0]}")
        if len(col_cells) < shape[1]:
            scale.append(f"a character about {shape[1] / len(col_cells):.3g} {what[1]}")
        yield Text.assemble(
            (f"{c.tensor}", "bold"),
            f" error / tolerance ({c.subject} vs {c.oracle}), {_dims(shape)}",
            f"; {', '.join(scale)} (the largest shown)" if scale else "",
        )
        width = len(col_cells)
        end = str(shape[1] - 1)
        ruler = f"{'':>{label_width}} 0" + (end.rjust(width - 1) if width > len(end) + 1 else "")
        yield Text(ruler, style="dim")
        for label, row in zip(labels, cells):
            line = Text(f"{label:>{label_width}}│", style="dim")
            for ratio in row:
                char, style = _level(float(ratio))
                line.append(char, style=style)
            line.append("│", style="dim")
            yield line


def heatmaps(report: Report, which: str = "failed") -> list[RenderableType]:
    """Heatmaps of the checks with an error map: the failed ones, or "all", or "none"."""
    if which == "none":
        return []
    shown = [
        c for c in report.checks if c.error_map is not None and (which == "all" or not c.passed)
    ]
    if not shown:
        return []
    parts: list[RenderableType] = []
    for c in shown:
        parts += [Heatmap(c), Text("")]
    parts.append(legend())
    return parts


def verdict(report: Report) -> Text:
    n = len(report.checks)
    if report.passed:
        return Text.assemble(("PASS", "bold green"), f"  all {n} checks passed")
    failed = ", ".join(f"{c.tensor} ({c.subject})" for c in report.failed)
    unsure = sum(c.verdict == "inconclusive" for c in report.failed)
    wrong = len(report.failed) - unsure
    counts = f"{wrong} of {n} checks failed" if wrong else ""
    if unsure:
        counts += (", " if counts else "") + f"{unsure} of {n} inconclusive"
    return Text.assemble(("FAIL", "bold red"), f"  {counts}: {failed}")


def render(
    report: Report,
    header: RenderableType | None = None,
    heatmap: str = "failed",
    notes: list[RenderableType] | None = None,
    with_verdict: bool = True,
) -> Group:
    """Everything a terminal shows for one report, in order, the verdict last.

    ``heatmap``: draw the error maps of the failed checks ("failed"), of all
    ("all"), or none ("none"). ``notes`` go just before the verdict. Without
    ``with_verdict`` the caller prints the verdict itself (after the CI
    annotations, on one line: :func:`lincheck.output.emit`).
    """
    parts: list[RenderableType] = [] if header is None else [header]
    if "reason" in report.witness:
        parts.append(Text(f"Witness mode {report.witness['mode']}: {report.witness['reason']}."))
    for table in summary_tables(report):
        parts += [table, Text("")]
    worst = worst_entries_table(report)
    if worst is not None:
        parts.append(worst)
    maps = heatmaps(report, heatmap)
    if maps:
        parts += [Text(""), *maps, Text("")]
    extra = problems(report)
    if extra is not None:
        parts.append(extra)
    parts += notes or []
    if with_verdict:
        parts.append(verdict(report))
    return Group(*parts)


def to_json(report: Report, **context: Any) -> str:
    """The JSON report, with ``context`` (command, inputs) merged in at the top level."""
    return report.to_json(**context)


def to_text(report: Report, header: RenderableType | None = None, width: int = 100) -> str:
    """The tables as plain text (no colour), as an assertion message or a log shows them."""
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False)
    console.print(render(report, header))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _plain_text(renderable: RenderableType, width: int = 100) -> str:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


BRIEF_WORST = 3
"""Worst entries a brief failure message lists per failed tensor."""


def brief(report: Report) -> Group:
    """A failed report in few lines, for an assertion message: what failed and the hints,
    the failed tensors' rows, their worst entries (at most :data:`BRIEF_WORST` each). The
    checks that passed, the heatmaps and the witness's tables are left to the full report."""
    parts: list[RenderableType] = []
    lines = problems(report)
    if lines is not None:
        parts += [lines, Text("")]
    for table in summary_tables(report, only_failed=True):
        parts += [table, Text("")]
    worst = worst_entries_table(report, per_tensor=0, per_failed=BRIEF_WORST)
    if worst is not None:
        parts += [worst, Text("")]
    return Group(*parts)


def brief_text(report: Report, width: int = 100) -> str:
    """:func:`brief` as plain text."""
    return _plain_text(brief(report), width)


def case_failures(result) -> str:
    """What failed in a case, in a few words: its failed tensors with their hints' codes,
    or the first line of its error."""
    if result.unsupported:
        return "takes no leading batch dimensions (--cases=-batched leaves this case out)"
    if result.error is not None:
        return result.error.splitlines()[0]
    parts = []
    for c in result.report.failed:
        codes = [h.code for h in result.report.hints if h.tensor == c.tensor]
        parts.append(c.tensor + (f" ({', '.join(codes)})" if codes else ""))
    return ", ".join(parts)


def cases_table(results, total: int | None = None) -> Table:
    """One row per case: how many checks passed, the verdict, what failed and why (titled
    "k of n cases" when only k of the ``total`` n were checked; untitled otherwise, under
    the command's header, which counts the cases)."""
    shown = len(results)
    table = _table("" if total in (None, shown) else f"{shown} of {total} cases")
    table.add_column("Case", overflow="fold")
    table.add_column("Checks", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=4)
    table.add_column("Failed (hints)", overflow="fold")
    for r in results:
        if r.report is None:
            checks = "—"
            mark = Text(r.status, style="bold yellow" if r.unsupported else "bold red")
        else:
            n = len(r.report.checks)
            checks = f"{n - len(r.report.failed)}/{n}"
            mark = Text("PASS", style="bold green") if r.passed else Text("FAIL", style="bold red")
        table.add_row(Text(r.name), checks, mark, Text(case_failures(r)))  # text, not markup
    return table


def verdict_cases(results, skipped=()) -> Text:
    """The last line: how many cases were checked and how they went, and how many of the
    sweep were skipped (not checked: a skipped case never counts as passed)."""
    failed = [r for r in results if not r.passed]
    skip = ""
    if skipped:
        kinds = ", ".join(dict.fromkeys(c.kind for c in skipped))
        skip = f"; {len(skipped)} skipped, not checked ({kinds})"
    if not failed:
        counts = (
            f"all {len(results)} cases passed"
            if not skipped
            else (f"all {len(results)} cases checked passed")
        )
        return Text.assemble(("PASS", "bold green"), f"  {counts}{skip}")
    bad = sum(r.bad_input for r in failed)
    unsupported = sum(r.unsupported for r in failed)
    wrong = len(failed) - bad - unsupported
    names = _first_names([r.name for r in failed])
    if bad == len(failed):
        counts = f"{bad} of {len(results)} cases had bad input"
    else:  # every count: a failed check is never hidden behind the bad input (exit 1)
        parts = [f"{wrong} of {len(results)} cases failed"] if wrong else []
        if unsupported and not (wrong or bad):  # not checked, so never a pass; but no
            # gradient was found wrong, and the line says so
            parts.append(
                f"no gradient wrong, but {unsupported} of {len(results)} cases not supported "
                "by your function (leading batch dimensions)"
            )
        elif unsupported:
            parts.append(f"{unsupported} not supported")
        parts += [f"{bad} had bad input"] if bad else []
        counts = ", ".join(parts)
    advice = "; --cases=-batched leaves them out" if unsupported else ""
    return Text.assemble(("FAIL", "bold red"), f"  {counts}: {names}{advice}{skip}")


VERDICT_NAMES = 3
"""Failed cases the verdict names; the rest are counted (the table lists them all)."""


def _first_names(names: list[str], most: int = VERDICT_NAMES) -> str:
    """The first ``most`` names, then how many more: the verdict stays one short line."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def render_cases(
    results,
    header: RenderableType | None = None,
    heatmap: str = "failed",
    notes: list[RenderableType] | None = None,
    skipped=(),
    with_verdict: bool = True,
) -> Group:
    """A summary table of all cases, then each failure: the first in full, the rest with
    only their failed rows, problems and hints."""
    from rich.rule import Rule

    parts: list[RenderableType] = [] if header is None else [header]
    parts += [cases_table(results), Text("")]
    shown_in_full = False
    for r in results:
        if r.passed:
            continue
        parts.append(Rule(Text(r.name, style="rule.text"), align="left"))
        if r.report is None:
            kind = "bad input" if r.bad_input else "unsupported" if r.unsupported else "error"
            parts.append(Text(f"{kind}: {r.error}", style="red"))
        elif not shown_in_full:
            parts.append(render(r.report, heatmap=heatmap))
            shown_in_full = True
        else:  # the rest more briefly: the failed rows, the problems and the hints
            for table in summary_tables(r.report, only_failed=True):
                parts += [table, Text("")]
            lines = problems(r.report)
            if lines is not None:
                parts.append(lines)
        parts.append(Text(""))
    if skipped:
        listed = "\n".join(f"  {c.name}  [{c.kind}]" for c in skipped)
        parts.append(Text(f"Skipped (not checked: --cases or --no-bias): {len(skipped)}\n{listed}"))
    parts += notes or []
    if with_verdict:
        parts.append(verdict_cases(results, skipped))
    return Group(*parts)


def sweep_text(
    results, skipped=(), width: int = 100, most: int | None = None, last_line: bool = True
) -> str:
    """A sweep as plain text: the table of cases, the failures' problems and hints (a
    case's error in full), and the verdict line (unless not ``last_line``); no tables of
    numbers, no heatmaps. With ``most``, only that many failures are detailed, and a
    failure whose tensors and hints are one's already detailed is left to the table."""
    parts: list[RenderableType] = [cases_table(results), Text("")]
    failed = [r for r in results if not r.passed]
    shown: set[str] = set()
    rest = 0
    for r in failed:
        alike = case_failures(r) if r.report is not None or r.unsupported else None
        if most is not None and (len(shown) >= most or (alike is not None and alike in shown)):
            rest += 1
            continue
        shown.add(alike or r.name)
        if r.report is None:
            kind = "bad input" if r.bad_input else "unsupported" if r.unsupported else "error"
            parts.append(Text(f"{r.name}: {kind}: {r.error}"))
        else:
            lines = problems(r.report)
            text = lines.plain if lines is not None else verdict(r.report).plain
            parts.append(Text(f"{r.name}:\n{text}"))
    if rest:
        parts.append(Text(f"({rest} more failed cases, alike or not shown: see the table)"))
    if last_line:
        parts.append(verdict_cases(results, skipped))
    return _plain_text(Group(*parts), width)


def explain_page(sizes, lang: str = "en") -> RenderableType:
    """``lincheck explain``: the derivation with the user's shapes (:mod:`lincheck.explain`)."""
    from rich.markdown import Markdown

    from .explain import text

    return Markdown(text(sizes, lang), inline_code_lexer=None)
