"""lincheck as a CI assertion: the Python API, --impl sweeps, many cases, JUnit and annotations."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from conftest import case, mean_bias
from oracles import reference_backward
from typer.testing import CliRunner

import lincheck
from lincheck.api import sweep
from lincheck.cli import app

runner = CliRunner()

IMPLEMENTATIONS = """
import numpy as np

def _flat(X, dY):
    return X.reshape(-1, X.shape[-1]), dY.reshape(-1, dY.shape[-1])

def correct(X, W, B, dY):
    X2, G = _flat(X, dY)
    return dY @ W, G.T @ X2, None if B is None else G.sum(0)

def transposed_dW(X, W, B, dY):
    X2, G = _flat(X, dY)
    return dY @ W, X2.T @ G, None if B is None else G.sum(0)

def mean_dB(X, W, B, dY):
    X2, G = _flat(X, dY)
    return dY @ W, G.T @ X2, None if B is None else G.mean(0)

def wrong_when_one_sample(X, W, B, dY):
    X2, G = _flat(X, dY)
    dW = G.T @ X2 if G.shape[0] > 1 else np.zeros_like(W)
    return dY @ W, dW, None if B is None else G.sum(0)

def wrong_with_leading_dims(X, W, B, dY):
    if X.ndim > 2:  # keeps only the first batch slice
        X, dY = X[0], dY[0]
    return dY @ W, dY.T @ X, None if B is None else dY.sum(0)

def raises(X, W, B, dY):
    raise RuntimeError("shapes not aligned")

def two_values(X, W, B, dY):
    return dY @ W, dY.T @ X

def forward(X, W, B):
    return X @ W.T + (0 if B is None else B)

def forward_without_bias(X, W, B):
    return X @ W.T
"""


@pytest.fixture
def impl(tmp_path, monkeypatch):
    """A user module of backward implementations, importable from the current folder."""
    name = f"impl_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(IMPLEMENTATIONS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cases_of(result):
    return {c["case"]: c for c in json.loads(result.stdout)["cases"]}


# --- the Python API ---------------------------------------------------------


def test_api_and_cli_agree(tmp_path, rng):
    X, W, B, G = (rng.standard_normal(s) for s in ((6, 4), (3, 4), (3,), (6, 3)))
    grads = {"dX": G @ W, "dW": (G.T @ X).T.copy().T * 1.0, "dB": G.mean(0)}
    for name, a in {"X": X, "W": W, "B": B, "dY": G, **grads}.items():
        np.save(tmp_path / f"{name}.npy", a)
    result = invoke("verify", tmp_path, "--json", "-")
    assert result.exit_code == 1
    from_cli = json.loads(result.stdout)
    from_api = json.loads(lincheck.check(X, W, B, G, **grads).to_json())
    assert from_cli["checks"] == from_api["checks"] and from_cli["hints"] == from_api["hints"]
    assert from_cli["passed"] is from_api["passed"] is False


def test_assert_gradients_message_is_the_readable_report(rng):
    X, W, B, G = (rng.standard_normal(s) for s in ((6, 4), (3, 4), (3,), (6, 3)))
    lincheck.assert_gradients(X, W, B, G, dX=G @ W, dW=G.T @ X, dB=G.sum(0))
    with pytest.raises(AssertionError) as info:
        lincheck.assert_gradients(X, W, B, G, dX=G @ W, dW=G.T @ X, dB=G.mean(0))
    message = str(info.value)
    assert message.startswith("lincheck: 1 of 6 checks failed: dB (supplied)\n")
    assert "Your gradients (fp64) vs the float64 analytic reference" in message
    assert re.search(r"dB\s+3\s+.*FAIL", message)  # the row of the failing tensor
    assert "hint [mean_instead_of_sum] dB = dY.mean(0)" in " ".join(message.split())
    assert "\x1b[" not in message  # plain text, no colour codes


def test_arrays_from_dlpack_and_array_protocol_without_importing_their_library(rng):
    X, W, B, G = (rng.standard_normal(s) for s in ((6, 4), (3, 4), (3,), (6, 3)))

    class OnlyDLPack:  # like a tensor of another library: only the protocol
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kwargs):
            return self._a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    class OnlyArray:
        def __init__(self, a):
            self._a = a

        def __array__(self, dtype=None, copy=None):
            return self._a

    report = lincheck.check(
        OnlyDLPack(X), OnlyArray(W), B, OnlyDLPack(G), dX=OnlyArray(G @ W), dW=OnlyDLPack(G.T @ X)
    )
    assert report.passed


def test_check_backward_sweep_names_the_failing_cases(rng):
    assert lincheck.check_backward(reference_backward, N=6, D_in=4, D_out=3).passed
    names = [c.name for c in sweep(6, 4, 3, ["float32"])]
    assert names == [
        "float32 N=6 D_in=4 D_out=3",
        "float32 N=1 D_in=4 D_out=3",
        "float32 N=6 D_in=1 D_out=3",
        "float32 N=6 D_in=4 D_out=1",
        "float32 N=6 D_in=3 D_out=4",
        "float32 X (2, 3, 4) D_out=3",
        "float32 N=6 D_in=4 D_out=3 no bias",
    ]

    def raises(X, W, B, dY):
        raise ValueError("boom")

    result = lincheck.check_backward(raises, N=4, D_in=3, D_out=2, dtypes=["float64"])
    assert not result.passed
    assert all(
        r.error == "test_check_backward_sweep_names_the_failing_cases.<locals>.raises "
        "raised ValueError: boom"
        for r in result.results
    )


# --- run --impl ----------------------------------------------------------------


def test_impl_correct_passes(impl):
    result = invoke(
        "run",
        "--impl",
        f"{impl}:correct",
        "--forward",
        f"{impl}:forward",
        "--n",
        6,
        "--din",
        4,
        "--dout",
        3,
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    cases = cases_of(result)
    assert len(cases) == 14 and all(c["passed"] for c in cases.values())
    assert {"Y"} < {c["tensor"] for c in json.loads(result.stdout)["checks"]}


@pytest.mark.parametrize(
    "function, failing, tensor",
    [
        ("transposed_dW", None, "dW"),
        ("mean_dB", None, "dB"),
        (
            "wrong_when_one_sample",
            {"float64 N=1 D_in=4 D_out=3", "float32 N=1 D_in=4 D_out=3"},
            "dW",
        ),
        (
            "wrong_with_leading_dims",
            {"float64 X (2, 3, 4) D_out=3", "float32 X (2, 3, 4) D_out=3"},
            "dX",
        ),
    ],
)
def test_impl_planted_bugs_fail_and_save_reproducible_cases(
    impl, tmp_path, function, failing, tensor
):
    saved = tmp_path / "failures"
    result = invoke(
        "run",
        "--impl",
        f"{impl}:{function}",
        "--n",
        6,
        "--din",
        4,
        "--dout",
        3,
        "--save-failures",
        saved,
        "--json",
        "-",
    )
    assert result.exit_code == 1, result.output
    cases = cases_of(result)
    failed = {name for name, c in cases.items() if not c["passed"]}
    if failing is not None:
        assert failed == failing
    assert failed
    assert f"FAIL {len(failed)} of 14 cases failed" in " ".join(result.stderr.split())
    for name in failed:
        case_tensors = {c["tensor"] for c in cases[name]["report"]["checks"] if not c["passed"]}
        assert tensor in case_tensors
        folder = saved / re.sub(r"[^A-Za-z0-9=._-]+", "_", name).strip("_")
        again = invoke("verify", folder, "--json", "-")
        assert again.exit_code == 1, again.output
        verify_tensors = {
            c["tensor"] for c in json.loads(again.stdout)["checks"] if not c["passed"]
        }
        assert verify_tensors == case_tensors  # reproduces the same failure


@pytest.mark.parametrize(
    "function, message",
    [
        ("raises", "raises raised RuntimeError: shapes not aligned"),
        ("two_values", "two_values returned 2 instead of (dX, dW, dB)"),
    ],
)
def test_impl_errors_are_failed_cases_not_tracebacks(impl, function, message):
    result = invoke(
        "run",
        "--impl",
        f"{impl}:{function}",
        "--n",
        4,
        "--din",
        3,
        "--dout",
        2,
        "--dtype",
        "float64",
        "--json",
        "-",
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    cases = cases_of(result)
    assert len(cases) == 7 and all(c["error"] == message for c in cases.values())


def test_forward_without_bias_is_caught(impl):
    result = invoke(
        "run",
        "--forward",
        f"{impl}:forward_without_bias",
        "--n",
        4,
        "--din",
        3,
        "--dout",
        2,
        "--dtype",
        "float64",
        "--json",
        "-",
    )
    assert result.exit_code == 1
    cases = cases_of(result)
    assert not cases["float64 N=4 D_in=3 D_out=2"]["passed"]
    assert cases["float64 N=4 D_in=3 D_out=2 no bias"]["passed"]


@pytest.mark.parametrize("spec", ["nomodule_xyz:fn", "json:nothing_here", "justaname"])
def test_bad_impl_spec_exits_2(impl, spec):
    result = invoke("run", "--impl", spec)
    assert result.exit_code == 2 and result.stderr.startswith("lincheck: error: --impl")


# --- many cases ------------------------------------------------------------------


def _dump(folder, rng, bug=None):
    case(folder, rng, 5, 4, 3, **({"fn": mean_bias} if bug == "mean" else {}))


def test_verify_a_model_dump_of_many_layers_in_parallel(tmp_path, rng):
    model = tmp_path / "model"
    for i in range(4):
        _dump(model / f"layer{i}", rng, bug="mean" if i == 2 else None)
    np.savez(model / "head.npz", X=np.ones((2, 3)), W=np.ones((1, 3)), dY=np.ones((2, 1)))
    result = invoke("verify", model, "--jobs", 2, "--json", "-", "--junit", tmp_path / "j.xml")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    cases = {c["case"]: c for c in report["cases"]}
    assert sorted(cases) == sorted(
        str(model / n) for n in ["head.npz", "layer0", "layer1", "layer2", "layer3"]
    )
    assert [n for n, c in cases.items() if not c["passed"]] == [str(model / "layer2")]
    assert {(h["case"], h["code"]) for h in report["hints"]} == {
        (str(model / "layer2"), "mean_instead_of_sum")
    }
    text = " ".join(result.stderr.split())
    assert "5 cases" in text and "layer2" in text and "dB (mean_instead_of_sum)" in text
    assert text.endswith(f"FAIL 1 of 5 cases failed: {model / 'layer2'}")
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("tests") == str(4 * 6 + 2) and suite.get("failures") == "1"


def test_verify_several_paths_and_bad_input_in_one(tmp_path, rng):
    _dump(tmp_path / "a", rng)
    _dump(tmp_path / "b", rng)
    (tmp_path / "b" / "W.npy").write_bytes(b"junk")
    result = invoke("verify", tmp_path / "a", tmp_path / "b", "--jobs", 1, "--json", "-")
    assert result.exit_code == 2  # bad input decides the exit code
    cases = cases_of(result)
    assert cases[str(tmp_path / "a")]["passed"] is True
    assert "not a .npy file" in cases[str(tmp_path / "b")]["error"]
    assert cases[str(tmp_path / "b")]["bad_input"] is True
    report = json.loads(result.stdout)
    assert report["counts"] == {
        "cases": 2,
        "failed": 0,
        "bad_input": 1,
        "unsupported": 0,
        "skipped": 0,
    }
    assert " ".join(result.stderr.split()).endswith(
        f"FAIL 1 of 2 cases had bad input: {tmp_path / 'b'}"
    )


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_check_is_never_hidden_behind_bad_input(tmp_path, rng, jobs):
    """One malformed case and one genuinely failing: exit 1 (a check failed), and the
    summary line, the JSON and the JUnit report name both."""
    _dump(tmp_path / "a", rng, bug="mean")
    _dump(tmp_path / "b", rng)
    (tmp_path / "b" / "W.npy").write_bytes(b"junk")
    _dump(tmp_path / "c", rng)
    junit = tmp_path / "j.xml"
    result = invoke("verify", tmp_path, "--jobs", jobs, "--json", "-", "--junit", junit)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["counts"] == {
        "cases": 3,
        "failed": 1,
        "bad_input": 1,
        "unsupported": 0,
        "skipped": 0,
    }
    text = " ".join(result.stderr.split())
    assert text.endswith(
        f"FAIL 1 of 3 cases failed, 1 had bad input: {tmp_path / 'a'}, {tmp_path / 'b'}"
    )
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("errors") == "1"
    (error,) = suite.iter("error")
    assert error.get("type") == "bad input"


# --- JUnit and GitHub ------------------------------------------------------------


def test_junit_to_a_dash_is_refused_not_written_as_a_file_named_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--n", "4", "--din", "3", "--dout", "2", "--junit", "-"])
    assert result.exit_code == 2 and "only --json takes -" in result.stderr
    assert not (tmp_path / "-").exists()


def test_junit_counts_and_github_annotations(tmp_path, rng):
    _dump(tmp_path / "c", rng, bug="mean")
    junit = tmp_path / "report.xml"
    junit.write_text("stale")
    result = runner.invoke(
        app, ["verify", str(tmp_path / "c"), "--junit", str(junit)], env={"GITHUB_ACTIONS": "true"}
    )
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "6" and root.get("failures") == "1"
    suite = root.find("testsuite")
    (failed,) = [t for t in suite.findall("testcase") if t.find("failure") is not None]
    assert failed.get("name") == "dB (supplied vs reference)"
    assert "mean_instead_of_sum" in failed.find("failure").text
    lines = [line for line in result.stdout.splitlines() if line.startswith("::")]
    assert len(lines) == 1
    assert re.fullmatch(r"::error title=[^:,\n]+::[^\n]+", lines[0]), lines[0]
    assert "%0A" in lines[0]  # multi-line message escaped as GitHub requires
    quiet = invoke("verify", tmp_path / "c", "--quiet")
    assert quiet.stdout == "FAIL  1 of 6 checks failed: dB (supplied)\n"


def test_junit_marks_errors(impl, tmp_path):
    junit = tmp_path / "j.xml"
    result = invoke(
        "run",
        "--impl",
        f"{impl}:raises",
        "--n",
        4,
        "--din",
        3,
        "--dout",
        2,
        "--dtype",
        "float64",
        "--junit",
        junit,
        "--github",
    )
    assert result.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "7" and suite.get("errors") == "7"
    assert (
        sum(
            line.startswith("::error title=lincheck float64 ")
            for line in result.stdout.splitlines()
        )
        == 7
    )


def test_run_in_several_dtypes_is_one_case_each():
    result = invoke(
        "run",
        "--n",
        6,
        "--din",
        4,
        "--dout",
        3,
        "--dtype",
        "float64",
        "--dtype",
        "float16",
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    assert sorted(cases_of(result)) == ["float16 N=6 D_in=4 D_out=3", "float64 N=6 D_in=4 D_out=3"]
    assert invoke("run", "--dtype", "float64", "--dtype", "float32", "--save", "x").exit_code == 2


def _group_alive(pgid: int) -> list[str]:
    """Processes (not zombies) still in process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


def _is_pool_worker(pid: str) -> bool:
    """A process of verify's pool (started by multiprocessing's spawn), not its resource
    tracker or the command itself."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in command


def _busy_model(tmp_path, cases: int, seed: int):
    """A folder of cases that each take many seconds in full mode: all still running."""
    rng = np.random.default_rng(seed)
    model = tmp_path / "model"
    for i in range(cases):
        folder = model / f"layer{i}"
        folder.mkdir(parents=True)
        for name, shape in (("X", (600, 400)), ("W", (300, 400)), ("dY", (600, 300))):
            np.save(folder / f"{name}.npy", rng.standard_normal(shape))
    return model


def _verify_with_two_busy_workers(tmp_path, model, json_target: str):
    """Start ``lincheck verify --jobs 2`` in a session of its own; once both workers are up
    and busy, return the process and its workers' pids."""
    exe = str(Path(sys.executable).with_name("lincheck"))
    process = subprocess.Popen(
        [exe, "verify", str(model), "--jobs", "2", "--mode", "full", "--json", json_target],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers: list[int] = []
    for _ in range(200):  # until both workers are up (at most 20 s)
        workers = [int(p) for p in _group_alive(process.pid) if _is_pool_worker(p)]
        if len(workers) >= 2 or process.poll() is not None:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()
    return process, workers


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find workers")
def test_one_ctrl_c_stops_every_worker_exits_130_and_writes_no_report(tmp_path):
    """A multi-case verify --jobs 2 interrupted as a terminal does (SIGINT to the whole
    process group) while its workers are busy: one line, exit 130, no worker left, no
    report file, nothing new in the dumps' folder."""
    model = _busy_model(tmp_path, 4, seed=0)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    process, _ = _verify_with_two_busy_workers(tmp_path, model, "out.json")
    pgid = process.pid
    os.killpg(pgid, signal.SIGINT)
    out, err = process.communicate(timeout=30)  # a hang guard, not a timing
    assert process.returncode == 130, err
    assert err == "lincheck: interrupted\n" and out == ""
    for _ in range(50):
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    assert _group_alive(pgid) == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find workers")
def test_a_worker_killed_mid_case_fails_the_cases_it_leaves_and_the_run_ends(tmp_path):
    model = _busy_model(tmp_path, 3, seed=1)
    process, workers = _verify_with_two_busy_workers(tmp_path, model, "-")
    # Each worker's BLAS gets its share of the cores (oversubscribed, OpenBLAS's spinning
    # threads slow a whole-model verify several times), unless the user chose a count.
    environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
    share = os.environ.get("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    assert f"OPENBLAS_NUM_THREADS={share}".encode() in environ
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    out, err = process.communicate(timeout=120)  # a hang guard, not a timing
    assert process.returncode == 1, err
    report = json.loads(out)
    died = "its worker process died (killed by a signal, or out of memory)"
    errors = [c["error"] for c in report["cases"]]
    assert len(errors) == 3 and died in errors and "Traceback" not in err
