"""Check a linear layer's gradients: validate inputs, build the oracles, compare.

This is the library's entry point (:func:`check`); the command line renders
its :class:`Report`. The verdict on every entry is

    |subject − oracle| ≤ bound(subject) + bound(oracle)

where each bound is a rigorous worst-case rounding-error bound (see
:mod:`lincheck.numeric` and ``docs/numerics.md``), so no tolerance is hand-set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import diagnose, layouts, plan, streaming, witness, workspace
from .allocator import arrays_reused
from .core import Gradients, as_batch, backward
from .errors import InputError
from .frameworks import arithmetic_of, narrow_dtype
from .precision import needs_squares, order_weights, parse, precision_for
from .results import Entry, Hint, Layer, Report, TensorCheck
from .tensors import SUBJECT_NAMES
from .validate import (
    Inputs,
    check_no_overflow,
    label,
    real_array,
    validate_inputs,
)

DTYPES = ("float64", "float32", "float16")
NARROW_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
"""``ml_dtypes``' narrow floats: random layers in them for ``run --impl`` and sweeps."""


# ---------------------------------------------------------------------------
# Checking


def _quiet_numpy(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: lincheck tests every result it
    uses for overflow and NaN itself, and says so in one line, not in warnings on stderr.
    Its large arrays are reused in lincheck's own processes
    (:func:`lincheck.allocator.arrays_reused`: a no-op in a program's own process, however
    it was started; a Dask worker's case is :func:`lincheck.batch.check_case`'s)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"), arrays_reused(own_only=True):
            return fn(*args, **kwargs)

    return wrapper


@_quiet_numpy
def check(
    X,
    W,
    B,
    dY,
    dX=None,
    dW=None,
    dB=None,
    Y=None,
    *,
    layout: str = "out_in",
    precision: str | None = None,
    certain_only: bool = False,
    X_scale=None,
    W_scale=None,
    dY_scale=None,
    against: str = "reference",
    method: str = "central",
    mode: str = "auto",
    samples: int = 64,
    directions: int = 40,
    seed: int = 0,
    budget: float = 10.0,
    atol: float | None = None,
    rtol: float | None = None,
    subject: str = "supplied",
    sources: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Check gradients of Y = X Wᵀ + B, every entry, with rigorous rounding bounds.

    Parameters
    ----------
    X : array_like, shape (*, D_in)
    W : array_like, shape (D_out, D_in), or (D_in, D_out) with ``layout="in_out"``
    B : array_like, shape (D_out,), or None for a layer without bias
    dY : array_like, shape (*, D_out)
        The upstream gradient G = ∂L/∂Y.
    dX, dW, dB, Y : array_like, optional
        Subjects: gradients (and a forward output) to check; dW has W's shape.
    layout : {"out_in", "in_out"}
        How W and dW are stored: torch's (D_out, D_in), Y = X Wᵀ + B (default),
        or (D_in, D_out), Y = X W + B, as JAX/Flax, Keras, TensorFlow and the
        CS231n assignments store the kernel (dW = Xᵀ dY, of W's shape). The
        report indexes dW as supplied and records the layout
        (:mod:`lincheck.layouts`).
    precision : str, optional
        The arithmetic the subjects were computed in: a preset ("fp64",
        "fp32", "tf32", "bf16", "fp16", "fp16-acc16", "fp8",
        "fp8-blockwise") or ``key=value`` pairs (:func:`lincheck.precision.parse`).
        Default: from each subject's dtype (float64 → fp64, float32 →
        fp32, float16 → fp16, bfloat16 → bf16, fp8 → fp8, integers → fp64).
    certain_only : bool
        Fail only beyond the rigorous worst-case bound (the certain tier),
        not beyond what rounding plausibly produces (the statistical tier).
    X_scale, W_scale, dY_scale : array_like, optional
        Dequantization factors of a scaled (fp8) model: the kernel used
        ``X_scale · q(X / X_scale)``; one value, or one per row or block
        (:mod:`lincheck.scaling`). Without them, the amax recipe.
    against : {"reference", "witness"}
        The oracle for the subjects: the analytic gradients computed in
        float64 from the exactly upcast inputs ("reference"; the witness
        then also checks the reference), or the witness itself. ``Y`` is
        always checked against the float64 forward pass.
    method : {"central", "dense", "complex-step"}
        How the witness estimates the gradients: central differences with
        whole columns perturbed per forward pass (default), central
        differences one entry at a time (the textbook check), or the complex
        step; see :func:`lincheck.witness.witness_block`.
    mode : {"auto", "full", "sample", "directions"}
        How much of the witness to compute. "full": every entry. "sample":
        ``samples`` random entries of dX and of dW. "directions":
        ``directions`` random rank-one ±1 directions of dX and of dW (an error
        whose largest entry exceeds the reported ``min_detectable_error`` is
        caught with probability ≥ 1 − (3/4)^directions; see
        :class:`lincheck.streaming.DirectionsWitness`). In both partial modes the
        subjects are still compared with the reference at every entry, and
        dB's witness is every entry (:class:`lincheck.streaming.BiasWitness`);
        X, dY and the dX and Y
        subjects are read a block of rows at a time, so memory-mapped arrays
        larger than memory can be checked (:class:`streaming.Rows`). "auto" (default): "full"
        if its cost, at a nominal 5·10¹⁰ multiply-adds per second, fits
        ``budget`` seconds, else "directions"; the report says why.
    samples, directions, seed : int
        Sizes of the partial modes and the seed of their random choices.
    budget : float
        Seconds of work "auto" allows a full witness.
    atol, rtol : float, optional
        If either is given, replace the bounds by ``numpy.allclose``'s rule,
        |subject − oracle| ≤ atol + rtol·|oracle| (the other defaults to 0).
    subject : str
        What to call the subjects in the report ("supplied", "analytic").
    sources : mapping, optional
        Array name → file it came from, for error messages.
    progress : callable, optional
        Called as ``progress(done, total)`` in forward passes of the witness
        as the check goes.

    Returns
    -------
    Report
        With no subjects, the report checks the float64 analytic formulas
        against the witness. A failed subject that fits a less accurate
        arithmetic gets a ``lower_precision`` hint.

    Raises
    ------
    InputError
        X, W, B or dY is malformed (not real numbers, NaN/Inf, wrong rank, a
        zero-size dimension, values whose products overflow) or their shapes
        disagree; or dB is given without B. A subject that is wrong in any
        way is a failed check, not an error.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X, W = rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    >>> B, G = rng.normal(size=2), rng.normal(size=(4, 2))
    >>> check(X, W, B, G, dX=G @ W, dW=G.T @ X, dB=G.mean(axis=0)).failed[0].tensor
    'dB'
    """
    if against not in ("reference", "witness"):
        raise ValueError(f"against must be 'reference' or 'witness', not {against!r}")
    model = None if precision is None else parse(precision)
    if method not in witness.METHODS:
        raise ValueError(f"method must be one of {witness.METHODS}, not {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, not {value}")
    allclose = None if atol is None and rtol is None else (atol or 0.0, rtol or 0.0)
    sources = sources or {}
    layouts.check_layout(layout)
    inputs = validate_inputs(X, W, B, dY, sources, layout)
    bias = inputs.B is not None
    if dB is not None and not bias:
        raise InputError(
            f"{label('dB', sources)}: a bias gradient is given but there is no bias B; "
            "supply B or leave dB out"
        )
    L = inputs.layer
    shapes = {
        "dX": (inputs.x_shape, (L.N, L.D_in)),
        "dW": ((L.D_out, L.D_in), (L.D_out, L.D_in)),
        "dB": ((L.D_out,), (L.D_out,)),
        "Y": (L.batch_shape + (L.D_out,), (L.N, L.D_out)),
    }
    if not bias:
        del shapes["dB"]
    supplied = {n: v for n, v in (("dX", dX), ("dW", dW), ("dB", dB), ("Y", Y)) if v is not None}
    given_scales = {"X": X_scale, "W": W_scale, "dY": dY_scale}
    scales = {
        n: layouts.internal(f"{n}_scale", real_array(f"{n}_scale", v, sources), layout)
        for n, v in given_scales.items()
        if v is not None
    }
    subjects, arrays = {}, {}
    for tensor, value in supplied.items():
        a = arrays[tensor] = real_array(tensor, value, sources)
        # A torch tensor from CUDA with TF32 allowed, or checked under autocast, was computed
        # in that arithmetic rather than its dtype's (lincheck/frameworks.py).
        p = model or parse(arithmetic_of(value) or precision_for(a.dtype))
        subjects[tensor] = plan.subject(
            tensor,
            layouts.internal(tensor, a, layout),
            p,
            subject,
            inputs.given,
            allclose,
            *shapes[tensor],
            scales=scales,
            certain_only=certain_only,
        )
    planned = plan.plans(shapes, subjects, against, "full")
    mode, reason = _choose_mode(mode, L, planned, method, budget)
    if mode == "full":  # a subject read from a file as it is used: read it once, whole
        subjects = {name: plan.read_whole(s) for name, s in subjects.items()}
    tallies = [plan.Tallies(p) for p in plan.plans(shapes, subjects, against, mode)]
    # Floating-point warnings are off (_quiet_numpy): results are checked explicitly.
    if mode == "full":
        layer, done, steps = _run_full(inputs, tallies, method, sources, progress)
    else:
        layer = None
        done, steps = _run_streamed(
            inputs, tallies, mode, samples, directions, seed, sources, progress
        )
    checks, witness_checks = [], []
    for t in tallies:
        own, against_witness = t.checks()
        checks += own
        witness_checks += against_witness
    failed = [t for t in tallies if t.needs_diagnosis]
    hints: list[Hint] = []
    if failed and layer is None and _diagnosable(L):
        layer = workspace.Workspace(inputs.X, inputs.W, inputs.B, inputs.G)
    for t in failed:
        if layer is None:
            hints.append(plan.not_diagnosed(t.plan.tensor, DIAGNOSIS_BYTES))
        else:
            hints += t.hints(layer, L.batch_shape, layout)
    if failed and layer is not None and L.D_in == L.D_out:
        hints = _other_layout(tallies, layer, L, layout, hints)
    checks = [layouts.user_check(c, layout, arrays.get("dW")) for c in checks]
    witness_checks = [layouts.user_check(c, layout) for c in witness_checks]
    witness_info: dict[str, Any] = {
        "method": method if mode == "full" else "central",
        "mode": mode,
        "forward_passes": int(np.ceil(done)),
        "steps": {name: tuple(v) for name, v in steps.items()},
    }
    if mode == "sample":
        witness_info.update(samples=samples, seed=seed)
    elif mode == "directions":
        witness_info.update(directions=directions, seed=seed)
    if reason:
        witness_info["reason"] = reason
    return Report(
        layer=L,
        checks=tuple(checks + witness_checks),
        witness=witness_info,
        hints=tuple(hints),
        layout=layout,
    )


def _other_layout(tallies, layer, L: Layer, layout: str, hints: list[Hint]) -> list[Hint]:
    """A square W read in the wrong layout: if the subjects fit the other layout
    (:func:`lincheck.diagnose.other_layout`), its ``layout`` hints replace the hints of the
    tensors it explains; otherwise ``hints`` as they are."""
    cases = {
        t.plan.tensor: (t.failure(layer, L.batch_shape, layout), t.needs_diagnosis)
        for t in tallies
        if t.plan.usable and t.plan.tensor in ("dX", "dW", "Y")
    }
    found = diagnose.other_layout(cases, layout)
    if not found:
        return hints
    return [h for h in hints if h.tensor not in found] + [found[t] for t in cases if t in found]


def _run_full(inputs: Inputs, tallies: list[plan.Tallies], method: str, sources, progress):
    """Every entry, column block by column block (:meth:`lincheck.workspace.Workspace.blocks`).

    Returns the layer's workspace (for the diagnosis), the forward passes
    done and the witness steps used.
    """
    layer = workspace.Workspace(inputs.X, inputs.W, inputs.B, inputs.G)
    check_no_overflow([layer.MY, layer.A_rows, layer.A_cols], sources)
    total = sum(layer.passes(t.plan.tensor, method) for t in tallies if t.plan.needs_witness)
    done = 0.0
    steps: dict[str, list[float]] = {}
    for t in tallies:
        p = t.plan
        for cols in layer.blocks(p.tensor, method, p.needs_witness):
            M, S = layer.magnitude(p.tensor, cols)
            block = None
            if p.needs_witness:
                block = witness.witness_block(layer, p.tensor, cols, M, method)
                # (an overflowing M shows in the bound, which is at least γ·M)
                check_no_overflow([block.estimate, block.bound], sources)
                done += block.passes
                plan.note_steps(steps, p.tensor, block.steps)
            t.add(layer, cols, M, S, block)
            if progress is not None and block is not None:
                progress(done, total)
    return layer, done, steps


def _totals(rows: streaming.Rows, subjects: dict) -> streaming.Totals:
    """The streamed totals, keeping what the dW and dB subjects' bounds will need: dW's
    magnitudes, and, as their arithmetic asks, its squares, the sums from the converted
    inputs and the order-weighted sums of a truncating accumulator (tolerances.py)."""
    converted: dict[str, np.ndarray] = {}
    squares, weights = False, None
    for name in ("dW", "dB"):
        sub = subjects.get(name)
        if sub is None:
            continue
        ops = sub.operands(name)
        converted.update({i: op.values for i, op in zip(("dY", "X"), ops) if op.values is not None})
        squares = squares or (name == "dW" and needs_squares(sub.precision, ops))
        acc = sub.precision.accumulator(name)
        if acc.truncates:
            weights = order_weights(rows.N, acc)
    return streaming.Totals(rows, "dW" in subjects, squares, converted, weights)


def _run_streamed(
    inputs: Inputs,
    tallies: list[plan.Tallies],
    mode: str,
    samples: int,
    directions: int,
    seed: int,
    sources,
    progress,
):
    """The partial modes, reading X and dY a block of rows at a time (:class:`streaming.Rows`).

    One pass over the row blocks compares the subjects of dX and Y row block
    by row block, runs the witnesses (sampled entries, random directions,
    dB's slopes) and sums what dW and dB need (:class:`streaming.Totals`);
    dW and dB are then compared whole. Memory is about W's size a few times
    over plus one block, whatever N is, so inputs larger than memory can be
    checked. Returns the forward passes done and the witness steps used.
    """
    rows = streaming.Rows(inputs.X, inputs.W, inputs.B, inputs.G)
    by_tensor = {t.plan.tensor: t for t in tallies}
    usable = {name for name, t in by_tensor.items() if t.plan.usable}
    totals = _totals(rows, {n: t.plan.subject for n, t in by_tensor.items() if n in usable})
    rng = np.random.default_rng(seed)
    found = {
        t.plan.tensor: t.partial_witness(totals, rows, mode, samples, directions, seed, rng)
        for t in tallies
        if t.plan.witnessed
    }
    total = sum(w.passes for w in found.values())
    done = 0.0
    reach = 0.0
    for r, block in rows:
        with np.errstate(over="ignore"):
            reach += _check_block_overflow(block, sources)
        totals.add(block, r)
        for tensor in ("dX", "Y"):
            if tensor in usable:
                M, S = block.magnitude(tensor)
                if tensor == "dX":  # whole, once: its chunks and dX's witness share it
                    block.reference("dX")
                for sub, chunk in block.row_chunks():
                    sliced = tuple(x[sub] if x.shape[0] == block.N else x for x in S)
                    span = slice(r.start + sub.start, r.start + sub.stop)
                    by_tensor[tensor].add(chunk, None, M[sub], sliced, None, rows=span)
        for w in found.values():
            w.add(r, block)
        done += total * (r.stop - r.start) / rows.N
        if progress is not None and found:
            progress(done, total)
    _check_dW_overflow(reach, rows, sources)
    if "dW" in usable:
        M, S = totals.magnitude("dW")
        for units, view in totals.row_chunks():
            by_tensor["dW"].add(view, None, M[units], (S[0], S[1][units]), None, rows=units)
    if "dB" in usable:
        M, S = totals.magnitude("dB")
        by_tensor["dB"].add(totals, None, M, S, None)
    steps: dict[str, list[float]] = {}
    for tensor, t in by_tensor.items():  # in the plans' order
        if tensor in found:
            t.finish_partial_witness(found[tensor], totals, steps)
    return total, steps


_ROOM = 2.0**900
"""Far enough below float64's largest value (2¹⁰²⁴) for any rounding of a bound's sums."""


def _check_block_overflow(block: workspace.Workspace, sources) -> float:
    """:func:`check_no_overflow` of a row block's products of absolute values, as the full
    mode's witness bounds check them, without computing them when bounds from row sums
    show they are far from overflow (σₙ = Σᵢ|G[n, i]|, ρₙ = Σⱼ|X[n, j]|):

    - MY[n, i] ≤ ρₙ max|W| + max|B|, so every loss share is at most
      Σₙ σₙ (ρₙ max|W| + max|B|);
    - dX's magnitudes, Σᵢ |G[n, i]||W[i, j]| ≤ σₙ max|W|.

    Returns this block's part of a bound on dW's magnitudes, Σₙ σₙ ρₙ (checked once
    the blocks are summed, :func:`_check_dW_overflow`)."""
    with np.errstate(over="ignore", invalid="ignore"):
        w = float(block.max_W_cols.max(initial=0.0))  # kept across the blocks
        b = 0.0 if block.B is None else float(np.abs(block.B).max(initial=0.0))
        sigma, rho = block.sum_G_rows, block.sum_X_rows
        top = float(np.sum(sigma * (rho * w + b)))
        dX = float(sigma.max(initial=0.0)) * w
        dW = float(sigma @ rho)
    if not (np.isfinite(top) and top < _ROOM):
        check_no_overflow([block.MY, block.A_rows, block.A_cols], sources)
    if not (np.isfinite(dX) and dX < _ROOM):
        check_no_overflow([block.magnitude("dX")[0]], sources)
    return dW


def _check_dW_overflow(reach: float, rows: streaming.Rows, sources) -> None:
    """:func:`check_no_overflow` of dW's magnitudes |G|ᵀ|X| when ``reach`` (Σₙ σₙ ρₙ over
    the blocks, :func:`_check_block_overflow`) does not show them far from overflow: a
    second pass over the rows then sums them (inputs within a few powers of float64's
    largest value only)."""
    if np.isfinite(reach) and reach < _ROOM:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        M = sum(block.aG.T @ block.aX for _, block in rows)
    check_no_overflow([np.asarray(M)], sources)


def _diagnosable(L: Layer) -> bool:
    """Whether a failed check of a streamed layer is small enough to diagnose in memory."""
    return DIAGNOSIS_FACTOR * 8 * L.N * (L.D_in + L.D_out) <= DIAGNOSIS_BYTES


DIAGNOSIS_BYTES = 2**30
"""Memory a diagnosis may take after a streamed check."""

DIAGNOSIS_FACTOR = 16
"""A diagnosis holds the whole layer (:class:`workspace.Workspace`) and tries its alternatives on
whole tensors: measured at about 13 times the float64 bytes of X and dY."""


MODES = ("auto", "full", "sample", "directions")

NOMINAL_RATE = 5e10
"""Multiply-adds per second assumed when choosing a mode: a deterministic cost
model (the same inputs always get the same mode), about right for a 2-core
machine with OpenBLAS in float64."""


def cost_options(options: Mapping[str, Any]) -> dict:
    """The check options (as given to :func:`check`) that :func:`nominal_seconds` takes,
    those set (a None is its default)."""
    names = ("mode", "method", "budget", "directions", "samples")
    return {name: options[name] for name in names if options.get(name) is not None}


def nominal_seconds(
    N: int,
    D_in: int,
    D_out: int,
    mode: str = "auto",
    method: str = "central",
    budget: float = 10.0,
    directions: int = 40,
    samples: int = 64,
) -> float:
    """About how long a check's witness takes at :data:`NOMINAL_RATE` (an upper estimate
    of its forward passes, before any array is read): what the command line decides by
    whether to show a progress bar at once."""
    per_pass = N * D_in * D_out / NOMINAL_RATE
    full = sum(workspace.full_passes(N, D_in, D_out, t, method) for t in ("dX", "dW", "dB"))
    if mode == "full" or (mode == "auto" and full * per_pass <= budget):
        return full * per_pass
    # The references' and magnitudes' products and the per-entry work (about six passes'
    # worth, measured), and the witness: the directions' rows and units through the
    # layer, or each sampled entry's row (dX) or unit (dW) twice.
    if mode == "sample":
        return (6 + 2 * samples / max(N, 1) + 2 * samples / max(D_out, 1)) * per_pass
    return (6 + directions / max(N, 1) + directions / max(D_out, 1)) * per_pass


def _choose_mode(mode, layer, plans, method, budget) -> tuple[str, str]:
    """The mode to run and, if chosen automatically against the budget, why."""
    if mode != "auto":
        return mode, ""
    passes = sum(
        workspace.full_passes(layer.N, layer.D_in, layer.D_out, p.tensor, method)
        for p in plans
        if p.witnessed or p.against_witness
    )
    seconds = passes * layer.N * layer.D_in * layer.D_out / NOMINAL_RATE
    if seconds <= budget:
        return "full", ""
    return "directions", (
        f"a full witness needs {passes:,} forward passes, about {seconds:,.0f} s at "
        f"{NOMINAL_RATE / 1e9:.0f} G multiply-adds/s, over the {budget:g} s budget; "
        "checked random directions instead (--mode full forces every entry)"
    )


def memory_needed(
    shapes: Mapping[str, tuple[int, ...]],
    mode: str = "full",
    method: str = "central",
    budget: float = 10.0,
) -> int:
    """Bytes a check of arrays with these shapes needs beyond the arrays themselves.

    ``shapes`` maps the names of the arrays given (X, W, dY, and any of B,
    dX, dW, dB, Y) to their shapes; "auto" is resolved as :func:`check`
    resolves it. A full check holds float64 copies of the inputs and
    subjects, the absolute values and magnitudes the bounds need
    (:class:`lincheck.workspace.Workspace`), and one block of perturbed forward
    passes with its per-entry arrays (twice ``workspace.BLOCK_BYTES``). The
    partial modes stream the rows (:class:`lincheck.streaming.Rows`): they
    hold some twenty-five arrays the size of W (W, its sums over the batch,
    the per-entry arrays of dW's check) and one row block
    (``streaming.ROW_BLOCK_BYTES``), whatever N is. It is an upper
    estimate, within a small factor of what the check allocates.
    """
    size = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    D_in, D_out = shapes["W"][-1], shapes["W"][0]
    N = size["X"] // max(D_in, 1)
    if mode == "auto":
        given = [t for t in ("dX", "dW", "dB") if t in shapes] or ["dX", "dW", "dB"]
        passes = sum(workspace.full_passes(N, D_in, D_out, t, method) for t in given)
        mode = "full" if passes * N * D_in * D_out / NOMINAL_RATE <= budget else "directions"
    if mode != "full":
        return 8 * (25 * D_out * D_in + 4 * D_in + 8 * D_out) + streaming.ROW_BLOCK_BYTES
    inputs = size["X"] + size["W"] + size["dY"] + size.get("B", 0)
    subjects = sum(size.get(n, 0) for n in SUBJECT_NAMES)
    layer = 2 * inputs + 2 * N * D_out  # float64 views or copies, |·|, MY and its shares
    # A block's perturbed passes and its per-entry arrays each take up to BLOCK_BYTES.
    return 8 * (layer + subjects) + 2 * workspace.BLOCK_BYTES


def random_inputs(
    rng: np.random.Generator,
    N: int,
    D_in: int,
    D_out: int,
    dtype: str = "float64",
    bias: bool = True,
) -> dict[str, np.ndarray]:
    """Random X, W, B, dY like a freshly initialised ``torch.nn.Linear`` sees.

    X and dY are standard normal; W and B are uniform on ±1/√D_in (PyTorch's
    default initialisation). Values are drawn in float64 and rounded once to
    ``dtype`` (to nearest, ties to even; the narrow floats of
    :data:`NARROW_DTYPES` through ``ml_dtypes``, which saturates nothing here:
    the values stay far below e4m3's largest, 448).
    """
    if dtype not in DTYPES + NARROW_DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES + NARROW_DTYPES}, not {dtype!r}")
    bound = 1.0 / np.sqrt(D_in)
    arrays = {
        "X": rng.standard_normal((N, D_in)),
        "W": rng.uniform(-bound, bound, (D_out, D_in)),
        "B": rng.uniform(-bound, bound, D_out),
        "dY": rng.standard_normal((N, D_out)),
    }
    if not bias:
        del arrays["B"]
    target = narrow_dtype(dtype) if dtype in NARROW_DTYPES else np.dtype(dtype)
    return {name: a.astype(target) for name, a in arrays.items()}


def analytic_gradients(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dX, dW (and dB) computed by NumPy in the arrays' own dtype, dX shaped like X.

    bfloat16 arrays are computed as frameworks compute them (the ``bf16``
    preset): the bfloat16 operands, exact in float32, multiplied and summed in
    float32, each result rounded once to bfloat16. (NumPy's own sums of
    ``ml_dtypes`` arrays would round every partial sum to bfloat16.)
    """
    X, G = as_batch(arrays["X"], arrays["dY"])
    W = arrays["W"]
    narrow = X.dtype.name in NARROW_DTYPES
    if narrow:
        X, W, G = (np.asarray(a, dtype=np.float32) for a in (X, W, G))
    grads = backward(X, W, G, bias="B" in arrays)
    out = {"dX": grads.dX.reshape(arrays["X"].shape), "dW": grads.dW}
    if grads.dB is not None:
        out["dB"] = grads.dB
    if narrow:
        out = {name: a.astype(arrays["X"].dtype) for name, a in out.items()}
    return out


__all__ = [
    "Entry",
    "Gradients",
    "Hint",
    "Layer",
    "Report",
    "TensorCheck",
    "analytic_gradients",
    "check",
    "random_inputs",
]
