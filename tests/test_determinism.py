"""What lincheck promises about reproducibility (docs/numerics.md §8), in subprocesses.

NumPy's BLAS sums products in an order that depends on the CPU's kernel and the
thread count, so the float64 reference, the witness's forward passes and the
tolerances can differ in their last digits from one machine or thread count to
another, and ``run --dtype float32``'s own gradients differ in float32 digits.
The promise is therefore narrower than byte-identical output everywhere:

* the same command on the same machine with the same thread count prints the
  same report, byte for byte (lincheck draws nothing that is not seeded);
* with any thread count (here 1, 2 and 16, on whatever kernel this machine's
  ``OPENBLAS_CORETYPE`` selects), the verdicts, the exit code and the hints are
  the same, and a failed check names the same worst entry with the same error
  to many digits: every bound holds for every order of summation, so only an
  error within the bounds' own last digits of its tolerance could be judged
  differently.

No assertion here rests on one machine's rounding: the planted error is far
from its tolerance and the correct gradients far inside theirs.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

THREADS = (1, 2, 16)


def lincheck(*args, threads: int, cwd) -> tuple[int, bytes]:
    """Run the installed command with ``threads`` BLAS threads; (exit code, JSON report bytes)."""
    env = dict(
        os.environ,
        OPENBLAS_NUM_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    exe = str(Path(sys.executable).with_name("lincheck"))
    done = subprocess.run(
        [exe, *map(str, args), "--json", "-"], cwd=cwd, env=env, capture_output=True, timeout=300
    )
    assert done.returncode in (0, 1), done.stderr.decode()
    return done.returncode, done.stdout


def at_every_thread_count(*args, cwd) -> list[tuple[int, bytes]]:
    """:func:`lincheck` once per count of THREADS, the processes side by side (as a CI runs)."""
    with ThreadPoolExecutor(len(THREADS)) as pool:
        return list(pool.map(lambda t: lincheck(*args, threads=t, cwd=cwd), THREADS))


def verdicts(code: int, report: bytes) -> dict:
    """What must not depend on the thread count: verdicts, hints, where failures are."""
    data = json.loads(report)
    failed = {
        (c["tensor"], c["subject"]): (c["worst_index"], c["max_abs_error"])
        for c in data["checks"]
        if not c["passed"]
    }
    return {
        "exit": code,
        "passed": data["passed"],
        "checks": sorted((c["tensor"], c["subject"], c["passed"]) for c in data["checks"]),
        "hints": sorted((h["code"], h["tensor"]) for h in data["hints"]),
        "failed_at": {key: index for key, (index, _) in failed.items()},
        "_errors": {key: error for key, (_, error) in failed.items()},
    }


def same_verdicts(outcomes: list[dict]) -> None:
    first = outcomes[0]
    for other in outcomes[1:]:
        assert {k: v for k, v in other.items() if k != "_errors"} == {
            k: v for k, v in first.items() if k != "_errors"
        }
        for key, error in first["_errors"].items():
            # A planted error is far above rounding: the reference's last digits barely move it.
            assert other["_errors"][key] == pytest.approx(error, rel=1e-9)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Float32 dumps big enough for multi-threaded BLAS: one correct, one with dW doubled."""
    rng = np.random.default_rng(5)
    X, W, B, G = (
        rng.standard_normal(s).astype(np.float32)
        for s in ((300, 200), (100, 200), (100,), (300, 100))
    )
    folders = {}
    for name, dW in (("correct", G.T @ X), ("doubled", 2 * (G.T @ X))):
        folder = tmp_path_factory.mktemp(name)
        arrays = {"X": X, "W": W, "B": B, "dY": G, "dX": G @ W, "dW": dW, "dB": G.sum(0)}
        for key, a in arrays.items():
            np.save(folder / f"{key}.npy", a)
        folders[name] = folder
    # A mean-reduced loss: dY = 1/N everywhere, so each column of dW holds D_out entries
    # equal in exact arithmetic, whose errors differ only in the BLAS's last bits.
    N, D_in, D_out = 256, 130, 70
    X = rng.standard_normal((N, D_in)).astype(np.float32)
    W = rng.standard_normal((D_out, D_in)).astype(np.float32)
    G = np.full((N, D_out), 1 / N, dtype=np.float32)
    folder = tmp_path_factory.mktemp("mean")
    for key, a in {"X": X, "W": W, "dY": G, "dW": 2 * (G.T @ X)}.items():
        np.save(folder / f"{key}.npy", a)
    folders["mean"] = folder
    return folders


@pytest.mark.parametrize("mode", ["full", "sample", "directions"])
def test_verify_verdicts_do_not_depend_on_the_thread_count(dumps, mode):
    for name, folder in dumps.items():
        runs = at_every_thread_count("verify", folder, "--mode", mode, cwd=folder)
        outcomes = [verdicts(*run) for run in runs]
        same_verdicts(outcomes)
        if name == "correct":
            assert outcomes[0]["exit"] == 0 and outcomes[0]["passed"]
        elif name == "mean":
            assert outcomes[0]["exit"] == 1 and ("dW", "supplied") in outcomes[0]["failed_at"]
        else:
            assert outcomes[0]["exit"] == 1
            assert ("scaled", "dW") in outcomes[0]["hints"]
            assert ("dW", "supplied") in outcomes[0]["failed_at"]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_run_passes_with_any_thread_count(tmp_path, dtype):
    args = ("run", "--n", 96, "--din", 128, "--dout", 64, "--dtype", dtype, "--seed", 3)
    outcomes = [verdicts(*run) for run in at_every_thread_count(*args, cwd=tmp_path)]
    same_verdicts(outcomes)
    assert outcomes[0]["exit"] == 0 and outcomes[0]["passed"]


@pytest.mark.parametrize("threads", [1, 2])
def test_same_thread_count_gives_a_byte_identical_report(dumps, tmp_path, threads):
    run = ("run", "--n", 96, "--din", 128, "--dout", 64, "--dtype", "float32", "--seed", 3)
    assert lincheck(*run, threads=threads, cwd=tmp_path) == lincheck(
        *run, threads=threads, cwd=tmp_path
    )
    folder = dumps["doubled"]
    verify = ("verify", folder, "--mode", "directions")
    assert lincheck(*verify, threads=threads, cwd=folder) == lincheck(
        *verify, threads=threads, cwd=folder
    )


def test_entries_tied_in_exact_arithmetic_name_the_same_worst_entry(rng):
    """Ratios that differ only in their last bits (as BLAS orders leave them) rank equal,
    and the lowest index is the worst, whatever the noise."""
    from lincheck.tally import Positions, Tally

    worst = set()
    for _ in range(20):
        # One value in exact arithmetic (1.3, far from a step of the cut), a few ulps of noise.
        err = 1.3 + rng.integers(-4, 5, size=(40, 30)) * 2.0**-52
        err[:5] = 0.5  # the first rows are smaller: the worst is the first entry of row 5
        t = Tally(top=5, shape=(40, 30))
        t.add(err, np.zeros_like(err), np.ones_like(err), 1.0, Positions())
        worst.add(t.best[0][0])
    assert worst == {5 * 30}
