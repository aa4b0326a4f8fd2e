"""Validation of the inputs X, W, B, dY: real numbers, finite, shapes that fit.

Every problem is an :class:`~lincheck.errors.InputError` whose one-line
message names the array (and the file it came from) and what is wrong;
``docs/bad-input.md`` lists them. Subjects (dX, dW, dB, Y) are converted
here too, but a subject that is wrong is a failed check, not an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from . import layouts
from .core import CHUNK, FileBacked, as_batch, leading_chunks
from .errors import InputError
from .frameworks import framework_of_type, to_numpy
from .results import Layer


def label(name: str, sources: Mapping[str, str]) -> str:
    return f"{name} ({sources[name]})" if name in sources else name


NARROW_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
"""``ml_dtypes``' floating types (NumPy reports their kind as "V"), read like floats."""


def is_float(dtype) -> bool:
    """Whether arrays of ``dtype`` hold floating-point values (NumPy's or ``ml_dtypes``')."""
    return dtype.kind == "f" or dtype.name in NARROW_FLOATS


def real_array(name: str, value: Any, sources: Mapping[str, str]) -> np.ndarray:
    """``value`` as an ndarray of real numbers, or InputError naming it.

    Takes NumPy arrays, torch tensors and JAX arrays of any dtype on any device
    (bfloat16 and fp8 through their bits: :func:`lincheck.frameworks.to_numpy`),
    and anything else with ``__array__`` or DLPack (``__dlpack__``), such as
    CuPy on the host, without importing those libraries. A tensor that
    requires grad is read through its ``detach()``.
    """
    found = as_numpy(value)
    if isinstance(found, Exception):
        raise InputError(f"{label(name, sources)}: cannot be read as an array ({found})") from None
    # A FileBacked array offers the part of the ndarray interface the checks use.
    a = cast(np.ndarray, found)
    kind = a.dtype.kind
    if kind == "f" and a.dtype.itemsize > 8:
        raise InputError(
            f"{label(name, sources)}: dtype {a.dtype} (extended precision) is not supported; "
            "save it as float64"
        )
    narrow = a.dtype.name in NARROW_FLOATS  # (ml_dtypes reports e4m3fn's kind as "V", e5m2's "f")
    if (
        kind == "V"
        and a.dtype.names is None
        and not narrow
        and a.dtype.name.startswith(("float", "int", "uint"))
    ):
        raise InputError(  # another ml_dtypes type (float8_e4m3fnuz, float4_e2m1fn, int4, ...)
            f"{label(name, sources)}: dtype {a.dtype} is not supported; lincheck reads "
            f"{', '.join(NARROW_FLOATS)} besides NumPy's floats, integers and bool"
        )
    if kind not in "biuf" and a.dtype.name not in NARROW_FLOATS:
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
            f"{label(name, sources)}: dtype {a.dtype} is {what}; expected a real "
            "float, integer or bool array"
        )
    return a


def as_numpy(value: Any) -> np.ndarray | FileBacked | Exception:
    """An ndarray view of ``value`` (no copy where the producer allows), or the reason not.

    An array read from a file as it is used (:class:`~lincheck.core.FileBacked`) stays one.
    """
    if isinstance(value, np.ndarray | FileBacked):
        return value
    if framework_of_type(value):  # torch or JAX: any dtype (bfloat16, fp8), any device, exactly
        try:
            found = to_numpy(value)
        except Exception as exc:
            return exc
        if found is not None:
            return found
    problem: Exception | None = None
    try:  # a tensor that requires grad is read through detach(), which may raise
        detached = getattr(value, "detach", lambda: value)()
    except Exception as exc:
        return exc
    for candidate in (value, detached):
        if hasattr(candidate, "__dlpack__"):
            try:
                return np.from_dlpack(candidate)
            except Exception as exc:  # a device or dtype DLPack cannot hand to NumPy
                problem = exc
        try:
            return np.asarray(candidate)
        except Exception as exc:
            problem = exc
    return problem if problem is not None else TypeError(f"{type(value).__name__} is no array")


def check_finite(name: str, a: np.ndarray, sources: Mapping[str, str]) -> None:
    problem = nonfinite_summary(a)
    if problem:
        raise InputError(f"{label(name, sources)}: {problem}")


def nonfinite_summary(a: np.ndarray) -> str:
    """ "contains 2 NaN and 1 Inf, first at [i, j]", or "" when every value is finite.

    Reads the array a chunk at a time, so a memory-mapped file larger than
    memory is scanned without a mask of its size.
    """
    if not is_float(a.dtype) or (a.size <= CHUNK and np.isfinite(a).all()):
        return ""
    n_nan = n_bad = 0
    first = None
    for part in leading_chunks(a):
        finite = np.isfinite(a[part])
        if finite.all():
            continue
        n_bad += int(finite.size - np.count_nonzero(finite))
        n_nan += int(np.count_nonzero(np.isnan(a[part])))
        if first is None:
            where = np.unravel_index(int(np.flatnonzero(~finite)[0]), finite.shape)
            first = [int(i) for i in where]
            if a.ndim and isinstance(part, slice):
                first[0] += part.start
    if first is None:
        return ""
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_bad - n_nan, "Inf")) if n]
    return f"contains {' and '.join(parts)}, first at {first}"


@dataclass(frozen=True)
class Inputs:
    """Validated inputs, flattened to 2-D; W and B upcast exactly to float64, X and G as given."""

    X: np.ndarray
    W: np.ndarray
    B: np.ndarray | None
    G: np.ndarray
    given: Mapping[str, np.ndarray]  # as supplied, for representability checks
    x_shape: tuple[int, ...]
    layer: Layer


def validate_inputs(X, W, B, dY, sources: Mapping[str, str], layout: str = "out_in") -> Inputs:
    """The inputs checked and flattened; W as ``layout`` stores it (:mod:`lincheck.layouts`),
    returned in lincheck's own layout, (D_out, D_in). Messages use the shapes as given."""
    arrays = {"X": X, "W": W, "dY": dY}
    if B is not None:
        arrays["B"] = B
    given = {name: real_array(name, value, sources) for name, value in arrays.items()}
    X, W, G = given["X"], given["W"], given["dY"]
    B = given.get("B")
    if W.ndim != 2:
        raise InputError(
            f"{label('W', sources)}: expected 2 dimensions {layouts.W_AXES[layout]}, "
            f"found shape {W.shape}"
        )
    D_out, D_in = W.shape if layout == "out_in" else W.shape[::-1]
    if X.ndim < 1 or X.shape[-1] != D_in:
        if X.ndim >= 1 and _fits(X, W.shape if layout == "in_out" else W.shape[::-1], B, G):
            other = layouts.OTHER[layout]
            expected = (
                f"(D_out, {X.shape[-1]})" if layout == "out_in" else f"({X.shape[-1]}, D_out)"
            )
            raise InputError(
                f"{label('W', sources)}: shape {W.shape} does not fit X {X.shape}: expected "
                f"{expected}; it fits as {layouts.W_AXES[other]} = {W.shape}: was W saved "
                f"transposed? If your layer stores it so (Y = {layouts.FORMULAS[other]['Y']}), "
                f"pass {layouts.advice(other)}"
            )
        # W's other dimension fitting X names W as the likely culprit, though B or dY
        # do not fit it transposed (so no layout fits the whole case).
        turned = X.ndim >= 1 and X.shape[-1] == D_out and D_out != D_in
        raise InputError(
            f"{label('X', sources)}: shape {X.shape} does not fit W {W.shape}: expected "
            f"(..., {D_in}), the last dimension equal to W's D_in"
            + (
                f"; X's {X.shape[-1]} is W's other dimension: was W saved transposed?"
                if turned
                else ""
            )
        )
    if B is not None and B.shape != (D_out,):
        raise InputError(
            f"{label('B', sources)}: shape {B.shape} does not fit W {W.shape}: expected ({D_out},)"
        )
    expected_G = X.shape[:-1] + (D_out,)
    if G.shape != expected_G:
        raise InputError(
            f"{label('dY', sources)}: shape {G.shape} does not fit X {X.shape} and W {W.shape}: "
            f"expected {expected_G}, X's leading dimensions then D_out"
        )
    if 0 in X.shape or 0 in W.shape:
        raise InputError(
            f"{label('X' if 0 in X.shape else 'W', sources)}: a dimension has size 0 "
            f"(X {X.shape}, W {W.shape}); there is nothing to check"
        )
    for name, a in given.items():
        check_finite(name, a, sources)
    W = given["W"] = layouts.internal("W", W, layout)  # (D_out, D_in) from here on
    X2, G2 = as_batch(X, G)  # views in the given dtypes: memory-mapped files stay on disk
    layer = Layer(
        N=X2.shape[0],
        D_in=D_in,
        D_out=D_out,
        batch_shape=tuple(X.shape[:-1]),
        bias=B is not None,
        dtypes={name: str(a.dtype) for name, a in given.items()},
    )
    return Inputs(
        X=X2,
        W=np.asarray(W, dtype=np.float64),
        B=None if B is None else np.asarray(B, dtype=np.float64),
        G=G2,
        given=given,
        x_shape=tuple(X.shape),
        layer=layer,
    )


def _fits(X, W_out_in: tuple[int, ...], B, G) -> bool:
    """Whether X, B and dY fit a W of shape ``W_out_in`` = (D_out, D_in)."""
    D_out, D_in = W_out_in
    bias_fits = B is None or tuple(B.shape) == (D_out,)
    return X.shape[-1] == D_in and bias_fits and tuple(G.shape) == X.shape[:-1] + (D_out,)


def layer_of(
    X, W, B, dY, sources: Mapping[str, str] | None = None, layout: str = "out_in"
) -> Layer:
    """The shapes of a layer (N, D_in, D_out, bias, dtypes) from its inputs, validated as
    :func:`check` validates them (InputError names what is wrong)."""
    return validate_inputs(X, W, B, dY, sources or {}, layout).layer


def check_no_overflow(arrays, sources: Mapping[str, str]) -> None:
    """Inputs whose products or perturbed forward passes overflow float64 cannot be checked."""
    if all(a is None or np.isfinite(a).all() for a in arrays):
        return
    names = ", ".join(label(n, sources) for n in ("X", "W", "dY"))
    raise InputError(
        f"{names}: values too large: sums of products overflow float64 "
        "(largest representable 1.8e308); rescale the inputs"
    )
