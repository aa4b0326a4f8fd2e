"""The command line: exit codes, tables, the JSON contract, files, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import case
from typer.testing import CliRunner

from lincheck.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def report_json(result):
    assert result.stdout.lstrip().startswith("{"), result.output
    return json.loads(result.stdout)


# --- run -----------------------------------------------------------------


def test_run_default_passes_and_prints_tables(tmp_path):
    result = invoke("run", "--n", 32, "--din", 64, "--dout", 16)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "N=32 D_in=64 D_out=16, float64, with bias, seed 0" in out
    assert "reproduce: lincheck run --n 32 --din 64 --dout 16 --seed 0 --dtype float64" in out
    assert "(central differences, 258 forward passes)" in " ".join(out.split())
    for tensor in ("dX", "dW", "dB"):
        assert f" {tensor} " in out
    assert "Worst entries" in out
    assert out.rstrip().endswith("PASS  all 3 checks passed")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_run_dtypes_pass(dtype):
    result = invoke(
        "run", "--n", 16, "--din", 24, "--dout", 8, "--dtype", dtype, "--seed", 3, "--json", "-"
    )
    assert result.exit_code == 0, result.output
    report = report_json(result)
    assert report["passed"] is True and report["dtype"] == dtype and report["seed"] == 3
    assert [c["subject_dtype"] for c in report["checks"]] == [dtype] * 3
    assert "PASS" in result.stderr  # with --json -, the tables go to stderr


def test_run_json_contract(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("stale")
    result = invoke("run", "--n", 4, "--din", 3, "--dout", 2, "--json", path)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["passed"] is True and report["hints"] == []
    assert report["command"] == "run"
    assert [c["tensor"] for c in report["checks"]] == ["dX", "dW", "dB"]
    for c in report["checks"]:
        assert {"tensor", "passed", "max_abs_error", "max_rel_error", "worst_index"} <= set(c)
        assert isinstance(c["max_abs_error"], float) and isinstance(c["worst_index"], list)
        assert c["oracle"] == "witness" and c["subject"] == "analytic"
    assert report["layer"] == {
        "N": 4,
        "D_in": 3,
        "D_out": 2,
        "batch_shape": [4],
        "bias": True,
        "dtypes": {"X": "float64", "W": "float64", "dY": "float64", "B": "float64"},
    }


def test_run_no_bias():
    report = report_json(
        invoke("run", "--n", 4, "--din", 3, "--dout", 2, "--no-bias", "--json", "-")
    )
    assert [c["tensor"] for c in report["checks"]] == ["dX", "dW"]
    assert report["layer"]["bias"] is False


def test_run_seed_reproduces_and_differs():
    a = report_json(invoke("run", "--n", 4, "--din", 3, "--dout", 2, "--seed", 7, "--json", "-"))
    b = report_json(invoke("run", "--n", 4, "--din", 3, "--dout", 2, "--seed", 7, "--json", "-"))
    c = report_json(invoke("run", "--n", 4, "--din", 3, "--dout", 2, "--seed", 8, "--json", "-"))
    assert a == b
    assert a["checks"][0]["worst_entries"] != c["checks"][0]["worst_entries"]


def test_run_save_writes_a_verifiable_folder_and_never_overwrites(tmp_path):
    folder = tmp_path / "saved"
    assert (
        invoke(
            "run", "--n", 5, "--din", 4, "--dout", 3, "--dtype", "float32", "--save", folder
        ).exit_code
        == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}.npy" for n in ("X", "W", "B", "dY", "dX", "dW", "dB")
    )
    assert np.load(folder / "X.npy").dtype == np.float32
    result = invoke("verify", folder)
    assert result.exit_code == 0, result.output
    again = invoke("run", "--n", 5, "--din", 4, "--dout", 3, "--save", folder)
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert np.load(folder / "X.npy").dtype == np.float32  # untouched
    assert (
        invoke("run", "--n", 5, "--din", 4, "--dout", 3, "--save", folder, "--force").exit_code == 0
    )
    assert np.load(folder / "X.npy").dtype == np.float64


# --- generate --------------------------------------------------------------


def test_generate_then_verify(tmp_path):
    folder = tmp_path / "case"
    result = invoke("generate", folder, "--n", 6, "--din", 4, "--dout", 3, "--with-grads")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}.npy" for n in ("X", "W", "B", "dY", "dX", "dW", "dB")
    )
    assert np.load(folder / "X.npy").shape == (6, 4)
    result = invoke("verify", folder, "--json", "-")
    assert result.exit_code == 0, result.output
    assert [(c["tensor"], c["subject"]) for c in report_json(result)["checks"]] == [
        ("dX", "supplied"),
        ("dW", "supplied"),
        ("dB", "supplied"),
        ("dX", "reference"),
        ("dW", "reference"),
        ("dB", "reference"),
    ]


@pytest.mark.parametrize("format", ["npy", "safetensors"])
def test_generate_names_a_folder_that_reads_as_markup_as_it_is(tmp_path, monkeypatch, format):
    """``lincheck generate 'a[/x]'`` (a folder a[ holding x]) says where it wrote, the
    path as given: not a MarkupError traceback, and no [b] dropped from "b[b]"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a[").mkdir()
    for name in ("a[/x]", "b[b]"):
        result = invoke("generate", name, "--n", 2, "--din", 2, "--dout", 1, "--format", format)
        assert result.exit_code == 0, result.output
        where = name if format == "npy" else f"{name}.safetensors"
        assert result.output.strip().endswith(f" to {where}"), result.output


def test_generate_never_overwrites_without_force(tmp_path):
    folder = tmp_path / "case"
    assert invoke("generate", folder, "--n", 6, "--din", 4, "--dout", 3).exit_code == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = invoke(
        "generate", folder, "--n", 6, "--din", 4, "--dout", 3, "--seed", 1, "--with-grads"
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "already exists; nothing was written" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no dX.npy either
    assert (
        invoke(
            "generate", folder, "--n", 6, "--din", 4, "--dout", 3, "--seed", 1, "--force"
        ).exit_code
        == 0
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} != before


# --- verify: planted bugs ------------------------------------------------------


PLANTED = {
    "dW transposed": ("dW", lambda d: {"dW": d["dW"].T}),
    "dB mean": ("dB", lambda d: {"dB": d["dY"].mean(0)}),
    "dB one row": ("dB", lambda d: {"dB": d["dY"][0]}),
    "dX sign flip": ("dX", lambda d: {"dX": -d["dX"]}),
    "dW scaled by 2": ("dW", lambda d: {"dW": 2 * d["dW"]}),
}


@pytest.mark.parametrize("square", [False, True], ids=["8x5x3", "6x6x6"])
@pytest.mark.parametrize("bug", list(PLANTED))
def test_verify_catches_planted_bugs(tmp_path, rng, bug, square):
    tensor, fn = PLANTED[bug]
    sizes = dict(N=6, D_in=6, D_out=6) if square else {}
    case(tmp_path / "c", rng, fn=fn, **sizes)
    result = invoke("verify", tmp_path / "c", "--json", "-")
    assert result.exit_code == 1, result.output
    report = report_json(result)
    assert report["passed"] is False
    assert [c["tensor"] for c in report["checks"] if not c["passed"]] == [tensor]
    assert f"FAIL  1 of 6 checks failed: {tensor} (supplied)" in result.stderr


def test_verify_locates_one_corrupted_entry(tmp_path, rng):
    def corrupt(d):
        dW = d["dW"].copy()
        dW[2, 3] *= 1 + 1e-3
        return {"dW": dW}

    case(tmp_path / "c", rng, fn=corrupt)
    result = invoke("verify", tmp_path / "c", "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    (failed,) = [c for c in report["checks"] if not c["passed"]]
    assert failed["tensor"] == "dW" and failed["worst_index"] == [2, 3]
    assert failed["message"].startswith("1 of 15 entries exceed their tolerance")
    assert failed["tier"] in ("certain", "statistical") and failed["verdict"] == "fail"
    assert "dW (supplied vs reference): 1 of 15 entries exceed their tolerance" in result.stdout


def test_verify_wrong_shape_and_nan_subjects_exit_1(tmp_path, rng):
    dX = rng.standard_normal((8, 5))
    dX[1, 1] = np.nan
    case(tmp_path / "c", rng, dX=dX, dB=np.ones(4))
    result = invoke("verify", tmp_path / "c", "--json", "-")
    assert result.exit_code == 1
    checks = {c["tensor"]: c for c in report_json(result)["checks"] if c["subject"] == "supplied"}
    assert checks["dX"]["message"] == "contains 1 NaN, first at [1, 1]"
    assert checks["dX"]["worst_index"] == [1, 1] and checks["dX"]["max_abs_error"] is None
    assert checks["dB"]["message"] == "wrong shape: expected (3,), got (4,)"
    assert checks["dW"]["passed"] is True


def test_verify_without_subjects_checks_the_formulas(tmp_path, rng):
    case(tmp_path / "c", rng, dX=None, dW=None, dB=None)
    report = report_json(invoke("verify", tmp_path / "c", "--json", "-"))
    assert report["passed"] and {c["subject"] for c in report["checks"]} == {"reference"}


def test_verify_npz_with_leading_batch_dims_and_no_bias(tmp_path, rng):
    X, W, G = (
        rng.standard_normal((2, 3, 5)),
        rng.standard_normal((4, 5)),
        rng.standard_normal((2, 3, 4)),
    )
    dX = G @ W
    dX[1, 0, 2] += 1.0
    np.savez(tmp_path / "c.npz", x=X, w=W, dy=G, dx=dX, dw=G.reshape(6, 4).T @ X.reshape(6, 5))
    result = invoke("verify", tmp_path / "c.npz", "--json", "-")
    assert result.exit_code == 1, result.output
    report = report_json(result)
    (failed,) = [c for c in report["checks"] if not c["passed"]]
    assert failed["tensor"] == "dX" and failed["worst_index"] == [1, 0, 2]
    assert report["layer"]["batch_shape"] == [2, 3] and report["layer"]["bias"] is False


# --- bad input and bad usage ------------------------------------------------


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lincheck: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"X": None}, ["missing X"]),
        ({"W": np.ones((3, 4))}, ["X (", "shape (8, 5) does not fit W (3, 4)"]),
        ({"dY": np.ones((8, 2))}, ["dY (", "expected (8, 3)"]),
        ({"B": np.ones(5)}, ["B (", "expected (3,)"]),
        ({"X": np.full((8, 5), np.inf)}, ["X (", "contains 40 Inf, first at [0, 0]"]),
        ({"W": np.ones((3, 5), dtype=complex)}, ["W (", "complex"]),
        ({"dY": np.array(["a"] * 24).reshape(8, 3)}, ["dY (", "string"]),
    ],
    ids=["missing", "X/W", "dY", "B", "inf", "complex", "string"],
)
def test_verify_bad_inputs_exit_2_with_one_line(tmp_path, rng, overrides, fragments):
    case(tmp_path / "c", rng, **overrides)
    json_path = tmp_path / "r.json"
    _one_line_error(invoke("verify", tmp_path / "c", "--json", json_path), *fragments)
    assert not json_path.exists()


def test_verify_truncated_and_pickled_files(tmp_path, rng):
    case(tmp_path / "c", rng)
    data = (tmp_path / "c" / "W.npy").read_bytes()
    (tmp_path / "c" / "W.npy").write_bytes(data[:-10])
    _one_line_error(invoke("verify", tmp_path / "c"), "W (", "truncated")
    proof = tmp_path / "pwned"
    payload = np.array([0, 0], dtype=object)
    payload[0] = _Payload(str(proof))
    np.save(tmp_path / "c" / "W.npy", payload, allow_pickle=True)
    _one_line_error(invoke("verify", tmp_path / "c"), "W (", "never unpickles")
    assert not proof.exists()


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_verify_missing_path():
    _one_line_error(invoke("verify", "no/such/dir"), "no/such/dir: no such file or folder")


@pytest.mark.parametrize(
    "args",
    [["run", "--n", "0"], ["run", "--dtype", "float8"], ["verify"], ["generate"], ["frobnicate"]],
)
def test_bad_usage_exits_2(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output


def test_help_lists_exit_codes_and_an_example():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    checks = (
        "Exit codes: 0 every check passed · 1 a check failed · 2 bad usage or bad input "
        "(with several cases, 1 if any check failed, even where others had bad input) · "
        "130 interrupted (Ctrl-C)."
    )
    for command in ("run", "verify", "generate", "explain"):
        assert command in result.stdout
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0
        text = " ".join(sub.stdout.split())
        # Only the codes a command can give: generate and explain check nothing (no 1).
        assert (checks in text) is (command in ("run", "verify"))
        assert "Exit codes: 0 " in text and "130 interrupted (Ctrl-C)." in text
        assert ("1 a check failed" in text) is (command in ("run", "verify"))
        assert f"Example: lincheck {command}" in text


def _help_words(command) -> list[str]:
    """Every word of a command's help texts, metavars and option names, as written."""
    import typer.main

    from lincheck.cli import app as typer_app

    group = typer.main.get_command(typer_app)
    cmd = group if command is None else group.commands[command]
    words = (cmd.help or "").split()
    for param in cmd.params:
        words += (getattr(param, "help", None) or "").replace("\\[", "[").split()
        if param.param_type_name == "option":
            words += [*param.opts, *param.secondary_opts]
        words += [param.metavar] if param.metavar else []
    return words


@pytest.mark.parametrize("command", [None, "run", "verify", "generate", "explain"])
def test_help_fits_80_columns_without_cut_words(command):
    """At 80 columns: no line wider, nothing cropped ("…"), every word of every help text
    whole on some line (Rich folds a word too long for its column), and short enough to
    read (the detail is in docs/cli.md)."""
    args = ["--help"] if command is None else [command, "--help"]
    result = runner.invoke(app, args, env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout
    shown = set(result.stdout.replace("│", " ").split())
    cut = [word for word in _help_words(command) if word not in shown]
    assert cut == [], cut
    assert len(lines) <= 110, len(lines)
    assert "lincheck[plot]" in result.stdout or command not in ("run", "verify")


# --- the installed program ---------------------------------------------------


def _script():
    path = Path(sys.executable).with_name("lincheck")
    if not path.exists():
        pytest.fail(f"no console script next to {sys.executable}: is lincheck installed?")
    return str(path)


def test_console_script_and_module(tmp_path, rng):
    done = subprocess.run(
        [_script(), "run", "--n", "4", "--din", "3", "--dout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "PASS  all 3 checks passed" in done.stdout
    module = subprocess.run(
        [sys.executable, "-m", "lincheck", "--version"], capture_output=True, text=True, timeout=60
    )
    assert module.returncode == 0 and module.stdout.startswith("lincheck ")


def test_console_script_bad_input_has_no_traceback(tmp_path, rng):
    case(tmp_path / "c", rng)
    (tmp_path / "c" / "dY.npy").write_bytes(b"garbage")
    done = subprocess.run(
        [_script(), "verify", str(tmp_path / "c")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("lincheck: error: dY (") and done.stderr.count("\n") == 1


def _read_until(fd: int, done, seconds: float) -> bytes:
    """Read a terminal's (or a pipe's) output until ``done(text)`` or ``seconds`` pass."""
    import select
    import time

    seen, deadline = b"", time.monotonic() + seconds
    while not done(seen) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
def test_a_long_check_shows_progress_at_once_and_ctrl_c_is_one_line():
    """On a terminal, a check of many seconds shows what it checks and a bar from its first
    forward passes on, advancing a few passes at a time (it showed nothing for the first
    quarter of the work); Ctrl-C mid-check is one line and exit 130."""
    import pty
    import re
    import signal

    master, slave = pty.openpty()
    process = subprocess.Popen(
        [_script(), "run", "--n", "512", "--din", "1024", "--dout", "512", "--mode", "full"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "COLUMNS": "80", "OPENBLAS_NUM_THREADS": "1"},
        start_new_session=True,
    )
    os.close(slave)
    try:

        def counts(text: bytes) -> list[tuple[bytes, bytes]]:
            plain = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", text)
            return re.findall(rb"(\d+)/(\d+) passes", plain)

        seen = _read_until(master, lambda text: len(set(counts(text))) >= 3, 120)
        found = counts(seen)
        assert len(set(found)) >= 3, seen
        total = int(found[0][1])
        assert total == 2 * (2 * 1024 + 1)  # every column of X and W, and B, twice
        assert int(found[0][0]) < total // 50  # from the start, not after a long first block
        # at 80 columns the count and the time left show whole, the label gives way
        plain = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", seen)
        assert re.search(rb"\d+/\d+ passes (\d+:\d\d:\d\d|-:--:--)", plain), plain
        assert b"N=512 D_in=1024 D_out=512, float64" in seen
        os.killpg(process.pid, signal.SIGINT)  # a terminal's Ctrl-C
        process.wait(timeout=60)
        rest = _read_until(master, lambda text: False, 2)
        assert process.stdout is not None
        out = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
        process.communicate()
    assert process.returncode == 130 and out == b""
    text = rest.decode(errors="replace")
    assert "lincheck: interrupted" in text and "Traceback" not in text


SLOW_START = """
import builtins, sys, time

real_import = builtins.__import__


def slow_import(name, *args, **kwargs):  # Typer's import made long, as on a cold disk
    if name == "typer" and "typer" not in sys.modules:
        sys.stderr.write("importing typer\\n")
        sys.stderr.flush()
        time.sleep(30)
    return real_import(name, *args, **kwargs)


builtins.__import__ = slow_import
sys.argv = ["lincheck", "run", "--n", "4"]
from lincheck.__main__ import main

main()
"""


def test_ctrl_c_while_the_program_starts_is_one_line():
    """A Ctrl-C while the command's modules import (here Typer, made slow) is the same one
    line and exit 130, not a KeyboardInterrupt traceback."""
    import signal

    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_START], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        started = _read_until(process.stderr.fileno(), lambda text: b"importing" in text, 60)
        assert started == b"importing typer\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err.decode()
    assert err == b"lincheck: interrupted\n" and out == b""


# --- precisions, witnesses and overrides -----------------------------------------


def _tf32_case(folder, rng):
    from conftest import compute_in

    X, W, B, G = (
        rng.standard_normal(s).astype(np.float32) for s in ((32, 64), (16, 64), (16,), (32, 16))
    )
    folder.mkdir()
    grads = compute_in("tf32", X, W, G)
    for name, a in {"X": X, "W": W, "B": B, "dY": G, "dX": grads["dX"], "dW": grads["dW"]}.items():
        np.save(folder / f"{name}.npy", a)


def test_verify_tf32_gradients_fail_fp32_with_a_hint_and_pass_tf32(tmp_path, rng):
    _tf32_case(tmp_path / "c", rng)
    result = invoke("verify", tmp_path / "c", "--json", "-")
    assert result.exit_code == 1, result.output
    report = report_json(result)
    assert [(h["code"], h["tensor"]) for h in report["hints"]] == [
        ("lower_precision", "dX"),
        ("lower_precision", "dW"),
    ]
    assert "hint [lower_precision] dX exceeds the tolerance of float32 arithmetic" in " ".join(
        result.stderr.split()
    )
    tf32 = invoke("verify", tmp_path / "c", "--precision", "tf32", "--json", "-")
    assert tf32.exit_code == 0, tf32.output
    checks = report_json(tf32)["checks"]
    assert {c["precision"] for c in checks if c["subject"] == "supplied"} == {"tf32"}
    assert all(c["typical_ratio"] is not None and c["min_detectable_error"] > 0 for c in checks)


def test_verify_complex_step_and_allclose_override(tmp_path, rng):
    def corrupt(d):
        dW = d["dW"].copy()
        dW[0, 1] *= 1 + 1e-6
        return {"dW": dW}

    case(tmp_path / "c", rng, fn=corrupt)
    result = invoke("verify", tmp_path / "c", "--method", "complex-step", "--json", "-")
    assert result.exit_code == 1
    report = report_json(result)
    assert report["witness"]["method"] == "complex-step"
    assert [c["tensor"] for c in report["checks"] if not c["passed"]] == ["dW"]
    loose = invoke("verify", tmp_path / "c", "--rtol", "1e-5", "--json", "-")
    assert loose.exit_code == 0, loose.output
    assert {c["rule"] for c in report_json(loose)["checks"]} == {"allclose"}
    assert "Tolerance: atol 0 + rtol 1e-05" in " ".join(loose.stderr.split())


def test_run_complex_step_passes():
    result = invoke("run", "--n", 8, "--din", 6, "--dout", 4, "--method", "complex-step")
    assert result.exit_code == 0, result.output
    assert "(complex step, 13 forward passes)" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "args",
    [
        ["--precision", "fp9"],
        ["--precision", "bf16,acc=fp12"],
        ["--method", "forward"],
        ["--atol", "-1"],
    ],
)
def test_verify_bad_options_exit_2(tmp_path, rng, args):
    case(tmp_path / "c", rng)
    result = invoke("verify", tmp_path / "c", *args)
    assert result.exit_code == 2, result.output


def test_run_modes_on_the_command_line():
    result = invoke(
        "run",
        "--n",
        20,
        "--din",
        10,
        "--dout",
        6,
        "--mode",
        "directions",
        "--directions",
        4,
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    report = report_json(result)
    assert report["witness"]["mode"] == "directions" and report["witness"]["directions"] == 4
    modes = {(c["tensor"], c["oracle"]): c["mode"] for c in report["checks"]}
    assert modes[("dX", "witness")] == "directions" and modes[("dX", "reference")] == "full"
    auto = invoke("run", "--n", 20, "--din", 10, "--dout", 6, "--budget", 0)
    assert auto.exit_code == 0, auto.output
    assert "Witness mode directions: a full witness needs" in " ".join(auto.stdout.split())
    sample = invoke("run", "--n", 20, "--din", 10, "--dout", 6, "--mode", "sample", "--samples", 7)
    assert sample.exit_code == 0 and "at 7 sampled entries" in " ".join(sample.stdout.split())


def test_quiet_prints_only_the_verdict(tmp_path, rng):
    result = invoke("run", "--n", 4, "--din", 3, "--dout", 2, "--quiet")
    assert result.exit_code == 0 and result.stdout == "PASS  all 3 checks passed\n"
    case(tmp_path / "c", rng, dB=np.zeros(3))
    result = invoke("verify", tmp_path / "c", "-q")
    assert result.exit_code == 1
    assert result.stdout == "FAIL  1 of 6 checks failed: dB (supplied)\n"


def test_dense_method_agrees(tmp_path, rng):
    case(tmp_path / "c", rng, N=3, D_in=2, D_out=2)
    result = invoke("verify", tmp_path / "c", "--method", "dense", "--json", "-")
    assert result.exit_code == 0, result.output
    report = report_json(result)
    assert report["witness"]["method"] == "dense"
    assert report["witness"]["forward_passes"] == 2 * (3 * 2 + 2 * 2 + 2)


@pytest.mark.parametrize("bug", __import__("test_diagnose").BUGS)
def test_every_hint_code_through_the_cli(tmp_path, rng, bug):
    from test_diagnose import planted

    X, W, B, G = (rng.standard_normal(s) for s in ((12, 7), (5, 7), (5,), (12, 5)))
    grads, code, tensor = planted(bug, X, W, B, G)
    folder = tmp_path / "c"
    folder.mkdir()
    for name, a in {"X": X, "W": W, "B": B, "dY": G, **grads}.items():
        np.save(folder / f"{name}.npy", a)
    result = invoke("verify", folder, "--json", "-")
    assert result.exit_code == 1, result.output
    hints = report_json(result)["hints"]
    assert [(h["code"], h["tensor"]) for h in hints] == [(code, tensor)]
    assert f"hint [{code}] " in result.stderr


@pytest.mark.parametrize(
    "env, args, after, coloured",
    [
        ({"FORCE_COLOR": "1"}, [], [], True),
        ({"FORCE_COLOR": "1"}, ["--no-color"], [], False),
        ({"FORCE_COLOR": "1"}, [], ["--no-color"], False),  # after the command too
        ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, [], [], False),
        ({}, [], [], False),  # not a terminal: plain text
    ],
)
def test_colour_only_when_wanted(env, args, after, coloured):
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    command = [sys.executable, "-m", "lincheck", *args, "run", "--n", "4", "--din", "3"]
    done = subprocess.run(
        [*command, "--dout", "2", "--heatmap", *after],
        capture_output=True,
        text=True,
        env={**clean, **env, "COLUMNS": "80"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ("\x1b[" in done.stdout) is coloured
    plain = [line for line in done.stdout.splitlines() if "│" in line]
    assert plain  # the heatmaps print in any case: characters carry the levels
    assert done.stdout.rstrip().splitlines()[-1].split()[-3:] == ["3", "checks", "passed"]


@pytest.mark.parametrize("width", [80, 200])
def test_output_fits_the_terminal_width(tmp_path, width):
    """No line wider than the terminal: tables and heatmaps size themselves."""
    rng = np.random.default_rng(3)
    X, W = rng.standard_normal((300, 40)), rng.standard_normal((30, 40))
    G = rng.standard_normal((300, 30))
    d = tmp_path / "dump"
    d.mkdir()
    dW = G.T @ X
    dW[4, 33] += 1.0  # a failure: tables of the worst entries and a heatmap
    for name, a in {"X": X, "W": W, "dY": G, "dX": G @ W, "dW": dW}.items():
        np.save(d / f"{name}.npy", a)
    result = runner.invoke(app, ["verify", str(d), "--heatmap"], env={"COLUMNS": str(width)})
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= width
    assert sum(" error / tolerance (" in line for line in lines) == 4  # dX, dW × 2 oracles
    assert lines[-1].startswith("FAIL")
    for item in ("X (300, 40) float64", "dY (300, 30) float64", "dW (30, 40) float64"):
        assert any(item in line for line in lines), item  # the header wraps between arrays


def test_shell_completion_completes_commands():
    env = {**os.environ, "_LINCHECK_COMPLETE": "complete_bash", "COMP_WORDS": "lincheck ver"}
    done = subprocess.run(
        [sys.executable, "-m", "lincheck"],
        capture_output=True,
        text=True,
        env={**env, "COMP_CWORD": "1"},
        timeout=60,
        check=False,
    )
    assert done.stdout.split() == ["verify"], done.stderr
    # Without the variable typer reads the shell off the process tree (none, under a
    # detached job) and takes "bash" for an argument; with it, --show-completion takes it.
    script = subprocess.run(
        [sys.executable, "-m", "lincheck", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
        timeout=60,
        check=False,
    )
    assert script.returncode == 0 and "_LINCHECK_COMPLETE=complete_bash" in script.stdout


def test_heatmap_flags(tmp_path):
    rng = np.random.default_rng(5)
    X, W, G = rng.standard_normal((6, 5)), rng.standard_normal((3, 5)), rng.standard_normal((6, 3))
    d = tmp_path / "dump"
    d.mkdir()
    for name, a in {"X": X, "W": W, "dY": G, "dW": 2 * G.T @ X}.items():
        np.save(d / f"{name}.npy", a)

    def maps(*flags):
        result = runner.invoke(app, ["verify", str(d), *flags])
        assert result.exit_code == 1, result.output
        return [
            line.split()[0] for line in result.stdout.splitlines() if " error / tolerance (" in line
        ]

    assert maps() == ["dW"]  # the failed tensor's
    assert maps("--heatmap") == ["dW", "dW"]  # and the passing reference vs witness
    assert maps("--no-heatmap") == []


def test_help_imports_no_numpy():
    code = (
        "import sys; from typer.testing import CliRunner; from lincheck.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); print(r.exit_code, 'numpy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False"]


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
@pytest.mark.parametrize("command", ["run", "verify", "explain"])
def test_a_stream_that_is_not_utf8_gets_plain_characters_not_a_crash(
    tmp_path, rng, encoding, command
):
    """PYTHONIOENCODING=ascii or latin-1: every character the stream cannot encode is
    spelled in ASCII (× → x, ≤ → <=, heatmap blocks → : + # @), the verdict unchanged."""
    case(tmp_path / "c", rng, fn=lambda d: {"dW": 2 * d["dW"]})  # fails, with a hint
    args = {
        "run": ["run", "--n", "6", "--din", "4", "--dout", "3", "--heatmap"],
        "verify": ["verify", str(tmp_path / "c"), "--heatmap"],
        "explain": ["explain", "--lang", "zh"],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", "lincheck", *args],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": encoding, "COLUMNS": "100"},
    )
    assert done.returncode == (1 if command == "verify" else 0), done.stderr.decode(encoding)
    out = done.stdout.decode(encoding)  # raises if a byte is not of the encoding
    assert "Traceback" not in done.stderr.decode(encoding) and out.strip()
    if command == "verify":
        assert "hint [scaled]" in " ".join(out.split())
        assert "@" in out  # the over-tolerance block, in ASCII
    if command != "explain":
        assert out.rstrip().splitlines()[-1].split()[0] in ("PASS", "FAIL")


def test_the_command_lines_choices_are_the_librarys():
    """The option enums live apart from the library (--help imports no NumPy): they must
    name exactly what the library accepts."""
    from lincheck import checks, options, precision, witness

    assert [m.value for m in options.Mode] == list(checks.MODES)
    assert [m.value for m in options.Method] == list(witness.METHODS)
    assert [d.value for d in options.DType] == list(checks.DTYPES)
    assert options.PRESET_NAMES == tuple(precision.PRESETS)


# --- the terminal: one-line usage errors, the verdict last, no trailing blanks -------------


@pytest.mark.parametrize(
    "args, said",
    [
        (["run", "--n", "0"], "lincheck run: error: --n: 0 is not in the range x>=1"),
        (["run", "--dtype", "int8"], "lincheck run: error: --dtype: 'int8' is not one of"),
        (["verify", "--bogus"], "lincheck verify: error: no such option --bogus; see lincheck"),
        (["run", "--samles", "3"], "no such option --samles (did you mean --samples?)"),
        (["generate"], "lincheck generate: error: DIR: missing"),
        (["explain", "a", "b"], "lincheck explain: error: Got unexpected extra argument"),
        # nan passes min=0 (every comparison with it is false) and would fail every entry
        (["run", "--atol", "nan"], "lincheck run: error: --atol: nan is not a finite number"),
        (["run", "--impl", "pkg/layers.py:backward"], "not a file: --impl pkg.layers:backward"),
        (["verify", "d", "--rtol", "inf"], "error: --rtol: inf is not a finite number"),
    ],
)
def test_usage_errors_are_one_line_on_stderr(args, said):
    """Click's errors, which Typer draws as a box of 5-6 lines, are one line like lincheck's
    own; an unknown option suggests only a close name (Click's list offered --dout for
    --bogus)."""
    result = runner.invoke(app, args, env={"COLUMNS": "40"})
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert said in result.stderr and "Possible options" not in result.stderr


def _many_failing_cases(folder: Path, rng, count: int = 6) -> None:
    for i in range(count):
        case(folder / f"layer{i}", rng, dB=np.zeros(3) if i else None)  # layer0 has no dB


@pytest.mark.parametrize("width", [40, 80, 200])
@pytest.mark.parametrize("github", [False, True])
def test_the_verdict_is_the_last_line_and_one_line(tmp_path, rng, width, github):
    """At any width, with or without GitHub annotations (which come before it), the last
    line is the whole verdict; --quiet prints that line alone (and the annotations asked
    for)."""
    _many_failing_cases(tmp_path / "model", rng)
    args = ["verify", str(tmp_path / "model"), "--jobs", "1"] + (["--github"] if github else [])
    env = {"COLUMNS": str(width), "GITHUB_ACTIONS": "false"}
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("FAIL  5 of 6 cases failed: ")
    assert lines[-1].endswith(" and 2 more")  # 5 failed: 3 named, the rest counted
    assert sum(line.startswith("::error") for line in lines) == (5 if github else 0)
    if github:
        assert lines[-2].startswith("::error")
    quiet = runner.invoke(app, [*args, "--quiet"], env=env).stdout.splitlines()
    assert [line for line in quiet if not line.startswith("::error")] == [lines[-1]]
    assert quiet[-1] == lines[-1]


def test_piped_output_has_no_trailing_blanks(tmp_path, rng):
    case(tmp_path / "c", rng, dW=np.zeros((3, 5)))
    for args in (
        ["run", "--n", "6", "--din", "4", "--dout", "3"],
        ["verify", str(tmp_path / "c"), "--heatmap"],
        ["explain"],
        ["run", "--help"],
        ["--bogus"],
    ):
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        lines = (result.stdout + result.stderr).splitlines()
        assert lines and not [line for line in lines if line != line.rstrip()], args
    assert len(runner.invoke(app, ["run", "--help"]).stdout.splitlines()) > 20
