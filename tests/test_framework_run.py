"""``lincheck run --impl`` on torch and JAX layers, and the rules that dispatch them.

The rules (which framework a function takes, whether it is a forward or a backward,
the arithmetic a framework used) are pure functions, tested here without importing
torch or JAX. The command line runs on the layers of ``tests/torch_layers.py`` and
``tests/jax_layers.py`` in subprocesses, four at a time (each imports torch or JAX
in its worker, about 2–3 s of CPU apiece), and read back when the tests ask.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lincheck import checks, worker
from lincheck.cli import app
from lincheck.errors import InputError
from lincheck.frameworks import classify, default_precision, detect_framework

TESTS = Path(__file__).resolve().parent
LINCHECK = [sys.executable, "-m", "lincheck"]


# ---------------------------------------------------------------------------
# The arithmetic a framework used: a pure function of dtype, device and flags


@pytest.mark.parametrize(
    ("dtype", "device", "flags", "preset"),
    [
        ("float32", "cpu", {}, "fp32"),
        ("float32", "cpu", {"tf32": True}, "fp32"),  # TF32 is a CUDA setting
        ("float32", "cpu", {"tf32": "bf16"}, "bf16,out=fp32,reduce=fp32"),  # oneDNN, AMX
        ("float32", "cpu", {"tf32": "tf32"}, "tf32"),
        ("float64", "cpu", {"tf32": "bf16"}, "fp64"),  # float32 matmuls only
        ("float32", "cuda", {}, "fp32"),
        ("float32", "cuda", {"tf32": True}, "tf32"),
        ("float32", "gpu", {"tf32": True}, "tf32"),  # JAX's name for it
        ("float32", "tpu", {"tf32": True}, "bf16,out=fp32,reduce=fp32"),
        ("float32", "mps", {"tf32": True}, "fp32"),
        ("float64", "cuda", {"tf32": True}, "fp64"),
        ("bfloat16", "cuda", {"tf32": True}, "bf16"),
        ("float16", "cpu", {}, "fp16"),
        ("float8_e4m3fn", "cuda", {}, "fp8"),
        ("float32", "cpu", {"autocast": "bfloat16"}, "bf16"),
        ("float32", "cuda", {"autocast": "float16", "tf32": True}, "fp16"),
        ("float64", "cpu", {"autocast": "bfloat16"}, "fp64"),  # autocast leaves float64 alone
    ],
)
def test_default_precision(dtype, device, flags, preset):
    assert default_precision(dtype, device, **flags) == preset


def test_default_precisions_are_valid_specs():
    from lincheck.precision import parse

    parse(default_precision("float32", "tpu", tf32=True))


# ---------------------------------------------------------------------------
# Which framework a function takes, and whether it is a forward or a backward


def function(source: str, **scope):
    """A function defined in a module whose globals are ``scope`` (fake modules: nothing
    is imported)."""
    namespace = dict(scope)
    exec(source, namespace)
    name = source.split("def ", 1)[1].split("(", 1)[0]
    return namespace[name]


def fake(name: str) -> types.ModuleType:
    return types.ModuleType(name)


NP, TORCH, JNP = fake("numpy"), fake("torch"), fake("jax.numpy")


@pytest.mark.parametrize(
    ("source", "scope", "expected"),
    [
        ("def f(X, W, B, dY): return np.dot(dY, W)", {"np": NP}, "numpy"),
        ("def f(X, W, B): return torch.matmul(X, W.T)", {"np": NP, "torch": TORCH}, "torch"),
        ("def f(X, W, B): return jnp.dot(X, W.T)", {"np": NP, "jnp": JNP}, "jax"),
        # the code names NumPy only, in a module that imports torch too: NumPy
        ("def f(X, W, B, dY): return np.dot(dY, W)", {"np": NP, "torch": TORCH}, "numpy"),
        # the code names nothing: what the module imports decides
        ("def f(X, W, B): return X @ W.T + B", {"np": NP, "torch": TORCH}, "torch"),
        ("def f(X, W, B): return X @ W.T + B", {"jnp": JNP}, "jax"),
        ("def f(X, W, B, dY): return dY @ W", {}, "numpy"),
        ("def f(X, W, B): return X @ W.T + B", {"torch": TORCH, "jnp": JNP}, None),
        # nested functions count
        (
            "def f(X, W, B):\n def g(x): return torch.relu(x)\n return g(X)",
            {"torch": TORCH},
            "torch",
        ),
    ],
)
def test_detect_framework(source, scope, expected):
    assert detect_framework(function(source, **scope)) == expected


def test_ambiguous_module_asks_for_framework():
    fn = function("def f(X, W, B): return X @ W.T + B", torch=TORCH, jnp=JNP)
    with pytest.raises(InputError, match="--framework torch or --framework jax"):
        classify(fn, "--impl m:f")


def test_numpy_roles_by_arity():
    backward = function("def f(X, W, B, dY): return dY @ W, None, None", np=NP)
    assert classify(backward, "--impl m:f").role == "backward"
    forward = function("def f(X, W, B=None): return X @ W.T", np=NP)
    with pytest.raises(InputError, match="a NumPy forward.*--forward"):
        classify(forward, "--impl m:f")
    two = function("def f(X, W): return X", np=NP)
    with pytest.raises(InputError, match="takes 2 required arguments"):
        classify(two, "--impl m:f")
    varargs = function("def f(*args): return args", np=NP)
    assert classify(varargs, "--impl m:f").role == "backward"  # as lincheck always called it
    with pytest.raises(InputError, match="--device cuda: NumPy functions run on the CPU only"):
        classify(backward, "--impl m:f", device="cuda")


# ---------------------------------------------------------------------------
# Narrow dtypes cross the worker's protocol intact


def test_protocol_carries_narrow_floats():
    import ml_dtypes

    values = np.array([[1.0, -2.5, 3e-3], [448.0, 0.0, -0.0]])
    arrays = {
        "X": values.astype(ml_dtypes.bfloat16),
        "W": values.astype(ml_dtypes.float8_e4m3fn),
        "dY": values.astype(ml_dtypes.float8_e5m2),
        "B": values.astype(np.float32),
    }
    buf = io.BytesIO()
    worker._send(buf, {"call": True}, arrays)
    header, got = worker._receive(io.BytesIO(buf.getvalue()).read)
    assert header == {"call": True}
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype
        assert got[name].tobytes() == a.tobytes()
    assert worker._dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    # a name that is not a narrow float is a garbled message, never an attribute lookup
    tampered = buf.getvalue().replace(b'"X": "bfloat16"', b'"X": "__class__"')
    with pytest.raises(ValueError):
        worker._receive(io.BytesIO(tampered).read)


def test_random_narrow_inputs_and_lincheck_bfloat16_gradients():
    data = checks.random_inputs(np.random.default_rng(0), 64, 8, 3, "bfloat16")
    assert {a.dtype.name for a in data.values()} == {"bfloat16"}
    grads = checks.analytic_gradients(data)
    assert {a.dtype.name for a in grads.values()} == {"bfloat16"}
    exact = data["dY"].astype(np.float64).sum(0)
    assert np.array_equal(grads["dB"], exact.astype(np.float32).astype(data["dY"].dtype))


def test_run_bfloat16_checks_lincheck_own_gradients():
    result = CliRunner().invoke(app, ["run", "--dtype", "bfloat16", "--n", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["run", "--dtype", "float8_e4m3fn"])
    assert result.exit_code == 2 and "no fp8 gradients of its own" in result.stderr
    result = CliRunner().invoke(app, ["run", "--device", "cuda"])
    assert result.exit_code == 2 and "--device need --impl" in result.stderr


def test_import_lincheck_imports_no_framework():
    code = (
        "import sys, numpy as np, lincheck, lincheck.worker, lincheck.frameworks\n"
        "X = np.ones((3, 2)); lincheck.check(X, np.ones((1, 2)), None, np.ones((3, 1)))\n"
        "print(sorted(m for m in ('torch', 'jax', 'ml_dtypes') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_framework_modules_name_their_extra(name):
    code = f"import sys; sys.modules[{name!r}] = None; import lincheck.{name}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"pip install {name} (lincheck's [{name}] extra)" in done.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------
# lincheck run --impl, in subprocesses started together

SIZES = ["--n", "6", "--din", "5", "--dout", "3", "--dtype", "float32", "--dtype", "bfloat16"]
RUNS = {
    # name: (object and options, expected exit code, hint code every failing case must
    # name). A correct nn.Module class runs in tests/test_readme.py (the README's command).
    "torch backward": ("torch_layers:backward --framework torch", 0, None),
    "torch forward": ("torch_layers:linear", 0, None),
    "JAX forward": ("jax_layers:linear_jit", 0, None),
    "torch backward, dB mean": ("torch_layers:mean_bias_backward", 1, "mean_instead_of_sum"),
    "torch forward, dW doubled": ("torch_layers:scaled_linear", 1, "scaled"),
    "nn.Module class, dB mean": ("torch_layers:MeanBiasLinear", 1, "mean_instead_of_sum"),
    "JAX forward, dW doubled": ("jax_layers:scaled_linear", 1, "scaled"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of RUNS (and one without torch), four at a time: their results."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    # A torch that cannot be imported, first on the path: the user's module fails to import.
    missing = tmp_path_factory.mktemp("no-torch")
    (missing / "torch").mkdir()
    (missing / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("GITHUB_ACTIONS", None)
    commands = {
        name: ([*LINCHECK, "run", "--impl", *obj.split(), *SIZES, "--json", "-", "--quiet"], env)
        for name, (obj, _, _) in RUNS.items()
    }
    no_torch = dict(env, PYTHONPATH=os.pathsep.join([str(missing), env.get("PYTHONPATH", "")]))
    commands["without torch"] = ([*LINCHECK, "run", "--impl", "torch_layers:Linear"], no_torch)

    def run(name: str):
        command, environment = commands[name]
        done = subprocess.run(
            command, cwd=TESTS, env=environment, capture_output=True, text=True, timeout=300
        )
        return done.returncode, done.stdout, done.stderr

    # Four at a time: two cores stay busy, and memory stays bounded (each worker holds
    # torch or JAX, a few hundred MB).
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(commands, pool.map(run, commands)))


@pytest.mark.parametrize("name", list(RUNS))
def test_run_impl(runs, name):
    obj, expected, code = RUNS[name]
    returncode, out, err = runs[name]
    assert returncode == expected, err
    report = json.loads(out)
    cases = report["cases"]
    assert {c["case"].split()[0] for c in cases} == {"float32", "bfloat16"}
    assert all(c["error"] is None for c in cases), err
    if expected == 0:
        if name != "torch backward":  # forwards and modules give Y, which is checked too
            assert all("Y" in {k["tensor"] for k in c["report"]["checks"]} for c in cases)
        return
    failing = [c for c in cases if not c["passed"]]
    assert {c["case"].split()[0] for c in failing} == {"float32", "bfloat16"}
    for case in failing:
        if "D_in=1 " in case["case"] or "D_out=1" in case["case"]:
            continue  # a doubled dW of one row or column is named "localized"
        assert code in {h["code"] for h in case["report"]["hints"]}, case["case"]


def test_run_impl_without_torch_names_the_extra(runs):
    returncode, _, err = runs["without torch"]
    assert returncode == 2
    (line,) = err.strip().splitlines()
    assert (
        "No module named 'torch'" in line
        and "(pip install torch (lincheck's [torch] extra))" in line
    )


def test_saved_failures_keep_the_arithmetic_they_were_held_to(tmp_path, monkeypatch):
    """A forward under autocast, Y doubled: its failing case, saved as .safetensors, records
    bf16,reduce=fp32, and verify holds the file to it again (the same tensors fail)."""
    pytest.importorskip("torch")
    from lincheck import arrays

    monkeypatch.chdir(TESTS)
    runner = CliRunner()
    run = runner.invoke(
        app,
        [
            "run",
            "--impl",
            "torch_layers:autocast_doubled",
            "--cases",
            "main",
            "--dtype",
            "float32",
            "--save-failures",
            str(tmp_path),
            "--format",
            "safetensors",
            "--json",
            "-",
        ],
    )
    assert run.exit_code == 1, run.output
    [saved] = tmp_path.iterdir()
    assert arrays.load(saved).metadata == {"lincheck.precision": "bf16,reduce=fp32"}
    verify = runner.invoke(app, ["verify", str(saved), "--json", "-"])

    def failed(report):
        return sorted(c["tensor"] for c in report["checks"] if not c["passed"])

    assert verify.exit_code == 1
    ran = json.loads(run.stdout)["cases"][0]["report"]
    assert failed(json.loads(verify.stdout)) == failed(ran) != []
    assert {
        c["precision"] for c in json.loads(verify.stdout)["checks"] if c["subject"] == "supplied"
    } == {"bf16,reduce=fp32"}
