"""The facts about each array that every module reads: names, operands, shapes, axes.

One table, so that a ladder over ``"dX"``/``"dW"``/``"dB"`` is never written
twice. With X of shape (N, D_in) (leading batch dimensions flattened),
W (D_out, D_in), B (D_out,) and G = dL/dY (N, D_out):

    dX = G W      (N, D_in)       D_out terms per entry
    dW = Gᵀ X     (D_out, D_in)   N terms per entry
    dB = Σₙ G     (D_out,)        N terms per entry
    Y  = X Wᵀ + B (N, D_out)      D_in (+ 1 with a bias) terms per entry
"""

from __future__ import annotations

from typing import Any

INPUT_NAMES = ("X", "W", "B", "dY")
SUBJECT_NAMES = ("dX", "dW", "dB", "Y")
SCALE_NAMES = ("X_scale", "W_scale", "dY_scale")
"""Optional dequantization factors of a scaled (fp8) model (:mod:`lincheck.scaling`)."""

OPERANDS = {"dX": ("dY", "W"), "dW": ("dY", "X"), "dB": ("dY",), "Y": ("X", "W", "B")}
"""The inputs each tensor is computed from (their formats set its rounding)."""

AXES = {
    "dX": ("batch row", "input feature"),
    "dW": ("output unit", "input feature"),
    "dB": ("", "output unit"),
    "Y": ("batch row", "output unit"),
}
"""What the rows and the columns of each tensor are (batch rows: leading dimensions
flattened; dB is one row)."""


def shape2d(tensor: str, N: int, D_in: int, D_out: int) -> tuple[int, ...]:
    """The tensor's shape with leading batch dimensions flattened: (N, D_in) for dX, ..."""
    return {"dX": (N, D_in), "dW": (D_out, D_in), "dB": (D_out,), "Y": (N, D_out)}[tensor]


def terms(tensor: str, N: int, D_in: int, D_out: int, bias: bool) -> int:
    """Terms per entry: D_out for dX, N for dW and dB, D_in + 1 (with bias) for Y."""
    return {"dX": D_out, "dW": N, "dB": N, "Y": D_in + bias}[tensor]


def flat_index(flat: int, shape: tuple[int, ...]) -> list[int]:
    """The index of the ``flat``-th entry (row-major) of an array of this shape."""
    index = []
    for n in reversed(shape):
        flat, i = divmod(int(flat), n)
        index.append(i)
    return index[::-1]


class Sizes:
    """The per-tensor facts of a layer whose sizes are ``N``, ``D_in``, ``D_out`` and whose
    bias is ``B`` (None without one): what the workspace of a layer and the totals of a
    streamed one both answer."""

    N: int
    D_in: int
    D_out: int
    B: Any

    @property
    def bias(self) -> bool:
        return self.B is not None

    def terms(self, tensor: str) -> int:
        """Terms per entry (:func:`terms`)."""
        return terms(tensor, self.N, self.D_in, self.D_out, self.bias)

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The tensor's 2-D shape (:func:`shape2d`)."""
        return shape2d(tensor, self.N, self.D_in, self.D_out)
