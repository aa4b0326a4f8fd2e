"""Cost of each arithmetic model's bounds: a full check under each preset against fp32's.

    python benchmarks/bench_presets.py            # (256, 512, 256), medians of 5
    python benchmarks/bench_presets.py --quick    # (32, 64, 16)

For each preset, in one run, interleaved: ``lincheck.check(X, W, B, G, dX=, dW=, dB=, Y=,
precision=preset, mode="full")`` on float32 inputs and subjects (rounded to the preset's
formats: the subject a kernel in that arithmetic would return), median of the repeats,
divided by the same check under fp32. The floor of both is the same witness (the forward
passes of a full check); what a preset adds is its bounds: the operand conversions it
tests, its statistical tier, the alternatives a failure is tried against. Target: at most
1.3× fp32's. The machine is shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import lincheck
from lincheck.precision import PRESETS, round_to


def subjects(X, W, B, G, preset: str) -> dict[str, np.ndarray]:
    """The gradients and Y in float32, rounded to the preset's output format."""
    out = PRESETS[preset].out
    grads = {"dX": G @ W, "dW": G.T @ X, "dB": G.sum(0), "Y": X @ W.T + B}
    return {k: round_to(v, out).astype(np.float32) for k, v in grads.items()}


def main() -> None:
    quick = "--quick" in sys.argv
    N, D_in, D_out = (32, 64, 16) if quick else (256, 512, 256)
    repeats = 21 if quick else 5
    rng = np.random.default_rng(0)
    X, W, B, G = (
        rng.standard_normal(s).astype(np.float32)
        for s in ((N, D_in), (D_out, D_in), (D_out,), (N, D_out))
    )
    cases = {p: subjects(X, W, B, G, p) for p in PRESETS}
    times: dict[str, list[float]] = {p: [] for p in PRESETS}
    for p in PRESETS:  # warm-up
        lincheck.check(X, W, B, G, **cases[p], precision=p, mode="full")
    for _ in range(repeats):
        for p in PRESETS:  # interleaved: the machine's load falls on every preset alike
            start = time.perf_counter()
            lincheck.check(X, W, B, G, **cases[p], precision=p, mode="full")
            times[p].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    print(f"full check, (N, D_in, D_out) = ({N}, {D_in}, {D_out}), medians of {repeats}")
    print(f"{'preset':<15}{'median':>10}{'vs fp32':>10}")
    for p, t in times.items():
        m = statistics.median(t)
        print(f"{p:<15}{m * 1e3:>8.1f} ms{m / base:>9.2f}×")


if __name__ == "__main__":
    main()
