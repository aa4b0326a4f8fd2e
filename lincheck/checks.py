"""Check a linear layer's gradients: validate inputs, build the oracles, compare.

This is the library's entry point (:func:`check`); the command line renders
its :class:`Report`. The verdict on every entry is

    |subject − oracle| ≤ bound(subject) + bound(oracle)

where each bound is a rigorous worst-case rounding-error bound (see
:mod:`lincheck.numeric` and ``docs/numerics.md``), so no tolerance is hand-set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from . import diagnose, numeric
from .core import Gradients, as_batch, backward, forward
from .diagnose import Hint
from .errors import InputError
from .precision import (
    PRECISIONS,
    ErrorBound,
    Precision,
    precision_for,
    product_error,
    representable,
    storage_format,
)

INPUT_NAMES = ("X", "W", "B", "dY")
SUBJECT_NAMES = ("dX", "dW", "dB", "Y")
DTYPES = ("float64", "float32", "float16")


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
    check: max over entries of tolerance + current error.

    Error fields are None when there is nothing to compare (wrong shape or
    non-finite values; ``message`` says which). Indices index the tensor as
    the user supplied it, leading batch dimensions included.
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "subject": self.subject,
            "subject_dtype": self.subject_dtype,
            "oracle": self.oracle,
            "precision": self.precision,
            "rule": self.rule,
            "passed": self.passed,
            "shape": list(self.shape),
            "expected_shape": list(self.expected_shape),
            "max_abs_error": _json_float(self.max_abs_error),
            "max_rel_error": _json_float(self.max_rel_error),
            "bound_ratio": _json_float(self.bound_ratio),
            "typical_ratio": _json_float(self.typical_ratio),
            "worst_index": None if self.worst_index is None else list(self.worst_index),
            "tolerance": _json_float(self.tolerance),
            "min_detectable_error": _json_float(self.min_detectable_error),
            "tolerance_rule": self.tolerance_rule,
            "message": self.message,
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
    """Everything one check produced. ``passed`` iff every check passed."""

    layer: Layer
    checks: tuple[TensorCheck, ...]
    witness: Mapping[str, Any]
    hints: tuple[Hint, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[TensorCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (``design.md``): passed, checks, hints, plus context."""
        return {
            "passed": self.passed,
            "checks": [c.as_dict() for c in self.checks],
            "hints": [h.as_dict() for h in self.hints],
            "layer": self.layer.as_dict(),
            "witness": dict(self.witness),
        }


def _json_float(x: float | None) -> float | None:
    """Strict JSON has no NaN or infinity: those become null."""
    return x if x is not None and np.isfinite(x) else None


# ---------------------------------------------------------------------------
# Input validation


def _label(name: str, sources: Mapping[str, str]) -> str:
    return f"{name} ({sources[name]})" if name in sources else name


def _index(flat: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(flat, shape)] if shape else []


def _real_array(name: str, value: Any, sources: Mapping[str, str]) -> np.ndarray:
    """``value`` as an ndarray of real numbers, or InputError naming it."""
    try:
        a = np.asarray(value)
    except Exception as exc:  # anything np.asarray cannot read is bad input
        raise InputError(f"{_label(name, sources)}: cannot be read as an array ({exc})") from None
    kind = a.dtype.kind
    if kind == "f" and a.dtype.itemsize > 8:
        raise InputError(
            f"{_label(name, sources)}: dtype {a.dtype} (extended precision) is not supported; "
            "save it as float64"
        )
    if kind not in "biuf":
        what = {
            "c": "complex",
            "O": "object (pickled)",
            "U": "string",
            "S": "bytes",
            "V": "structured or void",
            "M": "datetime",
            "m": "timedelta",
        }.get(kind, "non-numeric")
        raise InputError(
            f"{_label(name, sources)}: dtype {a.dtype} is {what}; expected a real "
            "float, integer or bool array"
        )
    return a


def _check_finite(name: str, a: np.ndarray, sources: Mapping[str, str]) -> None:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise InputError(f"{_label(name, sources)}: {_nonfinite_summary(a)}")


def _nonfinite_summary(a: np.ndarray) -> str:
    bad = ~np.isfinite(a)
    n_nan = int(np.count_nonzero(np.isnan(a)))
    n_inf = int(np.count_nonzero(bad)) - n_nan
    first = _index(int(np.flatnonzero(bad)[0]), a.shape)
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
    return f"contains {' and '.join(parts)}, first at {first}"


@dataclass(frozen=True)
class _Inputs:
    """Validated inputs, flattened to 2-D and upcast exactly to float64."""

    X: np.ndarray
    W: np.ndarray
    B: np.ndarray | None
    G: np.ndarray
    given: Mapping[str, np.ndarray]  # as supplied, for representability checks
    x_shape: tuple[int, ...]
    layer: Layer


def _validate_inputs(X, W, B, dY, sources: Mapping[str, str]) -> _Inputs:
    arrays = {"X": X, "W": W, "dY": dY}
    if B is not None:
        arrays["B"] = B
    given = {name: _real_array(name, value, sources) for name, value in arrays.items()}
    X, W, G = given["X"], given["W"], given["dY"]
    B = given.get("B")
    if W.ndim != 2:
        raise InputError(
            f"{_label('W', sources)}: expected 2 dimensions (D_out, D_in), found shape {W.shape}"
        )
    D_out, D_in = W.shape
    if X.ndim < 1 or X.shape[-1] != D_in:
        raise InputError(
            f"{_label('X', sources)}: shape {X.shape} does not fit W {W.shape}: expected "
            f"(..., {D_in}), the last dimension equal to W's D_in"
        )
    if B is not None and B.shape != (D_out,):
        raise InputError(
            f"{_label('B', sources)}: shape {B.shape} does not fit W {W.shape}: expected ({D_out},)"
        )
    expected_G = X.shape[:-1] + (D_out,)
    if G.shape != expected_G:
        raise InputError(
            f"{_label('dY', sources)}: shape {G.shape} does not fit X {X.shape} and W {W.shape}: "
            f"expected {expected_G}, X's leading dimensions then D_out"
        )
    if 0 in X.shape or 0 in W.shape:
        raise InputError(
            f"{_label('X' if 0 in X.shape else 'W', sources)}: a dimension has size 0 "
            f"(X {X.shape}, W {W.shape}); there is nothing to check"
        )
    for name, a in given.items():
        _check_finite(name, a, sources)
    X64, G64 = as_batch(X.astype(np.float64), G.astype(np.float64))
    layer = Layer(
        N=X64.shape[0],
        D_in=D_in,
        D_out=D_out,
        batch_shape=tuple(X.shape[:-1]),
        bias=B is not None,
        dtypes={name: str(a.dtype) for name, a in given.items()},
    )
    return _Inputs(
        X=X64,
        W=W.astype(np.float64),
        B=None if B is None else B.astype(np.float64),
        G=G64,
        given=given,
        x_shape=tuple(X.shape),
        layer=layer,
    )


# ---------------------------------------------------------------------------
# Checking


@dataclass(frozen=True)
class _Oracle:
    """Values of one oracle in the user's shapes, with per-entry error bounds."""

    name: str
    values: Mapping[str, np.ndarray | None]
    worst: Mapping[str, np.ndarray | None]
    typical: Mapping[str, np.ndarray | None]
    precision: str


_OPERANDS = {"dX": ("dY", "W"), "dW": ("dY", "X"), "dB": ("dY",), "Y": ("X", "W", "B")}


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
    grouped: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    subject: str = "supplied",
    sources: Mapping[str, str] | None = None,
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
    method : {"central", "complex-step"}
        How the witness estimates the gradients; see
        :func:`lincheck.numeric.central_differences` and
        :func:`lincheck.numeric.complex_step`.
    grouped : bool
        Perturb whole columns per forward pass (default) or one entry at a
        time (the textbook check; central differences only).
    atol, rtol : float, optional
        If either is given, replace the bounds by ``numpy.allclose``'s rule,
        |subject − oracle| ≤ atol + rtol·|oracle| (the other defaults to 0).
    subject : str
        What to call the subjects in the report ("supplied", "analytic").
    sources : mapping, optional
        Array name → file it came from, for error messages.

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
    allclose = None if atol is None and rtol is None else (atol or 0.0, rtol or 0.0)
    sources = sources or {}
    inputs = _validate_inputs(X, W, B, dY, sources)
    X64, W64, B64, G64 = inputs.X, inputs.W, inputs.B, inputs.G
    bias = B64 is not None
    if dB is not None and not bias:
        raise InputError(
            f"{_label('dB', sources)}: a bias gradient is given but there is no bias B; "
            "supply B or leave dB out"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        mags = numeric.Magnitudes.of(X64, W64, B64, G64)
        _check_no_overflow([mags.dX, mags.dW, mags.Y], sources)
        reference = backward(X64, W64, G64, bias=bias)
        wit = numeric.witness(X64, W64, B64, G64, method=method, grouped=grouped, magnitudes=mags)
        _check_no_overflow([*wit.grads, *wit.bounds], sources)
    L = inputs.layer
    expected = {
        "dX": inputs.x_shape,
        "dW": (L.D_out, L.D_in),
        "dB": (L.D_out,),
        "Y": L.batch_shape + (L.D_out,),
    }
    inner = {"dX": L.D_out, "dW": L.N, "dB": L.N, "Y": L.D_in + int(bias)}

    def as_given(values: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
        # Back from the flattened batch to the shapes the user supplied.
        return {n: None if v is None else np.reshape(v, expected[n]) for n, v in values.items()}

    def subject_bound(name: str, p: Precision, dtype: np.dtype) -> ErrorBound:
        M, S = mags.of_tensor(name)
        given = [inputs.given[o] for o in _OPERANDS[name] if o in inputs.given]
        rounded = not all(representable(g, p.operands) for g in given)
        bound = product_error(M, S, inner[name], p, storage_format(dtype), rounded)
        shape = expected[name]
        return ErrorBound(bound.worst.reshape(shape), bound.typical.reshape(shape), bound.rule)

    fp64 = PRECISIONS["fp64"]
    ref_bounds = {
        n: subject_bound(n, fp64, np.dtype(np.float64)) for n in expected if n != "dB" or bias
    }
    ref = _Oracle(
        "reference",
        as_given({**reference._asdict(), "Y": forward(X64, W64, B64)}),
        {n: b.worst for n, b in ref_bounds.items()},
        {n: b.typical for n, b in ref_bounds.items()},
        "fp64",
    )
    witness_oracle = _Oracle(
        "witness",
        as_given(wit.grads._asdict()),
        as_given(wit.bounds._asdict()),
        as_given(wit.typical._asdict()),
        "fp64",
    )

    supplied = {n: v for n, v in (("dX", dX), ("dW", dW), ("dB", dB), ("Y", Y)) if v is not None}
    checks: list[TensorCheck] = []
    hints: list[Hint] = []
    for name, value in supplied.items():
        a = _real_array(name, value, sources)
        p = PRECISIONS[precision] if precision else precision_for(a.dtype)
        oracle = witness_oracle if against == "witness" and name != "Y" else ref
        own = subject_bound(name, p, a.dtype)
        result = _compare(name, subject, a, oracle, own, p.name, allclose, expected[name])
        checks.append(result)
        if not result.passed and result.max_abs_error is not None and allclose is None:
            err = np.abs(a.astype(np.float64) - oracle.values[name])
            bound_for = partial(subject_bound, name, dtype=a.dtype)
            hint = diagnose.lower_precision(name, p, a, err, oracle.worst[name], bound_for)
            if hint is not None:
                hints.append(hint)
    if not supplied or against == "reference":
        for name in ("dX", "dW", "dB"):
            if (name == "dB" and not bias) or (supplied and name not in supplied):
                continue
            checks.append(
                _compare(
                    name,
                    "reference",
                    ref.values[name],
                    witness_oracle,
                    ErrorBound(ref.worst[name], ref.typical[name], ref_bounds[name].rule),
                    "fp64",
                    allclose,
                    expected[name],
                )
            )
    return Report(
        layer=L,
        checks=tuple(checks),
        witness={
            "method": wit.method,
            "grouped": wit.grouped,
            "forward_passes": wit.forward_passes,
            "steps": wit.steps,
        },
        hints=tuple(hints),
    )


def _check_no_overflow(arrays, sources: Mapping[str, str]) -> None:
    """Inputs whose products or perturbed forward passes overflow float64 cannot be checked."""
    if all(a is None or np.all(np.isfinite(a)) for a in arrays):
        return
    names = ", ".join(_label(n, sources) for n in ("X", "W", "dY"))
    raise InputError(
        f"{names}: values too large: sums of products overflow float64 "
        "(largest representable 1.8e308); rescale the inputs"
    )


def _compare(
    tensor: str,
    subject: str,
    value: np.ndarray,
    oracle: _Oracle,
    own: ErrorBound,
    precision: str,
    allclose: tuple[float, float] | None,
    expected_shape: tuple[int, ...],
) -> TensorCheck:
    """Compare one subject (as supplied) with an oracle, entry by entry."""
    value = np.asarray(value)
    shape = tuple(value.shape)
    if allclose is None:
        rule, rule_text = "bound", f"{own.rule} + {oracle.name} bound"
    else:
        rule, rule_text = (
            "allclose",
            f"atol {allclose[0]:g} + rtol {allclose[1]:g} × |{oracle.name}|",
        )
    base = dict(
        tensor=tensor,
        subject=subject,
        subject_dtype=str(value.dtype),
        oracle=oracle.name,
        precision=precision,
        rule=rule,
        shape=shape,
        expected_shape=tuple(expected_shape),
        tolerance_rule=rule_text,
    )
    nothing = dict(
        passed=False,
        max_abs_error=None,
        max_rel_error=None,
        bound_ratio=None,
        typical_ratio=None,
        tolerance=None,
        min_detectable_error=None,
    )
    if shape != tuple(expected_shape):
        return TensorCheck(
            **base,
            **nothing,
            worst_index=None,
            message=f"wrong shape: expected {tuple(expected_shape)}, got {shape}",
        )
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        first = np.flatnonzero(~np.isfinite(value))[0]
        return TensorCheck(
            **base,
            **nothing,
            worst_index=tuple(_index(int(first), shape)),
            message=_nonfinite_summary(value),
        )
    s = value.astype(np.float64)
    o = np.asarray(oracle.values[tensor], dtype=np.float64)
    if allclose is None:
        tol = own.worst + oracle.worst[tensor]
    else:
        tol = allclose[0] + allclose[1] * np.abs(o)
    tol = np.broadcast_to(tol, o.shape)
    typical = np.sqrt(own.typical**2 + oracle.typical[tensor] ** 2)
    cmp = numeric.compare(s, o, tol)
    err = np.abs(s - o)
    with np.errstate(divide="ignore", invalid="ignore"):
        typical_ratio = float(np.max(np.where(err == 0, 0.0, err / typical), initial=0.0))
    s_flat, o_flat, tol_flat = s.ravel(), o.ravel(), tol.ravel()
    entries = tuple(
        Entry(
            index=tuple(_index(i, shape)),
            subject=float(s_flat[i]),
            oracle=float(o_flat[i]),
            abs_error=float(abs(s_flat[i] - o_flat[i])),
            tolerance=float(tol_flat[i]),
        )
        for i in cmp.order
    )
    if cmp.passed:
        message = ""
    else:
        n_bad = int(np.count_nonzero(err > tol))
        message = f"{n_bad} of {s.size} entries exceed their tolerance"
    return TensorCheck(
        **base,
        passed=cmp.passed,
        max_abs_error=cmp.max_abs_error,
        max_rel_error=cmp.max_rel_error,
        bound_ratio=cmp.bound_ratio,
        typical_ratio=typical_ratio,
        worst_index=tuple(_index(cmp.worst, shape)),
        tolerance=cmp.tolerance_at_worst,
        min_detectable_error=float(np.max(tol + err, initial=0.0)),
        message=message,
        worst_entries=entries,
    )


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
