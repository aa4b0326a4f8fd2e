"""Many cases: ``verify`` of a folder of generated cases, against the floor of the work.

The floor is what any checker must do per case: read its files and compute its three
float64 reference products (X Wᵀ, G W, Gᵀ X) once, in one process on one core. The
runs are ``lincheck verify DIR --mode directions --quiet`` as a user starts them (a new
process each, its start-up included) with ``--jobs 1``, ``--jobs 2`` and
``--scheduler`` on a two-worker Dask ``LocalCluster`` started beforehand (one thread
each, set up as Dask sets workers up, ``MALLOC_TRIM_THRESHOLD_`` included; its start-up
is not counted: a cluster is already up when a user points lincheck at it). BLAS runs
one thread per process throughout, so "per core" is comparable.

Also timed:

* "products": reading each case as the floor does, then the products that a bound per
  entry needs: dX's and dW's float64 references, and their magnitudes |G| |W| and
  |G|ᵀ |X| in float32, as lincheck computes them. What a check takes beyond this is its
  per-entry work (tolerances, comparisons, the report's summaries), its witness and its
  bookkeeping.
* "engine": lincheck's engine on every case in the benchmark's own process (no
  start-up), which separates the checks' own cost from the command's.

The benchmark's process is declared lincheck's own, as the command's is
(:func:`lincheck.allocator.lincheck_process`): its floor, products and engine run with
glibc's thresholds as the command's checks do.

Printed: the median wall seconds and cases per second of each, and its CPU seconds (the
command's and its workers', Dask's included), which a machine shared with other jobs
does not inflate as it does wall time; then the ratios the targets are about: each
run's CPU time over the floor's (target ≤ 1.25 per core) and over the engine's (what
running the cases through the command and its workers adds to the checks), and the
Dask run over ``--jobs 2`` on the same two cores (target ≤ 1.25).

    python benchmarks/bench_many.py                       # 40 cases up to (1024, 256, 256)
    python benchmarks/bench_many.py --cases 200 --largest 4096,1024,1024
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy starts its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import resource  # noqa: E402
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


def floor(root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read every case and compute its three float64 products once."""
    wall, cpu = time.perf_counter(), time.process_time()
    for folder in sorted(root.iterdir()):
        a = {n: np.load(folder / f"{n}.npy") for n in ("X", "W", "B", "dY", "dX", "dW", "dB")}
        X, W, G = (a[n].astype(np.float64) for n in ("X", "W", "dY"))
        _ = (X @ W.T, G @ W, G.T @ X)
    return time.perf_counter() - wall, time.process_time() - cpu


def products(root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read every case and compute the products a check of its dX
    and dW needs: the two float64 references and the two magnitudes, in float32."""
    wall, cpu = time.perf_counter(), time.process_time()
    for folder in sorted(root.iterdir()):
        a = {n: np.load(folder / f"{n}.npy") for n in ("X", "W", "B", "dY", "dX", "dW", "dB")}
        X, W, G = (a[n].astype(np.float64) for n in ("X", "W", "dY"))
        aX, aW, aG = (np.abs(a[n]) for n in ("X", "W", "dY"))
        _ = (G @ W, G.T @ X, aG @ aW, aG.T @ aX)
    return time.perf_counter() - wall, time.process_time() - cpu


def in_process(root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds lincheck's engine takes on every case in this process (no
    start-up): the checks themselves, one after another."""
    from lincheck import batch

    options = dict(
        precision=None, certain_only=False, layout="out_in", method="central",
        mode="directions", samples=64, directions=40, seed=0, budget=10.0, atol=None,
        rtol=None,
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    tasks = batch.plan(sorted(root.iterdir()), options)
    for done in batch.run_serial(tasks, options):
        assert done.result.passed, done.result.error
    return time.perf_counter() - wall, time.process_time() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _workers_cpu(client) -> float:
    def cpu() -> float:
        import psutil

        times = psutil.Process().cpu_times()
        return times.user + times.system

    return sum(client.run(cpu).values()) if client is not None else 0.0


def verify(root: Path, *options: str, client=None) -> tuple[float, float]:
    """(wall, CPU) seconds of ``lincheck verify``: the command and its workers' CPU time
    (the pool's processes, or the Dask workers')."""
    exe = str(Path(sys.executable).with_name("lincheck"))
    command = [exe, "verify", str(root), "--mode", "directions", "--quiet", *options]
    cpu = _children_cpu() + _workers_cpu(client)
    wall = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    cpu = _children_cpu() + _workers_cpu(client) - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr}")
    return wall, cpu


def cluster():
    """A two-worker LocalCluster, one thread each, as Dask sets its workers up; this
    process's environment is left as it was (a Nanny sets its workers' variables in the
    process that starts them, MALLOC_TRIM_THRESHOLD_ among them, which the ``lincheck``
    commands started later would inherit)."""
    from distributed import Client, LocalCluster

    saved = dict(os.environ)
    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    os.environ.clear()
    os.environ.update(saved)
    return local, Client(local)


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
    from lincheck.allocator import arrays_reused, lincheck_process

    lincheck_process()
    with arrays_reused():  # set now, for the floor's first run too, as for every later one
        pass
    runs: dict[str, list[tuple[float, float]]] = {
        "floor": [], "products": [], "engine": [], "jobs 1": [], "jobs 2": [], "dask 2": []
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cases"
        generate(root, args.cases, largest, args.seed)  # type: ignore[arg-type]
        floor(root)  # warm the page cache
        clusters = {} if args.no_dask else {"dask 2": cluster()}
        try:
            for _ in range(args.repeat):
                runs["floor"].append(floor(root))
                runs["products"].append(products(root))
                runs["engine"].append(in_process(root))
                runs["jobs 1"].append(verify(root, "--jobs", "1"))
                runs["jobs 2"].append(verify(root, "--jobs", "2"))
                for name, (local, client) in clusters.items():
                    address = local.scheduler_address
                    runs[name].append(verify(root, "--scheduler", address, client=client))
        finally:
            for local, client in clusters.values():
                client.close()
                local.close()
    wall = {name: statistics.median(w for w, _ in r) for name, r in runs.items() if r}
    cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items() if r}
    print(
        f"{args.cases} cases up to N,D_in,D_out = {args.largest}, --mode directions, "
        f"median of {args.repeat}, {os.cpu_count()} cores"
    )
    print("            wall s   cases/s    CPU s  CPU/floor  CPU/engine")
    for name in wall:
        print(
            f"  {name:<9} {wall[name]:6.2f} {args.cases / wall[name]:9.1f} {cpu[name]:8.2f} "
            f"{cpu[name] / cpu['floor']:10.2f} {cpu[name] / cpu['engine']:11.2f}"
        )
    if "dask 2" in wall:
        print(
            f"  dask 2 / jobs 2: wall {wall['dask 2'] / wall['jobs 2']:.2f}, "
            f"CPU {cpu['dask 2'] / cpu['jobs 2']:.2f}"
        )


if __name__ == "__main__":
    main()
