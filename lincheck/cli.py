"""The ``lincheck`` command: parse, call the library, render, choose the exit code.

Exit codes (stable): 0 every check passed; 1 at least one check failed;
2 bad usage or bad input (one line on stderr, nothing written; with several
cases, 2 when every failing case had bad input, and the reports name each);
130 interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.core import TyperGroup

from . import __version__, output
from .options import (
    EXIT_CODES,
    LAYER,
    MANY,
    METHOD,
    MORE_HELP,
    OUTPUT,
    PRINT_EXIT_CODES,
    WRITE_EXIT_CODES,
    YOURS,
    Atol,
    BFile,
    Budget,
    CertainOnly,
    DBFile,
    DeviceOption,
    DirectionsOption,
    DType,
    DTypeOption,
    DTypesOption,
    DWFile,
    DXFile,
    DYFile,
    Force,
    FormatOption,
    FrameworkOption,
    GithubOption,
    HeatmapOption,
    JsonlOption,
    JsonOption,
    JunitOption,
    Language,
    Layout,
    LayoutOption,
    MaxMemory,
    Method,
    MethodOption,
    Mode,
    ModeOption,
    NoColor,
    PlotOption,
    PrecisionOption,
    Quiet,
    ResumeOption,
    Rtol,
    Samples,
    SaveFormat,
    SchedulerOption,
    Seed,
    SizeIn,
    SizeN,
    SizeOut,
    WFile,
    XFile,
    YFile,
    check_options,
    output_options,
)
from .output import (
    ProgressBar,
    bad_input,
    check_outputs,
    emit,
    emit_many,
    fail,
    memory_guard,
    require_plotting,
)


class _Commands(TyperGroup):
    """lincheck's commands, with usage errors as one line on stderr (exit 2), not a box."""

    def main(  # type: ignore[override]
        self,
        args=None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra,
    ):
        import sys

        from typer._click import exceptions as click_errors

        call = (args, prog_name, complete_var)
        if not standalone_mode:
            return super().main(*call, standalone_mode=False, **extra)
        with output.trimmed_streams():
            try:
                code = super().main(*call, standalone_mode=False, **extra)
            except click_errors.NoArgsIsHelpError as exc:  # bare `lincheck`: the help, exit 2
                output.stdout.print(exc.ctx.get_help(), markup=False, highlight=False)
                sys.exit(2)
            except click_errors.ClickException as exc:
                sys.exit(output.usage_error(exc))
            except typer.Abort:
                output.stderr.print("lincheck: aborted", highlight=False)
                sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="lincheck",
    cls=_Commands,
    help=(
        "Check the gradients of a fully connected layer Y = X Wᵀ + B, every entry, "
        "against rigorous floating-point error bounds.\n\n"
        "dX = G W,  dW = Gᵀ X,  dB = Σₙ G  with G = dL/dY."
    ),
    epilog=EXIT_CODES + "\nExample: lincheck run --n 32 --din 64 --dout 16\n" + MORE_HELP,
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        output.stdout.print(f"lincheck {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    no_color: Annotated[
        bool,
        typer.Option("--no-color", help="Plain text: no colours or styles (as NO_COLOR=1 does)."),
    ] = False,
) -> None:
    if no_color or os.environ.get("NO_COLOR"):
        output.plain_consoles()


@app.command(
    short_help="Check a random layer's gradients (or your backward: --impl).",
    help=(
        "Generate a random layer, compute its gradients in --dtype, and check every entry "
        "against a float64 numerical witness, within rounding-error bounds derived for "
        "--dtype. With --impl, check your own backward on a sweep of shapes."
    ),
    epilog=EXIT_CODES
    + "\nExample: lincheck run --n 32 --din 64 --dout 16 --dtype float32"
    + "\nExample: lincheck run --impl mypkg.layers:linear_backward --junit report.xml\n"
    + MORE_HELP,
)
def run(
    n: SizeN = 32,
    din: SizeIn = 64,
    dout: SizeOut = 16,
    seed: Seed = 0,
    dtype: DTypesOption = None,
    no_bias: Annotated[
        bool,
        typer.Option(
            "--no-bias", help="A layer without bias (no B, no dB).", rich_help_panel=LAYER
        ),
    ] = False,
    impl: Annotated[
        str | None,
        typer.Option(
            "--impl",
            help="Check yours instead: a backward fn(X, W, B, dY) -> (dX, dW, dB), a torch "
            "or JAX forward, an autograd.Function or an nn.Module class.",
            metavar="MODULE:OBJECT",
            rich_help_panel=YOURS,
        ),
    ] = None,
    forward: Annotated[
        str | None,
        typer.Option(
            "--forward",
            help="Also check your forward fn(X, W, B) -> Y.",
            metavar="MODULE:FUNCTION",
            rich_help_panel=YOURS,
        ),
    ] = None,
    layout: LayoutOption = Layout.out_in,
    precision: PrecisionOption = None,
    cases: Annotated[
        list[str] | None,
        typer.Option(
            "--cases",
            help="Only these cases of the sweep (--cases=-NAME: all but one; list: print them). "
            "Repeatable.",
            metavar="NAME[,NAME...]",
            show_default=False,
            rich_help_panel=YOURS,
        ),
    ] = None,
    json_path: JsonOption = None,
    junit: JunitOption = None,
    github: GithubOption = False,
    method: MethodOption = Method.central,
    mode: ModeOption = Mode.auto,
    samples: Samples = 64,
    directions: DirectionsOption = 40,
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
            help="Also write the arrays, as generate --with-grads does.",
            metavar="DIR",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0.0,
            help="Seconds your functions may take on one case (0: no limit).",
            metavar="SECONDS",
            rich_help_panel=YOURS,
        ),
    ] = 60.0,  # worker.DEFAULT_TIMEOUT (not imported: --help imports no NumPy); tested equal
    save_failures: Annotated[
        Path | None,
        typer.Option(
            "--save-failures",
            help="Write each failing case to DIR, for lincheck verify.",
            metavar="DIR",
            rich_help_panel=YOURS,
        ),
    ] = None,
    save_format: FormatOption = SaveFormat.npy,
    force: Force = False,
    framework: FrameworkOption = None,
    device: DeviceOption = "cpu",
    no_color: NoColor = False,
) -> None:
    """lincheck run (the help text is in the decorator: one line per paragraph)."""
    chosen = ",".join(cases) if cases else None  # --cases a --cases b is --cases a,b
    if chosen == "list":
        _list_cases((n, din, dout))
    kinds = _chosen_cases(chosen, impl or forward)
    options = check_options(method, mode, samples, directions, seed, budget, atol, rtol)
    if precision is not None:
        if not (impl or forward):
            fail(
                "--precision needs --impl or --forward: lincheck's own gradients are "
                "computed in --dtype, and held to its arithmetic"
            )
        options["precision"] = precision  # your functions' arithmetic, not the dtype's
    require_plotting(plot)
    out = output_options(json_path, junit, github, quiet, heatmap, plot, force)
    out["format"] = save_format.value
    save_file = save if save_format is SaveFormat.safetensors else None  # one file, not a folder
    check_outputs(
        out, folders={"--save": None if save_file else save, "--save-failures": save_failures}
    )
    if save_file is not None:
        _check_case_file(save_file, force)
    sizes = (n, din, dout)
    dtypes = [d.value for d in dtype] if dtype else None
    narrow = [d for d in dtypes or () if d.startswith(("bfloat16", "float8"))]
    if narrow and save_format is SaveFormat.npy and (save or save_failures):
        option = "--save" if save else "--save-failures"
        fail(f"{option}: .npy cannot carry {narrow[0]} arrays; add --format safetensors")
    if impl or forward:
        if save is not None:
            fail(
                "--save writes the random layer of a plain run; with --impl or --forward, "
                "--save-failures DIR writes the cases your functions failed"
            )
        where = (None if framework is None else framework.value, device)
        yours = (impl, forward, layout.value, kinds, where)
        _run_yours(yours, sizes, dtypes, seed, no_bias, timeout, save_failures, options, out)
    if save_failures is not None:
        fail("--save-failures needs --impl or --forward")
    if framework is not None or device != "cpu":
        fail("--framework and --device need --impl")
    if any(d.startswith("float8") for d in dtypes or ()):
        fail(
            "--dtype float8_*: lincheck computes no fp8 gradients of its own (frameworks "
            "return fp8 matmuls' results in bfloat16 or float32); check yours with --impl"
        )
    _run_random(sizes, dtypes or ["float64"], seed, no_bias, save, options, out, layout.value)


def _list_cases(sizes) -> NoReturn:
    """run --cases list: each case's name, its shape at these sizes, and what it tests."""
    from . import api

    n, din, dout = sizes
    lines = ["The cases of a sweep (run --impl/--forward --cases NAME[,NAME...]):"]
    for case in api.sweep(n, din, dout, ["float64"]):
        shape = case.name.removeprefix("float64 ")
        lines.append(f"  {case.kind:<8} {shape}: {api.CASES[case.kind]}")
    lines.append("Each in every --dtype. --cases=-NAME checks all but NAME.")
    for line in lines:
        output.stdout.print(line, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(0)


def _chosen_cases(cases: str | None, yours) -> tuple[str, ...] | None:
    """--cases as the kinds of case to check (bad usage, one line, for an unknown name)."""
    if cases is None:
        return None
    if not yours:
        fail("--cases needs --impl or --forward (a plain run checks one random layer)")
    from .api import select_cases

    try:
        return select_cases(cases)
    except ValueError as exc:
        fail(f"--cases {cases}: {exc}")


def _run_yours(
    yours, sizes, dtypes, seed, no_bias, timeout, save_failures, options, out
) -> NoReturn:
    """run --impl/--forward: the user's functions on a sweep of cases, in a worker process."""
    from . import api, layouts
    from .worker import Worker

    impl, forward, layout, kinds, where = yours
    n, din, dout = sizes
    dtypes = dtypes or ["float64", "float32"]
    cases, skipped = api.split_sweep(n, din, dout, dtypes, seed, kinds, layout)
    if no_bias:  # the cases with a bias are left out, and reported as skipped
        skipped = tuple(sorted((*skipped, *(c for c in cases if c.bias)), key=_sweep_order))
        cases = [c for c in cases if not c.bias]
    if save_failures is not None and not out["force"]:
        _refuse_saved_cases(save_failures, cases, out["format"])
    # Your functions run in a worker process: nothing they do can end, hang or
    # garble this one (lincheck/worker.py).
    with bad_input(), layouts.command_line_advice():
        framework, device = where
        with Worker(impl, forward, timeout or None, (), framework, device, layout) as worker:
            results = [api.run_case(case, None, worker=worker, **options) for case in cases]
    if save_failures is not None:
        _save_failures(save_failures, results, out["force"], out["format"])
    what = " and ".join(x for x in (impl, forward) if x)
    header = (
        f"[bold]lincheck run[/] {what}: {len(cases)} cases "
        f"({', '.join(dtypes)}; N={n} D_in={din} D_out={dout} and edges), seed {seed}"
        + (f", W as {layouts.W_AXES[layout]}" if layout != "out_in" else "")
    )
    context = {"command": "run", "impl": impl, "forward": forward, "seed": seed}
    emit_many(results, header, out, {**context, "layout": layout}, skipped)


def _sweep_order(case) -> int:
    return case.seed  # cases are seeded in sweep order


def _refuse_saved_cases(folder: Path, cases, save_format: str = "npy") -> None:
    """--save-failures without --force into a folder that holds cases of this sweep: exit 2
    before any work (saving them after the checks would fail and hide the verdict)."""
    from . import writing
    from .tensors import INPUT_NAMES, SUBJECT_NAMES

    names = [*INPUT_NAMES, *SUBJECT_NAMES]
    if save_format == "safetensors":
        files = [writing.case_path(folder / c.slug, save_format) for c in cases]
        taken = [p for p in files if os.path.lexists(p)]
    else:
        taken = [folder / c.slug for c in cases if writing.existing_targets(folder / c.slug, names)]
    if taken:
        more = ", ..." if len(taken) > 2 else ""
        fail(
            f"--save-failures {folder}: already holds saved cases "
            f"({', '.join(str(p) for p in taken[:2])}{more}); "
            "nothing was written (use --force to replace them, or another folder)"
        )


def _run_random(sizes, dtypes, seed, no_bias, save, options, out, layout="out_in") -> NoReturn:
    """run: a seeded random layer per dtype, its analytic gradients against the witness
    (W and dW shown, and saved, as ``layout`` stores them)."""
    import numpy as np

    from . import api, checks, layouts, writing

    n, din, dout = sizes
    if save is not None and len(dtypes) > 1:
        fail("--save takes a single --dtype")
    results = []
    for value in dtypes:
        data = checks.random_inputs(np.random.default_rng(seed), n, din, dout, value, not no_bias)
        grads = checks.analytic_gradients(data)
        given = layouts.stored({**data, **grads}, layout)
        if save is not None:
            with bad_input():
                writing.save_case(save, given, format=out["format"], force=out["force"])
        bar = ProgressBar(not out["quiet"], f"N={n} D_in={din} D_out={dout}, {value}")
        bar.expect(checks.nominal_seconds(n, din, dout, **checks.cost_options(options)))
        try:
            report = checks.check(
                *(given.get(k) for k in ("X", "W", "B", "dY")),
                **{k: given[k] for k in grads},
                layout=layout,
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
        + f"{' --no-bias' if no_bias else ''}"
        + (f" --layout {layout}" if layout != "out_in" else "")
        + "[/]"
    )
    if len(results) == 1:
        context = {"command": "run", "seed": seed, "dtype": dtypes[0], "layout": layout}
        study = None
        if out["plot"] is not None:
            from . import witness, workspace

            layer = workspace.Workspace(*(data.get(k) for k in ("X", "W", "B", "dY")))
            study = witness.step_study(layer)
        emit(results[0].report, header, results[0].name, out, context, study)
    emit_many(results, header, out, {"command": "run", "seed": seed, "dtypes": dtypes})


def _save_failures(folder: Path, results, force: bool, save_format: str = "npy") -> None:
    """Write each failing case's inputs and the user's outputs to folder/<case>/ (or
    folder/<case>.safetensors); a case the user's function does not take has no outputs
    to reproduce."""
    from . import writing

    for result in results:
        if result.passed or result.unsupported:
            continue
        metadata = None
        report = result.report
        held_to = (
            {c.precision for c in report.checks if c.subject == "supplied"} if report else set()
        )
        if save_format == "safetensors" and len(held_to) == 1:
            # The arithmetic the case was held to (autocast's, say), for verify to use again.
            metadata = {"lincheck.precision": held_to.pop()}
        with bad_input():
            writing.save_case(
                folder / result.case.slug,
                dict(result.arrays),
                format=save_format,
                force=force,
                metadata=metadata,
            )


def _check_case_file(save: Path, force: bool) -> None:
    """--save FILE --format safetensors: refused before any work if it cannot be written."""
    from . import writing

    with bad_input():
        writing.check_output(writing.case_path(save, "safetensors"), what="--save", force=force)


@app.command(
    short_help="Check gradients your code saved (.npy folder, .npz or .safetensors).",
    help=(
        "Check gradients your code produced (dX, dW, dB, Y) against the float64 analytic "
        "reference, itself checked against a numerical witness; with no gradients given, "
        "check the formulas on your X, W, B, dY. Each entry's tolerance is derived from the "
        "arithmetic (--precision). Several cases are checked in parallel, in one table."
    ),
    epilog=EXIT_CODES
    + "\nExample: lincheck verify dump/ --json report.json"
    + "\nExample: lincheck verify model_dump/ --junit report.xml   (a case per layer)\n"
    + MORE_HELP,
)
def verify(
    paths: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders of .npy files, .npz or .safetensors files, one case each (a "
            "folder of cases: all of them). X, W, dY required; B, and dX, dW, dB, Y to "
            "check, optional.",
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
    precision: PrecisionOption = None,
    certain_only: CertainOnly = False,
    layout: LayoutOption = Layout.out_in,
    method: MethodOption = Method.central,
    mode: ModeOption = Mode.auto,
    samples: Samples = 64,
    directions: DirectionsOption = 40,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            help="Seed of the sample or directions.",
            metavar="N",
            rich_help_panel=METHOD,
        ),
    ] = 0,
    budget: Budget = 10.0,
    atol: Atol = None,
    rtol: Rtol = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also list the files that were ignored.", rich_help_panel=OUTPUT
        ),
    ] = False,
    max_memory: MaxMemory = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Worker processes for several cases (default: one per core, or none when the "
            "cases are too little work to pay for starting them).",
            show_default=False,
            metavar="N",
            rich_help_panel=MANY,
        ),
    ] = None,
    quiet: Quiet = False,
    heatmap: HeatmapOption = None,
    plot: PlotOption = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace existing plot files (and a --jsonl file).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    jsonl: JsonlOption = None,
    resume: ResumeOption = None,
    scheduler: SchedulerOption = "local",
    no_color: NoColor = False,
) -> None:
    """lincheck verify (the help text is in the decorator)."""
    from . import arrays

    options = dict(
        precision=precision,
        certain_only=certain_only,
        layout=layout.value,
        **check_options(method, mode, samples, directions, seed, budget, atol, rtol),
    )
    out = output_options(json_path, junit, github, quiet, heatmap, plot, force)
    out.update(verbose=verbose, max_memory=max_memory)
    require_plotting(plot)
    given = {"X": x, "W": w, "B": b, "dY": dy, "dX": dx, "dW": dw, "dB": db, "Y": y}
    files = {name: file for name, file in given.items() if file is not None}
    paths = paths or []
    if not paths and not files:
        fail("give a PATH (a folder or .npz) or the arrays' files (--x, --w, --dy, ...)")
    check_outputs(out, inputs=[*paths, *files.values()])
    for path in paths:  # a PATH mistyped, or no case: said at once, before any case runs
        if not arrays.is_url(path) and not os.path.lexists(path):
            fail(f"{path}: no such file or folder")
        problem = arrays.not_a_case(path)
        if problem is not None:
            fail(problem)
    cases = [case for path in paths for case in arrays.cases(path)]
    if files and len(cases) > 1:
        fail("--x, --w, --dy and the like add to one case; got several PATHs")
    many = (jsonl, resume, scheduler != "local")
    if files and any(many):
        fail("--jsonl, --resume and --scheduler take case PATHs, not --x, --w, --dy and the like")
    if len(cases) <= 1 and not any(many):
        _verify_one_path(cases[0] if cases else None, options, out, files)
    _verify_many(cases, options, out, (jobs, scheduler), (jsonl, resume))


def _verify_many(cases: list, options: dict, out: dict, where, journal) -> NoReturn:
    """Several cases (lincheck/batch.py): largest first, each case's JSON line written as it
    finishes, progress on the terminal, then one summary, failures first."""
    from . import batch

    jobs, scheduler = where
    jsonl, resume = journal
    appending = jsonl is not None and resume is not None and _same_file(jsonl, resume)
    # --resume F --jsonl F before F exists (a first run of a script that always resumes)
    first = appending and not os.path.lexists(resume)
    records = [] if first else _resumed_records(resume)
    if jsonl is not None:
        with bad_input():
            from . import writing

            what = "--jsonl"
            writing.check_output(jsonl, inputs=cases, what=what, force=out["force"] or appending)
    client = None
    if scheduler != "local":
        _require_dask()
        with bad_input():  # before anything is written
            client = batch.connect(scheduler)
    tasks = batch.plan(cases, options)
    kept, rest = batch.resumable(tasks, records)
    cores = os.cpu_count() or 1
    workers = (jobs or batch.default_workers(rest, cores)) if scheduler == "local" else 1
    workers = min(workers, max(len(rest), 1))
    writer = None
    if jsonl is not None:
        if not appending and os.path.lexists(jsonl):
            with bad_input():
                from . import writing

                writing.write_text(jsonl, "")  # --force: replaced, then appended to
        writer = batch.JsonlWriter(jsonl)
        if not appending:
            for done in kept:
                writer.write(batch.record(done))  # as the earlier run wrote it
    if client is None:
        engine = batch.run_local(rest, options, out["max_memory"], workers)
    else:
        workers = max(1, len(client.scheduler_info().get("workers", ())))
        engine = batch.run_dask(rest, options, out["max_memory"], client)
    results = [done.result for done in kept]
    header = f"[bold]lincheck verify[/] {len(cases)} case{'' if len(cases) == 1 else 's'}"
    if resume is not None and not first:
        from rich.markup import escape

        if kept:
            header += f" ({len(kept)} decided by {escape(str(resume))}, not checked again)"
        else:
            header += f" (none decided by {escape(str(resume))}: all checked)"
    bar = output.CaseProgress(len(tasks), len(kept), workers, enabled=not out["quiet"])
    try:
        for done in engine:
            if writer is not None:
                writer.write(batch.record(done))
            results.append(done.result)
            bar.update(done.result.passed, done.result.bad_input)
            if done.note and not out["quiet"]:  # a partial mode chosen for memory
                output.stderr.print(f"lincheck: {done.task.name}: {done.note}", markup=False)
    except output.Interrupted:
        engine.close()
        bar.close()
        output.show_interrupted(results, header, out, len(tasks), jsonl and str(jsonl))
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if client is not None:
            client.close()
    context = {
        "command": "verify",
        "paths": [str(p) for p in cases],
        "layout": options["layout"],
    }
    emit_many(output.failures_first(results), header, out, context)


def _resumed_records(resume: Path | None) -> list:
    """--resume FILE: its records (lines cut short by a kill are left out: their cases are
    checked again); bad usage if it cannot be read, or holds lines but no record at all
    (not a --jsonl file)."""
    if resume is None:
        return []
    from . import batch

    try:
        records, unreadable = batch.read_records(resume)
    except OSError as exc:
        fail(f"--resume {resume}: cannot read: {exc.strerror or exc}")
    if unreadable and not records:
        fail(f"--resume {resume}: not a --jsonl file of lincheck verify (no record in it)")
    return records


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _require_dask() -> None:
    """--scheduler ADDRESS without Dask's distributed: say how to install it, before any work."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        fail(
            "--scheduler ADDRESS runs the cases on a Dask cluster: pip install distributed "
            "(lincheck's [dask] extra)"
        )


def _check_dump(path, files, options, max_memory, quiet, progress=None):
    """Load one dump (a folder, an .npz, and/or single files) and check it: (loaded, report)."""
    import numpy as np

    from . import arrays, checks, layouts, tensors

    loaded = arrays.load(path, files)
    a = loaded.arrays
    if options.get("precision") is None:  # --precision wins over the file's metadata
        stored = arrays.stored_precision(loaded, path if path is not None else "files")
        options = {**options, "precision": stored} if stored else options
    memory_guard(a, options, max_memory, quiet)
    if progress is not None and a["X"].ndim >= 1 and a["dY"].ndim >= 1:
        N = int(np.prod(a["X"].shape[:-1], dtype=np.int64))
        D_in, D_out = a["X"].shape[-1], a["dY"].shape[-1]
        progress.expect(checks.nominal_seconds(N, D_in, D_out, **checks.cost_options(options)))
    with layouts.command_line_advice():
        report = _check_loaded(checks, tensors, a, loaded, options, progress)
    return loaded, report


def _check_loaded(checks, tensors, a, loaded, options, progress):
    return checks.check(
        a["X"],
        a["W"],
        a.get("B"),
        a["dY"],
        **{name: a[name] for name in (*tensors.SUBJECT_NAMES, *tensors.SCALE_NAMES) if name in a},
        **options,
        sources=loaded.sources,
        progress=progress,
    )


def _verify_one_path(path: Path | str | None, options: dict, out: dict, files: dict) -> None:
    """One dump (a folder, an .npz, and/or single files): its full tables."""
    from . import arrays, tensors

    bar = ProgressBar(not out["quiet"], f"lincheck verify {path if path is not None else 'files'}")
    try:
        with bad_input():
            loaded, report = _check_dump(path, files, options, out["max_memory"], out["quiet"], bar)
    finally:
        bar.close()
    a = loaded.arrays
    arithmetic = arrays.arithmetic_source(options.get("precision"), loaded)
    from rich.columns import Columns
    from rich.console import Group, RenderableType
    from rich.text import Text

    layer = report.layer
    name = str(path) if path is not None else "files"
    title = Text.assemble(
        ("lincheck verify", "bold"),
        f" {name}  N={layer.N} D_in={layer.D_in} D_out={layer.D_out}, "
        f"{'with' if layer.bias else 'without'} bias",
        f", {arithmetic['precision']} arithmetic (from {arithmetic['from']})" if arithmetic else "",
    )
    # One item per array, laid out in columns: a narrow terminal wraps between arrays.
    order = [*tensors.INPUT_NAMES, *tensors.SUBJECT_NAMES]
    shapes = [Text(f"{n} {tuple(a[n].shape)} {a[n].dtype}", style="dim") for n in order if n in a]
    parts: list[RenderableType] = [title, Columns(shapes, padding=(0, 2))]
    if out["verbose"] and loaded.ignored:
        parts.append(Text(f"ignored: {', '.join(loaded.ignored)}", style="dim"))
    context = {
        "command": "verify",
        "path": name,
        "sources": dict(loaded.sources),
        "layout": options["layout"],
    }
    if arithmetic:
        context["arithmetic"] = arithmetic
    if loaded.metadata:
        context["metadata"] = dict(loaded.metadata)
    emit(report, Group(*parts), name, out, context)


@app.command(
    short_help="Write random inputs (and gradients) as .npy files (or .safetensors).",
    help=(
        "Write seeded random X.npy, W.npy, B.npy, dY.npy (the inputs of verify), and with "
        "--with-grads dX.npy, dW.npy, dB.npy (--format safetensors: one file). Files are "
        "written atomically, and never replaced without --force."
    ),
    epilog=WRITE_EXIT_CODES
    + "\nExample: lincheck generate case/ --n 8 --din 4 --dout 3 --with-grads\n"
    + MORE_HELP,
)
def generate(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Folder to write into (created if needed); with --format safetensors, the file.",
            show_default=False,
            metavar="DIR",
        ),
    ],
    n: SizeN = 32,
    din: SizeIn = 64,
    dout: SizeOut = 16,
    seed: Seed = 0,
    dtype: DTypeOption = DType.float64,
    no_bias: Annotated[
        bool, typer.Option("--no-bias", help="Write no B (and no dB).", rich_help_panel=LAYER)
    ] = False,
    with_grads: Annotated[
        bool,
        typer.Option(
            "--with-grads",
            help="Also write dX, dW, dB computed in --dtype.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    layout: LayoutOption = Layout.out_in,
    save_format: FormatOption = SaveFormat.npy,
    force: Force = False,
    no_color: NoColor = False,
) -> None:
    """lincheck generate (the help text is in the decorator)."""
    import numpy as np

    from . import checks, layouts, writing

    data = checks.random_inputs(np.random.default_rng(seed), n, din, dout, dtype.value, not no_bias)
    if with_grads:
        data.update(checks.analytic_gradients(data))
    with bad_input():
        written = writing.save_case(
            directory, layouts.stored(data, layout.value), format=save_format.value, force=force
        )
    if save_format is SaveFormat.safetensors:
        output.stdout.print(
            f"wrote {', '.join(data)} to {written[0]}", markup=False, highlight=False
        )
        return
    output.stdout.print(
        f"wrote {', '.join(p.name for p in written)} to {directory}", markup=False, highlight=False
    )


@app.command(
    short_help="Show the derivation with your shapes, and what each check costs.",
    help=(
        "The forward and backward formulas of the layer with your shapes substituted, the "
        "surrogate loss behind the numerical witness, what each check does and costs at "
        "these sizes, and the error bounds: the original derivation, corrected. Shapes come "
        "from --n/--din/--dout or from a dump PATH (as for verify)."
    ),
    epilog=PRINT_EXIT_CODES
    + "\nExample: lincheck explain --n 128 --din 512 --dout 256 --lang zh"
    + "\nExample: lincheck explain dump/\n"
    + MORE_HELP,
)
def explain(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A dump (folder of .npy files, .npz or .safetensors) whose shapes and dtypes "
            "to use.",
            show_default=False,
            metavar="PATH",
        ),
    ] = None,
    n: SizeN = 32,
    din: SizeIn = 64,
    dout: SizeOut = 16,
    precision: PrecisionOption = None,
    no_bias: Annotated[
        bool, typer.Option("--no-bias", help="A layer without bias.", rich_help_panel=LAYER)
    ] = False,
    layout: LayoutOption = Layout.out_in,
    lang: Annotated[
        Language,
        typer.Option(
            "--lang",
            help="en, or zh: the derivation's own language.",
            metavar="LANG",
            rich_help_panel=OUTPUT,
        ),
    ] = Language.en,
    no_color: NoColor = False,
) -> None:
    """lincheck explain (the help text is in the decorator)."""
    from .explain import Sizes
    from .report import explain_page

    chosen = precision
    if path is not None:
        from . import arrays, layouts, validate
        from .precision import precision_for

        with bad_input(), layouts.command_line_advice():
            loaded = arrays.load(path)
            a = loaded.arrays
            layer = validate.layer_of(
                a["X"], a["W"], a.get("B"), a["dY"], loaded.sources, layout.value
            )
            stored = arrays.stored_precision(loaded, path) if chosen is None else None
        n, din, dout, bias = layer.N, layer.D_in, layer.D_out, layer.bias
        subjects = [a[name] for name in ("dX", "dW", "dB") if name in a]
        chosen = chosen or stored or precision_for((subjects or [a["X"]])[0].dtype).name
    else:
        bias = not no_bias
    sizes = Sizes(
        N=n, D_in=din, D_out=dout, bias=bias, precision=chosen or "fp64", layout=layout.value
    )
    output.stdout.print(explain_page(sizes, lang.value))


def main() -> None:
    """The ``lincheck`` command. Ctrl-C stops every worker, prints one line, exits 130; the
    reports are written only at the end (atomically), so none is left half-written."""
    import sys

    from .allocator import lincheck_process

    lincheck_process()  # a case's large arrays are reused (lincheck.allocator)
    output.encodable_streams()
    output.catch_interrupts()
    try:
        app(prog_name="lincheck")  # the same name (in help, for completion) under python -m
    except output.Interrupted:
        output.stderr.print("lincheck: interrupted", highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every worker is already stopped and no report is due: exit now, without the
        # interpreter's exit handlers, which would wait on a process pool whose worker was
        # killed halfway through sending a result (a hang).
        os._exit(130)
