"""Speed of lincheck against the floor of the forward passes it needs, and against peers.

    python benchmarks/bench_check.py              # all sizes (about 10 minutes)
    python benchmarks/bench_check.py --quick      # (32, 64, 16) and the whole-process timings

For each (N, D_in, D_out), float64, in one run, medians of repeated runs, each
after one warm-up call (see ``median_time``):

- floor: the 2·(2·D_in + 1) forward passes X Wᵀ + B that a full grouped
  witness evaluates, as plain NumPy matmuls, one after another;
- lincheck full: ``lincheck.check(X, W, B, G, mode="full")``: validation, the
  float64 reference, every entry of the witness with its bounds, the
  comparison; its peak traced memory against 3× the input bytes + 64 MiB;
- lincheck directions: ``mode="directions"`` with 40 directions per tensor;
- dense loop: one entry at a time, two forward passes each (run where it
  takes under a minute, otherwise estimated from its pass count);
- torch.autograd.gradcheck on F.linear, float64, slow mode (the full
  Jacobian) and fast mode, where torch is importable and the Jacobian fits
  in 2 GB. torch is not a dependency: ``pip install torch==2.13.0``.

Then the whole process: ``lincheck run --n 32 --din 64 --dout 16`` against
``python -c "import numpy, typer, rich"``, with the ``lincheck`` beside this
Python (time it from a ``pip install .`` environment: an editable install
recompiles lincheck on every start where PYTHONDONTWRITEBYTECODE is set). The
machine is shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

import lincheck
from lincheck.checks import random_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import oracles  # noqa: E402  (whole-tensor witnesses, kept with the tests)

SIZES = [(32, 64, 16), (256, 512, 256), (1024, 1024, 1024)]


def median_time(repeats: int, fn, *args, **kwargs) -> float:
    """Median of ``repeats`` timed calls after one untimed warm-up call (first-call costs:
    page faults, BLAS and einsum set-up); calls under 10 ms are timed five times as often,
    since a shared machine's noise is larger than they are. A single repeat is one cold call
    (the large sizes)."""
    if repeats > 1:
        start = time.perf_counter()
        fn(*args, **kwargs)
        if time.perf_counter() - start < 0.01:
            repeats *= 5
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor(X, W, B, passes: int) -> None:
    for _ in range(passes):
        X @ W.T + B


def peak_memory(fn, *args, **kwargs) -> int:
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def torch_gradcheck(X, W, B, fast: bool):
    import torch
    import torch.nn.functional as F  # noqa: N812

    inputs = tuple(torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (X, W, B))
    return torch.autograd.gradcheck(F.linear, inputs, fast_mode=fast)


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def bench_size(N, D_in, D_out, repeats: int, have_torch: bool) -> None:
    d = random_inputs(np.random.default_rng(0), N, D_in, D_out)
    X, W, B, G = d["X"], d["W"], d["B"], d["dY"]
    passes = 2 * (2 * D_in + 1)
    big = N * D_in * D_out > 256 * 512 * 256
    reps = 1 if big else repeats
    t_floor = median_time(reps, floor, X, W, B, passes)
    t_full = median_time(reps, lincheck.check, X, W, B, G, mode="full")
    t_dirs = median_time(repeats, lincheck.check, X, W, B, G, mode="directions", directions=40)
    inputs = sum(a.nbytes for a in (X, W, B, G))
    peak = peak_memory(lincheck.check, X, W, B, G, mode="full") if not big else None
    P = N * D_in + D_out * D_in + D_out
    t_pass = median_time(5, floor, X, W, B, 1)
    if 2 * P * t_pass < 60:
        t_dense = median_time(1, oracles.central_differences, X, W, B, G, grouped=False)
        dense = fmt(t_dense)
    else:
        t_dense = 2 * P * t_pass
        dense = f"≈{fmt(t_dense)} (est.)"
    print(f"\n(N, D_in, D_out) = {(N, D_in, D_out)}: {P:,} entries, {passes:,} passes in the floor")
    print(f"  floor                       {fmt(t_floor):>12}   1.00x")
    print(f"  lincheck full               {fmt(t_full):>12}   {t_full / t_floor:.2f}x", end="")
    if peak is not None:
        print(f"   peak {peak / 2**20:.1f} MiB (limit {(3 * inputs + 64 * 2**20) / 2**20:.1f})")
    else:
        print()
    print(f"  lincheck directions (16)    {fmt(t_dirs):>12}   {t_dirs / t_floor:.3f}x")
    print(f"  dense loop                  {dense:>12}   {t_dense / t_floor:.0f}x")
    if not have_torch:
        print("  torch gradcheck             (torch not importable)")
        return
    jacobian_bytes = P * N * D_out * 8
    if jacobian_bytes <= 2 * 2**30:
        # As many runs as lincheck's: its time varies by ±15% here from run to run.
        t_slow = median_time(repeats, torch_gradcheck, X, W, B, fast=False)
        print(
            f"  torch gradcheck slow        {fmt(t_slow):>12}   {t_slow / t_floor:.0f}x"
            f"   lincheck full is {t_slow / t_full:.0f}x faster"
        )
    else:
        print(
            f"  torch gradcheck slow        cannot run: its Jacobian needs "
            f"{jacobian_bytes / 2**30:,.0f} GiB"
        )
    t_fast = median_time(max(1, repeats // 3), torch_gradcheck, X, W, B, fast=True)
    print(f"  torch gradcheck fast        {fmt(t_fast):>12}   {t_fast / t_floor:.3f}x")


def bench_process(repeats: int) -> None:
    exe = shutil.which("lincheck") or str(Path(sys.executable).with_name("lincheck"))
    commands = {
        "python -c 'import numpy, typer, rich'": [
            sys.executable,
            "-c",
            "import numpy, typer, rich",
        ],
        # What `run` cannot do without: random inputs, and Rich to print its tables.
        "  its imports: + numpy.random, rich tables": [
            sys.executable,
            "-c",
            "import numpy, numpy.random, typer, rich.console, rich.table",
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
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    print(f"lincheck {lincheck.__version__}, numpy {np.__version__}, float64, medians")
    for size in SIZES[:1] if quick else SIZES:
        bench_size(*size, repeats=5 if quick else 9, have_torch=have_torch)
    bench_process(repeats=21)


if __name__ == "__main__":
    main()
