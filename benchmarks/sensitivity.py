"""How small a mistake lincheck catches, and how close correct results come to failing.

For every preset, on gradients from the emulated kernels (tests/emulate.py):

- the largest ``bound_ratio`` (error / tolerance) of correct results over summation orders,
  shapes (32, 64, 16), (3, 37, 5) and N = 200,000 (D_in = 8, D_out = 4), seeds, tensors;
- the smallest relative error planted in ONE entry of dW (the largest |dW| entry, and one
  of median |dW|) that fails (verdict "fail"), by bisection on log ε, at (32, 64, 16) and
  at N = 200,000. An inconclusive dW (the model cannot resolve it) is reported as such.

Run: python benchmarks/sensitivity.py [preset ...]  (a few minutes for all presets).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import emulate as em  # noqa: E402
from test_emulated import PRESETS, inputs  # noqa: E402

import lincheck  # noqa: E402

SHAPES = {"32x64x16": ((32,), 64, 16), "3x37x5": ((3,), 37, 5), "N=200000": ((200_000,), 8, 4)}


def supplied(report):
    return {c.tensor: c for c in report.checks if c.subject == "supplied"}


def largest_ratio(preset: str, seeds=(0, 1, 2)) -> tuple[float, str]:
    """The largest bound_ratio of correct results, and where."""
    best, where = 0.0, ""
    for shape, dims in SHAPES.items():
        big = shape.startswith("N=")
        for seed in seeds[:1] if big else seeds:
            X, W, B, dY = inputs(preset, *dims, seed=seed)
            for order in ("sequential", "tree") if big else em.ORDERS:
                r = em.emulate(X, W, B, dY, preset, order, seed=seed)
                report = lincheck.check(X, W, B, dY, precision=preset, **r.cast())
                for name, c in supplied(report).items():
                    if c.bound_ratio is not None and c.bound_ratio > best:
                        best = c.bound_ratio
                        where = f"{name} {shape} {order} seed={seed} ({c.verdict})"
    return best, where


def smallest_caught(preset: str, shape: str, which: str) -> str:
    """The smallest relative error in one dW entry that lincheck fails, by bisection."""
    X, W, B, dY = inputs(preset, *SHAPES[shape])
    r = em.emulate(X, W, B, dY, preset, "sequential", tensors=("dW", "dB"))
    mags = np.abs(r.dW).ravel()
    idx = int(np.argmax(mags)) if which == "max" else int(np.argsort(mags)[len(mags) // 2])
    entry = np.unravel_index(idx, r.dW.shape)

    def verdict(eps: float) -> str:
        dW = r.dW.copy()
        dW[entry] *= 1 + eps
        report = lincheck.check(X, W, B, dY, dW=dW.astype(r.dtype), precision=preset)
        return supplied(report)["dW"].verdict

    base = verdict(0.0)
    if base != "pass":
        return f"correct dW is {base}"
    lo, hi = -17.0, 1.0  # log10 ε
    if verdict(10**hi) != "fail":
        return f"not caught at ε = {10**hi:g}"
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if verdict(10**mid) == "fail" else (mid, hi)
    return f"{10**hi:.3g}"


def main(presets) -> None:
    print(f"{'preset':15s} {'max bound_ratio (correct)':>27s}  where")
    rows = []
    for preset in presets:
        t = time.time()
        ratio, where = largest_ratio(preset)
        caught = {
            (shape, which): smallest_caught(preset, shape, which)
            for shape in ("32x64x16", "N=200000")
            for which in ("max", "median")
        }
        rows.append((preset, caught))
        print(f"{preset:15s} {ratio:27.3f}  {where}  [{time.time() - t:.0f} s]", flush=True)
    print()
    head = "smallest caught relative error in one dW entry (largest |dW| entry / median entry)"
    print(head)
    print(f"{'preset':15s} {'32x64x16':>28s} {'N=200000':>40s}")
    for preset, c in rows:
        small = f"{c['32x64x16', 'max']} / {c['32x64x16', 'median']}"
        big = f"{c['N=200000', 'max']} / {c['N=200000', 'median']}"
        print(f"{preset:15s} {small:>28s} {big:>40s}")


if __name__ == "__main__":
    main(sys.argv[1:] or PRESETS)
