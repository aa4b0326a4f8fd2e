"""The catalogue of bad input (docs/bad-input.md): each case, its exact message, its exit code.

Every entry builds a dump in a temporary folder DIR, runs ``lincheck verify`` on it and
compares stderr with the catalogue's message (DIR standing for the folder); a test
also checks that docs/bad-input.md lists every message, so the page cannot drift.
"""

import io
import json
import os
import socket
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import lincheck
from lincheck.cli import app

runner = CliRunner()
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"


def good(N=4, D_in=3, D_out=2):
    rng = np.random.default_rng(0)
    X, W, B, G = (rng.standard_normal(s) for s in ((N, D_in), (D_out, D_in), (D_out,), (N, D_out)))
    return {"X": X, "W": W, "B": B, "dY": G, "dW": G.T @ X}


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def folder(d, **changes):
    """Write good arrays to d, with changes: an array, raw bytes, or None to leave it out."""
    d.mkdir(exist_ok=True)
    for name, value in {**good(), **changes}.items():
        if value is None:
            continue
        (d / f"{name}.npy").write_bytes(value if isinstance(value, bytes) else npy(value))
    return [str(d)]


def npz(d, members: dict, name="case.npz"):
    d.mkdir(exist_ok=True)
    with zipfile.ZipFile(d / name, "w") as z:
        for key, data in members.items():
            z.writestr(f"{key}.npy", data)
    return [str(d / name)]


class Exploit:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["LINCHECK_PROOF"])),))


def pickle_payload():
    a = np.empty(2, dtype=object)
    a[0] = Exploit()
    return npy(a)


X_BYTES = npy(np.ones((4, 3)))


def bzip2_npz(d):
    d.mkdir(exist_ok=True)
    with zipfile.ZipFile(d / "case.npz", "w", compression=zipfile.ZIP_BZIP2) as z:
        for key, a in good().items():
            z.writestr(f"{key}.npy", npy(a))
    return [str(d / "case.npz")]


def node(d, name, kind, **changes):
    """Good arrays in d, and at d/name a FIFO, a device, a socket or a symlink (all made
    inside d: nothing outside the test's folder is touched)."""
    folder(d, **changes)
    path = d / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind in ("char", "block"):
        mode, device = (stat.S_IFCHR, (1, 3)) if kind == "char" else (stat.S_IFBLK, (7, 0))
        try:
            os.mknod(path, mode | 0o600, os.makedev(*device))
        except PermissionError:
            pytest.skip("making a device node needs CAP_MKNOD")
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))  # the socket file stays after the socket closes
    elif kind == "loop":
        path.symlink_to(path.name)
    else:
        path.symlink_to(kind)
    return path


def header(descr: str, shape: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy file with this header text, as np.save would pad it."""
    text = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def raw_zip(path, members):
    """A zip file written byte by byte, so that its sizes can lie: members are
    (name, method, data, declared uncompressed size, declared compressed size)."""
    out, central = bytearray(), bytearray()
    for name, method, data, size, packed in members:
        name = name.encode()
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0, zlib.crc32(data), packed, size)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, len(out)) + name
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + data
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0
    )
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(out + central + end))
    return [str(path)]


def stored(key, data):
    return (f"{key}.npy", 0, data, len(data), len(data))


def good_members():
    return [stored(k, npy(v)) for k, v in good().items() if k != "X"]


NPY_ADVICE = (
    ", which .npy cannot carry; save the case as one .safetensors file instead: "
    'safetensors.numpy.save_file({{"X": X, "W": W, "dY": dY, ...}}, "case.safetensors")'
)


def st_case(d, edit=None, data=None, header=None, length=None, name="case.safetensors"):
    """The good arrays as one .safetensors file written by the reference writer, then its
    header (parsed JSON) edited, or replaced by raw bytes, its data or its length changed."""
    import safetensors.numpy

    raw = safetensors.numpy.save(good())
    n = int.from_bytes(raw[:8], "little")
    parsed = json.loads(raw[8 : 8 + n])
    if edit is not None:
        edit(parsed)
    if header is None:
        header = json.dumps(parsed, separators=(",", ":")).encode()
    body = raw[8 + n :] if data is None else data(raw[8 + n :])
    d.mkdir(exist_ok=True)
    size = len(header) if length is None else length
    (d / name).write_bytes(size.to_bytes(8, "little") + header + body)
    return [str(d / name)]


def narrow_npy(dtype_name):
    import ml_dtypes

    return npy(np.ones((4, 3), getattr(ml_dtypes, dtype_name)))


def put(d, name, data=b""):
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(data)
    return [str(d / name)]


CATALOGUE = [
    # (id, setup(DIR) -> argv after "verify", message with {dir}, exit code)
    (
        "W stored as (D_in, D_out) without --layout in_out",
        lambda d: folder(d, W=good()["W"].T, dW=None),
        "W ({dir}/W.npy): shape (3, 2) does not fit X (4, 3): expected (D_out, 3); it fits as "
        "(D_in, D_out) = (3, 2): was W saved transposed? If your layer stores it so "
        "(Y = X W + B), pass --layout in_out",
        2,
    ),
    (
        "W stored as (D_out, D_in) with --layout in_out",
        lambda d: [*folder(d, dW=None), "--layout", "in_out"],
        "W ({dir}/W.npy): shape (2, 3) does not fit X (4, 3): expected (3, D_out); it fits as "
        "(D_out, D_in) = (2, 3): was W saved transposed? If your layer stores it so "
        "(Y = X Wᵀ + B), pass --layout out_in",
        2,
    ),
    (
        "a W of the wrong rank with --layout in_out",
        lambda d: [*folder(d, W=np.ones(3)), "--layout", "in_out"],
        "W ({dir}/W.npy): expected 2 dimensions (D_in, D_out), found shape (3,)",
        2,
    ),
    ("missing folder", lambda d: [str(d / "nowhere")], "{dir}/nowhere: no such file or folder", 2),
    (
        "missing --x file",
        lambda d: folder(d, X=None) + ["--x", str(d / "none.npy")],
        "X ({dir}/none.npy): no such file",
        2,
    ),
    (
        "not a folder or .npz",
        lambda d: folder(d) and [str(d / "X.npy")],
        "{dir}/X.npy: expected a folder of .npy files, an .npz or a .safetensors file (give the "
        "folder; verify also takes the file as --x FILE)",
        2,
    ),
    (
        "required array missing",
        lambda d: folder(d, W=None, dY=None),
        "{dir}: missing W, dY (needs X, W and dY; found B, X, dW)",
        2,
    ),
    ("empty file", lambda d: folder(d, X=b""), "X ({dir}/X.npy): empty file", 2),
    (
        "text named .npy",
        lambda d: folder(d, X=b"1,2,3\n4,5,6\n"),
        "X ({dir}/X.npy): not a .npy file (it does not start with \\x93NUMPY)",
        2,
    ),
    (
        "random bytes",
        lambda d: folder(d, X=bytes(range(200))),
        "X ({dir}/X.npy): not a .npy file (it does not start with \\x93NUMPY)",
        2,
    ),
    (
        "truncated header",
        lambda d: folder(d, X=X_BYTES[:30]),
        "X ({dir}/X.npy): not a valid .npy file (its header is cut short)",
        2,
    ),
    (
        "malformed header",
        lambda d: folder(d, X=X_BYTES.replace(b"(4, 3)", b"(4, 3", 1)),
        "X ({dir}/X.npy): not a valid .npy file (its header is malformed)",
        2,
    ),
    (
        "negative shape",
        lambda d: folder(d, X=X_BYTES.replace(b"(4, 3)", b"(-4, 3)", 1)),
        "X ({dir}/X.npy): not a valid .npy file (its header declares shape (-4, 3))",
        2,
    ),
    (
        "truncated data",
        lambda d: folder(d, X=X_BYTES[:-8]),
        "X ({dir}/X.npy): truncated: the header declares shape (4, 3) float64 (96 bytes of data) "
        "but the file holds 88",
        2,
    ),
    (
        "huge declared shape",
        lambda d: folder(d, X=X_BYTES.replace(b"(4, 3)", b"(99999999999, 3)")),
        "X ({dir}/X.npy): truncated: the header declares shape (99999999999, 3) float64 "
        "(2,399,999,999,976 bytes of data) but the file holds 106",
        2,
    ),
    (
        "npz that is not a zip",
        lambda d: (d.mkdir(), (d / "c.npz").write_bytes(b"PK no zip")) and [str(d / "c.npz")],
        "{dir}/c.npz: not a readable .npz (zip) file: File is not a zip file",
        2,
    ),
    (
        "npz with a corrupt member",
        lambda d: npz(d, {"X": X_BYTES[:-8], "W": npy(good()["W"]), "dY": npy(good()["dY"])}),
        "X ({dir}/case.npz:X): truncated: the header declares shape (4, 3) float64 (96 bytes of "
        "data) but the file holds 88",
        2,
    ),
    (
        "object array",
        lambda d: folder(d, W=np.array([[1, 2, 3], [4, 5, None]], dtype=object)),
        "W ({dir}/W.npy): dtype object holds Python objects (pickled data); lincheck never "
        "unpickles, save plain numbers",
        2,
    ),
    (
        "pickle payload",
        lambda d: folder(d, X=pickle_payload()),
        "X ({dir}/X.npy): dtype object holds Python objects (pickled data); lincheck never "
        "unpickles, save plain numbers",
        2,
    ),
    (
        "structured array",
        lambda d: folder(d, B=np.zeros(2, dtype=[("a", "<f8")])),
        "B ({dir}/B.npy): dtype [('a', '<f8')] is structured or void; expected a real float, "
        "integer or bool array",
        2,
    ),
    (
        "string array",
        lambda d: folder(d, X=np.array([["1", "2", "3"]] * 4)),
        "X ({dir}/X.npy): dtype <U1 is string; expected a real float, integer or bool array",
        2,
    ),
    (
        "complex array",
        lambda d: folder(d, W=good()["W"] + 0j),
        "W ({dir}/W.npy): dtype complex128 is complex; expected a real float, integer or bool "
        "array",
        2,
    ),
    (
        "datetime array",
        lambda d: folder(d, dY=np.zeros((4, 2), dtype="datetime64[s]")),
        "dY ({dir}/dY.npy): dtype datetime64[s] is datetime; expected a real float, integer or "
        "bool array",
        2,
    ),
    (
        "extended precision",
        lambda d: folder(d, X=np.ones((4, 3), dtype=np.longdouble)),
        "X ({dir}/X.npy): dtype float128 (extended precision) is not supported; save it as float64",
        2,
    ),
    (
        "0-d X",
        lambda d: folder(d, X=np.array(1.0)),
        "X ({dir}/X.npy): shape () does not fit W (2, 3): expected (..., 3), the last dimension "
        "equal to W's D_in",
        2,
    ),
    (
        "wrong rank W",
        lambda d: folder(d, W=np.ones(3)),
        "W ({dir}/W.npy): expected 2 dimensions (D_out, D_in), found shape (3,)",
        2,
    ),
    (
        "zero-size dimension",
        lambda d: folder(d, X=np.ones((0, 3)), dY=np.ones((0, 2))),
        "X ({dir}/X.npy): a dimension has size 0 (X (0, 3), W (2, 3)); there is nothing to check",
        2,
    ),
    (
        "X and W disagree",
        lambda d: folder(d, X=np.ones((4, 5))),
        "X ({dir}/X.npy): shape (4, 5) does not fit W (2, 3): expected (..., 3), the last "
        "dimension equal to W's D_in",
        2,
    ),
    (
        "X and dY disagree",
        lambda d: folder(d, dY=np.ones((5, 2))),
        "dY ({dir}/dY.npy): shape (5, 2) does not fit X (4, 3) and W (2, 3): expected (4, 2), X's "
        "leading dimensions then D_out",
        2,
    ),
    (
        "W and B disagree",
        lambda d: folder(d, B=np.ones(3)),
        "B ({dir}/B.npy): shape (3,) does not fit W (2, 3): expected (2,)",
        2,
    ),
    (
        "W and dY disagree",
        lambda d: folder(d, dY=np.ones((4, 5))),
        "dY ({dir}/dY.npy): shape (4, 5) does not fit X (4, 3) and W (2, 3): expected (4, 2), X's "
        "leading dimensions then D_out",
        2,
    ),
    (
        "leading dims of X and dY disagree",
        lambda d: folder(d, X=np.ones((2, 2, 3)), dY=np.ones((4, 2)), dW=None),
        "dY ({dir}/dY.npy): shape (4, 2) does not fit X (2, 2, 3) and W (2, 3): expected (2, 2, "
        "2), X's leading dimensions then D_out",
        2,
    ),
    (
        "NaN in an input",
        lambda d: folder(d, X=np.where(np.eye(4, 3) > 0, np.nan, 1.0)),
        "X ({dir}/X.npy): contains 3 NaN, first at [0, 0]",
        2,
    ),
    (
        "Inf in an input",
        lambda d: folder(d, W=np.array([[1.0, np.inf, 2], [3, 4, -np.inf]])),
        "W ({dir}/W.npy): contains 2 Inf, first at [0, 1]",
        2,
    ),
    (
        "products overflow",
        lambda d: folder(d, X=np.full((4, 3), 1e200), W=np.full((2, 3), 1e200)),
        "X ({dir}/X.npy), W ({dir}/W.npy), dY ({dir}/dY.npy): values too large: sums of products "
        "overflow float64 (largest representable 1.8e308); rescale the inputs",
        2,
    ),
    (
        "dB without B",
        lambda d: folder(d, B=None, dB=np.ones(2)),
        "dB ({dir}/dB.npy): a bias gradient is given but there is no bias B; supply B or leave dB "
        "out",
        2,
    ),
    (
        "two files for one name",
        lambda d: folder(d) and ((d / "x.npy").write_bytes(X_BYTES), [str(d)])[1],
        "X: two sources for one array: {dir}/X.npy and {dir}/x.npy",
        2,
    ),
    (
        "a folder and --x",
        lambda d: folder(d) + ["--x", str(d / "X.npy")],
        "X: two sources for one array: {dir}/X.npy and --x {dir}/X.npy",
        2,
    ),
    (
        "a folder named X.npy",
        lambda d: (folder(d, X=None), (d / "X.npy").mkdir(), [str(d)])[2],
        "X ({dir}/X.npy): not a regular file (a folder)",
        2,
    ),
    # Files that are not regular files are refused before they are opened: a FIFO would
    # block the open (or the read) forever, a device would read as endless data or none.
    (
        "a FIFO named X.npy",
        lambda d: node(d, "X.npy", "fifo", X=None) and [str(d)],
        "X ({dir}/X.npy): not a regular file (a FIFO)",
        2,
    ),
    (
        "a character device named X.npy",
        lambda d: node(d, "X.npy", "char", X=None) and [str(d)],
        "X ({dir}/X.npy): not a regular file (a character device)",
        2,
    ),
    (
        "a block device named W.npy",
        lambda d: node(d, "W.npy", "block", W=None) and [str(d)],
        "W ({dir}/W.npy): not a regular file (a block device)",
        2,
    ),
    (
        "a socket named dY.npy",
        lambda d: node(d, "dY.npy", "socket", dY=None) and [str(d)],
        "dY ({dir}/dY.npy): not a regular file (a socket)",
        2,
    ),
    (
        "a symlink to a FIFO",
        lambda d: (node(d, "pipe", "fifo", X=None), node(d, "X.npy", "pipe", X=None), [str(d)])[2],
        "X ({dir}/X.npy): not a regular file (a FIFO)",
        2,
    ),
    (
        "a symlink loop",
        lambda d: node(d, "X.npy", "loop", X=None) and [str(d)],
        "X ({dir}/X.npy): a symlink loop",
        2,
    ),
    (
        "a symlink to a missing file",
        lambda d: node(d, "X.npy", "gone.npy", X=None) and [str(d)],
        "X ({dir}/X.npy): a symlink to a missing file (gone.npy)",
        2,
    ),
    (
        "a FIFO named case.npz as PATH",
        lambda d: [str(node(d, "case.npz", "fifo"))],
        "{dir}/case.npz: not a regular file (a FIFO)",
        2,
    ),
    (
        "a device as PATH",
        lambda d: [str(node(d, "null", "char"))],
        "{dir}/null: not a regular file (a character device)",
        2,
    ),
    (
        "a symlink loop as PATH",
        lambda d: [str(node(d, "loop.npz", "loop"))],
        "{dir}/loop.npz: a symlink loop",
        2,
    ),
    (
        "a FIFO as --x FILE",
        lambda d: [str(d), "--x", str(node(d, "x.fifo", "fifo", X=None))],
        "X ({dir}/x.fifo): not a regular file (a FIFO)",
        2,
    ),
    # Headers NumPy parses but cannot make an array of.
    (
        "items of 0 bytes (<U0)",
        lambda d: folder(d, X=header("'<U0'", "(4, 3)")),
        "X ({dir}/X.npy): not a valid .npy file (its header declares dtype <U0, whose items "
        "have no bytes)",
        2,
    ),
    (
        "items of 0 bytes (|V0)",
        lambda d: folder(d, X=header("'|V0'", "(4, 3)")),
        "X ({dir}/X.npy): not a valid .npy file (its header declares dtype |V0, whose items "
        "have no bytes)",
        2,
    ),
    (
        "items of 0 bytes (|S0)",
        lambda d: folder(d, W=header("'|S0'", "(2, 3)")),
        "W ({dir}/W.npy): not a valid .npy file (its header declares dtype |S0, whose items "
        "have no bytes)",
        2,
    ),
    (
        "more dimensions than NumPy allows",
        lambda d: folder(d, X=header("'<f8'", "(" + "1, " * 70 + ")", bytes(8))),
        "X ({dir}/X.npy): not a valid .npy file (its header declares 70 dimensions; NumPy "
        "allows at most 64)",
        2,
    ),
    (
        "a dimension beyond NumPy's limit (2**70, 0)",
        lambda d: folder(d, X=header("'<f8'", f"({2**70}, 0)")),
        "X ({dir}/X.npy): not a valid .npy file (its header declares shape "
        "(1180591620717411303424, 0) float64, too large for NumPy)",
        2,
    ),
    (
        "a shape whose byte count overflows (2**62, 0, 4)",
        lambda d: folder(d, X=header("'<f8'", f"({2**62}, 0, 4)")),
        "X ({dir}/X.npy): not a valid .npy file (its header declares shape "
        "(4611686018427387904, 0, 4) float64, too large for NumPy)",
        2,
    ),
    (
        "a bool as a dimension",
        lambda d: folder(d, X=header("'<f8'", "(True, 5)", bytes(40))),
        "X ({dir}/X.npy): not a valid .npy file (its header declares shape (True, 5))",
        2,
    ),
    (
        "a subarray dtype",
        lambda d: folder(d, X=header("('<f8', (2,))", "(4, 3)", bytes(192))),
        "X ({dir}/X.npy): not a valid .npy file (its header declares the subarray dtype "
        "('<f8', (2,)))",
        2,
    ),
    # Archives whose declared sizes cannot be true are refused before anything is inflated.
    (
        "a bzip2 member (its ratio has no small bound: a bomb could not be told apart)",
        lambda d: bzip2_npz(d),
        "X ({dir}/case.npz:X): the archive member is compressed with bzip2; lincheck reads "
        "stored or deflated members (np.savez, np.savez_compressed)",
        2,
    ),
    (
        "a zip bomb (deflate beyond 1032:1)",
        lambda d: raw_zip(
            d / "case.npz", [("X.npy", 8, b"\x03\x00", 4_000_000_128, 2), *good_members()]
        ),
        "X ({dir}/case.npz:X): the archive member declares 4,000,000,128 bytes inflated from 2, "
        "beyond deflate's largest ratio (1032:1); refused unread (a corrupt archive or a zip "
        "bomb)",
        2,
    ),
    (
        "a stored member whose sizes disagree",
        lambda d: raw_zip(
            d / "case.npz", [("X.npy", 0, X_BYTES, 1_000_000, len(X_BYTES)), *good_members()]
        ),
        "X ({dir}/case.npz:X): the stored (uncompressed) archive member declares 1,000,000 "
        "bytes but holds 224; the archive is corrupt",
        2,
    ),
    (
        "a member larger than the archive",
        lambda d: raw_zip(
            d / "case.npz", [("X.npy", 8, b"\x03\x00", 4 * 10**9, 10**9), *good_members()]
        ),
        "X ({dir}/case.npz:X): the archive member declares 1,000,000,000 compressed bytes but "
        "the whole archive has 1,146; the archive is corrupt",
        2,
    ),
    # .safetensors: the header is checked whole before any data is read.
    (
        "safetensors: empty",
        lambda d: put(d, "case.safetensors"),
        "{dir}/case.safetensors: empty file",
        2,
    ),
    (
        "safetensors: shorter than its length",
        lambda d: put(d, "case.safetensors", b"\x01\x02"),
        "{dir}/case.safetensors: not a valid .safetensors file (it has 2 bytes, fewer than the 8 "
        "of its length)",
        2,
    ),
    (
        "safetensors: header length beyond the file",
        lambda d: st_case(d, length=10**6),
        "{dir}/case.safetensors: not a valid .safetensors file (its header length is 1,000,000 "
        "bytes but the file holds 562 after the length)",
        2,
    ),
    (
        "safetensors: header length over the limit",
        lambda d: st_case(d, length=2**40),
        "{dir}/case.safetensors: not a valid .safetensors file (its header length is "
        "1,099,511,627,776 bytes; lincheck reads headers up to 16,777,216)",
        2,
    ),
    (
        "safetensors: header not UTF-8",
        lambda d: st_case(d, header=b'{"\xff":1}'),
        "{dir}/case.safetensors: not a valid .safetensors file (its header is not UTF-8: byte 2)",
        2,
    ),
    (
        "safetensors: header not JSON",
        lambda d: st_case(d, header=b"{not json"),
        "{dir}/case.safetensors: not a valid .safetensors file (its header is not JSON: Expecting "
        "property name enclosed in double quotes)",
        2,
    ),
    (
        "safetensors: header a JSON array",
        lambda d: st_case(d, header=b"[1, 2]"),
        "{dir}/case.safetensors: not a valid .safetensors file (its header is an array, not a "
        "JSON object)",
        2,
    ),
    (
        "safetensors: a repeated key",
        lambda d: st_case(
            d, header=b'{"B":{"dtype":"F64","shape":[2],"data_offsets":[0,16]},"B":1}'
        ),
        "{dir}/case.safetensors: not a valid .safetensors file (its header repeats the key 'B')",
        2,
    ),
    (
        "safetensors: NaN in the header",
        lambda d: st_case(d, header=b'{"__metadata__":{"a":NaN}}'),
        "{dir}/case.safetensors: not a valid .safetensors file (its header holds NaN, which is "
        "not JSON)",
        2,
    ),
    (
        "safetensors: a tensor not an object",
        lambda d: st_case(d, lambda h: h.update(B=5)),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'B' is a number, not a "
        "JSON object)",
        2,
    ),
    (
        "safetensors: a field missing",
        lambda d: st_case(d, lambda h: h["X"].pop("dtype")),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'X' has no dtype)",
        2,
    ),
    (
        "safetensors: an unknown dtype",
        lambda d: st_case(d, lambda h: h["X"].update(dtype="F128")),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'X': dtype 'F128' is not "
        "a safetensors dtype)",
        2,
    ),
    (
        "safetensors: a complex array",
        lambda d: st_case(d, lambda h: h["X"].update(dtype="C64")),
        "X ({dir}/case.safetensors:X): dtype C64 (complex) is not supported; lincheck reads F64, "
        "F32, F16, BF16, F8_E4M3, F8_E5M2, I8..I64, U8..U64 and BOOL",
        2,
    ),
    (
        "safetensors: a dtype lincheck does not read (F8_E8M0)",
        lambda d: st_case(d, lambda h: h["W"].update(dtype="F8_E8M0", shape=[48])),
        "W ({dir}/case.safetensors:W): dtype F8_E8M0 is not supported; lincheck reads F64, F32, "
        "F16, BF16, F8_E4M3, F8_E5M2, I8..I64, U8..U64 and BOOL",
        2,
    ),
    (
        "safetensors: a negative dimension",
        lambda d: st_case(d, lambda h: h["X"].update(shape=[-4, 3])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'X': shape [-4, 3] is not "
        "a list of counts)",
        2,
    ),
    (
        "safetensors: a float dimension",
        lambda d: st_case(d, lambda h: h["X"].update(shape=[4.0, 3])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'X': shape [4.0, 3] is not "
        "a list of counts)",
        2,
    ),
    (
        "safetensors: a zero-size shape beyond NumPy's limit",
        lambda d: st_case(d, lambda h: h["B"].update(shape=[2**70, 0], data_offsets=[0, 0])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'B': shape "
        "[1180591620717411303424, 0] is too large for NumPy)",
        2,
    ),
    (
        "safetensors: offsets not two counts",
        lambda d: st_case(d, lambda h: h["B"].update(data_offsets=[0])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'B': data_offsets [0] are "
        "not two counts)",
        2,
    ),
    (
        "safetensors: offsets that end before they begin",
        lambda d: st_case(d, lambda h: h["B"].update(data_offsets=[16, 0])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'B': data_offsets [16, 0] "
        "end before they begin)",
        2,
    ),
    (
        "safetensors: a shape that does not fit its bytes",
        lambda d: st_case(d, lambda h: h["X"].update(shape=[4, 2])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensor 'X': shape [4, 2] F64 "
        "needs 64 bytes but data_offsets [64, 160] hold 96)",
        2,
    ),
    (
        "safetensors: a gap in the data",
        lambda d: st_case(d, lambda h: h.pop("B")),
        "{dir}/case.safetensors: not a valid .safetensors file (bytes [0, 16) of its data belong "
        "to no tensor; the tensors must cover the data without gaps)",
        2,
    ),
    (
        "safetensors: overlapping tensors",
        lambda d: st_case(d, lambda h: h["W"].update(data_offsets=[0, 48])),
        "{dir}/case.safetensors: not a valid .safetensors file (tensors 'B' [0, 16] and 'W' [0, "
        "48] overlap)",
        2,
    ),
    (
        "safetensors: bytes after the last tensor",
        lambda d: st_case(d, data=lambda b: b + bytes(8)),
        "{dir}/case.safetensors: not a valid .safetensors file (8 bytes after the last tensor's "
        "data belong to no tensor)",
        2,
    ),
    (
        "safetensors: truncated data",
        lambda d: st_case(d, data=lambda b: b[:-8]),
        "{dir}/case.safetensors: not a valid .safetensors file (truncated: its tensors need 272 "
        "bytes of data but the file holds 264)",
        2,
    ),
    (
        "safetensors: metadata not strings",
        lambda d: st_case(d, lambda h: h.update(__metadata__={"a": 1})),
        "{dir}/case.safetensors: not a valid .safetensors file (its __metadata__ is not an object "
        "of strings)",
        2,
    ),
    (
        "safetensors: a lincheck.precision that is no arithmetic",
        lambda d: st_case(d, lambda h: h.update(__metadata__={"lincheck.precision": "bf17"})),
        "{dir}/case.safetensors: its metadata's lincheck.precision 'bf17' is not an arithmetic: "
        "precision 'bf17': 'bf17' is neither a preset (fp64, fp32, tf32, bf16, fp16, fp16-acc16, "
        "fp8, fp8-blockwise) nor key=value with a key of x, w, dy, convert, scale, products, acc, "
        "out, bias, reduce",
        2,
    ),
    # Files lincheck does not read: what they look like, and the one line that converts them.
    (
        "a bfloat16 array saved with np.save",
        lambda d: folder(d, X=narrow_npy("bfloat16")),
        "X ({dir}/X.npy): dtype |V2 (raw bytes) is what np.save writes for a bfloat16 array"
        + NPY_ADVICE,
        2,
    ),
    (
        "an fp8 e4m3 array saved with np.save",
        lambda d: folder(d, W=narrow_npy("float8_e4m3fn")),
        "W ({dir}/W.npy): dtype |V1 (raw bytes) is what np.save writes for an fp8 "
        "(float8_e4m3fn) array" + NPY_ADVICE,
        2,
    ),
    (
        "an fp8 e5m2 array saved with np.save",
        lambda d: folder(d, dY=narrow_npy("float8_e5m2")),
        "dY ({dir}/dY.npy): dtype <f1 (raw bytes) is what np.save writes for an fp8 "
        "(float8_e5m2) array" + NPY_ADVICE,
        2,
    ),
    (
        "a PyTorch pickle",
        lambda d: put(d, "case.pt", b"PK\x03\x04 never opened"),
        "{dir}/case.pt: a PyTorch pickle (.pt); lincheck never unpickles. Save the tensors as "
        'safetensors instead: python -c "import torch; from safetensors.torch import save_file; '
        "save_file({{k: v.detach().contiguous().clone() for k, v in "
        "torch.load('{dir}/case.pt').items()}}, '{dir}/case.safetensors')\"",
        2,
    ),
    (
        "a CSV file",
        lambda d: put(d, "X.csv", b"1,2,3\n"),
        "{dir}/X.csv: a text file (.csv); lincheck reads binary arrays. Save each as .npy in one "
        "folder: python -c \"import numpy as np; np.save('{dir}/X.npy', np.loadtxt('{dir}/X.csv', "
        "delimiter=',', ndmin=2))\"",
        2,
    ),
    (
        "another kind of file",
        lambda d: put(d, "case.h5", b"HDF"),
        "{dir}/case.h5: expected a folder of .npy files, an .npz or a .safetensors file",
        2,
    ),
    (
        "a case file as --x FILE",
        lambda d: folder(d, X=None) + ["--x", str(st_case(d)[0])],
        "X ({dir}/case.safetensors): holds a whole case: give it as PATH",
        2,
    ),
]


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e[0] for e in CATALOGUE])
def test_catalogue(tmp_path, monkeypatch, entry):
    name, setup, message, code = entry
    d = tmp_path / "dump"
    monkeypatch.setenv("LINCHECK_PROOF", str(tmp_path / "pwned"))
    argv = setup(d)
    result = runner.invoke(app, ["verify", *argv])
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr == f"lincheck: error: {message.format(dir=d)}\n"
    assert not (tmp_path / "pwned").exists()  # no pickle ever ran


def test_unreadable_permissions(tmp_path, monkeypatch):
    """As root every file is readable; a denied open stands in for chmod 000."""
    from lincheck import arrays

    folder(tmp_path / "dump")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(arrays, "open", denied, raising=False)
    result = runner.invoke(app, ["verify", str(tmp_path / "dump")])
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"lincheck: error: B ({tmp_path}/dump/B.npy): cannot read: Permission denied\n"
    )


@pytest.mark.parametrize(
    "array",
    [np.asfortranarray(good()["X"]), good()["X"].astype(">f8"), good()["X"].astype(">f4")],
    ids=["Fortran order", "big-endian float64", "big-endian float32"],
)
def test_valid_layouts_are_checked(tmp_path, array):
    d = tmp_path / "dump"
    folder(d, X=array, dW=good()["dY"].T @ np.asarray(array, dtype=np.float64))
    result = runner.invoke(app, ["verify", str(d)])
    assert result.exit_code == 0, result.output


def test_unknown_files_are_ignored_and_listed_with_verbose(tmp_path):
    d = tmp_path / "dump"
    folder(d)
    (d / "notes.txt").write_text("hello")
    np.save(d / "activations.npy", np.ones(3))
    assert runner.invoke(app, ["verify", str(d)]).exit_code == 0
    verbose = runner.invoke(app, ["verify", str(d), "--verbose"])
    assert verbose.exit_code == 0
    text = "".join(verbose.stdout.split())  # long paths wrap anywhere
    assert f"ignored:{d}/activations.npy,{d}/notes.txt" in text


def test_the_docs_list_every_message():
    text = " ".join(DOC.read_text().replace("\\|", "|").split())  # \| is | in a table
    for name, _, message, _code in CATALOGUE:
        assert " ".join(message.format(dir="DIR").split()) in text, name


@pytest.mark.parametrize("mode", ["full", "directions", "sample"])
@pytest.mark.parametrize("shape", [(32, 128, 64), (1024, 64, 32), (10000, 32, 16)], ids=str)
def test_memory_estimate_bounds_what_the_check_allocates(mode, shape, monkeypatch):
    """Blocks cut to 1 MiB, so these small shapes take many blocks, as large ones do."""
    import tracemalloc

    from lincheck import check, streaming, workspace

    monkeypatch.setattr(workspace, "BLOCK_BYTES", 2**20)
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 2**20)
    from lincheck.checks import analytic_gradients, memory_needed, random_inputs

    data = random_inputs(np.random.default_rng(0), *shape, "float32")
    grads = analytic_gradients(data)
    tracemalloc.start()
    try:
        check(data["X"], data["W"], data["B"], data["dY"], **grads, mode=mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shapes = {name: a.shape for name, a in {**data, **grads}.items()}
    assert peak <= memory_needed(shapes, mode)


def test_max_memory_refuses_and_large_checks_say_what_they_need(tmp_path, monkeypatch):
    from lincheck import checks

    folder(tmp_path / "dump")
    result = runner.invoke(app, ["verify", str(tmp_path / "dump"), "--max-memory", "1M"])
    assert result.exit_code == 2
    assert result.stderr == (
        "lincheck: error: this check needs about 64 MiB of memory beyond its inputs, over "
        "1 MiB (--max-memory); free memory or raise --max-memory\n"
    )
    bad = runner.invoke(app, ["verify", str(tmp_path / "dump"), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "expected a size like 4G, 512M" in bad.stderr
    monkeypatch.setattr(checks, "memory_needed", lambda shapes, *how: 3 * 2**30)
    big = runner.invoke(app, ["verify", str(tmp_path / "dump"), "--max-memory", "8G"])
    assert big.exit_code == 0
    assert big.stderr == "lincheck: this check needs about 3.0 GiB of memory beyond its inputs\n"


def test_large_files_fit_the_memory_limit_in_the_partial_modes(tmp_path, monkeypatch):
    """Files over MEMMAP_BYTES are read as used; directions stream them, a full check must refuse.

    The thresholds are cut by 16 (4 MiB files, 8 MiB blocks), so a 7 MiB X stands for a
    file over the default 64 MiB at a sixteenth of the time.
    """
    from lincheck import arrays, streaming, workspace

    monkeypatch.setattr(arrays, "MEMMAP_BYTES", 4 * 2**20)
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 8 * 2**20)
    monkeypatch.setattr(workspace, "BLOCK_BYTES", 2 * 2**20)
    rng = np.random.default_rng(0)
    N, D_in, D_out = 20_000, 96, 16
    d = tmp_path / "dump"
    d.mkdir()
    X = np.lib.format.open_memmap(d / "X.npy", mode="w+", dtype=np.float32, shape=(N, D_in))
    X[:] = rng.standard_normal((N, D_in), dtype=np.float32)
    X.flush()
    np.save(d / "W.npy", rng.standard_normal((D_out, D_in), dtype=np.float32))
    np.save(d / "dY.npy", rng.standard_normal((N, D_out), dtype=np.float32))
    del X
    assert (d / "X.npy").stat().st_size > arrays.MEMMAP_BYTES
    full = runner.invoke(app, ["verify", str(d), "--max-memory", "10M"])
    assert full.exit_code == 2, full.output
    assert "over 10 MiB (--max-memory)" in full.stderr
    streamed = runner.invoke(app, ["verify", str(d), "--max-memory", "10M", "--mode", "directions"])
    assert streamed.exit_code == 0, streamed.output
    assert "directions" in streamed.stdout


def test_a_fifo_among_several_cases_is_bad_input_not_a_hang(tmp_path):
    """verify DIR --jobs 2, where DIR holds cases and a FIFO named like one."""
    from lincheck import arrays

    d = tmp_path / "model"
    d.mkdir()
    folder(d / "a")
    folder(d / "b")
    os.mkfifo(d / "c.npz")
    assert arrays.cases(d) == [d / "a", d / "b", d / "c.npz"]  # listed, never opened
    result = runner.invoke(app, ["verify", str(d), "--jobs", "2"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # the table wraps the message
    assert "regular file (a FIFO)" in text and "1 of 3 cases had bad input" in text


def test_narrow_types_lincheck_does_not_read_are_named():
    """ml_dtypes' other types were called "structured or void"."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    X = np.ones((4, 3), dtype=ml_dtypes.float8_e4m3fnuz)
    with pytest.raises(
        lincheck.InputError, match="float8_e4m3fnuz is not supported; lincheck reads bfloat16"
    ):
        lincheck.check(X, np.ones((2, 3)), None, np.ones((4, 2)))


def test_a_transposed_W_is_named_even_when_B_does_not_fit_it(rng):
    """W saved as (D_in, D_out) with a B that fits neither layout: the X line names W's
    other dimension as the likely culprit; an X that fits neither dimension does not."""
    from lincheck import InputError, check

    X, W, G = rng.standard_normal((8, 5)), rng.standard_normal((3, 5)), rng.standard_normal((8, 3))
    with pytest.raises(InputError, match=r"W's other dimension: was W saved transposed\?$"):
        check(X, W.T, np.ones(4), G)
    with pytest.raises(InputError) as caught:
        check(np.ones((8, 7)), W, np.ones(4), G)
    assert "transposed" not in str(caught.value)
