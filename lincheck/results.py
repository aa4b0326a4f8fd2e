r"""What a check produces: result types and their JSON.

:class:`Report` holds one :class:`TensorCheck` per tensor and oracle, the
:class:`Layer`'s sizes and the :class:`Hint`\ s; ``as_dict`` / ``to_json``
give the JSON report whose field names are stable (README, "JSON report").
Presentation (:mod:`lincheck.report`, :mod:`lincheck.ci`,
:mod:`lincheck.plots`) needs only this module, not the checking engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .tally import RESOLVE
from .tensors import flat_index

if TYPE_CHECKING:
    from .tally import Tally
    from .witness import Directions


@dataclass(frozen=True)
class Hint:
    """A diagnosis of a failed check: a stable ``code``, the tensor, a sentence, the evidence.

    Codes: ``transposed``, ``layout`` (a square W stored the other way: every
    subject fits the other layout), ``mean_instead_of_sum``, ``sign_flipped``,
    ``scaled``, ``bias_not_summed``, ``bias_wrong_axis``, ``swapped`` (dX
    and dW), ``weight_decay``, ``wrong_operand``, ``rows_missing``, ``localized``,
    ``lower_precision``, ``non_finite``, and ``unexplained`` when a check
    failed and none of them fits.
    """

    code: str
    tensor: str
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "tensor": self.tensor,
            "message": self.message,
            "evidence": _plain(dict(self.evidence)),
        }


def _plain(value):
    """Evidence as plain JSON values: NumPy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class Entry:
    """One entry of a compared tensor: where it is and both values."""

    index: tuple[int, ...]
    subject: float
    oracle: float
    abs_error: float
    tolerance: float


@dataclass(frozen=True)
class TensorCheck:
    """The verdict on one tensor (dX, dW, dB or Y) against one oracle.

    ``subject`` says what was checked ("supplied" by the user, "analytic" as
    computed by lincheck in the run's dtype, or the float64 "reference"),
    ``oracle`` what it was checked against ("reference": the analytic
    gradient in float64; "witness": the numerical estimate). ``precision``
    is the arithmetic the subject is held to, ``rule`` what set the
    tolerance: "bound" (rounding-error bounds of subject and oracle) or
    "allclose" (the user's atol + rtol·|oracle|).

    ``bound_ratio`` is max |error| / tolerance (≤ 1 to pass);
    ``typical_ratio`` is max |error| / (√k u Σ|terms|), the probabilistic
    scale of rounding error (near 1 is normal); ``min_detectable_error`` is
    the smallest change to any single entry that is certain to fail the
    check: max over entries of tolerance + current error. ``mode`` is "full"
    (every entry), "sample" (``checked`` random entries) or "directions"
    (``checked`` random ±1 directions; errors and tolerances are then per
    direction, in units of the directional derivative per unit step, and
    ``worst_index`` is None).

    Error fields are None when there is nothing to compare (wrong shape or
    non-finite values; ``message`` says which). Indices index the tensor as
    the user supplied it, leading batch dimensions included.

    ``error_map`` is the error / tolerance of the 2-D tensor (leading batch
    dimensions flattened, dB as one row), pooled by maximum into at most
    ``tally.MAP_CELLS`` cells; ``histogram`` counts error / tolerance over
    ``tally.RATIO_BINS``. Both are None for checks along directions and
    for tensors that could not be compared; neither is in the JSON report.
    """

    tensor: str
    subject: str
    subject_dtype: str
    oracle: str
    precision: str
    rule: str
    passed: bool
    shape: tuple[int, ...]
    expected_shape: tuple[int, ...]
    max_abs_error: float | None
    max_rel_error: float | None
    bound_ratio: float | None
    typical_ratio: float | None
    worst_index: tuple[int, ...] | None
    tolerance: float | None
    min_detectable_error: float | None
    tolerance_rule: str
    message: str = ""
    worst_entries: tuple[Entry, ...] = ()
    mode: str = "full"
    checked: int = 0
    error_map: np.ndarray | None = field(default=None, compare=False, repr=False)
    histogram: np.ndarray | None = field(default=None, compare=False, repr=False)
    verdict: str = ""
    tier: str | None = None
    certain_ratio: float | None = None
    resolution: float | None = None

    def __post_init__(self):
        if not self.verdict:  # checks that are not tallied: pass or fail
            object.__setattr__(self, "verdict", "pass" if self.passed else "fail")

    @classmethod
    def not_compared(
        cls, tensor, subject, array, oracle, precision, rule, expected_shape, rule_text, problem
    ) -> TensorCheck:
        """A subject that could not be compared at all: wrong shape, NaN or Inf."""
        first = None
        if problem.startswith("contains"):
            first = tuple(flat_index(int(np.flatnonzero(~np.isfinite(array))[0]), array.shape))
        return cls(
            tensor=tensor,
            subject=subject,
            subject_dtype=str(array.dtype),
            oracle=oracle,
            precision=precision,
            rule=rule,
            passed=False,
            shape=tuple(array.shape),
            expected_shape=tuple(expected_shape),
            max_abs_error=None,
            max_rel_error=None,
            bound_ratio=None,
            typical_ratio=None,
            worst_index=first,
            tolerance=None,
            min_detectable_error=None,
            tolerance_rule=rule_text,
            message=problem,
        )

    @classmethod
    def from_tally(
        cls,
        tensor: str,
        tally: Tally,
        shape: tuple[int, ...],
        subject: str,
        dtype: str,
        oracle: str,
        precision: str,
        rule: str,
        rule_text: str,
        mode: str = "full",
    ) -> TensorCheck:
        """The verdict of an entry-by-entry comparison (:class:`lincheck.tally.Tally`)."""
        entries = tuple(
            Entry(
                index=tuple(flat_index(flat, shape)),
                subject=s,
                oracle=o,
                abs_error=abs(s - o),
                tolerance=tol,
            )
            for flat, s, o, tol in tally.best
        )
        if tally.exceeded:
            message = f"{tally.exceeded} of {tally.count} entries exceed their tolerance"
            if tally.tier == "statistical":
                message += " (statistical tier: beyond what rounding plausibly produces)"
            else:
                message += (
                    f" ({tally.certain_exceeded} beyond the rigorous bound: wrong whatever "
                    "the summation order)"
                )
        elif tally.unbounded:
            message = (
                f"inconclusive: {precision} arithmetic bounds nothing here (an operand beyond "
                "the format's range, or sums so long that every digit can be lost)"
            )
        elif not tally.conclusive:
            message = (
                f"inconclusive: under {precision} arithmetic the tolerance is at least half of "
                f"every entry (the largest |{tensor}| is {tally.resolution:.2g}× its tolerance, "
                f"{RESOLVE:g}× is needed), so even a zero {tensor} could pass; check a smaller "
                "batch, or a more accurate arithmetic"
            )
            if tensor == "dB" and precision in ("bf16", "fp16"):  # the presets' 16-bit sums
                message += f" (for torch's dB, summed in float32: {precision},reduce=fp32)"
        else:
            message = ""
        return cls(
            tensor=tensor,
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
            verdict=tally.verdict,
            tier=tally.tier,
            certain_ratio=tally.max_certain_ratio,
            resolution=tally.resolution if tally.resolve else None,
        )

    @classmethod
    def from_directions(
        cls, tensor: str, d: Directions, shape: tuple[int, ...], rule_text: str
    ) -> TensorCheck:
        """A check along random directions: one comparison per direction, no entry to name."""
        distance = np.abs(d.difference - d.predicted)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(distance == 0, 0.0, distance / d.tolerance)
            typical = np.where(distance == 0, 0.0, distance / d.typical)
            rel = np.where(distance == 0, 0.0, distance / np.abs(d.predicted))
        worst = int(np.argmax(ratio))
        # An infinite tolerance certifies nothing, and its sums may have overflowed (the
        # difference and ⟨r, V⟩ then infinite, their distance NaN): not counted as exceeded.
        bounded = np.isfinite(d.tolerance)
        exceeded = int(np.count_nonzero(bounded & ~(distance <= d.tolerance)))
        bounded = bool(np.all(bounded))
        return cls(
            tensor=tensor,
            subject="reference",
            subject_dtype="float64",
            oracle="witness",
            precision="fp64",
            rule="bound",
            passed=exceeded == 0 and bounded,
            shape=tuple(shape),
            expected_shape=tuple(shape),
            max_abs_error=float(np.max(distance / d.step)),
            max_rel_error=float(rel.max()),
            bound_ratio=float(ratio.max()),
            typical_ratio=float(typical.max()),
            worst_index=None,
            tolerance=float(d.tolerance[worst] / d.step[worst]),
            min_detectable_error=float(np.max((d.tolerance + distance) / d.step)),
            tolerance_rule=rule_text,
            message=f"{exceeded} of {len(distance)} directions exceed their tolerance"
            if exceeded
            else ""
            if bounded
            else "the bound along the directions is beyond float64's range: nothing certified",
            mode="directions",
            checked=len(distance),
            verdict="fail" if exceeded else "pass" if bounded else "inconclusive",
        )

    def require_map(self) -> np.ndarray:
        """The error map; only checks compared entry by entry have one (ValueError if not)."""
        if self.error_map is None:
            raise ValueError(f"{self.tensor}: no error map (not compared entry by entry)")
        return self.error_map

    @property
    def shape2d(self) -> tuple[int, int]:
        """The 2-D view the error map covers: leading dimensions flattened, dB one row."""
        shape = self.expected_shape
        return int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "subject": self.subject,
            "subject_dtype": self.subject_dtype,
            "oracle": self.oracle,
            "precision": self.precision,
            "rule": self.rule,
            "passed": self.passed,
            "verdict": self.verdict,
            "tier": self.tier,
            "shape": list(self.shape),
            "expected_shape": list(self.expected_shape),
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "bound_ratio": _json_float(self.bound_ratio),
            "certain_ratio": _json_float(self.certain_ratio),
            "resolution": _json_float(self.resolution),
            "typical_ratio": _json_float(self.typical_ratio),
            "worst_index": None if self.worst_index is None else list(self.worst_index),
            "tolerance": _json_float(self.tolerance),
            "min_detectable_error": _json_float(self.min_detectable_error),
            "tolerance_rule": self.tolerance_rule,
            "message": self.message,
            "mode": self.mode,
            "checked": self.checked,
            "worst_entries": [
                {
                    "index": list(e.index),
                    "subject": _json_float(e.subject),
                    "oracle": _json_float(e.oracle),
                    "abs_error": _json_float(e.abs_error),
                    "tolerance": _json_float(e.tolerance),
                }
                for e in self.worst_entries
            ],
        }


@dataclass(frozen=True)
class Layer:
    """The checked layer's sizes and the dtypes of the arrays given."""

    N: int
    D_in: int
    D_out: int
    batch_shape: tuple[int, ...]
    bias: bool
    dtypes: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "N": self.N,
            "D_in": self.D_in,
            "D_out": self.D_out,
            "batch_shape": list(self.batch_shape),
            "bias": self.bias,
            "dtypes": dict(self.dtypes),
        }


@dataclass(frozen=True)
class Report:
    """Everything one check produced. ``passed`` iff every check passed. ``layout`` is how W
    and dW were stored ("out_in", (D_out, D_in); or "in_out", (D_in, D_out)); dW's indices
    and shapes are as supplied."""

    layer: Layer
    checks: tuple[TensorCheck, ...]
    witness: Mapping[str, Any]
    hints: tuple[Hint, ...] = ()
    layout: str = "out_in"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[TensorCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (README, "JSON report"): passed, checks, hints, plus context."""
        return {
            "passed": self.passed,
            "checks": [c.as_dict() for c in self.checks],
            "hints": [h.as_dict() for h in self.hints],
            "layer": self.layer.as_dict(),
            "layout": self.layout,
            "witness": dict(self.witness),
        }

    def to_json(self, **context: Any) -> str:
        """The JSON report as strict JSON text, with ``context`` merged in at the top level."""
        return json_text({**self.as_dict(), **context})


def json_text(report: Mapping[str, Any]) -> str:
    """A report as strict JSON (no NaN or Infinity: those are null already), indented.

    A path whose bytes are not UTF-8 reaches Python as a string with lone
    surrogates, which strict JSON parsers reject: such bytes are written as
    ``\\xff`` escapes instead.
    """
    import json

    return json.dumps(_valid_text(report), indent=2, allow_nan=False) + "\n"


def _valid_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:  # bytes of a file name that Python decoded with surrogateescape
                raw = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # any other lone surrogate
                return value.encode("utf-8", "backslashreplace").decode("utf-8")
            return raw.decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, Mapping):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_text(v) for v in value]
    return value


def _json_float(x: float | None) -> float | None:
    """Strict JSON has no NaN or infinity: those become null."""
    return x if x is not None and np.isfinite(x) else None


def report_from_dict(data: Mapping[str, Any]) -> Report:
    """A report read back from its JSON form (:meth:`Report.as_dict`), as ``verify --resume``
    reads a case decided by an earlier run. What the JSON form leaves out stays out: the
    error maps and histograms (no heatmaps), and non-finite numbers (null in JSON).

    Raises KeyError, TypeError or ValueError on a dict that is not such a report.
    """

    def tup(value):
        return None if value is None else tuple(value)

    checks = []
    for c in data["checks"]:
        entries = tuple(
            Entry(tuple(e["index"]), e["subject"], e["oracle"], e["abs_error"], e["tolerance"])
            for e in c["worst_entries"]
        )
        plain = {k: v for k, v in c.items() if k not in ("worst_entries",)}
        plain.update(
            shape=tuple(c["shape"]),
            expected_shape=tuple(c["expected_shape"]),
            worst_index=tup(c["worst_index"]),
            worst_entries=entries,
        )
        checks.append(TensorCheck(**plain))
    hints = tuple(Hint(**h) for h in data["hints"])
    layer = dict(data["layer"])
    layer["batch_shape"] = tuple(layer["batch_shape"])
    return Report(
        Layer(**layer), tuple(checks), dict(data["witness"]), hints, data.get("layout", "out_in")
    )
