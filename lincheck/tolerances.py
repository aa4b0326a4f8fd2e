"""A subject's tolerances on a layer: :func:`lincheck.precision.subject_bound` fed with what
the layer (a :class:`~lincheck.workspace.Workspace`, a block of its rows, or the streamed
:class:`~lincheck.streaming.Totals`) knows of the terms: their magnitudes, largest
values, squares, a window tree's partial sums, the conversions' exact shift and a
truncating accumulator's order bias (``docs/numerics.md`` §2.3). The verdict, the
alternatives a failure is tried against and the diagnosis all call :func:`model_bound`.
"""

from __future__ import annotations

import numpy as np

from .precision import (
    Arithmetic,
    ErrorBound,
    Format,
    Operand,
    needs_squares,
    order_weights,
    subject_bound,
)


def model_bound(
    layer,
    model: Arithmetic,
    tensor: str,
    operands: tuple[Operand, ...],
    storage: Format,
    M,
    S,
    ref,
    cols=None,
    rows=None,
) -> ErrorBound:
    """The certain and statistical tolerances of ``tensor`` (columns ``cols``; ``rows``
    places a block of rows in the inputs) computed under ``model``, whose float64
    reference is ``ref`` and magnitudes M, S."""
    return subject_bound(
        model,
        tensor,
        layer.terms(tensor),
        M,
        S,
        ref,  # its sign is ignored
        lambda: layer.largest(tensor, cols),  # only where the model needs it
        operands,
        storage,
        *_statistics(layer, model, tensor, operands, ref, cols, rows),
    )


def _statistics(layer, model: Arithmetic, tensor: str, operands, ref, cols, rows) -> tuple:
    """(Σ terms², B for Y, the window tree's fluctuations, the conversions' exact shift,
    the order bias) for the statistical tier, each computed only where the model needs
    it (None otherwise)."""
    squares = layer.squares(tensor, cols) if needs_squares(model, operands) else None
    acc = model.accumulator(tensor)
    tree = layer.tree_squares(acc.window) if acc.window and tensor == "dB" else None
    bias = layer.B if tensor == "Y" else None
    shift = _conversion_shift(layer, tensor, operands, ref, cols, rows)
    ordered = None
    if acc.truncates:
        k = layer.terms(tensor)
        w = order_weights(k, acc)
        weighted = layer.ordered(tensor, w, cols)
        if weighted is not None:  # Σ wᵢ rᵢ = Σ wᵢ tᵢ − (v/k) Σ wᵢ
            ordered = weighted - ref * (w.sum() / k)
    return squares, bias, tree, shift, ordered


def _conversion_shift(layer, tensor: str, operands, ref, cols, rows):
    """The reference computed from the operands as the model's kernel converted them, less
    the reference: what the conversions move each entry by (None if no operand was
    converted, or the layer is streamed totals, or the inputs are read from files)."""
    if not any(op.values is not None for op in operands):
        return None
    if not hasattr(layer, "G"):  # streamed totals: kept as the blocks went by, if asked
        return layer.conversion_shift(tensor, cols)
    sel: slice | np.ndarray = slice(None) if cols is None else cols
    r = slice(None) if rows is None else rows

    def value(op, name):
        if op.values is None:
            return getattr(layer, name)
        return op.values if name == "W" or name == "B" else op.values[r]

    if tensor == "dX":
        got = value(operands[0], "G") @ value(operands[1], "W")[:, sel]
    elif tensor == "dW":
        got = value(operands[0], "G").T @ value(operands[1], "X")[:, sel]
    elif tensor == "dB":
        got = value(operands[0], "G").sum(axis=0)
    else:
        got = value(operands[0], "X") @ value(operands[1], "W").T
        if layer.B is not None:
            got = got + (value(operands[2], "B") if len(operands) > 2 else layer.B)
    return got - ref
