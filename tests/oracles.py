"""Whole-tensor witnesses and comparisons: conveniences for the tests and benchmarks.

The package computes everything a block at a time; these assemble whole
tensors from the same functions, for tests that compare them with
independent oracles and for studies of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lincheck import streaming
from lincheck.checks import analytic_gradients
from lincheck.core import Gradients
from lincheck.tally import Positions, Tally
from lincheck.witness import DEFAULT_REL_STEP, Block, Directions, witness_block
from lincheck.workspace import Workspace


@dataclass(frozen=True)
class Magnitudes:
    """Whole-tensor magnitudes M (``dX``, ``dW``, ``dB``, ``Y``) and operand sums S (``sums``)."""

    dX: np.ndarray
    dW: np.ndarray
    dB: np.ndarray | None
    Y: np.ndarray
    sums: dict[str, np.ndarray | float]

    @classmethod
    def of(cls, X, W, B, G) -> Magnitudes:
        L = Workspace(X, W, B, G)
        pairs = {t: L.magnitude(t) for t in ("dX", "dW", "dB", "Y")}
        return cls(
            dX=pairs["dX"][0],
            dW=pairs["dW"][0],
            dB=pairs["dB"][0] if L.bias else None,
            Y=pairs["Y"][0],
            sums={t: S for t, (_, S) in pairs.items()},
        )

    def of_tensor(self, name: str):
        """(M, S) for "dX", "dW", "dB" or "Y"."""
        return getattr(self, name), self.sums[name]


@dataclass(frozen=True)
class Witness:
    """Whole-tensor witness: estimates, worst-case bounds, typical bounds, cost."""

    grads: Gradients
    bounds: Gradients
    typical: Gradients
    method: str
    forward_passes: int
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)


def witness(X, W, B, G, *, method: str = "central", rel_step: float = DEFAULT_REL_STEP) -> Witness:
    """Estimate every entry of dX, dW (and dB) with :func:`witness_block`, whole tensors."""
    L = Workspace(X, W, B, G)
    parts: dict[str, list[Block]] = {}
    for tensor in ("dX", "dW", "dB") if L.bias else ("dX", "dW"):
        for cols in L.blocks(tensor, method):
            M, _ = L.magnitude(tensor, cols)
            parts.setdefault(tensor, []).append(witness_block(L, tensor, cols, M, method, rel_step))

    def join(attr):
        out = {
            t: np.concatenate([getattr(b, attr) for b in blocks], axis=-1)
            for t, blocks in parts.items()
        }
        return Gradients(out["dX"], out["dW"], out.get("dB"))

    steps = {
        t[1:]: (min(b.steps[0] for b in blocks), max(b.steps[1] for b in blocks))
        for t, blocks in parts.items()
    }
    passes = sum(b.passes for blocks in parts.values() for b in blocks)
    return Witness(join("estimate"), join("bound"), join("typical"), method, passes, steps)


def central_differences(X, W, B, G, *, grouped: bool = True, rel_step: float = DEFAULT_REL_STEP):
    """Every entry by central differences (grouped, or one at a time if not ``grouped``)."""
    return witness(X, W, B, G, method="central" if grouped else "dense", rel_step=rel_step)


def complex_step(X, W, B, G) -> Witness:
    """Every entry by the complex step, grouped."""
    return witness(X, W, B, G, method="complex-step")


@dataclass(frozen=True)
class Comparison:
    """Whole-array comparison: see :class:`Tally` (``order``: flat indices, worst first)."""

    passed: bool
    max_abs_error: float
    max_rel_error: float
    bound_ratio: float
    worst: int
    order: tuple[int, ...]
    tolerance_at_worst: float


def compare(subject, oracle, tolerance, top: int = 5) -> Comparison:
    """Compare two float64 arrays of one shape entry by entry (one :class:`Tally` block)."""
    tally = Tally(top)
    tally.add(subject, oracle, tolerance, np.inf, Positions())
    best = tally.best
    return Comparison(
        passed=tally.passed,
        max_abs_error=tally.max_abs,
        max_rel_error=tally.max_rel,
        bound_ratio=tally.max_ratio,
        worst=best[0][0] if best else 0,
        order=tuple(b[0] for b in best),
        tolerance_at_worst=best[0][3] if best else 0.0,
    )


def reference_backward(X, W, B, dY):
    """The correct backward of Y = X Wᵀ + B in NumPy, in the inputs' dtype (a model answer)."""
    grads = analytic_gradients({"X": X, "W": W, "dY": dY, **({"B": B} if B is not None else {})})
    return grads["dX"], grads["dW"], grads.get("dB")


def witness_directions(
    layer: Workspace, tensor: str, reference, count: int, seed: int
) -> Directions:
    """:class:`DirectionsWitness` of an in-memory layer (``reference`` whole, dX or dW)."""
    rows = streaming.Rows(layer.X, layer.W, layer.B, layer.G)
    totals = streaming.Totals(rows)
    found = streaming.DirectionsWitness(tensor, rows, count, seed, totals.sum_M, lambda: reference)
    for r, block in rows:
        totals.add(block)
        if tensor == "dX":  # the witness reads the block's reference: make it the one given
            block.__dict__["_dX"] = reference[r]
        found.add(r, block)
    return found.result()
