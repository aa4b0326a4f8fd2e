"""Where results go: the terminal, report files, plots, and the exit code.

The consoles (stdout for the tables, stderr for errors and progress), the
one-line error for bad input (:func:`fail`), the checks on output targets
made before any work, the reports written at the end (JSON, JUnit, GitHub
annotations, PNG plots) and the exit code they add up to. Also what keeps
the terminal honest: ASCII spellings for a stream that is not UTF-8, and
Ctrl-C turned into one line and exit 130 (:func:`lincheck.cli.main`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from .errors import LincheckError
from .options import parse_size


class _Trimmed:
    """sys.stdout or sys.stderr (looked up at each write, as Rich does), with the spaces
    Rich pads lines with removed from line ends when the stream is not a terminal: a log
    or a pipe gets no trailing blanks. A terminal gets everything as written (a live
    progress bar erases with spaces)."""

    def __init__(self, name: str, stream=None):
        self.name = name
        self.fixed = stream  # a stream of its own, or None: sys.<name> at each write
        self.pending = ""  # blanks at the end of the last write, kept until the next one

    @property
    def stream(self):
        import sys

        return self.fixed if self.fixed is not None else getattr(sys, self.name)

    def write(self, text: str) -> int:
        stream = self.stream
        if stream.isatty():
            return stream.write(self.pending + text)
        import re

        text = self.pending + text
        body = text.rstrip(" ")
        self.pending = text[len(body) :]
        stream.write(re.sub(r" +(?=(?:\x1b\[[0-9;]*m)*\n)", "", body))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextmanager
def trimmed_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr without trailing blanks for the length of the block (when
    they are not terminals): Typer draws its help on consoles of its own."""
    import sys

    saved = sys.stdout, sys.stderr
    sys.stdout = _Trimmed("stdout", saved[0])
    sys.stderr = _Trimmed("stderr", saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _console(err: bool, **options: Any) -> Console:
    return Console(file=_Trimmed("stderr" if err else "stdout"), stderr=err, **options)  # type: ignore[arg-type]


stdout = _console(False)
stderr = _console(True)


def plain_consoles() -> None:
    """No escape codes at all, not only no colours: bold and dim go too (NO_COLOR)."""
    global stdout, stderr
    stdout, stderr = _console(False, color_system=None), _console(True, color_system=None)


def fail(message: str) -> NoReturn:
    """Print one line on stderr and exit 2 (bad usage or bad input)."""
    stderr.print(
        f"lincheck: error: {message}", markup=False, highlight=False, emoji=False, soft_wrap=True
    )
    raise typer.Exit(code=2)


def usage_error(exc) -> int:
    """A Click usage error (bad option value, unknown option, missing argument) as one
    line on stderr, like :func:`fail`'s: ``lincheck run: error: --n: 0 is not in the
    range x>=1.`` Returns its exit code (2)."""
    from difflib import get_close_matches

    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "lincheck"
    param = getattr(exc, "param", None)
    if type(exc).__name__ == "NoSuchOption":
        # Click suggests whatever shares a few letters (--bogus: "--dout"): only close names.
        names = [name.lstrip("-") for name in exc.possibilities or ()]
        close = get_close_matches(exc.option_name.lstrip("-"), names, n=1, cutoff=0.75)
        message = f"no such option {exc.option_name}"
        message += f" (did you mean --{close[0]}?)" if close else ""
    elif param is not None and type(exc).__name__ in ("BadParameter", "MissingParameter"):
        hint = exc.param_hint or param.get_error_hint(ctx)
        hint = (hint if isinstance(hint, str) else " / ".join(hint)).replace("'", "")
        missing = type(exc).__name__ == "MissingParameter"
        message = f"{hint}: {'missing' if missing else exc.message}"
    else:
        message = exc.format_message()
    help_hint = f"; see {where} --help" if where and ctx is not None else ""
    stderr.print(
        f"{where}: error: {message.rstrip('.')}{help_hint}",
        markup=False,
        highlight=False,
        emoji=False,
        soft_wrap=True,
    )
    return int(getattr(exc, "exit_code", 2))


@contextmanager
def bad_input() -> Iterator[None]:
    """Turn the library's bad-input errors (:class:`LincheckError`) into :func:`fail`."""
    try:
        yield
    except LincheckError as exc:
        fail(str(exc))


class ProgressBar:
    """A progress bar on stderr for checks that take more than about a second.

    Only on a terminal and never with --quiet. It appears at once, naming
    what is checked, when the check's nominal cost (:meth:`expect`) says it
    will take over about a second; otherwise once a check has run for a
    quarter of a second and is projected to take over a second. It vanishes
    when done, so quick checks print nothing extra.
    """

    SHOW_AT = 0.2
    """Nominal seconds (``checks.NOMINAL_RATE``) past which the bar shows at once: about a
    second of a shared laptop core."""

    def __init__(self, enabled: bool, label: str = "witness"):
        import time

        self.enabled = enabled and stderr.is_terminal
        self.label = label
        self.clock = time.monotonic
        self.start = self.clock()
        self.bar: Any = None  # a rich.progress.Progress, imported when first shown

    def expect(self, nominal_seconds: float) -> None:
        """The check ahead is this long at the nominal rate: show the bar now if long."""
        if self.enabled and self.bar is None and nominal_seconds > self.SHOW_AT:
            self._show(None)

    def _show(self, total: float | None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        # At 80 columns the count and the time left must show whole: the bar keeps 12
        # cells, the count of passes and the time their width (about 30 in all), and the
        # label what is left (cut with an ellipsis).
        room = max(stderr.width - 42, 8)
        self.bar = Progress(
            TextColumn(
                "{task.description}",
                table_column=Column(max_width=room, no_wrap=True, overflow="ellipsis"),
            ),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            "passes",
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            refresh_per_second=8,
        )
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=total)

    def __call__(self, done: float, total: float) -> None:
        if not self.enabled or total == 0:
            return
        if self.bar is None:
            elapsed = self.clock() - self.start
            if elapsed < 0.25 or elapsed * total / max(done, 1) < 1.0:
                return
            self._show(total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def check_outputs(out: dict, inputs=(), folders: dict | None = None) -> None:
    """Every output target, before any work: one that lincheck must not write (a device,
    /dev/stdout, an input file, a folder for a file, a missing folder, plots that exist
    without --force, one file for two reports, a report that a dump folder would read as
    an array) is exit 2 with nothing done and nothing written."""
    from . import writing
    from .tensors import INPUT_NAMES, SUBJECT_NAMES

    if out["junit"] is not None and str(out["junit"]) == "-":
        fail("--junit -: the JUnit XML goes to a file, which CI reads; only --json takes -")
    reports = {
        what: Path(path)
        for what, path in (("--json", out["json_path"]), ("--junit", out["junit"]))
        if path is not None and str(path) != "-"
    }
    with bad_input():
        for what, path in reports.items():
            writing.check_output(
                path, inputs=inputs, what=what, force=True, dash_for_stdout=what == "--json"
            )
        targets = {"--plot": out["plot"], **(folders or {})}
        for what, folder in targets.items():
            if folder is not None:
                writing.check_output(folder, inputs=inputs, what=what, folder=True)
    if len(reports) == 2 and os.path.realpath(reports["--json"]) == os.path.realpath(
        reports["--junit"]
    ):
        fail(f"--json and --junit name one file, {reports['--json']}; give two")
    # A report named X.npy (or dw.npy) beside a dump would be read as that array next time.
    folders_read = [Path(p) for p in inputs if Path(p).is_dir()]
    folders_read += [Path(f) for f in (folders or {}).values() if f is not None]
    arrays_names = {f"{n.lower()}.npy" for n in (*INPUT_NAMES, *SUBJECT_NAMES)}
    for what, path in reports.items():
        beside = any(os.path.realpath(path.parent) == os.path.realpath(f) for f in folders_read)
        if beside and path.name.lower() in arrays_names:
            fail(
                f"{what} {path}: would be read as an array of the dump in {path.parent}; "
                "name the report otherwise"
            )
    if out["plot"] is not None and not out.get("force"):
        from .plots import PLOT_NAMES

        existing = writing.matching_files(out["plot"], PLOT_NAMES)
        if existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            fail(
                f"--plot {out['plot']}: already holds plots ({shown}); nothing was written "
                "(use --force to replace them, or another folder)"
            )


def _write_report(path: Path, text: str) -> None:
    """Replace a report file the user named (--json, --junit) atomically."""
    from . import writing

    with bad_input():
        writing.write_text(path, text)


def _finish(
    results, json_text, json_path, junit_path, github, to_stdout, last, skipped=()
) -> NoReturn:
    """Write the JSON and JUnit reports, print GitHub annotations, then the verdict
    (``last``) as the last line, never wrapped; then exit 0, 1 or 2."""
    outcomes = [(r.name, r.report, r.error, r.bad_input) for r in results]
    if json_path is not None:
        if to_stdout:
            typer.echo(json_text, nl=False)
        else:
            _write_report(json_path, json_text)
    if junit_path is not None:
        from .ci import junit_xml

        _write_report(junit_path, junit_xml(outcomes, skipped=skipped))
    console = stderr if to_stdout else stdout
    if github or os.environ.get("GITHUB_ACTIONS") == "true":
        from .ci import github_annotations

        console.file.flush()
        for line in github_annotations(outcomes):
            typer.echo(line, err=to_stdout)
    print_verdict(console, last)
    raise typer.Exit(code=exit_code(results))


def print_verdict(console: Console, line) -> None:
    """The verdict, one line at any width (``tail -1`` of a log is the verdict)."""
    console.print(line, soft_wrap=True, overflow="ignore", crop=False)


def exit_code(results) -> int:
    """0 all passed; 1 a check failed (or a user's function did), even if other cases had
    bad input, so a failure is never hidden behind a 2; 2 only bad input failed."""
    if any(not r.passed and not r.bad_input for r in results):
        return 1
    return 2 if any(r.bad_input for r in results) else 0


def require_plotting(plot: Path | None) -> None:
    """--plot without matplotlib: say how to install it, before any work is done."""
    if plot is not None:
        from .plots import require_matplotlib

        with bad_input():
            require_matplotlib()


def _heatmaps(out: dict) -> str:
    """--heatmap: all; --no-heatmap: none; neither: the failed checks'."""
    return {None: "failed", True: "all", False: "none"}[out.get("heatmap")]


def _plots(out: dict, reports: dict, study=None) -> list:
    """Write --plot's PNG files; a line listing them, to print before the verdict.

    One case: its plots in DIR. Several: the failed cases' plots, a subfolder each
    (a sweep's passing cases have nothing to look at).
    """
    from . import writing

    if out.get("plot") is None:
        return []
    import re

    from rich.text import Text

    from . import plots

    many = len(reports) > 1
    if many:
        reports = {name: r for name, r in reports.items() if not r.passed}
    written = []
    used: set[str] = set()
    for name, report in reports.items():
        slug = re.sub(r"[^\w.=-]+", "_", name)
        while slug in used:  # "a b" and "a_b" must not share a folder
            slug += "_"
        used.add(slug)
        folder = out["plot"] / slug if many else out["plot"]
        with bad_input():
            files = plots.plot_report(report, study)
            written += writing.save_files(folder, files, force=out.get("force", False))
    if not written:
        return [Text("Plots: nothing to plot" + (" (no case failed)" if many else ""))]
    if len(written) > 12:
        where = f"{len(reports)} folders in {out['plot']}, one per failed case" if many else ""
        return [Text(f"Plots: {len(written)} files, {where or out['plot']}")]
    return [Text(f"Plots ({len(written)}):\n" + "\n".join(f"  {p}" for p in written))]


def emit(report, header, name: str, out: dict, context: dict, study=None) -> NoReturn:
    """One report: the tables (or only the verdict), then the reports for CI; exit 0 or 1."""
    from .api import CaseResult
    from .report import render, verdict

    to_stdout = out["json_path"] is not None and str(out["json_path"]) == "-"
    console = stderr if to_stdout else stdout
    maps = _heatmaps(out)
    notes = _plots(out, {name: report}, study)
    if not out["quiet"]:  # --quiet: only the verdict
        console.print(render(report, header, maps, notes, with_verdict=False))
    json_text = report.to_json(**context) if out["json_path"] is not None else ""
    results = [CaseResult(name, report, None)]
    where = (out["json_path"], out["junit"], out["github"], to_stdout)
    _finish(results, json_text, *where, verdict(report))


def emit_many(results, header, out: dict, context: dict, skipped=()) -> NoReturn:
    """Several cases: one summary table, details of the failures, reports for CI; exit.
    ``skipped``: cases of a sweep not checked (``run --cases``), named in every report."""
    from .api import Sweep
    from .report import render_cases, verdict_cases

    to_stdout = out["json_path"] is not None and str(out["json_path"]) == "-"
    console = stderr if to_stdout else stdout
    maps = _heatmaps(out)
    notes = _plots(out, {r.name: r.report for r in results if r.report is not None})
    if not out["quiet"]:  # --quiet: only the verdict
        console.print(render_cases(results, header, maps, notes, skipped, with_verdict=False))
    sweep = Sweep(tuple(results), tuple(skipped))
    json_text = sweep.to_json(**context) if out["json_path"] is not None else ""
    where = (out["json_path"], out["junit"], out["github"], to_stdout)
    _finish(results, json_text, *where, verdict_cases(results, skipped), skipped)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fp:
            for line in fp:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_guard(arrays: Mapping, options: dict, limit_text: str | None, quiet: bool) -> None:
    """Say how much memory a large check needs before starting it; refuse it past the limit."""
    from .checks import memory_needed
    from .errors import InputError
    from .layouts import internal_shapes

    shapes = internal_shapes(
        {n: tuple(a.shape) for n, a in arrays.items()}, options.get("layout", "out_in")
    )
    if any(name not in shapes for name in ("X", "W", "dY")) or len(shapes["W"]) != 2:
        return  # malformed inputs: the check itself says what is wrong
    need = memory_needed(shapes, options["mode"], options["method"], options["budget"])
    limit: int | None
    if limit_text is not None:
        limit, why = parse_size(limit_text), "--max-memory"
    else:
        available = _available_memory()
        limit, why = (available // 2, "half the available memory") if available else (None, "")
    if limit is not None and need > limit:
        raise InputError(
            f"this check needs about {_size(need)} of memory beyond its inputs, over "
            f"{_size(limit)} ({why}); free memory or raise --max-memory"
        )
    if need > 256 * 2**20 and not quiet:
        stderr.print(
            f"lincheck: this check needs about {_size(need)} of memory beyond its inputs",
            highlight=False,
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# Characters lincheck prints, spelled in ASCII for a stream that cannot encode them
# (PYTHONIOENCODING=ascii, a latin-1 terminal); anything else becomes "?".
ASCII_SPELLINGS = {
    "×": "x", "−": "-", "─": "-", "━": "-", "│": "|", "—": "--", "–": "-",
    "≤": "<=", "≥": ">=", "≈": "~", "±": "+-", "→": "->", "…": "...", "·": ".",
    "γ": "g", "Σ": "sum", "θ": "theta", "∂": "d", "ᵀ": "^T", "ₙ": "_n", "⊙": "*",
    "√": "sqrt", "∞": "inf", "²": "^2", "⁻": "^-", "¹": "1", "⁰": "0",
    "░": ":", "▒": "+", "▓": "#", "█": "@",
}  # fmt: skip


def _degrade(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start : error.end]
    return "".join(ASCII_SPELLINGS.get(c, "?") for c in text), error.end


def encodable_streams() -> None:
    """Never crash on a stream that is not UTF-8: spell what it cannot encode in ASCII.

    Rich already draws ASCII boxes for such a stream; this covers the text (×, ≤,
    γ, heatmap blocks) that would otherwise raise UnicodeEncodeError.
    """
    import codecs
    import sys

    codecs.register_error("lincheck-ascii", _degrade)
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            "×─≤γ█".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="lincheck-ascii")


class Interrupted(BaseException):
    """Ctrl-C. Not a KeyboardInterrupt, which Click would turn into "Aborted!" and exit 1."""


def interrupt(signum, frame) -> None:
    import signal

    if os.getpid() != _MAIN_PID:
        return  # a forked worker before it set its own handler: lincheck stops it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup
    raise Interrupted


_MAIN_PID = os.getpid()


def catch_interrupts() -> None:
    """From now on, Ctrl-C in this process raises :class:`Interrupted` (forked workers
    ignore it until they set their own handler; lincheck stops them)."""
    import signal

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGINT, interrupt)


class CaseProgress:
    """Progress of many cases on stderr: done of total, running, failed so far (and with bad
    input, counted apart as the summary counts them), elapsed.

    Only on a terminal and never with --quiet; shown from the start (refreshed several
    times a second) and gone when done, so the summary follows on a clean screen.
    """

    def __init__(self, total: int, done: int = 0, workers: int = 1, enabled: bool = True):
        self.total, self.done, self.workers = total, done, workers
        self.failed = self.bad = 0
        self.bar: Any = None
        if not (enabled and stderr.is_terminal) or total == done:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.bar = Progress(
            "cases",
            BarColumn(),
            MofNCompleteColumn(),
            "{task.fields[status]}",
            TimeElapsedColumn(),
            console=stderr,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task("cases", total=total, completed=done, status=self._status())

    def _status(self) -> str:
        running = min(self.workers, self.total - self.done)
        bad = f", bad input {self.bad}" if self.bad else ""
        return f"running {running}, failed {self.failed}{bad}"

    def update(self, passed: bool, bad_input: bool = False) -> None:
        self.done += 1
        self.bad += bad_input
        self.failed += not passed and not bad_input
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, status=self._status())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def failures_first(results) -> list:
    """Several cases' results for the summary: those that did not pass first, then the rest,
    each by name (the same order however the cases were scheduled)."""
    return sorted(results, key=lambda r: (r.passed, r.name))


def show_interrupted(results, header, out: dict, total: int, where: str | None) -> None:
    """Ctrl-C during many cases: the cases finished so far (a table and the failures'
    errors), and how to go on; nothing if none had finished. :func:`lincheck.cli.main`
    then prints its one line and exits 130."""
    if not results:
        return
    from rich.console import Group
    from rich.text import Text

    from .report import cases_table

    to_stdout = out["json_path"] is not None and str(out["json_path"]) == "-"
    console = stderr if to_stdout else stdout
    parts: list = [header, cases_table(failures_first(results), total)]
    left = f"{len(results)} of {total} cases done"
    if where is not None:
        import shlex

        path = shlex.quote(str(where))  # to paste into a shell as it is
        left += f", kept in {where}: --resume {path} --jsonl {path} goes on"
    console.print(Group(*parts))
    print_verdict(console, Text(f"Interrupted: {left}"))  # one line however narrow
