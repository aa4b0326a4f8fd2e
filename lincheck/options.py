"""The command line's options: their types, choices and help, shared by the commands.

Only Typer and the standard library here (``lincheck --help`` imports no
NumPy). The choices mirror the library's (``checks.MODES``,
``witness.METHODS``, ``precision.PRESETS``, ``checks.DTYPES``);
``tests/test_cli.py`` checks that they agree.
"""

from __future__ import annotations

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
        help="With --impl: whose arrays your function takes, when the detection (the "
        "framework its code names, else what its module imports; NumPy if none) would guess "
        "wrong or cannot tell (a module using both torch and JAX).",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="With a torch or JAX --impl: the device its layer runs on (cpu, cuda, cuda:1, "
        "mps; JAX: cpu, gpu, tpu, with :INDEX).",
        metavar="DEVICE",
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
        help="The arithmetic the gradients were computed in; sets their error bounds. A preset "
        f"({', '.join(PRESET_NAMES)}) or key=value pairs, e.g. 'bf16,bias=fused' or "
        "'x=e4m3,w=e4m3,dy=e5m2,scale=tensor,acc=fp32,out=bf16' (keys x, w, dy, convert, "
        "scale, products, acc, out, bias; see lincheck explain --precision SPEC). Default: "
        "from each file's dtype.",
        show_default=False,
    ),
]

CertainOnly = Annotated[
    bool,
    typer.Option(
        "--certain-only",
        help="Fail only beyond the rigorous worst-case bound (the certain tier), not beyond "
        "what rounding plausibly produces (the statistical tier).",
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
        help="How W (and dW) are stored: out_in, (D_out, D_in) as torch.nn.Linear, Y = X Wᵀ + B; "
        "or in_out, (D_in, D_out) as JAX/Flax, Keras, TensorFlow and CS231n, Y = X W + B, "
        "with dW of W's shape. Reports index dW as stored.",
    ),
]


class SaveFormat(str, Enum):
    npy = "npy"
    safetensors = "safetensors"


FormatOption = Annotated[
    SaveFormat,
    typer.Option(
        "--format",
        help="How to write each case: npy, a folder of NAME.npy files; safetensors, one "
        "file (.safetensors appended to the name), which also carries bfloat16 and fp8.",
    ),
]


class Language(str, Enum):
    en = "en"
    zh = "zh"


JsonOption = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Also write the machine-readable report to this file (replaced if it exists); "
        "'-' writes it to stdout and moves the tables to stderr.",
        metavar="PATH",
    ),
]


SizeN = Annotated[int, typer.Option("--n", min=1, help="Batch size N.")]
SizeIn = Annotated[int, typer.Option("--din", min=1, help="Input features D_in.")]
SizeOut = Annotated[int, typer.Option("--dout", min=1, help="Output features D_out.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Seed of the random arrays.")]
DTypeOption = Annotated[
    DType, typer.Option("--dtype", help="dtype of the arrays and of the analytic computation.")
]
DTypesOption = Annotated[
    list[RunDType] | None,
    typer.Option(
        "--dtype",
        help="dtype of the arrays and of the computed gradients (repeat for several; "
        "default float64, with --impl float64 and float32). bfloat16, float8_e4m3fn and "
        "float8_e5m2 are ml_dtypes arrays (torch and JAX tensors for their layers); "
        "without --impl, fp8 is refused: lincheck computes no fp8 gradients of its own.",
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
Force = Annotated[
    bool, typer.Option("--force", help="Replace existing files (.npy, .safetensors, plots).")
]
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


JsonlOption = Annotated[
    Path | None,
    typer.Option(
        "--jsonl",
        help="Also write one JSON line per case as it finishes (its report, timing and "
        "fingerprint), flushed line by line: follow it with tail -f, resume from it with "
        "--resume. An existing file is not replaced without --force, unless it is the "
        "--resume file (then appended to).",
        metavar="PATH",
        show_default=False,
    ),
]
ResumeOption = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        help="Skip the cases an earlier run's --jsonl file decided (pass or fail) with the "
        "same files and options; the summary covers every case.",
        metavar="PATH",
        show_default=False,
    ),
]
SchedulerOption = Annotated[
    str,
    typer.Option(
        "--scheduler",
        help="Where several cases run: 'local' (a process pool, --jobs), or a Dask "
        "distributed scheduler's address (tcp://host:8786), whose workers read the dumps "
        "at the same paths (needs lincheck[dask]).",
        metavar="local|ADDRESS",
    ),
]
