"""How W (and dW) are stored: torch's (D_out, D_in), or (D_in, D_out) for ``x @ w + b``.

lincheck computes in one layout, torch's ``out_in``: W of shape (D_out, D_in)
and Y = X Wᵀ + B. JAX/Flax, Keras, TensorFlow and the CS231n assignments
store the kernel the other way, ``in_out``: W of shape (D_in, D_out) and
Y = X W + B, with dW = Xᵀ G of W's shape. A check in ``in_out`` transposes
W and dW at the edge (a view: no copy, and no read of a file-backed array,
:class:`lincheck.arrays.FileArray`), and maps what it reports about dW back
(:func:`user_check`), so that indices and shapes are the user's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

import numpy as np

LAYOUTS = ("out_in", "in_out")
OTHER = {"out_in": "in_out", "in_out": "out_in"}

W_AXES = {"out_in": "(D_out, D_in)", "in_out": "(D_in, D_out)"}
"""W's axes, in words, per layout."""

FORMULAS = {
    # The gradients (and the usual wrong products) written with W as the user stores it.
    "out_in": {"Y": "X Wᵀ + B", "dX": "dY W", "dW": "dYᵀ X", "dX_T": "dY Wᵀ", "dW_T": "Xᵀ dY"},
    "in_out": {"Y": "X W + B", "dX": "dY Wᵀ", "dW": "Xᵀ dY", "dX_T": "dY W", "dW_T": "dYᵀ X"},
}

_STYLE: ContextVar[str] = ContextVar("lincheck_layout_advice", default="python")


def check_layout(layout: str) -> str:
    """``layout`` if it is one lincheck knows, else ValueError."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return layout


def advice(layout: str) -> str:
    """How to ask for ``layout``: ``--layout in_out`` on the command line, ``layout="in_out"``
    from Python (the default)."""
    return option("layout", layout)


def option(name: str, value: str) -> str:
    """How to give an option: ``--precision fp16`` on the command line, ``precision="fp16"``
    from Python (the default)."""
    return f"--{name} {value}" if _STYLE.get() == "cli" else f'{name}="{value}"'


@contextmanager
def command_line_advice() -> Iterator[None]:
    """Within this block, messages name options as the CLI spells them (``--layout``)."""
    token = _STYLE.set("cli")
    try:
        yield
    finally:
        _STYLE.reset(token)


def transposed(a: Any) -> Any:
    """The transpose of a 2-D array as a view: an ndarray's ``.T``, or a file-backed array
    read in the other index order (:attr:`lincheck.arrays.FileArray.T`, nothing read)."""
    return a.T


def internal(tensor: str, a: Any, layout: str) -> Any:
    """A supplied W or dW (or W_scale) in lincheck's own layout: transposed for ``in_out`` if
    2-D. Anything else (another tensor, a dW of the wrong rank) is returned as it is."""
    if layout == "in_out" and tensor in ("W", "dW", "W_scale") and getattr(a, "ndim", 0) == 2:
        return transposed(a)
    return a


def stored(arrays: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """Arrays computed in lincheck's layout, with W and dW as ``layout`` stores them
    (C-contiguous: written to ``.npy`` files and handed to user functions)."""
    if layout == "out_in":
        return dict(arrays)
    return {
        name: np.ascontiguousarray(a.T) if name in ("W", "dW") and a.ndim == 2 else a
        for name, a in arrays.items()
    }


def user_index(index, flip: bool):
    """An index of the internal dW as the user indexes their dW (reversed when ``flip``)."""
    if index is None or not flip:
        return index
    return tuple(index)[::-1]


def user_check(check, layout: str, given: Any = None):
    """A dW :class:`~lincheck.results.TensorCheck` as the user sees it in ``layout``.

    ``given`` is the dW the user supplied (None for the reference's check). Shapes, the
    worst index, the worst entries and the error map are transposed back; a subject that
    was not compared gets its message in the user's shapes.
    """
    if layout == "out_in" or check.tensor != "dW":
        return check
    from .tensors import flat_index
    from .validate import nonfinite_summary

    expected = tuple(check.expected_shape)[::-1]
    flip = len(check.shape) == 2 and (given is None or getattr(given, "ndim", 0) == 2)
    shape = tuple(given.shape) if given is not None else tuple(check.shape)[::-1]
    changes: dict[str, Any] = {"shape": shape, "expected_shape": expected}
    if check.message.startswith("wrong shape"):
        changes["message"] = f"wrong shape: expected {expected}, got {shape}"
    elif check.message.startswith("contains") and given is not None:
        a = np.asarray(given)
        changes["message"] = nonfinite_summary(a)
        first = int(np.flatnonzero(~np.isfinite(a))[0])
        changes["worst_index"] = tuple(flat_index(first, a.shape))
    else:
        changes["worst_index"] = user_index(check.worst_index, flip)
        changes["worst_entries"] = tuple(
            replace(e, index=user_index(e.index, flip)) for e in check.worst_entries
        )
        if check.error_map is not None and flip:
            changes["error_map"] = check.error_map.T
    return replace(check, **changes)


def internal_shapes(shapes: Mapping[str, tuple[int, ...]], layout: str) -> dict:
    """Array shapes as lincheck's layout has them (W's and dW's reversed for ``in_out``)."""
    return {
        name: tuple(s)[::-1] if layout == "in_out" and name in ("W", "dW") and len(s) == 2 else s
        for name, s in shapes.items()
    }
