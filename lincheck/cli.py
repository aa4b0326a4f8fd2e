"""The ``lincheck`` command: parse, call the library, render, choose the exit code.

Exit codes (stable): 0 every check passed; 1 at least one check failed;
2 bad usage or bad input (one line on stderr, nothing written).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import LincheckError

EXIT_CODES = """\
Exit codes: 0 every check passed · 1 a check failed · 2 bad usage or bad input.
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
    add_completion=False,
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
        self.bar = None

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
) -> None:
    pass


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


def _emit(report, header, json_path: Path | None, context: dict, quiet: bool = False) -> None:
    """Render the tables (or only the verdict) and the JSON report, then exit 0 or 1."""
    from .report import render, verdict

    to_stdout = json_path is not None and str(json_path) == "-"
    console = stderr if to_stdout else stdout
    console.print(verdict(report) if quiet else render(report, header))
    if json_path is not None:
        from . import arrays
        from .report import to_json

        text = to_json(report, **context)
        if to_stdout:
            typer.echo(text, nl=False)
        else:
            try:
                arrays.write_text(json_path, text)
            except LincheckError as exc:
                raise _fail(str(exc)) from None
    raise typer.Exit(code=0 if report.passed else 1)


SizeN = Annotated[int, typer.Option("--n", min=1, help="Batch size N.")]
SizeIn = Annotated[int, typer.Option("--din", min=1, help="Input features D_in.")]
SizeOut = Annotated[int, typer.Option("--dout", min=1, help="Output features D_out.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Seed of the random arrays.")]
DTypeOption = Annotated[
    DType, typer.Option("--dtype", help="dtype of the arrays and of the analytic computation.")
]
Force = Annotated[bool, typer.Option("--force", help="Replace existing .npy files.")]
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
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print only the verdict line; no tables, no progress bar."),
]


@app.command(
    epilog=EXIT_CODES + "\nExample: lincheck run --n 32 --din 64 --dout 16 --dtype float32"
)
def run(
    n: SizeN = 32,
    din: SizeIn = 64,
    dout: SizeOut = 16,
    seed: Seed = 0,
    dtype: DTypeOption = DType.float64,
    no_bias: Annotated[
        bool, typer.Option("--no-bias", help="A layer without bias (no B, no dB).")
    ] = False,
    json_path: JsonOption = None,
    method: MethodOption = Method.central,
    mode: ModeOption = Mode.auto,
    samples: Samples = 64,
    directions: DirectionsOption = 16,
    budget: Budget = 10.0,
    atol: Atol = None,
    rtol: Rtol = None,
    quiet: Quiet = False,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Also write the generated arrays to this folder, as 'generate --with-grads' does.",
            metavar="DIR",
        ),
    ] = None,
    force: Force = False,
) -> None:
    """Generate a random layer, compute its gradients analytically in --dtype, and check
    every entry against a numerical witness from L = Σ G ⊙ Y (float64), within
    rounding-error bounds derived for --dtype."""
    import numpy as np

    from . import checks

    data = checks.random_inputs(np.random.default_rng(seed), n, din, dout, dtype.value, not no_bias)
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
            **_options(method, mode, samples, directions, seed, budget, atol, rtol),
            progress=bar,
        )
    finally:
        bar.close()
    bias = "without bias" if no_bias else "with bias"
    header = (
        f"[bold]lincheck run[/]  N={n} D_in={din} D_out={dout}, {dtype.value}, {bias}, "
        f"seed {seed}\n"
        f"[dim]reproduce: lincheck run --n {n} --din {din} --dout {dout} --seed {seed} "
        f"--dtype {dtype.value}{' --no-bias' if no_bias else ''}[/]"
    )
    context = {"command": "run", "seed": seed, "dtype": dtype.value}
    _emit(report, header, json_path, context, quiet)


@app.command(
    epilog=EXIT_CODES
    + "\nExample: lincheck verify dump/ --json report.json"
    + "   (dump/ holds X.npy W.npy B.npy dY.npy dW.npy …)"
)
def verify(
    path: Annotated[
        Path,
        typer.Argument(
            help="A folder of .npy files or one .npz file. Names (case-insensitive): "
            "X, W, dY required; B optional; dX, dW, dB, Y are the gradients (and "
            "forward output) to check.",
            show_default=False,
            metavar="PATH",
        ),
    ],
    json_path: JsonOption = None,
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
    quiet: Quiet = False,
) -> None:
    """Check gradients your code produced (dX, dW, dB, Y) against the float64 analytic
    reference, which is itself checked against a numerical witness; with no gradients
    given, check the analytic formulas on your X, W, B, dY. Each entry's tolerance is
    derived from the arithmetic (--precision), not set by hand."""
    from . import arrays, checks

    bar = _ProgressBar(not quiet)
    try:
        loaded = arrays.load(path)
        a = loaded.arrays
        report = checks.check(
            a["X"],
            a["W"],
            a.get("B"),
            a["dY"],
            **{name: a[name] for name in checks.SUBJECT_NAMES if name in a},
            precision=None if precision is None else precision.value,
            **_options(method, mode, samples, directions, seed, budget, atol, rtol),
            sources=loaded.sources,
            progress=bar,
        )
    except LincheckError as exc:
        raise _fail(str(exc)) from None
    finally:
        bar.close()
    layer = report.layer
    order = [*checks.INPUT_NAMES, *checks.SUBJECT_NAMES]
    shapes = ", ".join(
        f"{name} {tuple(a[name].shape)} {a[name].dtype}" for name in order if name in a
    )
    header = (
        f"[bold]lincheck verify[/] {path}  N={layer.N} D_in={layer.D_in} D_out={layer.D_out}, "
        f"{'with' if layer.bias else 'without'} bias\n[dim]{shapes}[/]"
    )
    context = {"command": "verify", "path": str(path), "sources": dict(loaded.sources)}
    _emit(report, header, json_path, context, quiet)


@app.command(
    epilog=EXIT_CODES + "\nExample: lincheck generate case/ --n 8 --din 4 --dout 3 --with-grads"
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
    """Write seeded random X.npy, W.npy, B.npy, dY.npy (the inputs of 'verify').

    Each file is written atomically; an existing file is never replaced without --force."""
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


def main() -> None:
    app()
