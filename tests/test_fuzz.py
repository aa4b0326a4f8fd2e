"""Fuzzing the loader and the command: mutated .npy and .npz bytes never crash lincheck.

Every outcome is a verdict (exit 0 or 1) or one line of bad input (exit 2), never a
traceback. What is loaded is checked against an oracle: an array equals what NumPy's
own reader makes of the same bytes, it is never larger than the bytes that hold it (so
work is bounded by the input, not by what a header declares), and arrays equal to the
clean ones give exactly the clean report. The default hypothesis profile runs 60 seeded
examples per property (a few seconds); ``LINCHECK_HYPOTHESIS=long pytest
tests/test_fuzz.py`` runs 5,000 fresh ones each (see tests/conftest.py).
"""

import io
import zipfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from lincheck import LincheckError, arrays, check
from lincheck.cli import app

runner = CliRunner()


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


CLEAN = {
    "X": npy(np.arange(12.0).reshape(4, 3) / 7),
    "W": npy(np.arange(6.0).reshape(2, 3) / 5 - 0.5),
    "dY": npy(np.arange(8.0).reshape(4, 2) / 3 - 1),
    "dW": npy(np.ones((2, 3))),
}
HEADERS = [
    b"(-1, 3)",
    b"(99999999999, 3)",
    b"()",
    b"(0,)",
    b"(4,3,0)",
    b"(4.5, 3)",
    b"'f'",
    b"[4, 3]",
    b"(4, 3, 1)",
    b"(2, 6)",
    b"(4, 3",
    b"(4, 3)) + (1,",
]
DTYPES = [
    b"'<c16'",
    b"'|O'",
    b"'<M8[s]'",
    b"'|S8'",
    b"[('a', '<f8')]",
    b"'<f16'",
    b"'>f8'",
    b"'<i8'",
    b"'|b1'",
    b"'<f2'",
    b"'<U1'",
    b"'|V8'",
]


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a random mutation: bit flips, a cut, an insertion, a spliced header."""
    kind = draw(st.sampled_from(["flip", "cut", "insert", "header", "dtype", "splice"]))
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "cut":
        out = out[: draw(st.integers(0, len(out)))]
    elif kind == "insert":
        i = draw(st.integers(0, len(out)))
        out[i:i] = draw(st.binary(min_size=1, max_size=24))
    elif kind == "header":
        out = bytearray(bytes(out).replace(b"(4, 3)", draw(st.sampled_from(HEADERS)), 1))
    elif kind == "dtype":
        out = bytearray(bytes(out).replace(b"'<f8'", draw(st.sampled_from(DTYPES)), 1))
    else:
        other = CLEAN[draw(st.sampled_from(sorted(CLEAN)))]
        i, j = draw(st.integers(0, len(out))), draw(st.integers(0, len(other)))
        out = out[:i] + other[j:]
    return bytes(out)


def _check_all(loaded):
    a = loaded
    return check(
        a["X"], a["W"], a.get("B"), a["dY"], **{k: a[k] for k in ("dX", "dW", "dB", "Y") if k in a}
    )


CLEAN_ARRAYS = {k: np.load(io.BytesIO(v)) for k, v in CLEAN.items()}
CLEAN_REPORT = _check_all(CLEAN_ARRAYS).as_dict()


def _same(a, b) -> bool:
    """Equal dtype, shape and bytes (NaN included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_loaded_truly(loaded: dict, raw: dict) -> None:
    """Each array is what NumPy makes of its bytes, and no larger than those bytes."""
    for k, a in loaded.items():
        assert np.asarray(a).nbytes <= len(raw[k])  # nothing a header merely declares
        assert _same(a, np.load(io.BytesIO(raw[k]), allow_pickle=False)), k


def _assert_consistent(loaded: dict) -> None:
    """A verdict, or one line of bad input; the clean arrays' verdict if they are intact."""
    try:
        report = _check_all(loaded)
    except LincheckError as exc:
        assert str(exc) and "\n" not in str(exc)  # one line
        assert not all(_same(loaded.get(k), CLEAN_ARRAYS[k]) for k in CLEAN_ARRAYS)
        return
    assert report.passed == all(c.passed for c in report.checks)
    if loaded.keys() == CLEAN_ARRAYS.keys() and all(
        _same(loaded[k], CLEAN_ARRAYS[k]) for k in CLEAN_ARRAYS
    ):
        assert report.as_dict() == CLEAN_REPORT  # the mutation left the data intact


def test_the_clean_arrays_fail_only_the_planted_dW():
    """The clean report the properties compare with: dW = ones is wrong, the reference right."""
    checks = [(c["tensor"], c["oracle"], c["passed"]) for c in CLEAN_REPORT["checks"]]
    assert checks == [("dW", "reference", False), ("dW", "witness", True)]


@given(name=st.sampled_from(sorted(CLEAN)), data=st.data())
def test_mutated_npy_is_a_verdict_or_bad_input(name, data):
    files = dict(CLEAN)
    files[name] = data.draw(mutated(CLEAN[name]))
    try:
        loaded = {k: arrays._read_npy(io.BytesIO(v), len(v), k) for k, v in files.items()}
    except LincheckError as exc:
        assert str(exc) and "\n" not in str(exc)  # one line
        assert str(exc).startswith(f"{name}: ")  # names the mutated array
        return
    _assert_loaded_truly(loaded, files)
    _assert_consistent(loaded)


@given(name=st.sampled_from(sorted(CLEAN)), data=st.data())
def test_mutated_npz_is_a_verdict_or_bad_input(tmp_path_factory, name, data):
    buf = io.BytesIO()
    with zipfile.ZipFile(
        buf, "w", compression=data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    ) as z:
        for k, v in CLEAN.items():
            z.writestr(f"{k}.npy", data.draw(mutated(v)) if k == name else v)
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("npz") / "case.npz"
    path.write_bytes(bytes(raw))
    try:
        loaded = arrays.load(path)
    except LincheckError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    with zipfile.ZipFile(path) as z:  # the oracle reads each member whole, CRC checked
        members = {
            k: z.read(source.split(":")[-1] + ".npy") for k, source in loaded.sources.items()
        }
    _assert_loaded_truly(dict(loaded.arrays), members)
    assert sum(np.asarray(a).nbytes for a in loaded.arrays.values()) <= len(raw) * 1032
    _assert_consistent(dict(loaded.arrays))


@given(name=st.sampled_from(sorted(CLEAN)), data=st.data())
def test_mutated_folder_through_the_cli(tmp_path_factory, name, data):
    folder = tmp_path_factory.mktemp("case")
    for k, v in CLEAN.items():
        (folder / f"{k}.npy").write_bytes(data.draw(mutated(v)) if k == name else v)
    result = runner.invoke(app, ["verify", str(folder), "--quiet"])
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output and "Warning" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("lincheck: error: ") and result.stderr.count("\n") == 1
