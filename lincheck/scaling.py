"""How a model's kernel saw each input: converted or not, with which scales, in range or not.

A kernel that works in a narrow format converts each operand value a to
conv(a), or with scaling to s · q(a / s), where s is the dequantization
factor (Transformer Engine's ``scale_inv``). lincheck needs three facts per
input from that (:func:`prepare`): whether any value changed (a value that
is already a number of the format costs no error), the largest scale (which
sets the size of an underflow: s times the format's smallest subnormal), and
whether any value left the format's range (then no bound exists).

Scales come from the dump (``X_scale``, ``W_scale``, ``dY_scale``) or from
the recipe of :func:`recipe`. Their shapes, for X of shape (N, D_in) (leading
dimensions flattened), dY (N, D_out) and W (D_out, D_in):

=========  ======================  =========================================
scale      X and dY                W
=========  ======================  =========================================
tensor     one value               one value
row        (N,)                    (D_out,)
block128   (N, ⌈D/128⌉): 1 × 128   (⌈D_out/128⌉, ⌈D_in/128⌉): 128 × 128
mx32       (N, ⌈D/32⌉): 1 × 32     (D_out, ⌈D_in/32⌉): 1 × 32, powers of two
=========  ======================  =========================================
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .core import FileBacked, leading_chunks
from .errors import InputError
from .precision import Arithmetic, Operand, representable, round_to

SCALE_NAMES = {"X": "X_scale", "W": "W_scale", "dY": "dY_scale"}


def _blocks(kind: str, name: str) -> tuple[int, int]:
    """Rows × columns of one block of input ``name`` under scaling ``kind`` (0: all)."""
    return {
        "tensor": (0, 0),
        "row": (1, 0),
        "block128": (128, 128) if name == "W" else (1, 128),
        "mx32": (1, 32),
    }[kind]


def block_shape(kind: str, name: str, shape: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scales of a 2-D input of ``shape`` (see the module's table)."""
    r, c = _blocks(kind, name)
    rows = 1 if r == 0 else -(-shape[0] // r)
    cols = 1 if c == 0 else -(-shape[1] // c)
    return rows, cols


def expand(scales: np.ndarray, kind: str, name: str, shape: tuple[int, int]) -> np.ndarray:
    """Per-block ``scales`` repeated to one value per entry of the input."""
    r, c = _blocks(kind, name)
    s = np.asarray(scales, dtype=np.float64).reshape(block_shape(kind, name, shape))
    s = np.repeat(s, r or shape[0], axis=0)[: shape[0]]
    return np.repeat(s, c or shape[1], axis=1)[:, : shape[1]]


def recipe(a: np.ndarray, kind: str, name: str, fmt) -> np.ndarray:
    """Scales by the usual recipe: each block's amax over the format's largest value (mx32:
    the power of two 2^(⌊log₂ amax⌋ − emax), OCP Microscaling Formats v1.0 §6.3); 1 for a
    block of zeros."""
    R, C = block_shape(kind, name, a.shape)
    r, c = _blocks(kind, name)
    r, c = r or a.shape[0], c or a.shape[1]
    pad = np.zeros((R * r, C * c))
    pad[: a.shape[0], : a.shape[1]] = np.abs(a)
    amax = pad.reshape(R, r, C, c).max(axis=(1, 3))
    if kind == "mx32":
        emax = int(np.frexp(fmt.max)[1]) - 1  # ⌊log₂ max⌋, exactly (frexp: m·2ᵉ, ½ ≤ m < 1)
        s = np.ldexp(1.0, np.frexp(amax)[1] - 1 - emax)
    else:
        s = amax / fmt.max
    return np.where(amax > 0, s, 1.0)


def _amax(a) -> float:
    """max |a|, a chunk at a time (``a`` may be a file larger than memory)."""
    if a.dtype.kind in "bu" or a.size == 0:
        return float(np.max(a, initial=0))
    return max(float(np.max(np.abs(a[part]), initial=0.0)) for part in leading_chunks(a))


def prepare(
    model: Arithmetic,
    given: Mapping[str, np.ndarray],
    scales: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Operand]:
    """How ``model``'s kernel saw each input of ``given`` (X, W, dY as 2-D arrays, B).

    Raises
    ------
    InputError
        A given scale has the wrong shape, or is not positive and finite.
    """
    scales = scales or {}
    unused = [SCALE_NAMES[n] for n in scales if not model.quantized(n)]
    if unused:
        raise InputError(
            f"{', '.join(unused)}: given, but the arithmetic {model.name} does not scale "
            f"{'that operand' if len(unused) == 1 else 'those operands'} (scale={model.scale})"
        )
    seen: dict[str, Operand] = {}
    for name, a in given.items():
        if name == "B":
            converted = not representable(a, model.out)
            values = round_to(np.asarray(a, dtype=np.float64), model.out) if converted else None
            seen[name] = Operand(model.out, converted, values=values)
            continue
        fmt = model.operand(name)
        if not model.quantized(name):
            overflows = fmt.max < _amax(a)
            converted = not representable(a, fmt)
            values = None
            if converted and not overflows and not isinstance(a, FileBacked):
                a2 = np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1])
                values = round_to(a2, fmt, model.convert)
            seen[name] = Operand(fmt, converted, 1.0, overflows, values=values)
            continue
        a64 = np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1])
        if name in scales:
            s = np.asarray(scales[name], dtype=np.float64)
            want = block_shape(model.scale, name, a64.shape)
            # One value, or (rows,) for row scales, or the blocks' (rows, columns): no other
            # shape of the same size, whose values would land on the wrong blocks.
            fits = (
                s.shape == want
                or (want[1] == 1 and s.shape == (want[0],))
                or s.size == 1 == want[0] * want[1]
            )
            if not fits:
                raise InputError(
                    f"{SCALE_NAMES[name]}: shape {s.shape} for scale={model.scale}, expected "
                    f"{want} for {name} of shape {a64.shape}"
                )
            if not np.all(np.isfinite(s) & (s > 0)):
                raise InputError(f"{SCALE_NAMES[name]}: scales must be positive and finite")
            if model.scale == "mx32" and not np.all(np.frexp(s)[0] == 0.5):
                raise InputError(f"{SCALE_NAMES[name]}: mx32 scales are powers of two")
        else:
            s = recipe(a64, model.scale, name, fmt)
        per_entry = expand(s, model.scale, name, a64.shape)
        q = np.abs(a64 / per_entry)
        beyond = q > fmt.max * (1.0 + fmt.u)  # a rounding up to the largest value is allowed
        c = None
        if model.scale == "mx32" and beyond.any():
            # MX conversions clamp to the largest value (OCP Microscaling Formats v1.0, §6.3):
            # an amax just under 2^(emax+1)·s loses up to 1 − max/2^(emax+1) of itself.
            c = float(np.max(1.0 - fmt.max / q[beyond])) + fmt.u
        overflows = bool(beyond.any()) and c is None
        converted = c is not None or not representable(a64 / per_entry, fmt)
        values = None
        if converted and not overflows:
            q = np.clip(round_to(a64 / per_entry, fmt, model.convert), -fmt.max, fmt.max)
            values = per_entry * q
        seen[name] = Operand(fmt, converted, float(np.max(s)), overflows, c, values)
    return seen
