"""Loading and saving arrays: names, formats, corrupt and hostile files, atomic writes."""

import io
import os
import zipfile

import numpy as np
import pytest

from lincheck import InputError, arrays, check, writing


def _write_inputs(folder, rng, dtype="float64", **extra):
    folder.mkdir(exist_ok=True)
    data = {
        "X": rng.standard_normal((4, 3)).astype(dtype),
        "W": rng.standard_normal((2, 3)).astype(dtype),
        "dY": rng.standard_normal((4, 2)).astype(dtype),
        **extra,
    }
    for name, a in data.items():
        np.save(folder / f"{name}.npy", a)
    return data


@pytest.mark.parametrize("dtype", ["float64", ">f8", "float32", ">f4", "float16", "int16", "bool"])
@pytest.mark.parametrize("shape", [(1,), (3, 2), (2, 3, 4), (1, 1)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_save_load_roundtrip(tmp_path, rng, dtype, shape, order):
    """Any real dtype, byte order, memory order and shape comes back bit for bit."""
    a = np.asarray(rng.standard_normal(shape) * 10, order=order).astype(dtype, order=order)
    np.save(
        tmp_path / "X.npy", a
    )  # NumPy's writer: big-endian and Fortran headers as found in the wild
    with open(tmp_path / "X.npy", "rb") as fp:
        back = arrays._read_npy(fp, os.path.getsize(tmp_path / "X.npy"), "X")
    assert back.dtype == a.dtype and back.shape == a.shape
    assert np.array_equal(back, a)
    writing.save(tmp_path / "out", {"W": a})
    assert np.array_equal(np.load(tmp_path / "out" / "W.npy"), a)


def test_folder_names_are_case_insensitive_and_unknown_files_ignored(tmp_path, rng):
    folder = tmp_path / "dump"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones((4, 3)))
    with open(folder / "W.NPY", "wb") as fp:  # np.save would append ".npy"
        np.save(fp, np.ones((2, 3)))
    np.save(folder / "DY.npy", np.ones((4, 2)))
    np.save(folder / "dw.npy", np.ones((2, 3)))
    np.save(folder / "activations.npy", np.ones(2))
    (folder / "notes.txt").write_text("hello")
    loaded = arrays.load(folder)
    assert set(loaded.arrays) == {"X", "W", "dY", "dW"}
    assert loaded.sources["W"] == str(folder / "W.NPY")
    assert sorted(os.path.basename(p) for p in loaded.ignored) == ["activations.npy", "notes.txt"]


def test_npz_keys(tmp_path, rng):
    path = tmp_path / "case.npz"
    np.savez_compressed(
        path, X=np.ones((4, 3)), w=np.ones((2, 3)), dy=np.ones((4, 2)), other=np.ones(1)
    )
    loaded = arrays.load(path)
    assert set(loaded.arrays) == {"X", "W", "dY"}
    assert loaded.sources["W"] == f"{path}:w"
    assert loaded.ignored == (f"{path}:other.npy",)


def test_two_files_for_one_name(tmp_path, rng):
    folder = tmp_path / "dump"
    _write_inputs(folder, rng)
    np.save(folder / "x.npy", np.ones((4, 3)))
    with pytest.raises(InputError, match=r"^X: two sources for one array: .*X.npy and .*x.npy$"):
        arrays.load(folder)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, r"no such file or folder"),
        (
            lambda p: p.write_text("x"),
            r"expected a folder of \.npy files, an \.npz or a \.safetensors",
        ),
    ],
)
def test_path_errors(tmp_path, make, message):
    path = tmp_path / "thing.npy"
    make(path)
    with pytest.raises(InputError, match=message):
        arrays.load(path)


def test_missing_required_arrays(tmp_path, rng):
    folder = tmp_path / "dump"
    folder.mkdir()
    np.save(folder / "X.npy", np.ones((4, 3)))
    with pytest.raises(InputError, match=r"missing W, dY \(needs X, W and dY; found X\)$"):
        arrays.load(folder)


def _npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"empty file$"),
        (
            b"this is text, not an array\n" * 4,
            r"not a \.npy file \(it does not start with \\x93NUMPY\)$",
        ),
        (bytes(range(256)), r"not a \.npy file \(it does not start with \\x93NUMPY\)$"),
        (_npy_bytes(np.ones((4, 3)))[:40], r"not a valid \.npy file \(its header is cut short\)$"),
        (
            _npy_bytes(np.ones((4, 3)))[:-8],
            r"truncated: the header declares shape \(4, 3\) float64 \(96 bytes of data\) "
            r"but the file holds 88$",
        ),
        (
            _npy_bytes(np.ones((4, 3))).replace(b"(4, 3)", b"(4000000000, 3000000000)".ljust(6)),
            r"not a valid \.npy file \(its header declares shape \(4000000000, 3000000000\) "
            r"float64, too large for NumPy\)$",
        ),
    ],
    ids=["empty", "text", "random bytes", "cut header", "cut data", "huge shape"],
)
def test_corrupt_npy_files(tmp_path, rng, content, message):
    folder = tmp_path / "dump"
    _write_inputs(folder, rng)
    (folder / "X.npy").write_bytes(content)
    with pytest.raises(InputError, match=r"^X \(.*X\.npy\): " + message):
        arrays.load(folder)


def test_pickle_payload_is_never_executed(tmp_path, rng):
    folder = tmp_path / "dump"
    _write_inputs(folder, rng)
    proof = tmp_path / "pwned"
    payload = np.empty(2, dtype=object)
    payload[0] = _Payload(str(proof))
    with open(folder / "X.npy", "wb") as fp:
        np.lib.format.write_array(fp, payload, allow_pickle=True)
    with pytest.raises(
        InputError, match=r"holds Python objects \(pickled data\); lincheck never unpickles"
    ):
        arrays.load(folder)
    assert not proof.exists()
    # Control: the payload is live for a loader that unpickles.
    np.load(folder / "X.npy", allow_pickle=True)
    assert proof.exists()


def test_npz_errors(tmp_path, rng):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(InputError, match=r"bad\.npz: not a readable \.npz \(zip\) file"):
        arrays.load(bad)
    cut = tmp_path / "cut.npz"
    with zipfile.ZipFile(cut, "w") as z:
        z.writestr("X.npy", _npy_bytes(np.ones((4, 3)))[:-5])
        z.writestr("W.npy", _npy_bytes(np.ones((2, 3))))
        z.writestr("dY.npy", _npy_bytes(np.ones((4, 2))))
    with pytest.raises(InputError, match=r"^X \(.*cut\.npz:X\): truncated"):
        arrays.load(cut)


# --- writing ------------------------------------------------------------


def test_save_refuses_to_overwrite_and_touches_nothing(tmp_path, rng):
    folder = tmp_path / "out"
    writing.save(folder, {"X": np.ones(2), "W": np.ones(3)})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(
        InputError, match=r"X\.npy: already exists; nothing was written \(use --force"
    ):
        writing.save(folder, {"B": np.zeros(2), "X": np.zeros(2)})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no B.npy either


def test_a_differently_cased_file_counts_as_existing(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones(2))
    with pytest.raises(InputError, match="x.npy: already exists"):
        writing.save(folder, {"X": np.zeros(2)})
    writing.save(folder, {"X": np.zeros(2)}, force=True)
    assert [p.name for p in folder.iterdir()] == ["X.npy"]


def test_force_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    folder = tmp_path / "out"
    writing.save(folder, {"X": np.ones(2)})
    writing.save(folder, {"X": np.zeros(3)}, force=True)
    assert np.array_equal(np.load(folder / "X.npy"), np.zeros(3))
    assert [p.name for p in folder.iterdir()] == ["X.npy"]


def test_force_replaces_a_symlink_not_the_file_it_points_to(tmp_path):
    precious = tmp_path / "precious.npy"
    np.save(precious, np.arange(3.0))
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "X.npy").symlink_to(precious)
    writing.save(folder, {"X": np.zeros(2)}, force=True)
    assert np.array_equal(np.load(precious), np.arange(3.0))
    assert not (folder / "X.npy").is_symlink()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()

    def explode(fp, array, allow_pickle):
        fp.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing.npy_format, "write_array", explode)
    with pytest.raises(InputError, match=r"X\.npy: cannot write: No space left on device"):
        writing.save(folder, {"X": np.ones(2)})
    assert list(folder.iterdir()) == []


def test_write_text_replaces(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    writing.write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_save_into_a_file_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        writing.save(tmp_path / "f", {"X": np.ones(1)})


def test_large_files_are_read_as_used_not_mapped(tmp_path, rng, monkeypatch):
    folder = tmp_path / "dump"
    data = _write_inputs(folder, rng)
    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 50)  # X (96 bytes) and dY (64) are "large"
    loaded = arrays.load(folder)
    X = loaded.arrays["X"]
    assert isinstance(X, arrays.FileArray) and not isinstance(X, np.ndarray)
    assert (X.shape, X.dtype, X.ndim, X.size, len(X)) == ((4, 3), np.float64, 2, 12, 4)
    assert isinstance(loaded.arrays["W"], np.ndarray)  # 48 bytes
    assert not loaded.arrays["W"].flags.writeable
    for name, a in data.items():
        assert np.array_equal(np.asarray(loaded.arrays[name]), a)
    block = X[1:3]
    assert isinstance(block, np.ndarray) and not block.flags.writeable
    assert np.array_equal(block, data["X"][1:3])
    assert np.array_equal(X[3:99], data["X"][3:]) and X[2:1].shape == (0, 3)
    assert np.array_equal(X[1], data["X"][1]) and np.array_equal(X[:, 2], data["X"][:, 2])
    flat = X.reshape(-1)
    assert isinstance(flat, arrays.FileArray) and np.array_equal(flat[5:9], data["X"].ravel()[5:9])
    np.save(folder / "Y.npy", np.asfortranarray(rng.standard_normal((4, 20))))
    np.save(folder / "dX.npy", rng.standard_normal((2, 4, 3)).astype(">f4"))
    loaded = arrays.load(folder)
    Y, dX = loaded.arrays["Y"], loaded.arrays["dX"]
    want = np.load(folder / "Y.npy")
    assert isinstance(Y, arrays.FileArray) and np.asarray(Y).flags.f_contiguous
    assert np.array_equal(Y, want) and np.array_equal(Y[1:3], want[1:3])
    assert np.array_equal(Y.reshape(2, 40), want.reshape(2, 40))  # C index order, as NumPy
    assert dX.dtype == np.dtype(">f4") and isinstance(dX.reshape(-1, 3), arrays.FileArray)
    assert np.array_equal(dX.reshape(-1, 3)[1:4], np.load(folder / "dX.npy").reshape(-1, 3)[1:4])
    assert np.array_equal(np.asarray(dX, dtype=np.float64), np.load(folder / "dX.npy"))


def test_file_arrays_are_checked_like_arrays_in_every_mode(tmp_path, rng, monkeypatch):
    folder = tmp_path / "dump"
    data = _write_inputs(folder, rng)
    G, X, W = data["dY"], data["X"], data["W"]
    np.save(folder / "dX.npy", G @ W)
    np.save(folder / "dW.npy", np.asfortranarray(G.T @ X + np.eye(2, 3) * 1e-3))  # wrong at [0, 0]
    in_memory = arrays.load(folder).arrays
    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 10)
    from_files = arrays.load(folder).arrays
    assert all(isinstance(a, arrays.FileArray) for a in from_files.values())
    for mode in ("full", "sample", "directions"):
        reports = [
            check(a["X"], a["W"], None, a["dY"], dX=a["dX"], dW=a["dW"], mode=mode)
            for a in (in_memory, from_files)
        ]
        assert reports[0].as_dict() == reports[1].as_dict()
        assert [(c.tensor, c.worst_index) for c in reports[1].failed] == [("dW", (0, 0))]


KILL_MID_WRITE = """
import os, signal, sys
import numpy as np
from lincheck import writing

def dying_write(fp, array, allow_pickle):
    fp.write(b"\\x93NUMPY half an array")
    fp.flush()
    os.kill(os.getpid(), signal.SIGKILL)

writing.npy_format.write_array = dying_write
writing.save(sys.argv[1], {"X": np.ones(1000)}, force=sys.argv[2] == "force")
"""


@pytest.mark.parametrize("force", [False, True])
def test_a_process_killed_mid_write_leaves_nothing_partial(tmp_path, force):
    import subprocess
    import sys

    folder = tmp_path / "out"
    folder.mkdir()
    if force:
        np.save(folder / "X.npy", np.arange(3.0))
    done = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(folder), "force" if force else "keep"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr  # killed while writing
    if force:  # the old file, whole, and nothing else
        assert [p.name for p in folder.iterdir()] == ["X.npy"]
        assert np.array_equal(np.load(folder / "X.npy"), np.arange(3.0))
    else:
        assert list(folder.iterdir()) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        writing.save(tmp_path / "out", {"X": np.ones(2)})
        writing.write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "out" / "X.npy").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


TRUNCATE_MID_CHECK = """
import os, sys
import numpy as np
from lincheck import arrays, check, streaming

arrays.MEMMAP_BYTES = 2**16  # X (about 1 MB) is read as used (or, before, memory-mapped)
streaming.ROW_BLOCK_BYTES = 2**16  # many row blocks
folder = sys.argv[1]
loaded = arrays.load(folder)
a = loaded.arrays

def progress(done, total):  # np.save rewriting X.npy in place truncates it first
    os.truncate(os.path.join(folder, "X.npy"), 128)

try:
    check(a["X"], a["W"], None, a["dY"], mode="directions", directions=2, progress=progress,
          sources=loaded.sources)
except arrays.InputError as exc:
    print(exc)
    sys.exit(2)
"""


def test_a_file_truncated_mid_check_is_one_line_not_a_signal(tmp_path, rng):
    """Before, the memory map of X died with SIGBUS (exit -7 here, 135 from a shell)."""
    import subprocess
    import sys

    folder = tmp_path / "dump"
    folder.mkdir()
    X = rng.standard_normal((20_000, 6))
    np.save(folder / "X.npy", X)
    np.save(folder / "W.npy", rng.standard_normal((3, 6)))
    np.save(folder / "dY.npy", rng.standard_normal((20_000, 3)))
    size = (folder / "X.npy").stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", TRUNCATE_MID_CHECK, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stdout == (
        f"X ({folder}/X.npy): the file changed while being checked (it had {size:,} bytes, "
        "now 128); check it again once it is written\n"
    )


def test_a_file_rewritten_in_place_mid_check_is_reported(tmp_path, rng, monkeypatch):
    folder = tmp_path / "dump"
    _write_inputs(folder, rng)
    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 10)
    X = arrays.load(folder).arrays["X"]
    assert np.array_equal(X[0:2], np.load(folder / "X.npy")[0:2])
    with open(folder / "X.npy", "r+b") as fp:  # the same size, other values, a later time
        fp.seek(-8, os.SEEK_END)
        fp.write(np.float64(7.0).tobytes())
    stamp = (folder / "X.npy").stat().st_mtime_ns + 10**9
    os.utime(folder / "X.npy", ns=(stamp, stamp))
    with pytest.raises(
        InputError,
        match=r"^X \(.*X\.npy\): the file changed while being "
        r"checked \(it was rewritten\); check it again once it is written$",
    ):
        X[0:2]
    with pytest.raises(InputError, match="the file changed while being checked"):
        np.asarray(X)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_members_over_64_mib_load(tmp_path, compressed):
    """A stored member is read by its offset in the archive; a deflated one is inflated."""
    X = np.zeros((arrays.MEMMAP_BYTES // 4 // 8 + 1, 8), dtype=np.float32)
    X[::4099, 3] = np.arange(len(X[::4099]))  # some values to find
    path = tmp_path / "big.npz"
    (np.savez_compressed if compressed else np.savez)(
        path, X=X, W=np.ones((2, 8), np.float32), dY=np.ones((len(X), 2), np.float32)
    )
    try:
        loaded = arrays.load(path).arrays
        assert isinstance(loaded["X"], arrays.FileArray) != compressed
        assert loaded["X"].shape == X.shape and loaded["X"].dtype == X.dtype
        assert np.array_equal(loaded["X"][4099 * 7 : 4099 * 7 + 3], X[4099 * 7 : 4099 * 7 + 3])
        assert np.array_equal(np.asarray(loaded["X"]), X)
    finally:
        path.unlink()


def test_file_arrays_are_read_a_block_at_a_time_in_the_partial_modes(tmp_path, monkeypatch):
    """As tests/test_modes.py checks for memory maps: no copy of X is ever made whole."""
    import tracemalloc

    from lincheck import checks, streaming

    # Blocks of 1 MiB, files over 1 MiB read as used: 40 000 rows take many blocks.
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 2**20)
    monkeypatch.setattr(checks, "DIAGNOSIS_BYTES", 0)  # a diagnosis would hold it all
    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 2**20)
    rng = np.random.default_rng(0)
    N, D_in, D_out = 40_000, 48, 16
    folder = tmp_path / "dump"
    folder.mkdir()
    X = rng.standard_normal((N, D_in), dtype=np.float32)
    G = rng.standard_normal((N, D_out), dtype=np.float32)
    W = rng.standard_normal((D_out, D_in)).astype(np.float32)
    dX = (G.astype(np.float64) @ W).astype(np.float32)
    dX[39_123, 7] += 1.0
    for name, a in {"X": X, "dY": G, "W": W, "dX": dX}.items():
        np.save(folder / f"{name}.npy", a)
    del X, G, dX
    a = arrays.load(folder).arrays
    assert {n for n, v in a.items() if isinstance(v, arrays.FileArray)} == {"X", "dY", "dX"}
    tracemalloc.start()
    try:  # float32 X with tf32 and bf16 alternatives: representability is scanned too
        report = check(a["X"], a["W"], None, a["dY"], dX=a["dX"], mode="directions", directions=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(c.tensor, c.worst_index) for c in report.failed] == [("dX", (39_123, 7))]
    assert [h.code for h in report.hints] == ["not_diagnosed"]
    assert peak < 8 * N * D_in / 4, peak  # a quarter of a float64 X, as for memory maps
