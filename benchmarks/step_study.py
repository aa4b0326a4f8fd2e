"""Witness error against the step h, float64, at (32, 64, 16): the figures in docs/numerics.md.

    python benchmarks/step_study.py

For fixed absolute steps and for lincheck's default per-entry steps, prints
the largest |estimate − exact| over dX, dW, dB and the largest rigorous bound.
"""

import sys
from pathlib import Path
from unittest import mock

import numpy as np

from lincheck import witness
from lincheck.checks import random_inputs
from lincheck.core import backward

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracles  # noqa: E402  (whole-tensor witnesses, kept with the tests)


def main() -> None:
    data = random_inputs(np.random.default_rng(0), 32, 64, 16)
    X, W, B, G = data["X"], data["W"], data["B"], data["dY"]
    exact = backward(X, W, G)
    print(f"{'method':8} {'step h':>10} {'max error':>11} {'max bound':>11}")
    for method in ("dense", "grouped"):
        for h in (1e-8, 1e-5, 1e-3, 1.0, None):
            if h is None:
                result = oracles.central_differences(X, W, B, G, grouped=method == "grouped")
                label = "default"
            else:
                fixed = lambda values, A, M, rel_step, h=h: np.full(np.shape(M), h)  # noqa: E731
                with mock.patch.object(witness, "step_sizes", fixed):
                    result = oracles.central_differences(X, W, B, G, grouped=method == "grouped")
                label = f"{h:.0e}"
            err = max(float(np.max(np.abs(e - x))) for e, x in zip(result.grads, exact))
            bound = max(float(np.max(b)) for b in result.bounds)
            print(f"{method:8} {label:>10} {err:11.2e} {bound:11.2e}")


if __name__ == "__main__":
    main()
