"""Check a linear layer's gradients: validate inputs, build the oracles, compare.

This is the library's entry point (:func:`check`); the command line renders
its :class:`Report`. The verdict on every entry is

    |subject − oracle| ≤ bound(subject) + bound(oracle)

where each bound is a rigorous worst-case rounding-error bound (see
:mod:`lincheck.numeric` and ``docs/numerics.md``), so no tolerance is hand-set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np

from . import diagnose, streaming, tally, witness, workspace
from .core import FileBacked, Gradients, as_batch, backward
from .errors import InputError
from .precision import (
    FLOAT64,
    PRECISIONS,
    Precision,
    precision_for,
    product_error,
    representable,
    storage_format,
)
from .results import Entry, Hint, Layer, Report, TensorCheck
from .tensors import OPERANDS, SUBJECT_NAMES
from .validate import (
    check_no_overflow,
    flat_index,
    label,
    nonfinite_summary,
    real_array,
    validate_inputs,
)

DTYPES = ("float64", "float32", "float16")


# ---------------------------------------------------------------------------
# Checking


def _quiet_numpy(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: lincheck tests every result it
    uses for overflow and NaN itself, and says so in one line, not in warnings on stderr."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
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
    precision: str | None = None,
    against: str = "reference",
    method: str = "central",
    mode: str = "auto",
    samples: int = 64,
    directions: int = 16,
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
    W : array_like, shape (D_out, D_in)
    B : array_like, shape (D_out,), or None for a layer without bias
    dY : array_like, shape (*, D_out)
        The upstream gradient G = ∂L/∂Y.
    dX, dW, dB, Y : array_like, optional
        Subjects: gradients (and a forward output) to check.
    precision : {"fp64", "fp32", "tf32", "bf16", "fp16"}, optional
        The arithmetic the subjects were computed in (see
        :mod:`lincheck.precision`). Default: from each subject's dtype
        (float64 → fp64, float32 → fp32, float16 → fp16, integers → fp64).
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
        ``directions`` random ±1 directions of dX and of dW (an error whose
        largest entry exceeds the reported ``min_detectable_error`` is caught
        with probability ≥ 1 − 2^-directions). In both partial modes the
        subjects are still compared with the reference at every entry, and
        dB's witness is whole (two forward passes); X, dY and the dX and Y
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
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, not {precision!r}")
    if method not in witness.METHODS:
        raise ValueError(f"method must be one of {witness.METHODS}, not {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    allclose = None if atol is None and rtol is None else (atol or 0.0, rtol or 0.0)
    sources = sources or {}
    inputs = validate_inputs(X, W, B, dY, sources)
    bias = inputs.B is not None
    if dB is not None and not bias:
        raise InputError(
            f"{label('dB', sources)}: a bias gradient is given but there is no bias B; "
            "supply B or leave dB out"
        )
    L = inputs.layer
    expected = {
        "dX": inputs.x_shape,
        "dW": (L.D_out, L.D_in),
        "dB": (L.D_out,),
        "Y": L.batch_shape + (L.D_out,),
    }
    supplied = {n: v for n, v in (("dX", dX), ("dW", dW), ("dB", dB), ("Y", Y)) if v is not None}
    shapes2d = {"dX": (L.N, L.D_in), "dW": (L.D_out, L.D_in), "dB": (L.D_out,), "Y": (L.N, L.D_out)}
    plans = []
    for tensor in ("dX", "dW", "dB", "Y"):
        if tensor == "dB" and not bias:
            continue
        plan = _Plan(tensor, expected[tensor], shapes2d[tensor])
        if tensor in supplied:
            a = real_array(tensor, supplied[tensor], sources)
            p = PRECISIONS[precision] if precision else precision_for(a.dtype)
            plan.subject = _Subject(a, p, subject, inputs.given, allclose)
            plan.against_witness = against == "witness" and tensor != "Y"
            plan.prepare(shapes2d[tensor])
        plan.witnessed = tensor != "Y" and (not supplied or tensor in supplied)
        if plan.subject is not None or plan.witnessed:
            plans.append(plan)
    mode, reason = _choose_mode(mode, L, plans, method, budget)
    for plan in plans:
        if mode != "full":
            # Only a full witness compares every entry; the subjects then go against the
            # reference (every entry, at the cost of one forward pass), and the reference
            # against the witness by sample or direction. dB's witness is always whole:
            # it costs two forward passes.
            plan.against_witness = False
            plan.block_witness = plan.tensor == "dB"
        elif plan.subject is not None and plan.against_witness:
            plan.witnessed = False  # the subject itself goes against the witness
        plan.mode = "full" if plan.block_witness else mode
    run = _run_full if mode == "full" else _run_streamed
    # Floating-point warnings are off (_quiet_numpy): results are checked explicitly.
    layer, done, steps = run(
        inputs, plans, method, mode, samples, directions, seed, sources, progress
    )
    checks = [p.subject_check() for p in plans if p.subject is not None]
    checks += [p.witness_check() for p in plans if p.witnessed]
    failed = [p for p in plans if p.needs_diagnosis]
    hints: list[Hint] = []
    if failed and layer is None and _diagnosable(L):
        layer = workspace.Workspace(inputs.X, inputs.W, inputs.B, inputs.G)
    for p in failed:
        hints += p.hints(layer, L.batch_shape) if layer is not None else [p.not_diagnosed()]
    witness_info = {
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
    return Report(layer=L, checks=tuple(checks), witness=witness_info, hints=tuple(hints))


def _run_full(inputs, plans, method, mode, samples, directions, seed, sources, progress):
    """Every entry, column block by column block (:meth:`lincheck.workspace.Workspace.blocks`)."""
    layer = workspace.Workspace(inputs.X, inputs.W, inputs.B, inputs.G)
    for plan in plans:  # a subject read from a file as used: read it once, whole
        if isinstance(plan.values, FileBacked):
            plan.values = np.asarray(plan.values)
    check_no_overflow([layer.MY, layer.A_rows, layer.A_cols], sources)
    total = sum(layer.passes(p.tensor, method) for p in plans if p.needs_witness)
    done = 0
    steps: dict[str, list[float]] = {}
    for plan in plans:
        for cols in layer.blocks(plan.tensor, method, plan.needs_witness):
            M, S = layer.magnitude(plan.tensor, cols)
            block = None
            if plan.needs_witness:
                block = witness.witness_block(layer, plan.tensor, cols, M, method)
                # (an overflowing M shows in the bound, which is at least γ·M)
                check_no_overflow([block.estimate, block.bound], sources)
                done += block.passes
                _note_steps(steps, plan.tensor, block.steps)
            plan.add(layer, cols, M, S, block)
            if progress is not None and block is not None:
                progress(done, total)
    return layer, done, steps


def _run_streamed(inputs, plans, method, mode, samples, directions, seed, sources, progress):
    """The partial modes, reading X and dY a block of rows at a time (:class:`streaming.Rows`).

    A first pass compares the subjects of dX and Y row block by row block,
    runs the witnesses that take each block's own steps (sampled entries,
    dB whole) and sums what dW, dB and the directions need
    (:class:`streaming.Totals`); dW and dB are then compared whole. Random
    directions need one step for a whole tensor, set by those sums: they
    take a second pass. Memory is about W's size a few times over plus one
    block, whatever N is, so memory-mapped inputs larger than memory can be
    checked.
    """
    rows = streaming.Rows(inputs.X, inputs.W, inputs.B, inputs.G)
    by_tensor = {p.tensor: p for p in plans}
    totals = streaming.Totals(rows, dW_magnitudes="dW" in by_tensor and by_tensor["dW"].usable)
    rng = np.random.default_rng(seed)
    later = [p for p in plans if p.witnessed and mode == "directions" and p.tensor != "dB"]
    now = {
        p.tensor: p.partial_witness(totals, rows, mode, samples, directions, seed, rng)
        for p in plans
        if p.witnessed and p not in later
    }
    total = sum(w.passes for w in now.values()) + 2 * directions * len(later)
    done = 0.0

    def step(r: slice, witnesses) -> None:
        nonlocal done
        done += sum(w.passes for w in witnesses) * (r.stop - r.start) / rows.N
        if progress is not None and witnesses:
            progress(done, total)

    for r, block in rows:
        check_no_overflow([block.MY, block.A_rows, block.A_cols], sources)
        totals.add(block)
        for tensor in ("dX", "Y"):
            if tensor in by_tensor and by_tensor[tensor].usable:
                M, S = block.magnitude(tensor)
                by_tensor[tensor].add(block, None, M, S, None, rows=r)
        for w in now.values():
            w.add(r, block)
        step(r, now.values())
    for tensor in ("dW", "dB"):
        if tensor in by_tensor and by_tensor[tensor].usable:
            M, S = totals.magnitude(tensor)
            by_tensor[tensor].add(totals, None, M, S, None)
    witnesses = dict(now)
    if later:
        second = {
            p.tensor: p.partial_witness(totals, rows, mode, samples, directions, seed, rng)
            for p in later
        }
        for r, block in rows:  # only X and dY as float64: the block's magnitudes are not needed
            for w in second.values():
                w.add(r, block)
            step(r, second.values())
        witnesses.update(second)
    steps: dict[str, list[float]] = {}
    for tensor in by_tensor:  # in the plans' order
        if tensor in witnesses:
            by_tensor[tensor].finish_partial_witness(witnesses[tensor], totals, steps)
    return None, total, steps


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
        "checked random directions instead (mode 'full' forces every entry)"
    )


def _note_steps(steps: dict[str, list[float]], tensor: str, block_steps) -> None:
    lo, hi = steps.get(tensor[1:], [np.inf, 0.0])
    steps[tensor[1:]] = [min(lo, block_steps[0]), max(hi, block_steps[1])]


class _Subject:
    """A supplied tensor, how it was computed, and what it is compared under."""

    def __init__(self, array, precision: Precision, label: str, given, allclose):
        self.array = array
        self.precision = precision
        self.label = label
        self.allclose = allclose
        self.storage = storage_format(array.dtype)
        self.given = given
        self.problem = ""

    def rounded(self, tensor: str, p: Precision) -> bool:
        """Whether the inputs, as given, had to be converted to ``p``'s operand format."""
        operands = [self.given[o] for o in OPERANDS[tensor] if o in self.given]
        return not all(representable(g, p.operands) for g in operands)


class _Plan:
    """Everything checked for one tensor, accumulated block by block."""

    def __init__(self, tensor: str, shape: tuple[int, ...], shape2d: tuple[int, ...]):
        self.tensor = tensor
        self.shape = shape  # as the user supplies it
        self.subject: _Subject | None = None
        self.against_witness = False
        self.witnessed = False
        self.values: np.ndarray | None = None  # the subject as float64, 2-D
        self.own_tally: tally.Tally | None = None  # the subject's, once it can be compared
        self.witness_tally = tally.Tally(shape=tuple(shape2d))
        self.rules = {"subject": "", "witness": ""}
        self.alternatives = ()
        self.usable = False
        self.block_witness = True  # the witness comes block by block (full mode, and dB)
        self.mode = "full"
        self.directions: witness.Directions | None = None

    @property
    def needs_witness(self) -> bool:
        return (self.witnessed and self.block_witness) or (self.usable and self.against_witness)

    def prepare(self, shape2d: tuple[int, ...]) -> None:
        """Decide once whether the subject can be compared at all (shape, NaN/Inf)."""
        sub = self.subject
        a = sub.array
        if tuple(a.shape) != tuple(self.shape):
            sub.problem = f"wrong shape: expected {tuple(self.shape)}, got {tuple(a.shape)}"
        elif problem := nonfinite_summary(a):
            sub.problem = problem
        else:
            self.usable = True
            self.own_tally = tally.Tally(shape=tuple(shape2d))
            self.values = a.reshape(shape2d)  # in its own dtype; upcast a block at a time
            if sub.allclose is None:
                self.alternatives = diagnose.candidates(sub.precision)
            self._rounded = {
                p.name: sub.rounded(self.tensor, p)
                for p in [sub.precision, *(PRECISIONS[n] for n in self.alternatives)]
            }

    def add(self, layer: workspace.Workspace, cols, M, S, block, rows: slice | None = None) -> None:
        """Compare one block: the subject against its oracle, the reference against the witness.

        A block is some columns (``cols``) of the whole layer, or all of a
        layer of some rows (``rows``) of the batch; ``layer`` is then that
        block's (:class:`streaming.Rows`).
        """
        tensor, k = self.tensor, layer.inner(self.tensor)
        ref = layer.reference(tensor, cols)
        ref_bound = product_error(M, S, k, PRECISIONS["fp64"], FLOAT64, False)
        flat = _flat_map(self.values.shape if rows else layer.shape(tensor), cols, rows)
        if self.usable:
            sub = self.subject
            s = self.values if cols is None else self.values[:, cols]
            s = np.asarray(s if rows is None else s[rows], dtype=np.float64)
            if self.against_witness:
                o, o_worst, o_typ, oracle = block.estimate, block.bound, block.typical, "witness"
            else:
                o, o_worst, o_typ, oracle = ref, ref_bound.worst, ref_bound.typical, "reference"
            rounded = self._rounded[sub.precision.name]
            own = product_error(M, S, k, sub.precision, sub.storage, rounded)
            if sub.allclose is None:
                tol = own.worst + o_worst
                self.rules["subject"] = f"{own.rule} + {oracle} bound"
                alternatives = {
                    name: product_error(
                        M, S, k, PRECISIONS[name], sub.storage, self._rounded[name]
                    ).worst
                    + o_worst
                    for name in self.alternatives
                }
            else:
                tol = sub.allclose[0] + sub.allclose[1] * np.abs(o)
                self.rules["subject"] = _allclose_rule(sub.allclose, oracle)
                alternatives = None
            typical = np.sqrt(own.typical**2 + o_typ**2)
            self.own_tally.add(s, o, tol, typical, flat, alternatives)
        if self.witnessed and block is not None:
            self._witness(ref, ref_bound, block, flat)

    def _witness(self, ref, ref_bound, block, flat) -> None:
        """The reference against the witness, for one block or one set of sampled entries."""
        allclose = self.subject.allclose if self.subject is not None else None
        if allclose is None:
            tol = ref_bound.worst + block.bound
            self.rules["witness"] = f"{ref_bound.rule} + witness bound"
        else:
            tol = allclose[0] + allclose[1] * np.abs(block.estimate)
            self.rules["witness"] = _allclose_rule(allclose, "witness")
        typical = np.sqrt(ref_bound.typical**2 + block.typical**2)
        self.witness_tally.add(ref, block.estimate, tol, typical, flat)

    def partial_witness(self, totals, rows, mode, samples, directions, seed, rng):
        """The streamed witness of a partial mode for this tensor (dB's is whole)."""
        if self.tensor == "dB":
            return streaming.BiasWitness(rows.N)
        if mode == "directions":
            reference = totals.reference("dW") if self.tensor == "dW" else None
            return streaming.DirectionsWitness(
                self.tensor, totals, rows.W, directions, seed, reference
            )
        shape2d = totals.shape(self.tensor)
        size = int(np.prod(shape2d))
        self.sampled = np.sort(rng.choice(size, size=min(samples, size), replace=False))
        entry_rows, cols = np.divmod(self.sampled, shape2d[1])
        return streaming.SampleWitness(self.tensor, entry_rows, cols, totals)

    def finish_partial_witness(self, witness, totals, steps) -> None:
        """The reference against a streamed witness, once every row block has gone through."""
        tensor = self.tensor
        if isinstance(witness, streaming.DirectionsWitness):
            self.directions = witness.result()
            self.rules["witness"] = "fp64 reference bound along each direction + witness bound"
            return
        if tensor == "dB":
            block, ref, (M, S) = witness.result(), totals.reference("dB"), totals.magnitude("dB")
            flat = _flat_map(totals.shape("dB"), None)
        else:
            (ref, M, S), block = witness.result()
            flat = lambda local: self.sampled[local]  # noqa: E731
        _note_steps(steps, tensor, block.steps)
        ref_bound = product_error(M, S, totals.inner(tensor), PRECISIONS["fp64"], FLOAT64, False)
        self._witness(ref, ref_bound, block, flat)

    def subject_check(self) -> TensorCheck:
        sub = self.subject
        a = sub.array
        oracle = "witness" if self.against_witness else "reference"
        rule = "bound" if sub.allclose is None else "allclose"
        if not self.usable:
            first = None
            if sub.problem.startswith("contains"):
                first = tuple(flat_index(int(np.flatnonzero(~np.isfinite(a))[0]), tuple(a.shape)))
            return TensorCheck(
                tensor=self.tensor,
                subject=sub.label,
                subject_dtype=str(a.dtype),
                oracle=oracle,
                precision=sub.precision.name,
                rule=rule,
                passed=False,
                shape=tuple(a.shape),
                expected_shape=tuple(self.shape),
                max_abs_error=None,
                max_rel_error=None,
                bound_ratio=None,
                typical_ratio=None,
                worst_index=first,
                tolerance=None,
                min_detectable_error=None,
                tolerance_rule=self.rules["subject"],
                message=sub.problem,
            )
        return self._from_tally(
            self.own_tally,
            sub.label,
            str(a.dtype),
            oracle,
            sub.precision.name,
            rule,
            self.rules["subject"],
        )

    def witness_check(self) -> TensorCheck:
        allclose = self.subject.allclose if self.subject is not None else None
        rule = "bound" if allclose is None else "allclose"
        if self.directions is not None:
            return self._from_directions(self.directions)
        return self._from_tally(
            self.witness_tally,
            "reference",
            "float64",
            "witness",
            "fp64",
            rule,
            self.rules["witness"],
            mode=self.mode,
        )

    def _from_directions(self, d: witness.Directions) -> TensorCheck:
        """A check along random directions: one comparison per direction, no entry to name."""
        distance = np.abs(d.difference - d.predicted)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(distance == 0, 0.0, distance / d.tolerance)
            typical = np.where(distance == 0, 0.0, distance / d.typical)
            rel = np.where(distance == 0, 0.0, distance / np.abs(d.predicted))
        worst = int(np.argmax(ratio))
        exceeded = int(np.count_nonzero(~(distance <= d.tolerance)))
        return TensorCheck(
            tensor=self.tensor,
            subject="reference",
            subject_dtype="float64",
            oracle="witness",
            precision="fp64",
            rule="bound",
            passed=exceeded == 0,
            shape=tuple(self.shape),
            expected_shape=tuple(self.shape),
            max_abs_error=float(np.max(distance / d.step)),
            max_rel_error=float(rel.max()),
            bound_ratio=float(ratio.max()),
            typical_ratio=float(typical.max()),
            worst_index=None,
            tolerance=float(d.tolerance[worst] / d.step[worst]),
            min_detectable_error=float(np.max((d.tolerance + distance) / d.step)),
            tolerance_rule=self.rules["witness"],
            message=""
            if exceeded == 0
            else f"{exceeded} of {len(distance)} directions exceed their tolerance",
            mode="directions",
            checked=len(distance),
        )

    def _from_tally(self, tally, subject, dtype, oracle, precision, rule, rule_text, mode="full"):
        best = tally.best
        shape = tuple(self.shape)
        entries = tuple(
            Entry(
                index=tuple(flat_index(flat, shape)),
                subject=s,
                oracle=o,
                abs_error=abs(s - o),
                tolerance=tol,
            )
            for flat, s, o, tol in best
        )
        if tally.exceeded:
            message = f"{tally.exceeded} of {tally.count} entries exceed their tolerance"
        elif tally.unbounded:
            message = (
                f"inconclusive: {precision} arithmetic bounds nothing here (sums of k terms "
                "with k·u ≥ 1 can lose every digit); if the sums were accumulated in float32, "
                "check with --precision fp32"
            )
        else:
            message = ""
        return TensorCheck(
            tensor=self.tensor,
            subject=subject,
            subject_dtype=dtype,
            oracle=oracle,
            precision=precision,
            rule=rule,
            passed=tally.passed,
            shape=shape,
            expected_shape=shape,
            max_abs_error=tally.max_abs,
            max_rel_error=tally.max_rel,
            bound_ratio=tally.max_ratio,
            typical_ratio=tally.max_typical_ratio,
            worst_index=entries[0].index if entries else None,
            tolerance=entries[0].tolerance if entries else None,
            min_detectable_error=tally.detectable,
            tolerance_rule=rule_text,
            message=message,
            worst_entries=entries,
            mode=mode,
            checked=tally.count,
            error_map=getattr(tally, "map", None),
            histogram=getattr(tally, "histogram", None),
        )

    @property
    def needs_diagnosis(self) -> bool:
        """A failed subject (not one that passed, or is inconclusive: no finite bound to
        measure a mistake by)."""
        return self.subject is not None and not (self.usable and self.own_tally.exceeded == 0)

    def not_diagnosed(self) -> Hint:
        return Hint(
            code="not_diagnosed",
            tensor=self.tensor,
            message=(
                "not diagnosed: a diagnosis holds the whole layer, over "
                f"{DIAGNOSIS_BYTES // 2**30} GiB here; the worst entries locate the errors"
            ),
        )

    def hints(self, layer: workspace.Workspace, batch_shape: tuple[int, ...]) -> list[Hint]:
        """What kind of mistake a failed subject looks like (nothing for a passing one)."""
        sub = self.subject
        if not self.needs_diagnosis:
            return []
        lower = None
        if self.usable and self.alternatives:
            lower = diagnose.lower_precision(
                self.tensor, sub.precision, sub.array, self.own_tally.alternatives
            )
        case = diagnose.Case(
            tensor=self.tensor,
            subject=sub.array,
            expected_shape=tuple(self.shape),
            layer=layer,
            precision=sub.precision,
            storage=sub.storage,
            rounded=self._rounded[sub.precision.name] if self.usable else False,
            batch_shape=batch_shape,
        )
        return diagnose.explain(case, lower)


def _allclose_rule(allclose: tuple[float, float], oracle: str) -> str:
    return f"atol {allclose[0]:g} + rtol {allclose[1]:g} × |{oracle}|"


def _flat_map(shape: tuple[int, ...], cols, rows: slice | None = None):
    """Map flat positions within a block to flat indices of the whole 2-D tensor.

    When the block's entries are contiguous in the tensor (whole rows), the map
    carries ``first``, the flat index of its first entry, so that callers can
    use slices instead of index arrays.
    """

    def offset(first: int):
        def shifted(local):
            return np.asarray(local, dtype=np.int64) + first

        shifted.first = first
        return shifted

    if rows is not None:
        return offset(rows.start * shape[1])
    if cols is None or (len(shape) == 2 and len(cols) == shape[1]):
        return offset(0)  # every column: the block is the whole tensor
    width = shape[1]

    def to_flat(local):
        rows, j = np.divmod(np.asarray(local, dtype=np.int64), len(cols))
        return rows * width + cols[j]

    return to_flat


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
    the per-entry arrays of dW's check, the perturbed copies of its
    directions) and one row block (``streaming.ROW_BLOCK_BYTES``), whatever N is. It is an upper
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
    ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    bound = 1.0 / np.sqrt(D_in)
    arrays = {
        "X": rng.standard_normal((N, D_in)),
        "W": rng.uniform(-bound, bound, (D_out, D_in)),
        "B": rng.uniform(-bound, bound, D_out),
        "dY": rng.standard_normal((N, D_out)),
    }
    if not bias:
        del arrays["B"]
    return {name: a.astype(dtype) for name, a in arrays.items()}


def analytic_gradients(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dX, dW (and dB) computed by NumPy in the arrays' own dtype, dX shaped like X."""
    X, G = as_batch(arrays["X"], arrays["dY"])
    grads = backward(X, arrays["W"], G, bias="B" in arrays)
    out = {"dX": grads.dX.reshape(arrays["X"].shape), "dW": grads.dW}
    if grads.dB is not None:
        out["dB"] = grads.dB
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
