"""The ``lincheck`` command: parse, call the library, render, choose the exit code.

Exit codes (stable): 0 every check passed; 1 at least one check failed;
2 bad usage or bad input (one line on stderr, nothing written; with several
cases, 2 when every failing case had bad input, and the reports name each);
130 interrupted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import __version__
from .errors import LincheckError

EXIT_CODES = """\
Exit codes: 0 every check passed · 1 a check failed · 2 bad usage or bad input
(with several cases, 1 if any check failed, even where others had bad input) ·
130 interrupted (Ctrl-C).
"""

app = typer.Typer(
    name="lincheck",
    help=(
        "Check the gradients of a fully connected layer Y = X Wᵀ + B, every entry, "
        "against rigorous floating-point error bounds.\n\n"
        "dX = G W,  dW = Gᵀ X,  dB = Σₙ G  with G = dL/dY."
    ),
    epilog=EXIT_CODES + "\nExample: lincheck run --n 32 --din 64 --dout 16",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stdout = Console()
stderr = Console(stderr=True)


class DType(str, Enum):
    float64 = "float64"
    float32 = "float32"
    float16 = "float16"


class PrecisionChoice(str, Enum):
    fp64 = "fp64"
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"
    fp16 = "fp16"


class Method(str, Enum):
    central = "central"
    dense = "dense"
    complex_step = "complex-step"


class Mode(str, Enum):
    auto = "auto"
    full = "full"
    sample = "sample"
    directions = "directions"


class _ProgressBar:
    """A progress bar on stderr for checks that take more than about a second.

    Only on a terminal and never with --quiet. It appears once a check has
    run for a quarter of a second and is projected to take over a second,
    and vanishes when done, so quick checks print nothing extra.
    """

    def __init__(self, enabled: bool):
        import time

        self.enabled = enabled and stderr.is_terminal
        self.clock = time.monotonic
        self.start = self.clock()
        self.bar: Any = None  # a rich.progress.Progress, imported when first shown

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total == 0:
            return
        if self.bar is None:
            elapsed = self.clock() - self.start
            if elapsed < 0.25 or elapsed * total / max(done, 1) < 1.0:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "witness",
                BarColumn(),
                MofNCompleteColumn(),
                "forward passes",
                TimeRemainingColumn(),
                console=stderr,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("witness", total=total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fail(message: str) -> typer.Exit:
    """Print one line on stderr and return the exit to raise (code 2: bad input)."""
    stderr.print(f"lincheck: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"lincheck {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    no_color: Annotated[
        bool,
        typer.Option(
            "--no-color",
            help="Plain text, no colours or styles (as NO_COLOR=1 does); the characters carry "
            "the meaning anyway.",
        ),
    ] = False,
) -> None:
    global stdout, stderr
    if no_color or os.environ.get("NO_COLOR"):
        # No escape codes at all, not only no colours: bold and dim go too.
        stdout, stderr = Console(color_system=None), Console(stderr=True, color_system=None)


JsonOption = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Also write the machine-readable report to this file (replaced if it exists); "
        "'-' writes it to stdout and moves the tables to stderr.",
        metavar="PATH",
    ),
]


def _options(method, mode, samples, directions, seed, budget, atol, rtol) -> dict:
    """The options run and verify share, as keyword arguments of ``checks.check``."""
    return dict(
        method=method.value,
        mode=mode.value,
        samples=samples,
        directions=directions,
        seed=seed,
        budget=budget,
        atol=atol,
        rtol=rtol,
    )


def _outputs(json_path, junit, github, quiet, heatmap, plot, force) -> dict:
    """Where results go and how they look: the output options run and verify share."""
    return dict(
        json_path=json_path,
        junit=junit,
        github=github,
        quiet=quiet,
        heatmap=heatmap,
        plot=plot,
        force=force,
    )


def _check_outputs(out: dict, inputs=(), folders: dict | None = None) -> None:
    """Every output target, before any work: one that lincheck must not write (a device,
    /dev/stdout, an input file, a folder for a file, a missing folder, plots that exist
    without --force, one file for two reports, a report that a dump folder would read as
    an array) is exit 2 with nothing done and nothing written."""
    from . import arrays
    from .tensors import INPUT_NAMES, SUBJECT_NAMES

    reports = {
        what: Path(path)
        for what, path in (("--json", out["json_path"]), ("--junit", out["junit"]))
        if path is not None and str(path) != "-"
    }
    try:
        for what, path in reports.items():
            arrays.check_output(
                path, inputs=inputs, what=what, force=True, dash_for_stdout=what == "--json"
            )
        targets = {"--plot": out["plot"], **(folders or {})}
        for what, folder in targets.items():
            if folder is not None:
                arrays.check_output(folder, inputs=inputs, what=what, folder=True)
    except LincheckError as exc:
        raise _fail(str(exc)) from None
    if len(reports) == 2 and os.path.realpath(reports["--json"]) == os.path.realpath(
        reports["--junit"]
    ):
        raise _fail(f"--json and --junit name one file, {reports['--json']}; give two")
    # A report named X.npy (or dw.npy) beside a dump would be read as that array next time.
    folders_read = [Path(p) for p in inputs if Path(p).is_dir()]
    folders_read += [Path(f) for f in (folders or {}).values() if f is not None]
    arrays_names = {f"{n.lower()}.npy" for n in (*INPUT_NAMES, *SUBJECT_NAMES)}
    for what, path in reports.items():
        beside = any(os.path.realpath(path.parent) == os.path.realpath(f) for f in folders_read)
        if beside and path.name.lower() in arrays_names:
            raise _fail(
                f"{what} {path}: would be read as an array of the dump in {path.parent}; "
                "name the report otherwise"
            )
    if out["plot"] is not None and not out.get("force"):
        from .plots import PLOT_NAMES

        existing = arrays.matching_files(out["plot"], PLOT_NAMES)
        if existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise _fail(
                f"--plot {out['plot']}: already holds plots ({shown}); nothing was written "
                "(use --force to replace them, or another folder)"
            )


def _write_report(path: Path, text: str) -> None:
    """Replace a report file the user named (--json, --junit) atomically."""
    from . import arrays

    try:
        arrays.write_text(path, text)
    except LincheckError as exc:
        raise _fail(str(exc)) from None


def _finish(results, json_text, json_path, junit_path, github, to_stdout) -> None:
    """Write the JSON and JUnit reports, print GitHub annotations; then exit 0, 1 or 2."""
    outcomes = [(r.name, r.report, r.error, r.bad_input) for r in results]
    if json_path is not None:
        if to_stdout:
            typer.echo(json_text, nl=False)
        else:
            _write_report(json_path, json_text)
    if junit_path is not None:
        from .ci import junit_xml

        _write_report(junit_path, junit_xml(outcomes))
    if github or os.environ.get("GITHUB_ACTIONS") == "true":
        from .ci import github_annotations

        for line in github_annotations(outcomes):
            typer.echo(line, err=to_stdout)
    raise typer.Exit(code=exit_code(results))


def exit_code(results) -> int:
    """0 all passed; 1 a check failed (or a user's function did), even if other cases had
    bad input, so a failure is never hidden behind a 2; 2 only bad input failed."""
    if any(not r.passed and not r.bad_input for r in results):
        return 1
    return 2 if any(r.bad_input for r in results) else 0


def _require_plotting(plot: Path | None) -> None:
    """--plot without matplotlib: say how to install it, before any work is done."""
    if plot is not None:
        from .plots import require_matplotlib

        try:
            require_matplotlib()
        except LincheckError as exc:
            raise _fail(str(exc)) from None


def _heatmaps(out: dict) -> str:
    """--heatmap: all; --no-heatmap: none; neither: the failed checks'."""
    return {None: "failed", True: "all", False: "none"}[out.get("heatmap")]


def _plots(out: dict, reports: dict, study=None) -> list:
    """Write --plot's PNG files; a line listing them, to print before the verdict.

    One case: its plots in DIR. Several: the failed cases' plots, a subfolder each
    (a sweep's passing cases have nothing to look at).
    """
    if out.get("plot") is None:
        return []
    import re

    from rich.text import Text

    from . import arrays, plots

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
        try:
            files = plots.plot_report(report, study)
            written += arrays.save_files(folder, files, force=out.get("force", False))
        except LincheckError as exc:
            raise _fail(str(exc)) from None
    if not written:
        return [Text("Plots: nothing to plot" + (" (no case failed)" if many else ""))]
    if len(written) > 12:
        where = f"{len(reports)} folders in {out['plot']}, one per failed case" if many else ""
        return [Text(f"Plots: {len(written)} files, {where or out['plot']}")]
    return [Text(f"Plots ({len(written)}):\n" + "\n".join(f"  {p}" for p in written))]


def _emit(report, header, name: str, out: dict, context: dict, study=None) -> None:
    """One report: the tables (or only the verdict), then the reports for CI; exit 0 or 1."""
    from .api import CaseResult
    from .report import render, verdict

    to_stdout = out["json_path"] is not None and str(out["json_path"]) == "-"
    console = stderr if to_stdout else stdout
    maps = _heatmaps(out)
    notes = _plots(out, {name: report}, study)
    if out["quiet"]:
        for note in [*notes, verdict(report)]:
            console.print(note)
    else:
        console.print(render(report, header, maps, notes))
    json_text = report.to_json(**context) if out["json_path"] is not None else ""
    results = [CaseResult(name, report, None)]
    _finish(results, json_text, out["json_path"], out["junit"], out["github"], to_stdout)


def _emit_many(results, header, out: dict, context: dict) -> None:
    """Several cases: one summary table, details of the failures, reports for CI; exit."""
    from .api import Sweep
    from .report import render_cases, verdict_cases

    to_stdout = out["json_path"] is not None and str(out["json_path"]) == "-"
    console = stderr if to_stdout else stdout
    maps = _heatmaps(out)
    notes = _plots(out, {r.name: r.report for r in results if r.report is not None})
    if out["quiet"]:
        for note in [*notes, verdict_cases(results)]:
            console.print(note)
    else:
        console.print(render_cases(results, header, maps, notes))
    json_text = Sweep(tuple(results)).to_json(**context) if out["json_path"] is not None else ""
    _finish(results, json_text, out["json_path"], out["junit"], out["github"], to_stdout)


SizeN = Annotated[int, typer.Option("--n", min=1, help="Batch size N.")]
SizeIn = Annotated[int, typer.Option("--din", min=1, help="Input features D_in.")]
SizeOut = Annotated[int, typer.Option("--dout", min=1, help="Output features D_out.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Seed of the random arrays.")]
DTypeOption = Annotated[
    DType, typer.Option("--dtype", help="dtype of the arrays and of the analytic computation.")
]
DTypesOption = Annotated[
    list[DType] | None,
    typer.Option(
        "--dtype",
        help="dtype of the arrays and of the computed gradients (repeat for several; "
        "default float64, with --impl float64 and float32).",
        show_default=False,
    ),
]
JunitOption = Annotated[
    Path | None,
    typer.Option(
        "--junit",
        help="Also write a JUnit XML report (one test case per tensor per case) to this file.",
        metavar="PATH",
    ),
]
GithubOption = Annotated[
    bool,
    typer.Option(
        "--github",
        help="Print GitHub Actions error annotations for failures (on by default when "
        "GITHUB_ACTIONS=true).",
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Replace existing files (.npy, plots).")]
MethodOption = Annotated[
    Method,
    typer.Option(
        "--method",
        help="How the numerical witness differentiates: central differences perturbing a "
        "whole column per forward pass; 'dense', one entry at a time (the textbook check, "
        "2 passes per entry); or the complex step Im L(θ + ih)/h (no cancellation; about "
        "twice the cost of central).",
    ),
]
Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        min=0.0,
        help="Override the rounding-error bounds with numpy.allclose's rule "
        "|a − b| ≤ atol + rtol·|b| (the other defaults to 0).",
    ),
]
Rtol = Annotated[float | None, typer.Option("--rtol", min=0.0, help="See --atol.")]
ModeOption = Annotated[
    Mode,
    typer.Option(
        "--mode",
        help="How much of the numerical witness to compute: every entry (full), --samples "
        "random entries of dX and dW (sample), or --directions random ±1 directions "
        "(directions). Your gradients are always compared with the float64 reference at "
        "every entry. auto: full if it fits --budget, else directions (and says why).",
    ),
]
Samples = Annotated[
    int, typer.Option("--samples", min=1, help="Entries per tensor in sample mode.")
]
DirectionsOption = Annotated[
    int,
    typer.Option("--directions", min=1, help="Random directions per tensor in directions mode."),
]
Budget = Annotated[
    float,
    typer.Option(
        "--budget",
        min=0.0,
        help="Seconds of work (at a nominal 5·10¹⁰ multiply-adds/s) that --mode auto allows "
        "a full witness.",
    ),
]


MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Refuse checks that would need more memory than this (like 4G or 512M); "
        "default: half of the memory available when lincheck starts.",
        metavar="SIZE",
        show_default=False,
    ),
]


def _parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '100000' → bytes (binary units)."""
    from .errors import InputError

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise InputError(f"--max-memory {text}: expected a size like 4G, 512M or 1000000")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


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


def _memory_guard(arrays: Mapping, options: dict, limit_text: str | None, quiet: bool) -> None:
    """Say how much memory a large check needs before starting it; refuse it past the limit."""
    from .checks import memory_needed
    from .errors import InputError

    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if any(name not in shapes for name in ("X", "W", "dY")) or len(shapes["W"]) != 2:
        return  # malformed inputs: the check itself says what is wrong
    need = memory_needed(shapes, options["mode"], options["method"], options["budget"])
    limit: int | None
    if limit_text is not None:
        limit, why = _parse_size(limit_text), "--max-memory"
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


def _array_file(name: str):
    """A ``--x FILE``-style option giving one array's ``.npy`` file."""
    return typer.Option(
        f"--{name.lower()}",
        help=f"{name} from this .npy file (with or instead of PATH).",
        metavar="FILE",
        show_default=False,
    )


XFile = Annotated[Path | None, _array_file("X")]
WFile = Annotated[Path | None, _array_file("W")]
BFile = Annotated[Path | None, _array_file("B")]
DYFile = Annotated[Path | None, _array_file("dY")]
DXFile = Annotated[Path | None, _array_file("dX")]
DWFile = Annotated[Path | None, _array_file("dW")]
DBFile = Annotated[Path | None, _array_file("dB")]
YFile = Annotated[Path | None, _array_file("Y")]


Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print only the verdict line; no tables, no progress bar."),
]

PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write PNG plots to DIR: per tensor an error / tolerance heatmap and a "
        "histogram (and for run the witness error against the step); with several cases, "
        "a subfolder per failed case. Needs matplotlib: pip install 'lincheck[plot]'.",
        metavar="DIR",
        show_default=False,
    ),
]

HeatmapOption = Annotated[
    bool | None,
    typer.Option(
        "--heatmap/--no-heatmap",
        help="Draw the error / tolerance map of every tensor (default: of the failed ones).",
        show_default=False,
    ),
]


@app.command(
    short_help="Check a random layer's gradients (or your backward: --impl).",
    help=(
        "Generate a random layer, compute its gradients analytically in --dtype, and check "
        "every entry against a numerical witness from L = Σ G ⊙ Y (float64), within "
        "rounding-error bounds derived for --dtype. With --impl, check your own backward."
    ),
    epilog=EXIT_CODES
    + "\nExample: lincheck run --n 32 --din 64 --dout 16 --dtype float32"
    + "\nExample: lincheck run --impl mypkg.layers:linear_backward --junit report.xml",
)
def run(
    n: SizeN = 32,
    din: SizeIn = 64,
    dout: SizeOut = 16,
    seed: Seed = 0,
    dtype: DTypesOption = None,
    no_bias: Annotated[
        bool, typer.Option("--no-bias", help="A layer without bias (no B, no dB).")
    ] = False,
    impl: Annotated[
        str | None,
        typer.Option(
            "--impl",
            help="Check your backward instead: package.module:function, called as "
            "fn(X, W, B, dY) -> (dX, dW, dB) (B and dB None without bias), on the requested "
            "shape, N=1, D_in=1, D_out=1, swapped sizes, leading batch dimensions and no bias, "
            "in each --dtype.",
            metavar="MODULE:FUNCTION",
        ),
    ] = None,
    forward: Annotated[
        str | None,
        typer.Option(
            "--forward",
            help="Also check your forward, fn(X, W, B) -> Y, against X Wᵀ + B on the same cases.",
            metavar="MODULE:FUNCTION",
        ),
    ] = None,
    json_path: JsonOption = None,
    junit: JunitOption = None,
    github: GithubOption = False,
    method: MethodOption = Method.central,
    mode: ModeOption = Mode.auto,
    samples: Samples = 64,
    directions: DirectionsOption = 16,
    budget: Budget = 10.0,
    atol: Atol = None,
    rtol: Rtol = None,
    quiet: Quiet = False,
    heatmap: HeatmapOption = None,
    plot: PlotOption = None,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Also write the generated arrays to this folder, as 'generate --with-grads' does.",
            metavar="DIR",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0.0,
            help="With --impl/--forward: seconds your functions may take on one case (and to "
            "import) before the case is stopped and failed; 0: no limit.",
            metavar="SECONDS",
        ),
    ] = 60.0,  # worker.DEFAULT_TIMEOUT (not imported: --help imports no NumPy); tested equal
    save_failures: Annotated[
        Path | None,
        typer.Option(
            "--save-failures",
            help="With --impl/--forward: write each failing case to DIR/<case>/ as .npy files "
            "that 'lincheck verify' reproduces.",
            metavar="DIR",
        ),
    ] = None,
    force: Force = False,
) -> None:
    """lincheck run (the help text is in the decorator: one line per paragraph)."""
    import numpy as np

    from . import api, checks

    options = _options(method, mode, samples, directions, seed, budget, atol, rtol)
    _require_plotting(plot)
    out = _outputs(json_path, junit, github, quiet, heatmap, plot, force)
    _check_outputs(out, folders={"--save": save, "--save-failures": save_failures})
    if impl or forward:
        from .worker import Worker

        dtypes = [d.value for d in dtype] if dtype else ["float64", "float32"]
        cases = api.sweep(n, din, dout, dtypes, seed)
        if no_bias:
            cases = [c for c in cases if not c.bias]
        if save_failures is not None and not force:
            from . import arrays
            from .tensors import INPUT_NAMES, SUBJECT_NAMES

            taken = [save_failures / c.slug for c in cases]
            taken = [p for p in taken if arrays.existing_targets(p, [*INPUT_NAMES, *SUBJECT_NAMES])]
            if taken:
                raise _fail(
                    f"--save-failures {save_failures}: already holds saved cases "
                    f"({', '.join(str(p) for p in taken[:2])}{', ...' if len(taken) > 2 else ''}); "
                    "nothing was written (use --force to replace them, or another folder)"
                )
        # Your functions run in a worker process: nothing they do can end, hang or
        # garble this one (lincheck/worker.py).
        try:
            with Worker(impl, forward, timeout or None) as worker:
                results = [api.run_case(case, None, worker=worker, **options) for case in cases]
        except LincheckError as exc:
            raise _fail(str(exc)) from None
        if save_failures is not None:
            _save_failures(save_failures, results, force)
        what = " and ".join(x for x in (impl, forward) if x)
        header = (
            f"[bold]lincheck run[/] {what}: {len(cases)} cases "
            f"({', '.join(dtypes)}; N={n} D_in={din} D_out={dout} and edges), seed {seed}"
        )
        context = {"command": "run", "impl": impl, "forward": forward, "seed": seed}
        _emit_many(results, header, out, context)
    if save_failures is not None:
        raise _fail("--save-failures needs --impl or --forward")
    dtypes = [d.value for d in dtype] if dtype else ["float64"]
    if save is not None and len(dtypes) > 1:
        raise _fail("--save takes a single --dtype")
    results = []
    for value in dtypes:
        data = checks.random_inputs(np.random.default_rng(seed), n, din, dout, value, not no_bias)
        grads = checks.analytic_gradients(data)
        if save is not None:
            from . import arrays  # only the file layer touches files; import it only to write

            try:
                arrays.save(save, {**data, **grads}, force=force)
            except LincheckError as exc:
                raise _fail(str(exc)) from None
        bar = _ProgressBar(not quiet)
        try:
            report = checks.check(
                *(data.get(k) for k in ("X", "W", "B", "dY")),
                **grads,
                against="witness",
                subject="analytic",
                **options,
                progress=bar,
            )
        finally:
            bar.close()
        results.append(api.CaseResult(f"{value} N={n} D_in={din} D_out={dout}", report, None))
    bias = "without bias" if no_bias else "with bias"
    header = (
        f"[bold]lincheck run[/]  N={n} D_in={din} D_out={dout}, {', '.join(dtypes)}, {bias}, "
        f"seed {seed}\n"
        f"[dim]reproduce: lincheck run --n {n} --din {din} --dout {dout} --seed {seed} "
        + " ".join(f"--dtype {d}" for d in dtypes)
        + f"{' --no-bias' if no_bias else ''}[/]"
    )
    if len(results) == 1:
        context = {"command": "run", "seed": seed, "dtype": dtypes[0]}
        study = None
        if plot is not None:
            from . import witness, workspace

            layer = workspace.Workspace(*(data.get(k) for k in ("X", "W", "B", "dY")))
            study = witness.step_study(layer)
        _emit(results[0].report, header, results[0].name, out, context, study)
    _emit_many(results, header, out, {"command": "run", "seed": seed, "dtypes": dtypes})


def _save_failures(folder: Path, results, force: bool) -> None:
    """Write each failing case's inputs and the user's outputs to folder/<case>/."""
    from . import arrays

    for result in results:
        if result.passed:
            continue
        try:
            arrays.save(folder / result.case.slug, dict(result.arrays), force=force)
        except LincheckError as exc:
            raise _fail(str(exc)) from None


@app.command(
    short_help="Check gradients your code saved (.npy folder or .npz).",
    help=(
        "Check gradients your code produced (dX, dW, dB, Y) against the float64 analytic "
        "reference, which is itself checked against a numerical witness; with no gradients "
        "given, check the analytic formulas on your X, W, B, dY. Each entry's tolerance is "
        "derived from the arithmetic (--precision), not set by hand. Several cases (one per "
        "layer of a model, say) are checked in parallel and summarized in one table."
    ),
    epilog=EXIT_CODES
    + "\nExample: lincheck verify dump/ --json report.json"
    + "   (dump/ holds X.npy W.npy B.npy dY.npy dW.npy …)"
    + "\nExample: lincheck verify model_dump/ --junit report.xml   (one folder per layer)",
)
def verify(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Folders of .npy files or .npz files, one case each; a folder that holds "
            "only case folders (or .npz files) stands for all of them. Names "
            "(case-insensitive): X, W, dY required; B optional; dX, dW, dB, Y are the "
            "gradients (and forward output) to check.",
            show_default=False,
            metavar="PATH...",
        ),
    ] = None,
    x: XFile = None,
    w: WFile = None,
    b: BFile = None,
    dy: DYFile = None,
    dx: DXFile = None,
    dw: DWFile = None,
    db: DBFile = None,
    y: YFile = None,
    json_path: JsonOption = None,
    junit: JunitOption = None,
    github: GithubOption = False,
    precision: Annotated[
        PrecisionChoice | None,
        typer.Option(
            "--precision",
            help="The arithmetic your gradients were computed in; sets their error bounds. "
            "Default: from each file's dtype (float64 → fp64, float32 → fp32, "
            "float16 → fp16). tf32: fp32 operands cut to 10-bit significands, fp32 sums; "
            "bf16: bfloat16 operands and result, fp32 sums.",
            show_default=False,
        ),
    ] = None,
    method: MethodOption = Method.central,
    mode: ModeOption = Mode.auto,
    samples: Samples = 64,
    directions: DirectionsOption = 16,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Seed of the sample or directions.")
    ] = 0,
    budget: Budget = 10.0,
    atol: Atol = None,
    rtol: Rtol = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also list the files that were ignored.")
    ] = False,
    max_memory: MaxMemory = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Worker processes for several cases (default: the number of cores).",
            show_default=False,
        ),
    ] = None,
    quiet: Quiet = False,
    heatmap: HeatmapOption = None,
    plot: PlotOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing plot files.")] = False,
) -> None:
    """lincheck verify (the help text is in the decorator)."""
    from . import arrays

    options = dict(
        precision=None if precision is None else precision.value,
        **_options(method, mode, samples, directions, seed, budget, atol, rtol),
    )
    out = _outputs(json_path, junit, github, quiet, heatmap, plot, force)
    out.update(verbose=verbose, max_memory=max_memory)
    _require_plotting(plot)
    given = {"X": x, "W": w, "B": b, "dY": dy, "dX": dx, "dW": dw, "dB": db, "Y": y}
    files = {name: file for name, file in given.items() if file is not None}
    paths = paths or []
    if not paths and not files:
        raise _fail("give a PATH (a folder or .npz) or the arrays' files (--x, --w, --dy, ...)")
    _check_outputs(out, inputs=[*paths, *files.values()])
    cases = [case for path in paths for case in arrays.cases(path)]
    if files and len(cases) > 1:
        raise _fail("--x, --w, --dy and the like add to one case; got several PATHs")
    if len(cases) <= 1:
        _verify_one_path(cases[0] if cases else None, options, out, files)
    workers = min(jobs or os.cpu_count() or 1, len(cases))
    if workers > 1:
        results = _verify_in_parallel(cases, options, max_memory, workers)
    else:
        results = [_verify_case(case, options, max_memory) for case in cases]
    header = f"[bold]lincheck verify[/] {len(cases)} cases"
    _emit_many(results, header, out, {"command": "verify", "paths": [str(p) for p in cases]})


def _check_dump(path, files, options, max_memory, quiet, progress=None):
    """Load one dump (a folder, an .npz, and/or single files) and check it: (loaded, report)."""
    from . import arrays, checks, tensors

    loaded = arrays.load(path, files)
    a = loaded.arrays
    _memory_guard(a, options, max_memory, quiet)
    report = checks.check(
        a["X"],
        a["W"],
        a.get("B"),
        a["dY"],
        **{name: a[name] for name in tensors.SUBJECT_NAMES if name in a},
        **options,
        sources=loaded.sources,
        progress=progress,
    )
    return loaded, report


def _verify_case(path: Path, options: dict, max_memory: str | None = None):
    """Check one dump (in a worker process): its result, or the bad input that stopped it."""
    from . import api

    try:
        _, report = _check_dump(path, None, options, max_memory, quiet=True)
    except LincheckError as exc:
        return api.CaseResult(str(path), None, str(exc), bad_input=True)
    return api.CaseResult(str(path), report, None)


def _verify_in_parallel(cases: list[Path], options: dict, max_memory, workers: int) -> list:
    """Check cases in ``workers`` processes; a worker that dies fails the cases it leaves.

    Ctrl-C is lincheck's alone (the workers ignore it): :func:`main` stops them all.
    """
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from . import api

    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_interrupts)
    try:
        futures = [pool.submit(_verify_case, case, options, max_memory) for case in cases]
        results = []
        for case, future in zip(cases, futures):
            try:
                results.append(future.result())
            except BrokenProcessPool:
                error = "its worker process died (killed by a signal, or out of memory)"
                results.append(api.CaseResult(str(case), None, error))
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown()
    return results


def _ignore_interrupts() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool) -> None:
    """Kill a process pool's workers now, not after their current case (about a minute)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # public in 3.14 only
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=1)


def _verify_one_path(path: Path | None, options: dict, out: dict, files: dict) -> None:
    """One dump (a folder, an .npz, and/or single files): its full tables."""
    from . import tensors

    bar = _ProgressBar(not out["quiet"])
    try:
        loaded, report = _check_dump(path, files, options, out["max_memory"], out["quiet"], bar)
        a = loaded.arrays
    except LincheckError as exc:
        raise _fail(str(exc)) from None
    finally:
        bar.close()
    from rich.columns import Columns
    from rich.console import Group, RenderableType
    from rich.text import Text

    layer = report.layer
    name = str(path) if path is not None else "files"
    title = Text.assemble(
        ("lincheck verify", "bold"),
        f" {name}  N={layer.N} D_in={layer.D_in} D_out={layer.D_out}, "
        f"{'with' if layer.bias else 'without'} bias",
    )
    # One item per array, laid out in columns: a narrow terminal wraps between arrays.
    order = [*tensors.INPUT_NAMES, *tensors.SUBJECT_NAMES]
    shapes = [Text(f"{n} {tuple(a[n].shape)} {a[n].dtype}", style="dim") for n in order if n in a]
    parts: list[RenderableType] = [title, Columns(shapes, padding=(0, 2))]
    if out["verbose"] and loaded.ignored:
        parts.append(Text(f"ignored: {', '.join(loaded.ignored)}", style="dim"))
    context = {"command": "verify", "path": name, "sources": dict(loaded.sources)}
    _emit(report, Group(*parts), name, out, context)


@app.command(
    short_help="Write random inputs (and gradients) as .npy files.",
    help=(
        "Write seeded random X.npy, W.npy, B.npy, dY.npy (the inputs of 'verify'), and with "
        "--with-grads dX.npy, dW.npy, dB.npy. Each file is written atomically; an existing "
        "file is never replaced without --force."
    ),
    epilog=EXIT_CODES + "\nExample: lincheck generate case/ --n 8 --din 4 --dout 3 --with-grads",
)
def generate(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Folder to write into (created if needed).", show_default=False, metavar="DIR"
        ),
    ],
    n: SizeN = 32,
    din: SizeIn = 64,
    dout: SizeOut = 16,
    seed: Seed = 0,
    dtype: DTypeOption = DType.float64,
    no_bias: Annotated[bool, typer.Option("--no-bias", help="Write no B (and no dB).")] = False,
    with_grads: Annotated[
        bool, typer.Option("--with-grads", help="Also write dX, dW, dB computed in --dtype.")
    ] = False,
    force: Force = False,
) -> None:
    """lincheck generate (the help text is in the decorator)."""
    import numpy as np

    from . import arrays, checks

    data = checks.random_inputs(np.random.default_rng(seed), n, din, dout, dtype.value, not no_bias)
    if with_grads:
        data.update(checks.analytic_gradients(data))
    try:
        written = arrays.save(directory, data, force=force)
    except LincheckError as exc:
        raise _fail(str(exc)) from None
    stdout.print(f"wrote {', '.join(p.name for p in written)} to {directory}", highlight=False)


class Language(str, Enum):
    en = "en"
    zh = "zh"


@app.command(
    short_help="Show the derivation with your shapes, and what each check costs.",
    help=(
        "The forward and backward formulas of the layer with your shapes substituted, the "
        "surrogate loss behind the numerical witness, what each check does and costs at "
        "these sizes, and the error bounds: the original derivation, corrected. Shapes come "
        "from --n/--din/--dout or from a dump PATH (as for verify)."
    ),
    epilog="Example: lincheck explain --n 128 --din 512 --dout 256 --lang zh"
    + "\nExample: lincheck explain dump/",
)
def explain(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A dump (folder of .npy files or .npz) whose shapes and dtypes to use.",
            show_default=False,
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Batch size N.")] = 32,
    din: Annotated[int, typer.Option("--din", min=1, help="Input features D_in.")] = 64,
    dout: Annotated[int, typer.Option("--dout", min=1, help="Output features D_out.")] = 16,
    precision: Annotated[
        PrecisionChoice | None,
        typer.Option("--precision", help="The arithmetic to state bounds for.", show_default=False),
    ] = None,
    no_bias: Annotated[bool, typer.Option("--no-bias", help="A layer without bias.")] = False,
    lang: Annotated[
        Language, typer.Option("--lang", help="en, or zh: the derivation's own language.")
    ] = Language.en,
) -> None:
    """lincheck explain (the help text is in the decorator)."""
    from .explain import Sizes
    from .report import explain_page

    chosen = None if precision is None else precision.value
    if path is not None:
        from . import arrays, validate
        from .precision import precision_for

        try:
            loaded = arrays.load(path)
            a = loaded.arrays
            layer = validate.layer_of(a["X"], a["W"], a.get("B"), a["dY"], loaded.sources)
        except LincheckError as exc:
            raise _fail(str(exc)) from None
        n, din, dout, bias = layer.N, layer.D_in, layer.D_out, layer.bias
        subjects = [a[name] for name in ("dX", "dW", "dB") if name in a]
        chosen = chosen or precision_for((subjects or [a["X"]])[0].dtype).name
    else:
        bias = not no_bias
    sizes = Sizes(N=n, D_in=din, D_out=dout, bias=bias, precision=chosen or "fp64")
    stdout.print(explain_page(sizes, lang.value))


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


def _encodable_streams() -> None:
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


class _Interrupted(BaseException):
    """Ctrl-C. Not a KeyboardInterrupt, which Click would turn into "Aborted!" and exit 1."""


def _interrupt(signum, frame) -> None:
    import signal

    if os.getpid() != _MAIN_PID:
        return  # a forked worker before it set its own handler: lincheck stops it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup
    raise _Interrupted


_MAIN_PID = os.getpid()


def main() -> None:
    """The ``lincheck`` command. Ctrl-C stops every worker, prints one line, exits 130; the
    reports are written only at the end (atomically), so none is left half-written."""
    import signal
    import sys

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    _encodable_streams()
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app(prog_name="lincheck")  # the same name (in help, for completion) under python -m
    except _Interrupted:
        stderr.print("lincheck: interrupted", highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every worker is already stopped and no report is due: exit now, without the
        # interpreter's exit handlers, which would wait on a process pool whose worker was
        # killed halfway through sending a result (a hang).
        os._exit(130)
