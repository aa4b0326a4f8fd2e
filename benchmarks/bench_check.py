"""Speed of a full lincheck check against the floor of the forward passes it needs.

    python benchmarks/bench_check.py            # default sizes
    python benchmarks/bench_check.py --quick    # (32, 64, 16) only

For each (N, D_in, D_out), float64, in one run:

- floor: the 2·(2·D_in + 1) forward passes X Wᵀ + B that the grouped witness
  evaluates, as plain NumPy matmuls, one after another;
- lincheck: ``lincheck.check`` on the same arrays (validation, float64
  reference, magnitudes, every entry of the witness with its bounds, the
  comparison);
- dense: the one-entry-at-a-time textbook check (small sizes only).

Then the whole process: ``lincheck run --n 32 --din 64 --dout 16`` against
``python -c "import numpy, typer, rich"``. Medians of repeated runs and
their ratios; the machine is shared, so read the ratios, not the seconds.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import lincheck
from lincheck import numeric
from lincheck.checks import random_inputs


def median_time(repeats: int, fn, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor(X, W, B, passes: int) -> None:
    for _ in range(passes):
        X @ W.T + B


def bench_sizes(sizes, repeats: int) -> None:
    print(
        f"{'(N, D_in, D_out)':>18} {'passes':>7} {'floor':>10} {'lincheck':>10} {'ratio':>7}"
        f" {'dense':>10} {'ratio':>7}"
    )
    for N, D_in, D_out in sizes:
        d = random_inputs(np.random.default_rng(0), N, D_in, D_out)
        X, W, B, G = d["X"], d["W"], d["B"], d["dY"]
        passes = 2 * (2 * D_in + 1)
        t_floor = median_time(repeats, floor, X, W, B, passes)
        t_check = median_time(repeats, lincheck.check, X, W, B, G)
        row = (
            f"{str((N, D_in, D_out)):>18} {passes:>7} {t_floor * 1e3:8.2f}ms "
            f"{t_check * 1e3:8.2f}ms {t_check / t_floor:6.2f}x"
        )
        if N * D_in * D_out <= 32 * 64 * 16:
            t_dense = median_time(
                max(1, repeats // 4), numeric.central_differences, X, W, B, G, grouped=False
            )
            row += f" {t_dense * 1e3:8.1f}ms {t_dense / t_floor:6.0f}x"
        print(row, flush=True)


def bench_process(repeats: int) -> None:
    exe = shutil.which("lincheck") or str(Path(sys.executable).with_name("lincheck"))
    commands = {
        "python -c 'import numpy, typer, rich'": [
            sys.executable,
            "-c",
            "import numpy, typer, rich",
        ],
        "lincheck run --n 32 --din 64 --dout 16": [
            exe,
            "run",
            "--n",
            "32",
            "--din",
            "64",
            "--dout",
            "16",
        ],
        "lincheck --help": [exe, "--help"],
    }
    base = None
    print(f"\n{'whole process':40} {'median':>10} {'ratio':>7}")
    for label, cmd in commands.items():
        t = median_time(repeats, subprocess.run, cmd, capture_output=True, check=False)
        base = base or t
        print(f"{label:40} {t * 1e3:8.0f}ms {t / base:6.2f}x", flush=True)


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = [(32, 64, 16)] if quick else [(32, 64, 16), (128, 256, 64), (256, 512, 256)]
    print(f"lincheck {lincheck.__version__}, numpy {np.__version__}, float64, medians\n")
    bench_sizes(sizes, repeats=5 if quick else 9)
    bench_process(repeats=5 if quick else 9)


if __name__ == "__main__":
    main()
