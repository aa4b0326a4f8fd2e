"""The same inputs and seed give byte-identical JSON, across runs and BLAS thread counts."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def lincheck(*args, threads: int, cwd) -> bytes:
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
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """A dump big enough for multi-threaded BLAS, with a planted error to diagnose."""
    folder = tmp_path_factory.mktemp("dump")
    rng = np.random.default_rng(5)
    X, W, B, G = (
        rng.standard_normal(s).astype(np.float32)
        for s in ((300, 200), (100, 200), (100,), (300, 100))
    )
    arrays = {"X": X, "W": W, "B": B, "dY": G, "dX": G @ W, "dW": 2 * (G.T @ X), "dB": G.sum(0)}
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)
    return folder


@pytest.mark.parametrize("mode", ["full", "sample", "directions"])
def test_verify_json_is_identical_across_runs_and_threads(dump, mode):
    outputs = {lincheck("verify", dump, "--mode", mode, threads=t, cwd=dump) for t in (1, 2, 2)}
    assert len(outputs) == 1
    assert b'"code": "scaled"' in outputs.pop()


def test_run_json_is_identical_across_threads(tmp_path):
    args = ("run", "--n", 96, "--din", 128, "--dout", 64, "--dtype", "float32", "--seed", 3)
    assert lincheck(*args, threads=1, cwd=tmp_path) == lincheck(*args, threads=2, cwd=tmp_path)
