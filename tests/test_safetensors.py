"""``.safetensors`` dumps: lincheck's own reader and writer against the reference implementation.

The oracle is the ``safetensors`` package (the reference Rust implementation's Python
bindings): files it writes load in lincheck to the same bytes, files lincheck writes load in
it to the same bytes, and mutated files lincheck accepts are exactly what it reads.
Malformed headers and their messages are in tests/test_bad_input.py.
"""

import io
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from lincheck import InputError, LincheckError, arrays, check, writing
from lincheck.cli import app

runner = CliRunner()

NARROW = {
    "BF16": (ml_dtypes.bfloat16, torch.bfloat16),
    "F8_E4M3": (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
    "F8_E5M2": (ml_dtypes.float8_e5m2, torch.float8_e5m2),
}


def raw_bytes(a) -> bytes:
    """The little-endian bytes of an ndarray or a torch tensor, C order."""
    if isinstance(a, torch.Tensor):
        return a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    a = np.asarray(a)
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).view(np.uint8).tobytes()


def layer(rng, N=6, D_in=5, D_out=3):
    return {
        "X": rng.standard_normal((N, D_in)),
        "W": rng.standard_normal((D_out, D_in)),
        "B": rng.standard_normal(D_out),
        "dY": rng.standard_normal((N, D_out)),
    }


# --- round trips and cross-checks ----------------------------------------------------------


VALUES = [
    ("float64", (3, 2)),
    (">f8", (2, 3, 2)),
    ("float32", (4,)),
    (">f4", (1, 1)),
    ("float16", (2, 5)),
    ("int8", (3,)),
    ("int16", (2, 2)),
    (">i4", (2,)),
    ("int64", ()),
    ("uint8", (4,)),
    ("uint16", (3,)),
    ("uint32", (2, 1)),
    ("uint64", (2,)),
    ("bool", (2, 3)),
    ("bfloat16", (3, 4)),
    ("float8_e4m3fn", (5,)),
    ("float8_e5m2", (2, 2)),
    ("float32", (0, 3)),
]


def _values(rng, dtype, shape):
    narrow = getattr(ml_dtypes, dtype, None)
    a = rng.standard_normal(shape) * 7
    return a.astype(narrow) if narrow is not None else a.astype(dtype)


@pytest.mark.parametrize("dtype, shape", VALUES, ids=[f"{d}{s}" for d, s in VALUES])
def test_save_case_round_trips_and_the_reference_reads_the_same_bytes(tmp_path, rng, dtype, shape):
    a = _values(rng, dtype, shape)
    data = {**layer(rng), "Y": a}
    [path] = writing.save_case(tmp_path / "case", data, format="safetensors", metadata={"k": "v"})
    assert path == tmp_path / "case.safetensors"
    loaded = arrays.load(path)
    back = np.asarray(loaded.arrays["Y"])
    assert back.shape == a.shape and back.dtype == a.dtype.newbyteorder("<")
    assert raw_bytes(back) == raw_bytes(a)
    assert loaded.metadata == {"k": "v"} and loaded.sources["Y"] == f"{path}:Y"
    # The reference reader, through torch (its NumPy loader reads neither F8 type).
    theirs = safetensors.torch.load_file(path)
    assert set(theirs) == set(data)
    for name, value in data.items():
        assert tuple(theirs[name].shape) == np.shape(value)
        assert raw_bytes(theirs[name]) == raw_bytes(value), name
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_the_header_is_the_reference_writers_byte_for_byte(tmp_path, rng):
    """Same dtype everywhere (the reference orders by dtype, then name): the same bytes."""
    data = layer(rng)
    path = tmp_path / "ours.safetensors"
    writing.save_case(path, data, format="safetensors")
    assert path.read_bytes() == safetensors.numpy.save(data)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = path.read_bytes()[8 : 8 + n]
    assert n % 8 == 0 and header.rstrip(b" ").endswith(b"}")
    assert len(header) - len(header.rstrip(b" ")) < 8


def test_each_array_starts_aligned_to_its_item_size(tmp_path, rng):
    data = {
        "X": rng.standard_normal((3, 2)).astype(np.float16),
        "W": rng.standard_normal((1, 2)).astype(np.float64),
        "dY": rng.standard_normal((3, 1)).astype(ml_dtypes.float8_e4m3fn),
        "B": rng.standard_normal(1).astype(np.float32),
    }
    [path] = writing.save_case(tmp_path / "c", data, format="safetensors")
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    for name, info in header.items():
        assert (8 + n + info["data_offsets"][0]) % data[name].dtype.itemsize == 0, name


@pytest.mark.parametrize("writer", ["numpy", "torch"])
def test_files_the_reference_writes_load_bit_for_bit(tmp_path, writer):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "X": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "W": torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn),
        "dY": torch.randn(4, 2, generator=g).to(torch.float8_e5m2),
        "B": torch.randn(2, generator=g).half(),
        "dX": torch.randn(4, 3, generator=g),
        "dW": torch.randn(2, 3, generator=g).double(),
        "dB": torch.tensor([3, -4], dtype=torch.int16),
        "Y": torch.tensor([[True, False]] * 4),
        "activations": torch.zeros(2, dtype=torch.complex64),
    }
    path = tmp_path / "case.safetensors"
    metadata = {"lincheck.module": "encoder.layers.1.linear2", "note": "é"}
    if writer == "torch":
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    else:
        as_ml = {t: ml for ml, t in NARROW.values()}
        as_numpy = {
            k: v.view(torch.uint8).numpy().view(as_ml[v.dtype]) if v.dtype in as_ml else v.numpy()
            for k, v in tensors.items()
        }  # safetensors.numpy writes ml_dtypes arrays as BF16, F8_E4M3, F8_E5M2
        safetensors.numpy.save_file(as_numpy, path, metadata=metadata)
    loaded = arrays.load(path)
    assert loaded.metadata == metadata
    assert loaded.ignored == (f"{path}:activations",)
    expected = {
        "X": ml_dtypes.bfloat16,
        "W": ml_dtypes.float8_e4m3fn,
        "dY": ml_dtypes.float8_e5m2,
        "B": np.float16,
        "dX": np.float32,
        "dW": np.float64,
        "dB": np.int16,
        "Y": np.bool_,
    }
    for name, dtype in expected.items():
        a = loaded.arrays[name]
        assert a.dtype == np.dtype(dtype) and a.shape == tuple(tensors[name].shape), name
        assert raw_bytes(a) == raw_bytes(tensors[name]), name
    # The same values as floats, independently: torch's own conversion to float64.
    for name in ("X", "W", "dY"):
        want = tensors[name].double().numpy()
        assert np.array_equal(np.asarray(loaded.arrays[name], dtype=np.float64), want)


def test_names_are_case_insensitive_and_two_keys_for_one_name_are_refused(tmp_path, rng):
    data = layer(rng)
    path = tmp_path / "c.safetensors"
    safetensors.numpy.save_file({"x": data["X"], "w": data["W"], "DY": data["dY"]}, path)
    assert set(arrays.load(path).arrays) == {"X", "W", "dY"}
    safetensors.numpy.save_file({"X": data["X"], "x": data["X"], **data}, path)
    with pytest.raises(InputError, match=rf"^X: two sources for one array: {path}:X and {path}:x$"):
        arrays.load(path)


def test_large_tensors_are_read_as_used_and_a_rewrite_is_detected(tmp_path, rng, monkeypatch):
    data = layer(rng, N=40)
    path = tmp_path / "c.safetensors"
    writing.save_case(path, data, format="safetensors")
    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 200)  # X (1600 bytes) and dY (960) are large
    loaded = arrays.load(path)
    X = loaded.arrays["X"]
    assert isinstance(X, arrays.FileArray) and isinstance(loaded.arrays["W"], np.ndarray)
    assert np.array_equal(X[3:7], data["X"][3:7]) and np.array_equal(np.asarray(X), data["X"])
    with open(path, "r+b") as fp:  # the same size, another value, a later time
        fp.seek(-8, os.SEEK_END)
        fp.write(np.float64(7.0).tobytes())
    stamp = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))
    with pytest.raises(InputError, match=r"^X \(.*c\.safetensors:X\): the file changed while"):
        X[0:2]


def test_reading_float32_imports_no_ml_dtypes_and_run_stays_lazy(tmp_path, rng):
    path = tmp_path / "c.safetensors"
    writing.save_case(
        path, {k: v.astype(np.float32) for k, v in layer(rng).items()}, format="safetensors"
    )
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from lincheck.cli import app\n"
        "r = CliRunner().invoke(app, ['run', '--n', '4', '--din', '3', '--dout', '2', '--quiet'])\n"
        "v = CliRunner().invoke(app, ['verify', sys.argv[1], '--quiet'])\n"
        "print(r.exit_code, v.exit_code, 'ml_dtypes' in sys.modules, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout == "0 0 False False\n", done.stderr


# --- writing -------------------------------------------------------------------------------


def test_save_case_never_overwrites_without_force(tmp_path, rng):
    path = tmp_path / "c.safetensors"
    writing.save_case(path, layer(rng), format="safetensors")
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"c\.safetensors: already exists; nothing was written"):
        writing.save_case(tmp_path / "c", {"X": np.zeros(2)}, format="safetensors")
    assert path.read_bytes() == before
    writing.save_case(tmp_path / "c", {"X": np.zeros(2)}, format="safetensors", force=True)
    assert set(safetensors.numpy.load_file(path)) == {"X"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


def test_save_case_npy_refuses_what_npy_cannot_carry(tmp_path):
    for dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        with pytest.raises(
            InputError, match=r"^dB: dtype .* cannot be stored in \.npy .*use --format safetensors"
        ):
            writing.save_case(tmp_path / "out", {"X": np.ones(2), "dB": np.ones(2, dtype)})
    assert not (tmp_path / "out").exists()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text()
    assert "`--save: .npy cannot carry bfloat16 arrays; add --format safetensors`" in docs
    with pytest.raises(InputError, match=r"^X: dtype complex128 cannot be stored in .safetensors"):
        writing.save_case(tmp_path / "c", {"X": np.ones(2, complex)}, format="safetensors")


def test_a_killed_write_leaves_nothing(tmp_path):
    code = (
        "import os, signal, sys\nimport numpy as np\nfrom lincheck import writing\n"
        "real = writing._write_all\n"
        "def dying(folder, writers, **kw):\n"
        "    def write(fp):\n"
        "        fp.write(b'half'); fp.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(folder, {p: write for p in writers}, **kw)\n"
        "writing._write_all = dying\n"
        "writing.save_case(sys.argv[1], {'X': np.ones(1000)}, format='safetensors')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], timeout=60)
    assert done.returncode == -9
    assert list(tmp_path.iterdir()) == []


# --- the command line ----------------------------------------------------------------------


def torch_bf16_dump(N=16, D_in=24, D_out=8, seed=0, dtype=None):
    """X, W, B, dY and torch's own bf16 backward of F.linear on the CPU."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D_in, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(D_out, D_in, generator=g) / D_in**0.5).bfloat16().requires_grad_()
    B = torch.randn(D_out, generator=g).bfloat16().requires_grad_()
    G = torch.randn(N, D_out, generator=g).bfloat16()
    torch.nn.functional.linear(X, W, B).backward(G)
    out = {"X": X, "W": W, "B": B, "dY": G, "dX": X.grad, "dW": W.grad, "dB": B.grad}
    return {k: v.detach() if dtype is None else v.detach().to(dtype) for k, v in out.items()}


def _verify(*args):
    result = runner.invoke(app, ["verify", *map(str, args), "--json", "-"])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def test_a_torch_bf16_dump_verifies_in_bf16_without_precision(tmp_path):
    path = tmp_path / "case.safetensors"
    safetensors.torch.save_file(torch_bf16_dump(), path)
    result, report = _verify(path)
    assert result.exit_code == 0, result.output
    assert {c["precision"] for c in report["checks"] if c["subject"] == "supplied"} == {"bf16"}
    assert report["layer"]["dtypes"]["X"] == "bfloat16"


@pytest.mark.parametrize(
    "bug, tensor, code",
    [
        (lambda d: {**d, "dB": d["dY"][0].clone()}, "dB", "bias_not_summed"),
        (lambda d: {**d, "dW": d["dW"] * 2}, "dW", "scaled"),
    ],
    ids=["dB not summed", "dW doubled"],
)
def test_a_torch_bf16_dump_with_a_planted_bug_fails_with_its_hint(tmp_path, bug, tensor, code):
    path = tmp_path / "case.safetensors"
    safetensors.torch.save_file(bug(torch_bf16_dump()), path)
    result, report = _verify(path)
    assert result.exit_code == 1, result.output
    assert {c["tensor"] for c in report["checks"] if not c["passed"]} == {tensor}
    assert code in {h["code"] for h in report["hints"] if h["tensor"] == tensor}


def test_the_metadata_sets_the_arithmetic_and_the_option_wins(tmp_path):
    """Autocast: bf16 arithmetic, float32 storage. Only the metadata can say so."""
    path = tmp_path / "case.safetensors"
    dump = torch_bf16_dump(N=64, D_in=64, D_out=32, dtype=torch.float32)
    safetensors.torch.save_file(dump, path, metadata={"lincheck.precision": "bf16"})
    result, report = _verify(path)
    assert result.exit_code == 0, result.output
    assert report["arithmetic"] == {"precision": "bf16", "from": "metadata"}
    assert {c["precision"] for c in report["checks"] if c["subject"] == "supplied"} == {"bf16"}
    text = runner.invoke(app, ["verify", str(path)])
    assert "bf16 arithmetic (from metadata)" in " ".join(text.stdout.split())
    explicit, report = _verify(path, "--precision", "fp32")
    assert explicit.exit_code == 1, explicit.output  # float32 arithmetic it was not
    assert report["arithmetic"] == {"precision": "fp32", "from": "--precision"}
    assert "lower_precision" in {h["code"] for h in report["hints"]}
    explain = runner.invoke(app, ["explain", str(path)])
    assert explain.exit_code == 0 and re.search(r"^bf16:", explain.stdout, re.M)
    safetensors.torch.save_file(dump, path)  # no metadata: the dtype's fp32 fails
    assert _verify(path)[0].exit_code == 1
    explain = runner.invoke(app, ["explain", str(path)])
    assert explain.exit_code == 0 and re.search(r"^fp32:", explain.stdout, re.M)


def test_fp8_e4m3_inputs_in_a_dump(tmp_path):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 8, generator=g).to(torch.float8_e4m3fn)
    W = torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn)
    G = torch.randn(12, 4, generator=g).to(torch.float8_e4m3fn)
    x, w, gr = X.double(), W.double(), G.double()  # exact: every fp8 value is a float64
    path = tmp_path / "case.safetensors"
    safetensors.torch.save_file({"X": X, "W": W, "dY": G, "dX": gr @ w, "dW": gr.T @ x}, path)
    result, report = _verify(path)
    assert result.exit_code == 0, result.output
    assert report["layer"]["dtypes"] == {
        "X": "float8_e4m3fn",
        "W": "float8_e4m3fn",
        "dY": "float8_e4m3fn",
    }
    safetensors.torch.save_file({"X": X, "W": W, "dY": G, "dW": gr.T @ x + 2**-10}, path)
    assert _verify(path)[0].exit_code == 1
    alone = tmp_path / "inputs.safetensors"  # no subjects: the formulas on fp8 inputs
    safetensors.torch.save_file({"X": X, "W": W, "dY": G}, alone)
    assert _verify(alone)[0].exit_code == 0


def test_a_folder_of_case_files_is_verified_case_by_case(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    names = ["encoder.layers.0.linear1", "encoder.layers.1.linear2", "head"]
    for seed, name in enumerate(names):
        dump = torch_bf16_dump(seed=seed)
        if name == "head":
            dump["dW"] = dump["dW"] * 2
        meta = {"lincheck.module": name, "lincheck.precision": "bf16"}
        safetensors.torch.save_file(dump, dumps / f"{name}.safetensors", metadata=meta)
    assert arrays.cases(dumps) == [dumps / f"{n}.safetensors" for n in names]
    result = runner.invoke(app, ["verify", str(dumps), "--jobs", "1"])
    assert result.exit_code == 1, result.output
    text = "".join(result.output.split())
    for name in names:
        assert f"{name}.safetensors" in text
    assert "FAIL1of3casesfailed" in text


def test_generate_and_run_save_write_safetensors_that_verify(tmp_path):
    made = runner.invoke(
        app,
        [
            "generate",
            str(tmp_path / "g"),
            "--n",
            "5",
            "--din",
            "4",
            "--dout",
            "3",
            "--with-grads",
            "--dtype",
            "float32",
            "--format",
            "safetensors",
        ],
    )
    assert made.exit_code == 0, made.output
    assert " ".join(made.stdout.split()) == (
        f"wrote X, W, B, dY, dX, dW, dB to {tmp_path / 'g.safetensors'}"
    )
    assert not (tmp_path / "g").exists()
    assert runner.invoke(app, ["verify", str(tmp_path / "g.safetensors")]).exit_code == 0
    again = runner.invoke(
        app, ["generate", str(tmp_path / "g.safetensors"), "--format", "safetensors"]
    )
    assert again.exit_code == 2 and "already exists" in again.stderr
    args = ["run", "--n", "5", "--din", "4", "--dout", "3", "--quiet", "--format", "safetensors"]
    saved = runner.invoke(app, [*args, "--save", str(tmp_path / "r")])
    assert saved.exit_code == 0, saved.output
    data = safetensors.numpy.load_file(tmp_path / "r.safetensors")
    assert sorted(data) == ["B", "W", "X", "dB", "dW", "dX", "dY"]
    assert runner.invoke(app, ["verify", str(tmp_path / "r.safetensors")]).exit_code == 0
    refused = runner.invoke(app, [*args, "--save", str(tmp_path / "r")])
    assert refused.exit_code == 2
    assert " ".join(refused.stderr.split()) == (
        f"lincheck: error: --save {tmp_path / 'r.safetensors'}: already exists; not replaced "
        "(use --force)"
    )


def test_save_failures_as_safetensors_reproduce(tmp_path):
    (tmp_path / "wrongmod2.py").write_text(
        "def f(X, W, B, dY):\n"
        "    X2 = X.reshape(-1, X.shape[-1]); G = dY.reshape(-1, dY.shape[-1])\n"
        "    return dY @ W, 2 * G.T @ X2, None if B is None else G.sum(0)\n"
    )
    saved = tmp_path / "failures"
    args = ["run", "--impl", "wrongmod2:f", "--n", "4", "--din", "3", "--dout", "2"]
    args += ["--dtype", "float64", "--save-failures", str(saved), "--format", "safetensors"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        first = runner.invoke(app, args)
        again = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    assert first.exit_code == 1, first.output
    files = sorted(saved.iterdir())
    assert files and all(p.suffix == ".safetensors" for p in files)
    assert again.exit_code == 2 and "already holds saved cases" in again.stderr
    result, report = _verify(files[0])
    assert result.exit_code == 1
    assert {c["tensor"] for c in report["checks"] if not c["passed"]} == {"dW"}
    everything = runner.invoke(app, ["verify", str(saved), "--jobs", "1", "--quiet"])
    assert everything.exit_code == 1
    assert f"FAIL {len(files)} of {len(files)} cases failed" in " ".join(everything.output.split())


# --- advice for files lincheck does not read, tested by following it ----------------------


def _advice_command(message: str) -> str:
    return re.search(r"(python -c \".*\")", message).group(1)


def _run_advice(message: str) -> None:
    """Run the ``python -c`` command an error line advises, as a user pastes it."""
    command = _advice_command(message).replace("python", sys.executable, 1)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_bf16_npy_gets_advice_that_works(tmp_path, rng):
    d = tmp_path / "dump"
    d.mkdir()
    data = {k: v.astype(ml_dtypes.bfloat16) for k, v in layer(rng).items()}
    for name, a in data.items():
        np.save(d / f"{name}.npy", a)  # |V2: the values' bytes, the dtype lost
    result = runner.invoke(app, ["verify", str(d)])
    assert result.exit_code == 2
    line = result.stderr.removeprefix("lincheck: error: ")
    assert line.startswith(f"B ({d}/B.npy): dtype |V2 (raw bytes) is what np.save writes for a")
    advice = re.search(r"(safetensors\.numpy\.save_file\(.*\))$", line.strip()).group(1)
    # Follow it, with the names it elides filled in.
    namespace = {"safetensors": safetensors, **data}
    code = advice.replace(", ...}", ', "B": B}').replace(
        '"case.safetensors"', repr(str(tmp_path / "case.safetensors"))
    )
    exec(code, namespace)
    result, report = _verify(tmp_path / "case.safetensors")
    assert result.exit_code == 0, result.output
    assert report["layer"]["dtypes"]["X"] == "bfloat16"


@pytest.mark.parametrize(
    "dtype, descr", [(ml_dtypes.float8_e4m3fn, "|V1"), (ml_dtypes.float8_e5m2, "<f1")]
)
def test_an_fp8_npy_gets_the_same_advice(tmp_path, dtype, descr):
    d = tmp_path / "dump"
    d.mkdir()
    for name, shape in {"X": (4, 3), "W": (2, 3), "dY": (4, 2)}.items():
        np.save(d / f"{name}.npy", np.ones(shape, dtype))
    result = runner.invoke(app, ["verify", str(d)])
    assert result.exit_code == 2
    assert (
        f"W ({d}/W.npy): dtype {descr} (raw bytes) is what np.save writes for an fp8"
        in result.stderr
    )


def test_a_torch_pickle_is_refused_unopened_with_a_conversion_that_works(tmp_path):
    dump = torch_bf16_dump()
    dump["W"] = dump["W"].T.contiguous().T  # non-contiguous, as a transposed weight is
    assert not dump["W"].is_contiguous()
    path = tmp_path / "case.pt"
    torch.save(dump, path)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 2
    line = result.stderr.removeprefix("lincheck: error: ").strip()
    assert line.startswith(f"{path}: a PyTorch pickle (.pt); lincheck never unpickles.")
    _run_advice(line)
    result, report = _verify(tmp_path / "case.safetensors")
    assert result.exit_code == 0, result.output
    assert report["layer"]["dtypes"]["W"] == "bfloat16"


def test_a_csv_is_refused_with_a_conversion_that_works(tmp_path, rng):
    d = tmp_path / "dump"
    d.mkdir()
    data = layer(rng)
    for name, a in data.items():
        if name != "X":
            np.save(d / f"{name}.npy", a)
    np.savetxt(d / "X.csv", data["X"], delimiter=",")
    result = runner.invoke(app, ["verify", str(d / "X.csv")])
    assert result.exit_code == 2
    line = result.stderr.removeprefix("lincheck: error: ").strip()
    assert line.startswith(f"{d}/X.csv: a text file (.csv); lincheck reads binary arrays.")
    _run_advice(line)
    assert np.array_equal(np.load(d / "X.npy"), data["X"])  # savetxt's repr round-trips
    assert runner.invoke(app, ["verify", str(d)]).exit_code == 0


def test_a_folder_of_torch_pickles_is_listed_with_a_conversion_that_works(tmp_path):
    """X.pt, W.pt, ... one tensor each (as torch.save writes them): the line names the
    files lincheck did not read and converts them into one case; never unpickled."""
    d = tmp_path / "dump"
    d.mkdir()
    for name, tensor in torch_bf16_dump().items():
        torch.save(tensor, d / f"{name}.pt")
    result = runner.invoke(app, ["verify", str(d)])
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"lincheck: error: {d}: missing X, W, dY (")
    assert "the folder holds B.pt, W.pt, X.pt, dB.pt, dW.pt, dX.pt and 1 more" in line
    code = re.fullmatch(r'python -c "(.*)"', _advice_command(line)).group(1)
    assert not re.search(r'[\\$`"]', code)  # the shell passes it as it is: run it here, where
    exec(code, {})  # torch is imported already (a fresh interpreter takes seconds)
    result, report = _verify(tmp_path / "dump.safetensors")
    assert result.exit_code == 0, result.output
    assert report["layer"]["dtypes"]["W"] == "bfloat16"


def test_a_folder_of_csv_files_is_listed_with_a_conversion_that_works(tmp_path, rng):
    """D_out = 1: W is one row and B one number, which loadtxt would squeeze (ndmin)."""
    d = tmp_path / "dump"
    d.mkdir()
    data = layer(rng, D_out=1)
    data["dW"] = data["dY"].T @ data["X"]
    for name, a in data.items():
        np.savetxt(d / f"{name}.csv", a, delimiter=",")
    result = runner.invoke(app, ["verify", str(d)])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "the folder holds B.csv, W.csv, X.csv, dW.csv, dY.csv, which lincheck" in line
    _run_advice(line)
    assert np.array_equal(np.load(d / "dW.npy"), data["dW"])  # savetxt's repr round-trips
    assert runner.invoke(app, ["verify", str(d)]).exit_code == 0


# --- fuzzing: whatever loads is what the reference reads -----------------------------------


def _clean_file() -> bytes:
    rng = np.random.default_rng(0)
    data = {
        "X": rng.standard_normal((4, 3)),
        "W": rng.standard_normal((2, 3)).astype(np.float32),
        "dY": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "dW": np.ones((2, 3), np.float16),
        "other": np.arange(3, dtype=np.int8),
    }
    buf = io.BytesIO()
    header = writing.st.build_header(data, {"lincheck.module": "m"})
    buf.write(header)
    for a in data.values():
        buf.write(a.tobytes())
    return buf.getvalue()


CLEAN = _clean_file()
FRAGMENTS = [
    b'"F64"',
    b'"F32"',
    b'"C64"',
    b'"BF16"',
    b'"F8_E8M0"',
    b'"F4"',
    b'"f32"',
    b"[4,3]",
    b"[]",
    b"[-1,3]",
    b"[4.0,3]",
    b"[0,96]",
    b"[96,96]",
    b"[0,97]",
    b"null",
    b"true",
    b'"X"',
    b'"dw"',
    b'"__metadata__"',
    b"{}",
    b"NaN",
    b'"\\ud800"',
    b",",
    b"}",
    b"1e400",
]


@st.composite
def mutated(draw) -> bytes:
    out = bytearray(CLEAN)
    n = struct.unpack("<Q", CLEAN[:8])[0]
    kind = draw(st.sampled_from(["flip", "data", "cut", "insert", "json", "length"]))
    if kind == "data":  # the values only: what loads must be the reference's bytes
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(8 + n, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "cut":
        out = out[: draw(st.integers(0, len(out)))]
    elif kind == "insert":
        i = draw(st.integers(0, len(out)))
        out[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "json":  # a token of the header replaced by another of the same length or not
        tokens = list(re.finditer(rb'"[^"]*"|\[[^\]]*\]|-?\d+', bytes(out[8 : 8 + n])))
        t = draw(st.sampled_from(tokens))
        new = draw(st.sampled_from(FRAGMENTS))
        header = bytes(out[8 : 8 + n])
        header = header[: t.start()] + new + header[t.end() :]
        if draw(st.booleans()):
            header = header.rstrip().ljust(-(-len(header.rstrip()) // 8) * 8)
        out = bytearray(struct.pack("<Q", len(header)) + header + bytes(out[8 + n :]))
    else:
        out[:8] = struct.pack("<Q", draw(st.integers(0, len(out) + 16)))
    return bytes(out)


@given(data=mutated())
def test_mutated_safetensors_load_as_the_reference_reads_them_or_are_one_line(
    tmp_path_factory, data
):
    path = tmp_path_factory.mktemp("st") / "case.safetensors"
    path.write_bytes(data)
    try:
        loaded = arrays.load(path)
    except LincheckError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    reference = {name: info for name, info in safetensors.deserialize(data)}  # must not raise
    for name, source in loaded.sources.items():
        key = source.rsplit(":", 1)[1]
        a = np.asarray(loaded.arrays[name])
        assert list(a.shape) == reference[key]["shape"]
        assert a.tobytes() == bytes(reference[key]["data"])
        assert writing.st.stored_dtype(a.dtype) == reference[key]["dtype"]
    try:
        report = check(
            *(loaded.arrays.get(k) for k in ("X", "W", "B", "dY")), dW=loaded.arrays.get("dW")
        )
    except LincheckError as exc:
        assert "\n" not in str(exc)
    else:
        assert report.passed == all(c.passed for c in report.checks)


@pytest.mark.skipif(safetensors.__version__ != "0.8.0", reason="a fact about safetensors 0.8.0")
def test_what_the_readme_says_of_the_safetensors_numpy_loader(tmp_path):
    """README ("bfloat16 and fp8 dumps") says why lincheck does not use it; true in 0.8.0."""
    path = tmp_path / "c.safetensors"
    safetensors.torch.save_file({"X": torch.ones(2, dtype=torch.bfloat16)}, path)
    with pytest.raises(KeyError, match="BF16"):
        safetensors.numpy.load(path.read_bytes())
    safetensors.torch.save_file({"X": torch.ones(2, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(KeyError, match="F8_E4M3"):
        safetensors.numpy.load(path.read_bytes())
    with pytest.raises(AttributeError, match="float8_e4m3fn"):
        safetensors.numpy.load_file(path)


@pytest.mark.parametrize("option", ["--save", "--save-failures"])
def test_bfloat16_cases_are_not_saved_as_npy(tmp_path, option):
    """run --dtype bfloat16 with a .npy target: refused before any work, naming the fix
    (saving after the checks would fail and hide the verdict)."""
    args = ["run", "--dtype", "bfloat16", option, str(tmp_path / "out"), "--quiet"]
    if option == "--save-failures":
        args += ["--impl", "cs231n_layers:backward"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"lincheck: error: {option}: .npy cannot carry bfloat16 arrays; add --format safetensors\n"
    )
    assert not (tmp_path / "out").exists()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text()
    assert "`--save: .npy cannot carry bfloat16 arrays; add --format safetensors`" in docs
