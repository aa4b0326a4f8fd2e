"""Many cases: ``verify`` of a folder of generated cases, against the floor of the work.

The floor is what any checker must do per case: read its files and compute its three
float64 reference products (X Wᵀ, G W, Gᵀ X) once, in one process on one core. The
runs are ``lincheck verify DIR --mode directions --quiet`` as a user starts them (a new
process each, its start-up included) with ``--jobs 1``, ``--jobs 2`` and
``--scheduler`` on a two-worker Dask ``LocalCluster`` started beforehand (one thread
each; its start-up is not counted: a cluster is already up when a user points
lincheck at it). BLAS runs one thread per process throughout, so "per core" is
comparable.

Also timed: lincheck's engine on every case in the benchmark's own process ("engine",
no start-up), which separates the checks' own cost from the command's.

Printed: the median seconds and cases per second of each, and the ratios the targets
are about: each run's core-seconds over the floor's (target ≤ 1.25) and over the
engine's (what running cases through the command and its workers adds to the checks),
and the Dask run over ``--jobs 2`` on the same two cores (target ≤ 1.25).

    python benchmarks/bench_many.py                       # 40 cases up to (1024, 256, 256)
    python benchmarks/bench_many.py --cases 200 --largest 4096,1024,1024
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy starts its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def generate(root: Path, count: int, largest: tuple[int, int, int], seed: int) -> None:
    """``count`` cases of mixed sizes (each dimension the largest's, or a half, or a quarter),
    float32 arrays with their float32 gradients, one folder of .npy files each."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        N, D_in, D_out = (max(1, d // int(rng.choice([1, 2, 4]))) for d in largest)
        X = rng.standard_normal((N, D_in), dtype=np.float32)
        W = rng.standard_normal((D_out, D_in), dtype=np.float32)
        B = rng.standard_normal(D_out, dtype=np.float32)
        G = rng.standard_normal((N, D_out), dtype=np.float32)
        folder = root / f"layer{i:04d}"
        folder.mkdir(parents=True)
        arrays = {"X": X, "W": W, "B": B, "dY": G, "dX": G @ W, "dW": G.T @ X, "dB": G.sum(0)}
        for name, a in arrays.items():
            np.save(folder / f"{name}.npy", a)


def floor(root: Path) -> float:
    """Seconds to read every case and compute its three float64 products once."""
    start = time.perf_counter()
    for folder in sorted(root.iterdir()):
        a = {n: np.load(folder / f"{n}.npy") for n in ("X", "W", "B", "dY", "dX", "dW", "dB")}
        X, W, G = (a[n].astype(np.float64) for n in ("X", "W", "dY"))
        _ = (X @ W.T, G @ W, G.T @ X)
    return time.perf_counter() - start


def in_process(root: Path) -> float:
    """Seconds lincheck's engine takes on every case in this process (no start-up): the
    checks themselves, one after another."""
    from lincheck import batch

    options = dict(
        precision=None, certain_only=False, layout="out_in", method="central",
        mode="directions", samples=64, directions=16, seed=0, budget=10.0, atol=None,
        rtol=None,
    )  # fmt: skip
    start = time.perf_counter()
    tasks = batch.plan(sorted(root.iterdir()), options)
    for done in batch.run_serial(tasks, options):
        assert done.result.passed, done.result.error
    return time.perf_counter() - start


def verify(root: Path, *options: str) -> float:
    exe = str(Path(sys.executable).with_name("lincheck"))
    command = [exe, "verify", str(root), "--mode", "directions", "--quiet", *options]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--largest", default="1024,256,256", help="N,D_in,D_out")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    largest = tuple(int(x) for x in args.largest.split(","))
    assert len(largest) == 3
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cases"
        generate(root, args.cases, largest, args.seed)  # type: ignore[arg-type]
        floor(root)  # warm the page cache
        runs: dict[str, list[float]] = {
            "floor": [], "engine": [], "jobs 1": [], "jobs 2": [], "dask 2": []
        }  # fmt: skip
        cluster = None
        if not args.no_dask:
            from distributed import LocalCluster

            cluster = LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        try:
            for _ in range(args.repeat):
                runs["floor"].append(floor(root))
                runs["engine"].append(in_process(root))
                runs["jobs 1"].append(verify(root, "--jobs", "1"))
                runs["jobs 2"].append(verify(root, "--jobs", "2"))
                if cluster is not None:
                    runs["dask 2"].append(verify(root, "--scheduler", cluster.scheduler_address))
        finally:
            if cluster is not None:
                cluster.close()
    median = {name: statistics.median(times) for name, times in runs.items() if times}
    cores = {"floor": 1, "engine": 1, "jobs 1": 1, "jobs 2": 2, "dask 2": 2}
    print(
        f"{args.cases} cases up to N,D_in,D_out = {args.largest}, --mode directions, "
        f"median of {args.repeat}, {os.cpu_count()} cores"
    )
    for name, seconds in median.items():
        core_seconds = seconds * cores[name]
        print(
            f"  {name:<7} {seconds:8.2f} s  {args.cases / seconds:8.1f} cases/s  "
            f"core-seconds / floor: {core_seconds / median['floor']:6.2f}  "
            f"/ engine: {core_seconds / median['engine']:5.2f}"
        )
    if "dask 2" in median:
        print(f"  dask 2 / jobs 2: {median['dask 2'] / median['jobs 2']:.2f}")


if __name__ == "__main__":
    main()
