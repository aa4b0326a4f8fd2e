"""The command line's options: their types, choices and help, shared by the commands.

Only Typer and the standard library here (``lincheck --help`` imports no
NumPy). The choices mirror the library's (``checks.MODES``,
``witness.METHODS``, ``precision.PRESETS``, ``checks.DTYPES``);
``tests/test_cli.py`` checks that they agree.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .errors import InputError

EXIT_CODES = """\
Exit codes: 0 every check passed · 1 a check failed · 2 bad usage or bad input
(with several cases, 1 if any check failed, even where others had bad input) ·
130 interrupted (Ctrl-C).
"""
WRITE_EXIT_CODES = """\
Exit codes: 0 written · 2 bad usage or bad input (nothing written) ·
130 interrupted (Ctrl-C).
"""
PRINT_EXIT_CODES = """\
Exit codes: 0 printed · 2 bad usage or bad input · 130 interrupted (Ctrl-C).
"""
MORE_HELP = "Every option in detail: docs/cli.md."

LAYER = "Layer"
YOURS = "Your implementation"
ARITHMETIC = "Arithmetic"
METHOD = "Check method"
OUTPUT = "Output"


class DType(str, Enum):
    float64 = "float64"
    float32 = "float32"
    float16 = "float16"


class RunDType(str, Enum):
    """run's dtypes: NumPy's, and the narrow floats (``ml_dtypes``; torch and JAX have them)."""

    float64 = "float64"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float8_e4m3fn = "float8_e4m3fn"
    float8_e5m2 = "float8_e5m2"


class Framework(str, Enum):
    numpy = "numpy"
    torch = "torch"
    jax = "jax"


FrameworkOption = Annotated[
    Framework | None,
    typer.Option(
        "--framework",
        help="numpy, torch or jax: whose arrays your --impl takes, when the detection "
        "guesses wrong.",
        metavar="NAME",
        show_default=False,
        rich_help_panel=YOURS,
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="Device of a torch or JAX --impl: cpu, cuda, cuda:1, mps; JAX: gpu, tpu:0.",
        metavar="DEVICE",
        rich_help_panel=YOURS,
    ),
]


PRESET_NAMES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp16-acc16", "fp8", "fp8-blockwise")
"""``precision.PRESETS``' names (``tests/test_cli.py`` checks that they agree)."""


def _precision(value: str | None) -> str | None:
    """A --precision spec, checked here so that a bad one is bad usage (exit 2) with the
    parser's own message (imports NumPy only when a spec is given)."""
    if value is None:
        return None
    from .precision import parse

    try:
        parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        metavar="SPEC",
        callback=_precision,
        help="Your gradients' arithmetic: a preset (bf16, fp16, tf32...) or key=value pairs.",
        show_default=False,
        rich_help_panel=ARITHMETIC,
    ),
]

CertainOnly = Annotated[
    bool,
    typer.Option(
        "--certain-only",
        help="Fail only beyond the rigorous bound, not beyond plausible rounding.",
        rich_help_panel=ARITHMETIC,
    ),
]


class Method(str, Enum):
    central = "central"
    dense = "dense"
    complex_step = "complex-step"


class Mode(str, Enum):
    auto = "auto"
    full = "full"
    sample = "sample"
    directions = "directions"


class Layout(str, Enum):
    out_in = "out_in"
    in_out = "in_out"


LayoutOption = Annotated[
    Layout,
    typer.Option(
        "--layout",
        help="W (and dW) stored as out_in, (D_out, D_in) as torch, or in_out, (D_in, D_out) "
        "as JAX/Keras.",
        metavar="LAYOUT",
        rich_help_panel=LAYER,
    ),
]


class SaveFormat(str, Enum):
    npy = "npy"
    safetensors = "safetensors"


FormatOption = Annotated[
    SaveFormat,
    typer.Option(
        "--format",
        help="npy, a folder of .npy files, or safetensors, one file (bfloat16 and fp8 too).",
        metavar="FORMAT",
        rich_help_panel=OUTPUT,
    ),
]


class Language(str, Enum):
    en = "en"
    zh = "zh"


JsonOption = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Write the JSON report here ('-': stdout, tables to stderr).",
        metavar="PATH",
        rich_help_panel=OUTPUT,
    ),
]


SizeN = Annotated[
    int, typer.Option("--n", min=1, help="Batch size N.", metavar="N", rich_help_panel=LAYER)
]
SizeIn = Annotated[
    int,
    typer.Option("--din", min=1, help="Input features D_in.", metavar="N", rich_help_panel=LAYER),
]
SizeOut = Annotated[
    int,
    typer.Option(
        "--dout", min=1, help="Output features D_out.", metavar="N", rich_help_panel=LAYER
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed", min=0, help="Seed of the random arrays.", metavar="N", rich_help_panel=LAYER
    ),
]
DTypeOption = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="dtype of the arrays and of the gradients.",
        metavar="float64|float32|float16",
        rich_help_panel=LAYER,
    ),
]
DTypesOption = Annotated[
    list[RunDType] | None,
    typer.Option(
        "--dtype",
        help="float64, float32, float16, bfloat16, float8_e4m3fn or float8_e5m2 (fp8: "
        "--impl only); repeat for several. Default float64 (--impl: and float32).",
        metavar="DTYPE",
        show_default=False,
        rich_help_panel=LAYER,
    ),
]
JunitOption = Annotated[
    Path | None,
    typer.Option(
        "--junit",
        help="Write a JUnit XML report here.",
        metavar="PATH",
        rich_help_panel=OUTPUT,
    ),
]
GithubOption = Annotated[
    bool,
    typer.Option(
        "--github",
        help="GitHub Actions annotations for failures (on when GITHUB_ACTIONS is true).",
        rich_help_panel=OUTPUT,
    ),
]
Force = Annotated[
    bool, typer.Option("--force", help="Replace existing files.", rich_help_panel=OUTPUT)
]
MethodOption = Annotated[
    Method,
    typer.Option(
        "--method",
        help="The witness: central differences (a column per pass), dense (an entry per "
        "pass), or complex-step.",
        metavar="METHOD",
        rich_help_panel=METHOD,
    ),
]


def _finite(value: float | None) -> float | None:
    """A tolerance must be a number: nan passes ``min=0`` (every comparison with it is
    false) and would fail every entry; inf would pass every one."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        min=0.0,
        callback=_finite,
        help="Use numpy.allclose's |a − b| ≤ atol + rtol·|b| instead of the bounds.",
        metavar="A",
        rich_help_panel=ARITHMETIC,
    ),
]
Rtol = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        min=0.0,
        callback=_finite,
        help="See --atol.",
        metavar="R",
        rich_help_panel=ARITHMETIC,
    ),
]
ModeOption = Annotated[
    Mode,
    typer.Option(
        "--mode",
        help="How much the witness confirms: every entry (full), some (sample), random "
        "directions; auto: full if it fits --budget.",
        metavar="MODE",
        rich_help_panel=METHOD,
    ),
]
Samples = Annotated[
    int,
    typer.Option(
        "--samples",
        min=1,
        help="Entries per tensor in sample mode.",
        metavar="N",
        rich_help_panel=METHOD,
    ),
]
DirectionsOption = Annotated[
    int,
    typer.Option(
        "--directions",
        min=1,
        help="Directions per tensor in directions mode.",
        metavar="N",
        rich_help_panel=METHOD,
    ),
]
Budget = Annotated[
    float,
    typer.Option(
        "--budget",
        min=0.0,
        help="Seconds (at a nominal 5·10¹⁰ multiply-adds/s) --mode auto allows a full witness.",
        metavar="SECONDS",
        rich_help_panel=METHOD,
    ),
]


MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Refuse checks needing more memory (4G, 512M; default: half the available).",
        metavar="SIZE",
        show_default=False,
        rich_help_panel=METHOD,
    ),
]


def _array_file(name: str):
    """A ``--x FILE``-style option giving one array's ``.npy`` file."""
    return typer.Option(
        f"--{name.lower()}",
        help=f"{name} from this .npy file.",
        metavar="FILE",
        show_default=False,
        rich_help_panel="Arrays one file at a time (with or instead of PATH)",
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
    typer.Option(
        "--quiet", "-q", help="Print only the verdict line, no progress.", rich_help_panel=OUTPUT
    ),
]

PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Write PNG heatmaps and histograms to DIR (needs matplotlib: the "
        "lincheck\\[plot] extra).",
        metavar="DIR",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]

HeatmapOption = Annotated[
    bool | None,
    typer.Option(
        "--heatmap/--no-heatmap",
        help="Error maps of every tensor, or none (default: the failed).",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]


def _no_color(value: bool) -> bool:
    if value:
        from . import output

        output.plain_consoles()
    return value


NoColor = Annotated[
    bool,
    typer.Option(
        "--no-color",
        callback=_no_color,
        is_eager=True,
        help="Plain text: no colours or styles (as NO_COLOR=1 does).",
        rich_help_panel="Output",
    ),
]
"""Accepted before the command (``lincheck --no-color run``) and after it."""


def check_options(method, mode, samples, directions, seed, budget, atol, rtol) -> dict:
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


def output_options(json_path, junit, github, quiet, heatmap, plot, force) -> dict:
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


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '100000' → bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise InputError(f"--max-memory {text}: expected a size like 4G, 512M or 1000000")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


MANY = "Many cases"

JsonlOption = Annotated[
    Path | None,
    typer.Option(
        "--jsonl",
        help="Also write a JSON line per case as it finishes (tail -f it; --resume from it).",
        metavar="PATH",
        show_default=False,
        rich_help_panel=MANY,
    ),
]
ResumeOption = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        help="Skip the cases this --jsonl file decided with the same files and options.",
        metavar="PATH",
        show_default=False,
        rich_help_panel=MANY,
    ),
]
SchedulerOption = Annotated[
    str,
    typer.Option(
        "--scheduler",
        help="local (a process pool, --jobs) or a Dask scheduler, tcp://host:8786.",
        metavar="local|ADDRESS",
        rich_help_panel=MANY,
    ),
]
