"""What is compared with what, per tensor: a frozen plan, and the tallies that fill it.

:func:`plans` decides once, before any work, for each of dX, dW, dB and Y:
whether there is a subject (the user's gradient) and whether it can be
compared at all (shape, NaN/Inf), what it is compared with (the float64
reference, or the witness itself in full mode), whether the reference is
checked against the witness, and whether that witness comes column block by
column block or streamed. A :class:`Plan` never changes afterwards.

:class:`Tallies` is the one mutable part: the running comparisons of one
plan, fed block by block by the runners in :mod:`lincheck.checks`, and
turned into :class:`~lincheck.results.TensorCheck` verdicts and
:class:`~lincheck.results.Hint` diagnoses at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from . import diagnose, streaming, tally, witness
from .core import FileBacked
from .precision import (
    Arithmetic,
    Format,
    Operand,
    model_operands,
    parse,
    reference_bound,
    storage_format,
)
from .results import Hint, TensorCheck
from .scaling import prepare
from .tally import RESOLVE, Positions
from .tensors import OPERANDS
from .tolerances import model_bound
from .validate import nonfinite_summary


@dataclass(frozen=True)
class Subject:
    """A supplied tensor: how it was computed, and whether it can be compared.

    ``problem`` is "" when it can (then ``values`` is its 2-D view, in its
    own dtype, upcast a block at a time), else what is wrong (a wrong shape,
    NaN or Inf). ``seen`` says how the declared model's kernel saw each input
    (:func:`lincheck.scaling.prepare`); ``alternatives`` are the arithmetics a
    failure is tested against (none under an allclose rule), whose views are
    worked out from ``inputs`` and ``scales`` only then. ``certain_only``: only
    the certain tier fails the check.
    """

    array: np.ndarray
    label: str
    precision: Arithmetic
    storage: Format
    allclose: tuple[float, float] | None
    problem: str
    values: np.ndarray | None
    alternatives: tuple[str, ...]
    seen: Mapping[str, Operand]
    certain_only: bool = False
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    scales: Mapping[str, np.ndarray] | None = None

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def oracle_rule(self) -> str:
        return "bound" if self.allclose is None else "allclose"

    def operands(self, tensor: str, name: str | None = None) -> tuple[Operand, ...]:
        """The operands of ``tensor`` as model ``name`` (default: the declared one) saw them
        (an alternative's are worked out when a failure is diagnosed)."""
        if name is None:
            return model_operands(self.precision, tensor, self.seen)
        model = parse(name)
        return model_operands(model, tensor, prepare(model, self.inputs, self.scales))


def subject(
    tensor: str,
    array: np.ndarray,
    precision: Arithmetic,
    label: str,
    given: Mapping[str, np.ndarray],
    allclose: tuple[float, float] | None,
    shape: tuple[int, ...],
    shape2d: tuple[int, ...],
    scales: Mapping[str, np.ndarray] | None = None,
    certain_only: bool = False,
) -> Subject:
    """Decide once whether a subject can be compared (shape, then NaN/Inf) and how."""
    if tuple(array.shape) != tuple(shape):
        problem = f"wrong shape: expected {tuple(shape)}, got {tuple(array.shape)}"
    else:
        problem = nonfinite_summary(array)
    values: np.ndarray | None = None
    alternatives: tuple[str, ...] = ()
    seen: Mapping[str, Operand] = {}
    inputs: dict[str, np.ndarray] = {}
    if not problem:
        values = array.reshape(shape2d)
        alternatives = diagnose.candidates(precision, tensor) if allclose is None else ()
        inputs = {o: given[o] for o in OPERANDS[tensor] if o in given}
        seen = prepare(precision, inputs, scales)
    return Subject(
        array=array,
        label=label,
        precision=precision,
        storage=storage_format(array.dtype),
        allclose=allclose,
        problem=problem,
        values=values,
        alternatives=tuple(alternatives),
        seen=seen,
        certain_only=certain_only,
        inputs=inputs if not problem else {},
        scales=scales,
    )


def read_whole(sub: Subject) -> Subject:
    """The subject with its values read into memory, if they are read from a file as used
    (a full check goes over them column block by column block: one read beats many)."""
    if isinstance(sub.values, FileBacked):
        return replace(sub, values=np.asarray(sub.values))
    return sub


@dataclass(frozen=True)
class Plan:
    """Everything decided about one tensor before the check runs.

    ``against_witness``: the subject goes against the witness (full mode,
    ``against="witness"``) instead of the float64 reference; ``witnessed``:
    the reference goes against the witness; ``block_witness``: that witness
    comes block by block (full mode, and dB's in every mode) rather than
    streamed by samples or directions; ``mode``: the witness's mode for this
    tensor.
    """

    tensor: str
    shape: tuple[int, ...]  # as the user supplies it
    shape2d: tuple[int, ...]
    subject: Subject | None
    against_witness: bool
    witnessed: bool
    block_witness: bool
    mode: str

    @property
    def usable(self) -> bool:
        return self.subject is not None and self.subject.usable

    @property
    def needs_witness(self) -> bool:
        """Whether a full run computes the witness for this tensor, block by block."""
        return (self.witnessed and self.block_witness) or (self.usable and self.against_witness)

    @property
    def allclose(self) -> tuple[float, float] | None:
        return None if self.subject is None else self.subject.allclose


def plans(
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
    subjects: Mapping[str, Subject],
    against: str,
    mode: str,
) -> list[Plan]:
    """The plans of the tensors to check, in the order dX, dW, dB, Y, for a resolved ``mode``.

    ``shapes`` maps each tensor of the layer to (its shape as supplied, its
    2-D shape). With no subjects, the analytic formulas are checked: every
    gradient's reference against the witness. Only a full witness compares
    every entry; in the partial modes the subjects go against the reference
    (every entry, at the cost of one forward pass) and the reference against
    the witness by sample or direction, and dB's witness is every entry (the
    bias's slopes from one row, :class:`lincheck.streaming.BiasWitness`).
    """
    out = []
    for tensor, (shape, shape2d) in shapes.items():
        sub = subjects.get(tensor)
        witnessed = tensor != "Y" and (not subjects or sub is not None)
        if sub is None and not witnessed:
            continue
        against_witness = sub is not None and against == "witness" and tensor != "Y"
        if mode != "full":
            against_witness, block_witness = False, tensor == "dB"
        else:
            block_witness = True
            if against_witness:
                witnessed = False  # the subject itself goes against the witness
        out.append(
            Plan(
                tensor=tensor,
                shape=tuple(shape),
                shape2d=tuple(shape2d),
                subject=sub,
                against_witness=against_witness,
                witnessed=witnessed,
                block_witness=block_witness,
                mode="full" if block_witness else mode,
            )
        )
    return out


def quadrature(a, b):
    """hypot(a, b) entry by entry: a subject's typical error and its oracle's, which add as
    independent errors do. Where b ≤ 2⁻²⁷ a at every entry (a float32 or narrower subject
    against the float64 reference, whose typical error is some 2⁻²⁹ of the subject's),
    (b/a)² ≤ 2⁻⁵⁴ and hypot(a, b) rounds to a: a is returned, without a per-entry hypot
    (among the costliest operations a check does on every entry)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.all(np.less_equal(b, np.multiply(a, 2.0**-27))):
            return a
    return np.hypot(a, b)


class Tallies:
    """The running comparisons of one plan: the subject's against its oracle, the
    reference's against the witness, and the rules that set their tolerances."""

    def __init__(self, plan: Plan):
        self.plan = plan
        resolve = plan.usable and plan.allclose is None
        self.own = tally.Tally(shape=plan.shape2d, resolve=resolve) if plan.usable else None
        self.witness = tally.Tally(shape=plan.shape2d)
        self.rules = {"subject": "", "witness": ""}
        self.directions: witness.Directions | None = None
        self.sampled: np.ndarray | None = None  # flat indices of sampled entries

    def add(self, layer, cols, M, S, block, rows: slice | None = None) -> None:
        """Compare one block: the subject against its oracle, the reference against the witness.

        A block is some columns (``cols``) of the whole layer, or all of a
        layer of some rows (``rows``) of the batch; ``layer`` is then that
        block's (:class:`streaming.Rows`), or the :class:`streaming.Totals`
        for dW and dB in the partial modes.
        """
        plan = self.plan
        tensor, k = plan.tensor, layer.terms(plan.tensor)
        ref = layer.reference(tensor, cols)
        ref_bound = reference_bound(M, S, k)
        flat = Positions.of_block(plan.shape2d, cols, rows)
        sub = plan.subject
        if sub is not None and sub.values is not None and self.own is not None:
            s = sub.values if cols is None else sub.values[:, cols]
            s = s if rows is None else s[rows]
            if s.dtype not in (np.float32, np.float64):  # float32 is subtracted as it is
                s = np.asarray(s, dtype=np.float64)
            if plan.against_witness:
                o, o_worst, o_typ, oracle = block.estimate, block.bound, block.typical, "witness"
            else:
                o, o_worst, o_typ, oracle = ref, ref_bound.worst, ref_bound.typical, "reference"

            def bound(name: str | None = None):
                model = sub.precision if name is None else parse(name)
                ops = sub.operands(tensor, name)
                return model_bound(layer, model, tensor, ops, sub.storage, M, S, ref, cols, rows)

            certain = None
            if sub.allclose is None:
                own = bound()
                certain = own.worst + o_worst
                tol = certain if sub.certain_only else own.statistical + o_worst
                tier = "rigorous bound" if sub.certain_only else "statistical tolerance"
                self.rules["subject"] = f"{own.rule}; {tier} + {oracle} bound"
                typical = quadrature(own.typical, o_typ)
            else:
                tol = sub.allclose[0] + sub.allclose[1] * np.abs(o)
                self.rules["subject"] = _allclose_rule(sub.allclose, oracle)
                typical = np.sqrt(bound().typical ** 2 + o_typ**2)
            self.own.add(s, o, tol, typical, flat, certain=certain)
        if plan.witnessed and block is not None:
            self.add_witness(ref, ref_bound, block, flat)

    def add_witness(self, ref, ref_bound, block, flat: Positions) -> None:
        """The reference against the witness, for one block or one set of sampled entries."""
        allclose = self.plan.allclose
        if allclose is None:
            tol = ref_bound.worst + block.bound
            self.rules["witness"] = f"{ref_bound.rule} + witness bound"
        else:
            tol = allclose[0] + allclose[1] * np.abs(block.estimate)
            self.rules["witness"] = _allclose_rule(allclose, "witness")
        typical = np.sqrt(ref_bound.typical**2 + block.typical**2)
        self.witness.add(ref, block.estimate, tol, typical, flat)

    def partial_witness(self, totals, rows, mode, samples, directions, seed, rng):
        """The streamed witness of a partial mode for this tensor (dB's is whole)."""
        tensor = self.plan.tensor
        if tensor == "dB":
            return streaming.BiasWitness(rows.N)
        if mode == "directions":
            return streaming.DirectionsWitness(
                tensor, rows, directions, seed, totals.sum_M, lambda: totals.reference("dW")
            )
        shape2d = totals.shape(tensor)
        size = int(np.prod(shape2d))
        self.sampled = np.sort(rng.choice(size, size=min(samples, size), replace=False))
        entry_rows, cols = np.divmod(self.sampled, shape2d[1])
        return streaming.SampleWitness(tensor, entry_rows, cols, totals)

    def finish_partial_witness(self, found, totals, steps) -> None:
        """The reference against a streamed witness, once every row block has gone through."""
        tensor = self.plan.tensor
        if isinstance(found, streaming.DirectionsWitness):
            self.directions = found.result()
            self.rules["witness"] = "fp64 reference bound along each direction + witness bound"
            return
        if tensor == "dB":
            block, ref, (M, S) = found.result(), totals.reference("dB"), totals.magnitude("dB")
            flat = Positions.of_block(totals.shape("dB"), None)
        else:
            (ref, M, S), block = found.result()
            flat = Positions(first=None, entries=self.sampled)
        note_steps(steps, tensor, block.steps)
        ref_bound = reference_bound(M, S, totals.terms(tensor))
        self.add_witness(ref, ref_bound, block, flat)

    def subject_check(self, sub: Subject) -> TensorCheck:
        plan = self.plan
        oracle = "witness" if plan.against_witness else "reference"
        if self.own is None:
            return TensorCheck.not_compared(
                plan.tensor,
                sub.label,
                sub.array,
                oracle,
                sub.precision.name,
                sub.oracle_rule,
                plan.shape,
                self.rules["subject"],
                sub.problem,
            )
        return TensorCheck.from_tally(
            plan.tensor,
            self.own,
            plan.shape,
            sub.label,
            str(sub.array.dtype),
            oracle,
            sub.precision.name,
            sub.oracle_rule,
            self.rules["subject"],
        )

    def witness_check(self) -> TensorCheck:
        plan = self.plan
        if self.directions is not None:
            return TensorCheck.from_directions(
                plan.tensor, self.directions, plan.shape, self.rules["witness"]
            )
        rule = "bound" if plan.allclose is None else "allclose"
        return TensorCheck.from_tally(
            plan.tensor,
            self.witness,
            plan.shape,
            "reference",
            "float64",
            "witness",
            "fp64",
            rule,
            self.rules["witness"],
            mode=plan.mode,
        )

    def checks(self) -> tuple[list[TensorCheck], list[TensorCheck]]:
        """(the subject's verdict, if any; the reference's against the witness, if any)."""
        sub = self.plan.subject
        return (
            [self.subject_check(sub)] if sub is not None else [],
            [self.witness_check()] if self.plan.witnessed else [],
        )

    @property
    def needs_diagnosis(self) -> bool:
        """A failed subject (not one that passed, or is inconclusive: no finite bound to
        measure a mistake by)."""
        if self.plan.subject is None:
            return False
        return self.own is None or self.own.exceeded != 0

    def alternative_fits(self, layer) -> dict[str, list]:
        """For each arithmetic a failure is tested against: [whether every entry fits its
        tolerance (the tier that decides) plus the reference's bound, the largest ratio,
        whether that tolerance could tell the gradient from zero (a check under it would be
        conclusive: :data:`lincheck.tally.RESOLVE`)]. Worked out only for a failed check,
        over the whole tensor of the diagnosis's layer."""
        sub, tensor = self.plan.subject, self.plan.tensor
        assert sub is not None and sub.values is not None
        M, S = layer.magnitude(tensor)
        k = layer.terms(tensor)
        ref = layer.reference(tensor)
        err = np.abs(np.asarray(sub.values, dtype=np.float64) - ref)
        extra = reference_bound(M, S, k).worst
        fits = {}
        for name in sub.alternatives:
            ops = sub.operands(tensor, name)
            b = model_bound(layer, parse(name), tensor, ops, sub.storage, M, S, ref)
            tol = (b.worst if sub.certain_only else b.statistical) + extra
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = float(np.max(np.where(err == 0, 0.0, err / tol), initial=0.0))
                size = np.abs(ref)
                resolves = not np.any(size) or bool(np.any(size > RESOLVE * tol))
            fits[name] = [bool(np.all(err <= tol)), ratio, resolves]
        return fits

    def hints(self, layer, batch_shape: tuple[int, ...], layout: str = "out_in") -> list[Hint]:
        """What kind of mistake a failed subject looks like (nothing for a passing one)."""
        sub = self.plan.subject
        if sub is None or not self.needs_diagnosis:
            return []
        lower = None
        if self.own is not None and sub.alternatives and sub.values is not None:
            fits = self.alternative_fits(layer)
            lower = diagnose.lower_precision(self.plan.tensor, sub.precision, sub.array, fits)
        return diagnose.explain(self.failure(layer, batch_shape, layout), lower)

    def failure(self, layer, batch_shape: tuple[int, ...], layout: str = "out_in"):
        """The subject as the diagnosis sees it (:class:`lincheck.diagnose.Failure`)."""
        sub = self.plan.subject
        assert sub is not None
        return diagnose.Failure(
            tensor=self.plan.tensor,
            subject=sub.array,
            expected_shape=self.plan.shape,
            layer=layer,
            precision=sub.precision,
            storage=sub.storage,
            operands=sub.operands(self.plan.tensor) if sub.usable else (),
            certain_only=sub.certain_only,
            batch_shape=batch_shape,
            layout=layout,
        )


def not_diagnosed(tensor: str, limit_bytes: int) -> Hint:
    return Hint(
        code="not_diagnosed",
        tensor=tensor,
        message=(
            "not diagnosed: a diagnosis holds the whole layer, over "
            f"{limit_bytes // 2**30} GiB here; the worst entries locate the errors"
        ),
    )


def note_steps(steps: dict[str, list[float]], tensor: str, block_steps: Sequence[float]) -> None:
    """Widen the range of witness steps seen for X, W or B (``tensor`` is dX, dW or dB)."""
    lo, hi = steps.get(tensor[1:], [np.inf, 0.0])
    steps[tensor[1:]] = [min(lo, block_steps[0]), max(hi, block_steps[1])]


def _allclose_rule(allclose: tuple[float, float], oracle: str) -> str:
    return f"atol {allclose[0]:g} + rtol {allclose[1]:g} × |{oracle}|"
