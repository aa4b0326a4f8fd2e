"""Real frameworks on CPU: their correct gradients pass lincheck, gross planted bugs fail.

torch (nn.Linear; float64, float32, bfloat16, float16, and CPU autocast to bfloat16
with float32 parameters), JAX (``jax.vjp`` of ``x @ w.T + b``) and tinygrad
(``x.linear(w.T, b)``) compute Y, dX, dW, dB for seeded layers with leading batch
dimensions, uneven sizes, N from 1 to 4096, inputs scaled by 1e-3 … 1e3 and with or
without bias. lincheck checks each run twice: with no precision, the arrays in their
own dtype (bfloat16 as ``ml_dtypes.bfloat16``), and with the dtype's preset.

Each framework is skipped when it is not installed (the test extra installs them).
``pytest -s`` prints the largest bound_ratio per preset at the end;
LINCHECK_FRAMEWORK_RATIOS=PATH also writes them as JSON.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace

import numpy as np
import pytest
from frameworks import PRESET, RUNNERS, Case, Run, tinygrad_usable

import lincheck

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")

DTYPES = ["float64", "float32", "bfloat16", "float16"]
# (leading dims of X and dY, D_in, D_out): N = 1, batch dims, uneven sizes, a long
# batch (dW and dB sum 4096 terms), square W, D_out > D_in.
SHAPES = [((1,), 8, 3), ((2, 3), 37, 5), ((64,), 37, 5), ((4096,), 16, 8), ((8, 16), 19, 19)]
SHAPES += [((333,), 5, 37)]
# Scales of X, W, dY, each independently 1e-3 … 1e3.
SCALES = [(1, 1, 1), (1e-3, 1e3, 1), (1e3, 1e-3, 1e-3), (1, 1e-3, 1e3), (1e-3, 1e-3, 1e-3)]
SCALES += [(1e3, 1, 1e-3), (1e3, 1e3, 1e-3)]

# Frameworks and the dtypes each runs; "autocast" is torch's CPU autocast to bfloat16.
FLAVOURS = [("torch", d) for d in DTYPES] + [("torch", "autocast")]
FLAVOURS += [("jax", d) for d in DTYPES] + [("tinygrad", d) for d in DTYPES]


# tinygrad compiles a kernel per shape (about 1 s each with a cold cache): it runs the
# batch dims, the long batch and the square W.
SHAPES_OF = {"tinygrad": [1, 3, 4]}


def cases(flavour_index: int, fw: str, dtype: str) -> list[Case]:
    """A layer per shape for each framework and dtype, the scales and bias rotated.

    A scale whose results leave ``dtype``'s normal range moves on to the next.
    """
    fmt = "bfloat16" if dtype == "autocast" else dtype
    out = []
    for i, (lead, D_in, D_out) in enumerate(SHAPES):
        if i not in SHAPES_OF.get(fw, range(len(SHAPES))):
            continue
        j = i + flavour_index
        bias = j % 2 == 0
        for k in range(len(SCALES)):
            case = Case(lead, D_in, D_out, bias, SCALES[(j + k) % len(SCALES)], seed=100 + i)
            if case.fits(fmt):
                break
        out.append(case)
    return out


# How each run is declared: no precision (arrays in their own dtype), and the preset.
# float64, float32 and float16 arrays default to their preset (the test checks it), so
# they run once; autocast's float32 gradients of bfloat16 arithmetic need "bf16".
DECLARED = {"bfloat16": ["own dtype", "preset"], "autocast": ["preset"]}

MATRIX = [
    pytest.param(fw, dtype, case, declared, id=f"{fw}-{dtype}-{case.id}-{declared}")
    for f, (fw, dtype) in enumerate(FLAVOURS)
    for case in cases(f, fw, dtype)
    for declared in DECLARED.get(dtype, ["own dtype"])
]


def require(fw: str) -> None:
    pytest.importorskip(fw, reason=f"{fw} is not installed (pip install '.[test]')")
    if fw == "tinygrad" and (why := tinygrad_usable()):
        pytest.skip(why)


@functools.cache
def run(fw: str, dtype: str, case: Case) -> Run:
    if dtype == "autocast":
        return RUNNERS[fw](case, "float32", autocast=True)
    return RUNNERS[fw](case, dtype)


def check(r: Run, precision: str | None, **options) -> lincheck.Report:
    return lincheck.check(r.X, r.W, r.B, r.dY, **r.subjects(), precision=precision, **options)


def supplied(report: lincheck.Report) -> dict[str, lincheck.TensorCheck]:
    return {c.tensor: c for c in report.checks if c.subject == "supplied"}


def describe(report: lincheck.Report) -> str:
    return "; ".join(
        f"{c.subject} {c.tensor}: ratio {c.bound_ratio} {c.message}".strip() for c in report.checks
    )


# Largest bound_ratio of a correct gradient, per preset and tensor: printed at the end.
RATIOS: dict[str, dict[str, tuple[float, str]]] = {}


@pytest.fixture(scope="module", autouse=True)
def ratio_summary():
    yield
    if not RATIOS:
        return
    print("\nlargest bound_ratio of correct framework gradients, per preset:")
    for preset, tensors in sorted(RATIOS.items()):
        cells = ", ".join(f"{t} {r:.3g} ({where})" for t, (r, where) in sorted(tensors.items()))
        print(f"  {preset}: {cells}")
    if path := os.environ.get("LINCHECK_FRAMEWORK_RATIOS"):
        with open(path, "w") as f:
            json.dump(RATIOS, f, indent=1)


def record(preset: str, report: lincheck.Report, where: str) -> None:
    table = RATIOS.setdefault(preset, {})
    for name, c in supplied(report).items():
        if c.bound_ratio is not None and c.bound_ratio > table.get(name, (-1.0, ""))[0]:
            table[name] = (c.bound_ratio, where)


@pytest.mark.parametrize(("fw", "dtype", "case", "declared"), MATRIX)
def test_correct_gradients_pass(fw, dtype, case, declared):
    require(fw)
    r = run(fw, dtype, case)
    preset = "bf16" if dtype == "autocast" else PRESET[dtype]
    precision = None if declared == "own dtype" else preset
    report = check(r, precision)
    got = supplied(report)
    assert set(got) == {"dX", "dW", "Y"} | ({"dB"} if r.dB is not None else set())
    assert report.passed, describe(report)
    for c in got.values():
        assert c.verdict == "pass", describe(report)
        assert c.precision == preset
    record(preset, report, f"{fw}-{dtype}-{case.id}")


@pytest.mark.parametrize(("dtype", "preset"), [("bfloat16", "bf16"), ("float16", "fp16")])
def test_jax_reduces_dB_in_its_own_format(dtype, preset):
    """XLA sums dY over the batch in bfloat16/float16 (a tree of 32-term sums), where
    torch and tinygrad accumulate in float32 and round once: JAX's dB is farther from
    the exact sum than the once-rounded float32 sum. The presets cover it (reduce=bf16/32);
    a model with a float32 reduction fails it statistically, not for certain."""
    require("jax")
    case = Case((333,), 5, 37, True, (1e3, 1, 1e-3), seed=105)
    jx = run("jax", dtype, case)
    exact = jx.dY.astype(np.float64).sum(0)
    once = exact.astype(np.float32).astype(jx.dB.dtype)  # a float32 sum rounded once
    assert (np.abs(jx.dB.astype(np.float64) - exact) > np.abs(once - exact)).any()
    assert check(jx, preset).passed
    report = check(jx, f"{preset},reduce=fp32-rz")
    db = supplied(report)["dB"]
    assert db.verdict == "fail" and db.tier == "statistical", describe(report)
    assert db.certain_ratio <= 1
    assert check(replace(jx, dB=once), f"{preset},reduce=fp32-rz").passed


# Planted bugs, each applied to one correct run: (tensor, how, the wrong value).
BUGS = {
    "dW=0": ("dW", lambda r: np.zeros_like(r.dW)),
    "dW sign-flipped": ("dW", lambda r: -r.dW),
    "dW halved": ("dW", lambda r: r.dW / 2),
    "dB=mean": ("dB", lambda r: r.dY.astype(np.float64).reshape(-1, r.dB.size).mean(0)),
    "dX=0": ("dX", lambda r: np.zeros_like(r.dX)),
    "dW transposed": ("dW", lambda r: r.dW.T.copy()),
}
# A square W for the transposition, N = 128 > 1 so that a mean differs from a sum.
BUGGY = Case((8, 16), 19, 19, True, (1, 1, 1), seed=7)


@pytest.mark.parametrize("bug", list(BUGS))
@pytest.mark.parametrize(("fw", "dtype"), FLAVOURS)
def test_planted_bugs_fail(fw, dtype, bug):
    require(fw)
    r = run(fw, dtype, BUGGY)
    tensor, wrong = BUGS[bug]
    value = wrong(r)
    good = getattr(r, tensor)
    r = Run(**{**r.__dict__, tensor: value.astype(good.dtype)})
    assert not np.array_equal(value, good.astype(np.float64))
    report = check(r, "bf16" if dtype == "autocast" else PRESET[dtype])
    assert not report.passed
    c = supplied(report)[tensor]
    assert not c.passed, describe(report)
    assert c.verdict in {"fail", "inconclusive"}


SUBTLE = {  # small mistakes in torch float16 gradients at N = 300 that passed a float16-sum model
    "dW × 1.05": ("dW", lambda r: r.dW.astype(np.float64) * 1.05),
    "dB × 1.02": ("dB", lambda r: r.dB.astype(np.float64) * 1.02),
    "dB missing the last sample": (
        "dB",
        lambda r: r.dY.astype(np.float64).reshape(-1, r.dB.size)[:-1].sum(0),
    ),
}


@pytest.mark.parametrize("bug", list(SUBTLE))
def test_subtle_float16_mistakes_fail_under_float32_accumulation(bug):
    """torch accumulates float16 products in float32: under the fp16 model (fp32 sums) these
    fail; under a float16-accumulation model they passed (Err/tol 0.096, 0.013, 0.041).
    The default fp16 model allows dB XLA's float16 tree reduction (40 float16 roundings
    deep here: a 2% error is within it); torch's own float32 reduction is declared with
    reduce=fp32-rz, under which a 2% dB fails."""
    require("torch")
    r = run("torch", "float16", Case((300,), 37, 5, True, (1, 1, 1), seed=3))
    torch_model = "fp16,reduce=fp32-rz"
    assert check(r, None).passed and check(r, torch_model).passed
    tensor, how = SUBTLE[bug]
    wrong = replace(r, **{tensor: how(r).astype(np.float16)})
    report = check(wrong, torch_model if tensor == "dB" else None)
    assert supplied(report)[tensor].verdict == "fail", describe(report)
