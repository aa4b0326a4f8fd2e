"""User code cannot fake a verdict: run --impl/--forward call it in a worker process.

Each test runs the installed ``lincheck`` command in a subprocess (as CI would), with a
user module in the current folder whose function misbehaves: ends the process, crashes,
hangs, prints, or returns a broadcast view of 10¹² entries. Each must end in a failed
case with its message and a written report (exit 1), never in exit 0, a hang, a
signal, or a garbled ``--json -``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lincheck
from lincheck import worker

USER_MODULE = """
import os, signal, sys, time
import numpy as np

def _ok(X, W, B, dY):
    X2, G = X.reshape(-1, X.shape[-1]), dY.reshape(-1, dY.shape[-1])
    return dY @ W, G.T @ X2, None if B is None else G.sum(0)

def exits_0(X, W, B, dY):
    sys.exit(0)

def exits_3(X, W, B, dY):
    sys.exit(3)

def hard_exit(X, W, B, dY):
    os._exit(0)

def segfault(X, W, B, dY):
    os.kill(os.getpid(), signal.SIGSEGV)

def chatty(X, W, B, dY):
    print("hello from the user's backward")
    return _ok(X, W, B, dY)

def hangs_on_one_row(X, W, B, dY):
    while X.shape[0] == 1:
        time.sleep(0.01)
    return _ok(X, W, B, dY)

def huge_view(X, W, B, dY):
    dX, dW, dB = _ok(X, W, B, dY)
    return np.broadcast_to(dX.ravel()[:1], (10**6, 10**6)), dW, dB

def fork_sleeper(X, W, B, dY):
    if os.fork() == 0:  # a grandchild that outlives the call, holding stderr open
        time.sleep(120)
        os._exit(0)
    return _ok(X, W, B, dY)

def fork_then_exit(X, W, B, dY):
    if os.fork() == 0:  # keeps the worker's pipe open after the worker is gone
        time.sleep(120)
        os._exit(0)
    os._exit(0)

def exits_on_second_case(X, W, B, dY):
    if X.shape[0] == 1:
        os._exit(0)
    return _ok(X, W, B, dY)
"""

SIZES = ("--n", "4", "--din", "3", "--dout", "2", "--dtype", "float64")


@pytest.fixture
def user(tmp_path):
    (tmp_path / "usercode.py").write_text(USER_MODULE)
    return tmp_path


def lincheck_cli(cwd: Path, *args: str, timeout=120) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("lincheck"))
    return subprocess.run(
        [exe, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def errors_of(report: dict) -> dict[str, str | None]:
    return {c["case"]: c["error"] for c in report["cases"]}


@pytest.mark.parametrize(
    "function, error",
    [
        ("exits_0", "exits_0 called sys.exit(0); a check cannot end lincheck"),
        ("exits_3", "exits_3 called sys.exit(3); a check cannot end lincheck"),
        (
            "hard_exit",
            "hard_exit ended its worker process with exit code 0 (os._exit?) instead of returning",
        ),
        ("segfault", "segfault crashed: its worker process was killed by SIGSEGV"),
    ],
)
def test_a_function_that_ends_its_process_fails_every_case_and_the_report_is_written(
    user, function, error
):
    done = lincheck_cli(user, "run", "--impl", f"usercode:{function}", *SIZES, "--json", "r.json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((user / "r.json").read_text())
    assert report["passed"] is False and len(report["cases"]) == 7
    assert set(errors_of(report).values()) == {error}
    assert "FAIL  7 of 7 cases failed" in done.stdout


def test_the_users_prints_go_to_stderr_and_never_into_json_on_stdout(user):
    done = lincheck_cli(user, "run", "--impl", "usercode:chatty", *SIZES, "--json", "-")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passed"] is True  # stdout is the report and nothing else
    assert done.stderr.count("hello from the user's backward") == 7


def test_a_hanging_function_is_stopped_at_the_timeout_and_the_sweep_goes_on(user):
    done = lincheck_cli(
        user, "run", "--impl", "usercode:hangs_on_one_row", *SIZES, "--timeout", "1", "--json", "-"
    )
    assert done.returncode == 1, done.stderr
    errors = errors_of(json.loads(done.stdout))
    stopped = "hangs_on_one_row did not return within 1 s (this case); stopped (--timeout)"
    assert errors.pop("float64 N=1 D_in=3 D_out=2") == stopped
    assert set(errors.values()) == {None}  # the cases after it ran in a fresh worker


def test_a_crash_in_one_case_does_not_stop_the_next(user):
    done = lincheck_cli(
        user, "run", "--impl", "usercode:exits_on_second_case", *SIZES, "--json", "-"
    )
    errors = errors_of(json.loads(done.stdout))
    assert errors.pop("float64 N=1 D_in=3 D_out=2").startswith("exits_on_second_case ended")
    assert set(errors.values()) == {None}


def test_a_broadcast_view_of_a_trillion_entries_is_a_failed_check_saying_the_shape(user):
    done = lincheck_cli(
        user,
        "run",
        "--impl",
        "usercode:huge_view",
        *SIZES,
        "--json",
        "-",
        "--save-failures",
        "saved",
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    checks = [c for c in report["checks"] if c["tensor"] == "dX" and c["subject"] == "supplied"]
    assert len(checks) == 7 and not any(c["passed"] for c in checks)
    assert {c["message"] for c in checks} >= {
        "wrong shape: expected (4, 3), got (1000000, 1000000)"
    }
    saved = user / "saved" / "float64_N=4_D_in=3_D_out=2"
    assert (saved / "dW.npy").exists() and not (saved / "dX.npy").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ("import sys\nsys.exit(0)\n", "--impl broken:f: cannot import broken: SystemExit: 0"),
        (
            "import os\nos._exit(0)\n",
            "cannot load f: ended its worker process with exit code 0 (os._exit?) instead of "
            "returning",
        ),
    ],
)
def test_a_module_that_exits_on_import_is_bad_usage(tmp_path, source, message):
    (tmp_path / "broken.py").write_text(source)
    done = lincheck_cli(tmp_path, "run", "--impl", "broken:f", *SIZES)
    assert done.returncode == 2
    assert done.stderr == f"lincheck: error: {message}\n"


# --- the Python API ------------------------------------------------------------


def exits_0(X, W, B, dY):
    sys.exit(0)


def hard_exit(X, W, B, dY):
    os._exit(0)


def test_check_backward_fails_a_case_that_calls_sys_exit():
    sweep = lincheck.check_backward(exits_0, N=4, D_in=3, D_out=2, dtypes=["float64"])
    assert not sweep.passed
    assert {r.error for r in sweep.results} == {
        "exits_0 called sys.exit(0); a check cannot end lincheck"
    }


def test_check_backward_isolated_survives_os_exit():
    sweep = lincheck.check_backward(
        hard_exit, N=4, D_in=3, D_out=2, dtypes=["float64"], isolate=True, timeout=30
    )
    assert not sweep.passed and len(sweep.results) == 7
    assert all("hard_exit ended its worker process" in r.error for r in sweep.results)


def test_check_backward_isolated_gives_the_same_verdicts_as_in_process():
    from oracles import reference_backward

    def wrong(X, W, B, dY):  # not importable: isolation refuses it with advice
        return reference_backward(X, W, B, dY)

    with pytest.raises(ValueError, match="isolate=True needs a function a worker can import"):
        lincheck.check_backward(wrong, N=4, D_in=3, D_out=2, isolate=True)
    here = lincheck.check_backward(reference_backward, N=5, D_in=3, D_out=2)
    there = lincheck.check_backward(reference_backward, N=5, D_in=3, D_out=2, isolate=True)
    assert here.passed and there.passed
    assert here.to_json() == there.to_json()


def test_a_broadcast_view_in_process_is_a_failed_check(rng):
    X, W, B, G = (rng.standard_normal(s) for s in ((8, 5), (3, 5), (3,), (8, 3)))
    huge = np.broadcast_to(np.float64(1.0), (10**6, 10**6))
    report = lincheck.check(X, W, B, G, dX=huge, dW=G.T @ X)
    (dX,) = [c for c in report.checks if c.tensor == "dX" and c.subject == "supplied"]
    assert not dX.passed and dX.message == "wrong shape: expected (8, 5), got (1000000, 1000000)"


def test_the_cli_default_timeout_is_the_workers():
    import inspect

    from lincheck.cli import run

    assert inspect.signature(run).parameters["timeout"].default == worker.DEFAULT_TIMEOUT


def test_a_function_that_writes_into_the_protocol_pipe_fails_its_case(user):
    (user / "sneaky.py").write_text(
        "import os\n"
        "def f(X, W, B, dY):\n"
        "    for fd in range(3, 12):\n"
        "        try:\n"
        "            os.write(fd, b'\\xff' * 64)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return dY @ W, dY.T @ X, dY.sum(0)\n"
    )
    done = lincheck_cli(user, "run", "--impl", "sneaky:f", *SIZES, "--json", "-")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    errors = set(errors_of(json.loads(done.stdout)).values())
    assert errors and all(e.startswith("f garbled its worker's reply") or e is None for e in errors)
    assert errors != {None}


def test_what_the_users_code_forks_ends_with_it(user):
    """A grandchild that sleeps for minutes neither delays the run (it holds stderr) nor
    outlives it; a worker that exits while a grandchild holds its pipe is seen to exit."""
    done = lincheck_cli(user, "run", "--impl", "usercode:fork_sleeper", *SIZES, timeout=60)
    assert done.returncode == 0, done.stderr  # returned in time: the grandchildren were ended
    done = lincheck_cli(
        user, "run", "--impl", "usercode:fork_then_exit", *SIZES, "--json", "-", timeout=60
    )
    errors = set(errors_of(json.loads(done.stdout)).values())
    assert errors == {
        "fork_then_exit ended its worker process with exit code 0 (os._exit?) instead of returning"
    }


FORGERIES = {
    # lincheck's own code in the worker, patched by the user's module: nothing is checked
    "skip": "import lincheck.worker as w\n"
    "w.call = lambda fn, forward, inputs: ({}, [])\n"
    "def f(X, W, B, dY):\n    return X, W, B\n",
    # a reply written by hand, without the fields lincheck sends
    "forge": "import os, struct, json\n"
    "def f(X, W, B, dY):\n"
    "    frame = json.dumps({'arrays': []}).encode()\n"
    "    for fd in range(3, 12):\n"
    "        try:\n"
    "            os.write(fd, struct.pack('<Q', len(frame)) + frame)\n"
    "        except OSError:\n"
    "            pass\n"
    "    os._exit(0)\n",
}


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_a_reply_that_skips_the_check_fails_the_case(user, kind):
    (user / "forger.py").write_text(FORGERIES[kind])
    done = lincheck_cli(user, "run", "--impl", "forger:f", *SIZES, "--json", "-")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = errors_of(json.loads(done.stdout))
    assert all(e is not None and "garbled its worker's reply" in e for e in errors.values())


class _NoDetach:
    def detach(self):
        raise RuntimeError("no detach")


class _ExitOnRead:
    def __array__(self, dtype=None, copy=None):
        raise SystemExit(0)


class _BadLength(tuple):
    def __len__(self):
        raise RuntimeError("no length")


def _returns(first):
    def backward(X, W, B, dY):
        from oracles import reference_backward

        dX, dW, dB = reference_backward(X, W, B, dY)
        return first(dX, dW, dB)

    return backward


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda dX, dW, dB: (_NoDetach(), dW, dB), "dX: cannot be read as an array (no detach)"),
        (
            lambda dX, dW, dB: (_ExitOnRead(), dW, dB),
            "dX: reading it as an array called sys.exit(0); a check cannot end lincheck",
        ),
        (
            lambda dX, dW, dB: _BadLength((dX, dW, dB)),
            "_returns.<locals>.backward raised RuntimeError: no length",
        ),
    ],
)
def test_the_users_result_objects_cannot_escape_check_backward(make, error):
    sweep = lincheck.check_backward(_returns(make), N=4, D_in=3, D_out=2, dtypes=["float64"])
    assert not sweep.passed and {r.error for r in sweep.results} == {error}
