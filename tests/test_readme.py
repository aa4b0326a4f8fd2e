"""The README's "Use in CI" examples run as written (all but installing lincheck)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert first.splitlines()[0] == "pip install lincheck" and len(first.splitlines()) == 3
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
