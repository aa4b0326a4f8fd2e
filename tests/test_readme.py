"""The README's examples run as written: "Use in CI" (all but installing lincheck), the
Python API's, and the terminal sessions (tests/readme.py), which must be what the program
prints."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lincheck.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"

LAYERS = """
import numpy as np


def linear_backward(X, W, B, dY):
    X2, G = X.reshape(-1, X.shape[-1]), dY.reshape(-1, dY.shape[-1])
    return dY @ W, G.T @ X2, None if B is None else G.sum(0)


def linear_forward(X, W, B):
    return X @ W.T + (0 if B is None else B)
"""


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, re.S)


@pytest.fixture
def project(tmp_path):
    """A user's project: mypkg/layers.py with a correct layer, and a dumps/ folder of cases."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "layers.py").write_text(LAYERS)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("GITHUB_ACTIONS", None)
    for i in range(2):
        subprocess.run(
            [
                "lincheck",
                "generate",
                f"dumps/layer{i}",
                "--n",
                "6",
                "--din",
                "5",
                "--dout",
                "4",
                "--seed",
                str(i),
                "--with-grads",
            ],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
        )
    return tmp_path, env


def run_shell(command: str, cwd, env):
    done = subprocess.run(
        command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.strip().startswith("pip install")
    ]


def test_the_three_lines(project):
    cwd, env = project
    first = blocks(section("Use in CI"))[0][1]
    assert first.splitlines()[0].startswith("pip install ") and len(first.splitlines()) == 3
    for command in commands(first):
        run_shell(command, cwd, env)
    assert (cwd / "lincheck.xml").exists()


def test_github_actions_job(project):
    cwd, env = project
    (yaml,) = [body for lang, body in blocks(section("Use in CI")) if lang == "yaml"]
    runs = re.findall(r"^\s*- run: (.+)$", yaml, re.M)
    assert any(r.startswith("pip install") for r in runs)
    for command in [r for r in runs if not r.startswith("pip install")]:
        run_shell(command, cwd, dict(env, GITHUB_ACTIONS="true"))
    assert (cwd / "lincheck.xml").exists() and (cwd / "lincheck-dumps.xml").exists()


def test_pytest_example(project):
    cwd, env = project
    (code,) = [body for lang, body in blocks(section("Use in CI")) if lang == "python"]
    (cwd / "test_linear.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_linear.py"],
        cwd=cwd,
        env=dict(env, PYTHONPATH=str(cwd)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_make_target(project):
    cwd, env = project
    if shutil.which("make") is None:
        pytest.fail("make is not installed; the README's make example cannot be checked")
    (makefile,) = [body for lang, body in blocks(section("Use in CI")) if lang == "make"]
    (cwd / "Makefile").write_text(makefile)
    done = run_shell("make check-gradients", cwd, env)
    assert "PASS  all 14 cases passed" in done.stdout


TORCH_LAYERS = """
import torch


class MyLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, B):
        ctx.save_for_backward(X, W)
        ctx.bias = B is not None
        Y = X @ W.T
        return Y + B if ctx.bias else Y

    @staticmethod
    def backward(ctx, G):
        X, W = ctx.saved_tensors
        X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
        return G @ W, G2.T @ X2, G2.sum(0) if ctx.bias else None


class MyLinear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, X):
        return MyLinearFunction.apply(X, self.weight, self.bias)
"""

JAX_LAYERS = """
import jax


@jax.custom_vjp
def linear(X, W, B):
    return X @ W.T + (0 if B is None else B)


def forward(X, W, B):
    return linear(X, W, B), (X, W, B)


def backward(saved, G):
    X, W, B = saved
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    return G @ W, G2.T @ X2, None if B is None else G2.sum(0)


linear.defvjp(forward, backward)
"""


def test_framework_layers(tmp_path, monkeypatch):
    """The "torch and JAX layers" examples: the command in a subprocess (started first, it
    runs while the Python examples run here), the Python blocks as written."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "layers.py").write_text(TORCH_LAYERS)
    (tmp_path / "mypkg" / "jax_layers.py").write_text(JAX_LAYERS)
    text = section("Python API")
    text = text[text.index("### torch and JAX layers") : text.index("### Whole torch models")]
    found = blocks(text)
    (command,) = [body.strip() for lang, body in found if lang == ""]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        command, shell=True, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.chdir(tmp_path)
        python = [body for lang, body in found if lang == "python"]
        assert len(python) == 2
        for body in python:
            exec(compile(body, "README.md", "exec"), {})
    finally:
        out, err = process.communicate(timeout=300)
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]
    assert process.returncode == 0, (out + err).decode()
    assert b"PASS  all 14 cases passed" in out


def test_whole_model_capture(tmp_path, monkeypatch):
    """The "Whole torch models" section: its Python block captures a model as written, its
    command verifies the dump (and the same dump held to fp32 fails, as it says); the table
    of a model with one broken custom linear is what verify prints for such a model."""
    torch = pytest.importorskip("torch")
    from test_capture import MLP

    text = section("Python API")
    text = text[text.index("### Whole torch models") : text.index("**What is public**")]
    python, command, table = blocks(text)
    monkeypatch.chdir(tmp_path)
    exec(compile(python[1], "README.md", "exec"), {})
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == [
        f"layers.{i}.linear{k}.safetensors" for i in (0, 1) for k in (1, 2)
    ]
    args = shlex.split(command[1])[1:]
    result = CliRunner().invoke(app, [*args, "--jobs", "1"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args, "--jobs", "1", "--precision", "fp32"])
    assert result.exit_code == 1, result.output

    torch.manual_seed(1)
    model = MLP(broken=True)
    (tmp_path / "broken").mkdir()
    monkeypatch.chdir(tmp_path / "broken")
    with pytest.importorskip("lincheck.torch").capture(model, "dumps"):
        model(torch.randn(16, 12)).square().sum().backward()
    result = CliRunner().invoke(app, ["verify", "dumps", "--jobs", "1"], terminal_width=100)
    assert result.exit_code == 1, result.output
    shown = [line.rstrip() for line in result.output.splitlines()]
    for row in table[1].strip("\n").splitlines():
        assert row.rstrip() in shown, row


# --- the terminal sessions (tests/readme.py) ------------------------------------------


def test_the_readme_sessions_are_what_the_program_prints():
    """Every README block marked ``<!-- output ... -->`` is what its commands print at 80
    columns (figures that are rounding noise compared as numbers only: tests/readme.py).
    After a change of the output: python -m tests.readme --update."""
    import readme

    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run the README's sessions")
    found = readme.sessions(README.read_text())
    titles = [session.title for session in found]
    for expected in ("lincheck run --n 32", "lincheck verify demo", "lincheck explain"):
        assert any(title.startswith(expected) for title in titles), titles
    drift = {}
    for session in found:
        diff = readme.differences(session, readme.transcript(session))
        if diff:
            drift[session.title] = "\n".join(diff)
    assert not drift, "run python -m tests.readme --update\n" + "\n\n".join(drift.values())


def test_the_readme_comparison_tells_drift_from_rounding_noise():
    """The comparison's own rules, against lines changed on purpose."""
    from readme import _same_line

    line = " dX      [15, 41]   0.316029966   0.316030047  8.16e-08   4.72e-07  PASS"
    noise = " dX      [15, 41]   0.316029971   0.316030047  9.02e-08   4.70e-07  PASS"
    assert _same_line(line, line) and _same_line(line, noise)
    assert not _same_line(line, line.replace("[15, 41]", "[15, 42]"))  # an index: exact
    assert not _same_line(line, line.replace("0.316029966", "0.318029966"))  # a value
    assert not _same_line(line, line.replace("PASS", "FAIL"))  # a word
    assert not _same_line(line, line.replace("  PASS", "   PASS"))  # the layout


def test_the_readme_keep_ranges():
    from readme import GAP, Session, shown

    lines = [f"line {i}" for i in range(1, 11)]
    session = Session(0, 0, "1:2,/^line.5/:+1,-2:", [], [], "")
    assert shown(session, lines).splitlines() == [
        "line 1", "line 2", GAP, "line 5", "line 6", GAP, "line 9", "line 10"
    ]  # fmt: skip
    assert shown(Session(0, 0, "", [], [], ""), lines).splitlines() == lines


def test_the_json_example_names_only_fields_the_report_has(tmp_path):
    """Each key of the README's JSON example is in the report `verify --json` writes for
    the same case (the example elides with "..." keys and values)."""
    import json

    text = section("JSON report")
    (example,) = [body for lang, body in blocks(text) if lang == "json"]
    shown = json.loads(example)
    demo = tmp_path / "demo"
    assert (
        CliRunner()
        .invoke(
            app, ["generate", str(demo), "--n", "8", "--din", "5", "--dout", "3", "--with-grads"]
        )
        .exit_code
        == 0
    )
    import numpy as np

    np.save(demo / "dB.npy", np.load(demo / "dY.npy").mean(0))
    real = json.loads(CliRunner().invoke(app, ["verify", str(demo), "--json", "-"]).stdout)

    real["checks"] = [
        c for c in real["checks"] if (c["tensor"], c["subject"]) == ("dB", "supplied")
    ]

    def missing(shown, real, where="") -> list[str]:
        if isinstance(shown, list) and shown and isinstance(real, list) and real:
            return missing(shown[0], real[0], where)
        if not isinstance(shown, dict):
            return []
        absent = [f"{where}.{key}" for key in shown if key != "..." and key not in real]
        for key in [k for k in shown if k in real]:
            absent += missing(shown[key], real[key], f"{where}.{key}")
        return absent

    assert missing(shown, real) == []
