"""Reading ``.npy`` / ``.npz`` arrays safely: one half of the file layer (:mod:`lincheck.writing`
is the other; no other module touches files).

Only regular files are opened. A path is ``stat``-ed first (a FIFO, a device,
a socket or a folder named ``X.npy`` is refused by what it is, a symlink loop
as such), then opened with ``O_NONBLOCK`` and ``fstat``-ed again, so a FIFO
swapped in between can neither hang the open nor be read.

Loading never unpickles: the ``.npy`` header is parsed first (NumPy's
``read_magic`` and ``read_array_header_*``, which evaluate only literals),
object dtypes are refused before any data is read, a header that declares
more data than the file holds (or a shape NumPy cannot index) is refused
without allocating it, and the data is read as raw bytes.

Arrays with more than ``MEMMAP_BYTES`` of data are not read whole and not
memory-mapped: they are :class:`FileArray` objects, read with ``os.pread``
as the check slices them (a block of rows at a time in the partial modes;
whole, once, in full mode). A memory map of a file that another program
truncates (``np.save`` rewriting it in place) kills the reader with SIGBUS
at the next page it touches, with no message; a ``pread`` instead returns
short, and every read is followed by an ``fstat``, so a file that shrank,
grew or was rewritten while being checked is reported in one line
(``InputError``: "the file changed while being checked"), exit 2. A stored
(uncompressed) ``.npz`` member is read the same way, by its offset in the
archive; a deflated one is inflated into memory, after its declared sizes
are checked against deflate's largest ratio (1032:1) and the archive's size,
so a zip bomb is refused before anything is inflated.

"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
import weakref
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npy_format

from . import safetensors_format as st
from .core import FileBacked
from .errors import InputError
from .tensors import INPUT_NAMES, SCALE_NAMES, SUBJECT_NAMES

ARRAY_NAMES = INPUT_NAMES + SUBJECT_NAMES + SCALE_NAMES
_BY_LOWER = {name.lower(): name for name in ARRAY_NAMES}
REQUIRED = ("X", "W", "dY")


@dataclass(frozen=True)
class Loaded:
    """Arrays found at a path, by canonical name (X, W, B, dY, dX, dW, dB, Y).

    ``arrays`` holds ndarrays, and :class:`FileArray` for large files;
    ``sources`` maps each name to the file (or ``file.npz:key``,
    ``file.safetensors:key``) it came from; ``ignored`` lists files or keys
    that name no array lincheck knows; ``metadata`` is a ``.safetensors``
    header's ``__metadata__`` (empty for ``.npy`` and ``.npz``), where a
    capture tool may record ``lincheck.precision`` (the arithmetic, a
    ``--precision`` spec) and ``lincheck.module``.
    """

    arrays: Mapping[str, np.ndarray | FileArray]
    sources: Mapping[str, str]
    ignored: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)


def load(
    path: str | os.PathLike | None, files: Mapping[str, str | os.PathLike] | None = None
) -> Loaded:
    """Load a folder of ``.npy`` files, one ``.npz`` or one ``.safetensors`` file, plus single
    files by name.

    Names are file stems, ``.npz`` or ``.safetensors`` keys, case-insensitive. X, W and dY are
    required; B, dX, dW, dB and Y are optional. ``files`` maps array names
    to ``.npy`` files given one by one (``--x FILE`` and the like); ``path``
    may then be None.

    Raises
    ------
    InputError
        The path is missing or of the wrong kind, a required array is
        missing, two files name one array, or a file is not a readable,
        complete ``.npy`` array of plain numbers.
    """
    if path is None:
        loaded = Loaded({}, {}, ())
    elif is_url(path):
        loaded = _load_url(str(path))
    else:
        path = Path(path)
        mode = _stat(path, str(path), missing="no such file or folder").st_mode
        if stat.S_ISDIR(mode):
            loaded = _load_folder(path)
        elif not stat.S_ISREG(mode):
            raise InputError(f"{path}: not a regular file ({kind_of(mode)})")
        elif path.suffix.lower() == ".npz":
            loaded = _load_npz(path)
        elif path.suffix.lower() == SAFETENSORS:
            loaded = _load_safetensors(path)
        else:
            raise InputError(f"{path}: {_unreadable(path)}")
    if files:
        arrays, sources = dict(loaded.arrays), dict(loaded.sources)
        for name, file in files.items():
            name = _canonical(name) or name
            _claim(sources, name, f"--{name.lower()} {file}")
            arrays[name] = _read_file(name, Path(file))
            sources[name] = str(file)
        loaded = Loaded(arrays, sources, loaded.ignored, loaded.metadata)
    missing = [name for name in REQUIRED if name not in loaded.arrays]
    if missing:
        where = path if path is not None else "the files given"
        found = ", ".join(sorted(loaded.arrays)) or "no known array"
        needs = f"needs X, W and dY; found {found}"
        instead = _found_instead(Path(path), loaded.ignored) if path is not None else ""
        raise InputError(f"{where}: missing {', '.join(missing)} ({needs}){instead}")
    return loaded


def cases(path: str | os.PathLike) -> list[Path | str]:
    """The dumps a path stands for: itself, or each case inside it.

    A folder that holds no array of its own but holds folders, ``.npz`` or
    ``.safetensors`` files (one per layer of a model, say) stands for each of
    those, sorted.
    Nothing is opened here (a FIFO named ``case.npz`` is a case that
    :func:`load` then refuses), and nothing raises: a path that cannot be
    listed is one case, for :func:`load` to report.
    """
    if is_url(path):
        return _url_cases(str(path))
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return [path]
        entries = sorted(path.iterdir())
    except (OSError, ValueError):
        return [path]
    own = [e for e in entries if e.suffix.lower() == ".npy" and _canonical(e.stem)]
    inner = [e for e in entries if e.suffix.lower() in (".npz", SAFETENSORS) or is_dir(e)]
    return list(inner) if inner and not own else [path]


SAFETENSORS = ".safetensors"


def not_a_case(path: str | os.PathLike) -> str | None:
    """Why a PATH given to ``verify`` is no case at all (a file of another kind: one
    array's ``.npy``, a text or pickle file), as :func:`load` would say it; None for a
    folder, an ``.npz`` or ``.safetensors`` file, a URL, or a path :func:`load` is left to
    report (missing, unreadable, not a regular file)."""
    if is_url(path):
        return None
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None
    if not regular or path.suffix.lower() in (".npz", SAFETENSORS):
        return None
    return f"{path}: {_unreadable(path)}"


PICKLES = (".pt", ".pth", ".bin", ".ckpt")
"""Suffixes of PyTorch's pickled files: refused by name, never opened."""

TEXTS = (".csv", ".txt", ".tsv")


def _ndim(name: str) -> int:
    """The dimensions a text file's array needs: 1 for B and dB, 2 for the others (loadtxt
    drops a dimension of length one: a W of one row would come back 1-D)."""
    return 1 if name in ("B", "dB") else 2


def _unreadable(path: Path) -> str:
    """Why lincheck does not read ``path`` (a file of another kind), and how to convert it."""
    suffix = path.suffix.lower()
    if suffix in PICKLES:
        src = _plain(path, "case.pt")
        dst = _plain(path.with_suffix(SAFETENSORS), "case.safetensors")
        return (
            f"a PyTorch pickle ({suffix}); lincheck never unpickles. Save the tensors as "
            'safetensors instead: python -c "import torch; from safetensors.torch import '
            "save_file; save_file({k: v.detach().contiguous().clone() for k, v in "
            f"torch.load('{src}').items()}}, '{dst}')\""
        )
    if suffix in TEXTS:
        name = _canonical(path.stem) or "X"
        src = _plain(path, f"{name}.csv")
        dst = _plain(path.with_name(f"{name}.npy"), f"{name}.npy")
        delimiter = ", delimiter=','" if suffix == ".csv" else ""
        delimiter = ", delimiter='\\t'" if suffix == ".tsv" else delimiter
        return (
            f"a text file ({suffix}); lincheck reads binary arrays. Save each as .npy in one "
            f"folder: python -c \"import numpy as np; np.save('{dst}', "
            f"np.loadtxt('{src}'{delimiter}, ndmin={_ndim(name)}))\""
        )
    if suffix == ".npy":
        return (
            "expected a folder of .npy files, an .npz or a .safetensors file (give the folder; "
            f"verify also takes the file as --{(_canonical(path.stem) or 'x').lower()} FILE)"
        )
    return "expected a folder of .npy files, an .npz or a .safetensors file"


LISTED = 6
"""Files a "missing" line names of those lincheck did not read (then how many more)."""


def _found_instead(folder: Path, ignored: tuple[str, ...]) -> str:
    """What a folder without X, W or dY holds instead, and, for PyTorch pickles or text
    files named after the arrays (``X.pt``, ``W.csv``...), the one line converting them."""
    if not ignored or not is_dir(folder):
        return ""
    files = [Path(p) for p in ignored]
    names = ", ".join(p.name for p in files[:LISTED])
    more = f" and {len(files) - LISTED} more" if len(files) > LISTED else ""
    text = f"; the folder holds {names}{more}, which lincheck does not read"
    kinds = {p.suffix.lower() for p in files}
    named = {_canonical(p.stem): p for p in files if _canonical(p.stem)}
    if kinds <= set(PICKLES) and named:
        items = ", ".join(f"'{n}': '{_plain(p, f'{n}.pt')}'" for n, p in named.items())
        dst = _plain(folder.with_name(folder.name + SAFETENSORS), "case.safetensors")
        return (
            f"{text}: PyTorch pickles, never unpickled. Save the tensors as one .safetensors "
            'case: python -c "import torch; from safetensors.torch import save_file; '
            "save_file({n: torch.load(p).detach().contiguous().clone() for n, p in "
            f"{{{items}}}.items()}}, '{dst}')\" and verify {dst}"
        )
    if len(kinds) == 1 and kinds <= set(TEXTS) and named:
        suffix = kinds.pop()
        delimiter = {".csv": ", delimiter=','", ".tsv": ", delimiter='\\t'"}.get(suffix, "")
        items = ", ".join(f"'{n}': '{_plain(p, f'{n}{suffix}')}'" for n, p in named.items())
        dst = _plain(folder, "case")
        return (
            f'{text}: text files. Save each as .npy in the folder: python -c "import numpy as '
            f"np; [np.save(f'{dst}/{{n}}.npy', np.loadtxt(p{delimiter}, ndmin=1 + (n[-1] != "
            "'B'))) for n, p in "
            f'{{{items}}}.items()]"'
        )
    if kinds & set(PICKLES) or kinds & set(TEXTS):
        first = next(p for p in files if p.suffix.lower() in (*PICKLES, *TEXTS))
        return f"{text}; {first.name} is {_unreadable(first)}"
    return text


def _plain(path: Path, fallback: str) -> str:
    """``path`` if it can be pasted into a single-quoted Python string in a double-quoted
    shell word as it is, else ``fallback``."""
    text = str(path)
    ok = text and all(c.isalnum() or c in "._-/+=,@:" for c in text)
    return text if ok else fallback


def is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _canonical(stem: str) -> str | None:
    return _BY_LOWER.get(stem.lower())


def _claim(found: dict[str, str], name: str, source: str) -> None:
    if name in found:
        raise InputError(f"{name}: two sources for one array: {found[name]} and {source}")
    found[name] = source


def _load_folder(folder: Path) -> Loaded:
    files: dict[str, str] = {}
    ignored = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder: {exc.strerror or exc}") from None
    for entry in entries:
        name = _canonical(entry.stem) if entry.suffix.lower() == ".npy" else None
        if name is None:
            ignored.append(str(entry))
        else:
            _claim(files, name, str(entry))
    arrays = {name: _read_file(name, Path(source)) for name, source in files.items()}
    return Loaded(arrays, files, tuple(ignored))


# ---------------------------------------------------------------------------
# Opening regular files only


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
)


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, in words ("a FIFO")."""
    return next((what for test, what in _KINDS if test(mode)), "not a file lincheck can read")


def _stat(path: Path, label: str, missing: str = "no such file") -> os.stat_result:
    """``os.stat(path)`` (following symlinks), or InputError saying why there is nothing."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(
                f"{label}: a symlink to a missing file ({os.readlink(path)})"
            ) from None
        raise InputError(f"{label}: {missing}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{label}: a symlink loop") from None
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # an embedded NUL byte
        raise InputError(f"{label}: cannot read: {exc}") from None


def _open_regular(path: Path, label: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file.

    ``stat`` first, so that nothing else is ever opened (opening a device can
    have effects, opening a FIFO blocks); then ``open`` with ``O_NONBLOCK`` and
    ``fstat`` again, in case a FIFO or a device took the file's place between
    the two (O_NONBLOCK has no effect on a regular file's reads).
    """
    mode = _stat(path, label).st_mode
    if not stat.S_ISREG(mode):
        raise InputError(f"{label}: not a regular file ({kind_of(mode)})")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{label}: a symlink loop") from None
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{label}: not a regular file ({kind_of(mode)})")
    return fd


READ_INPUTS: dict[tuple[int, int], tuple[int, int]] = {}
"""Files read as inputs in this process: (st_dev, st_ino) → (st_size, st_mtime_ns). The
writers refuse to replace them (a recycled inode of a deleted input has other times)."""


class _SharedFile:
    """An open regular file read with ``pread``; every read confirms it has not changed.

    The descriptor is closed when the last array reading from it is
    garbage-collected. A read that comes back short, or an ``fstat`` after a
    read that shows another size or modification time than at opening, is
    InputError: the file changed while being checked.
    """

    def __init__(self, fd: int):
        self.fd = fd
        st = os.fstat(fd)
        self.stamp = (st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        READ_INPUTS[(st.st_dev, st.st_ino)] = self.stamp
        self._close = weakref.finalize(self, os.close, fd)

    def stream(self) -> IO[bytes]:
        """The file as a stream from its start (the descriptor stays open)."""
        return open(self.fd, "rb", closefd=False)

    def read(self, offset: int, nbytes: int, label: str) -> np.ndarray:
        """``nbytes`` bytes at ``offset``, as a uint8 array."""
        out = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(out)  # type: ignore[arg-type]  # an ndarray is a buffer
        done = 0
        while done < nbytes:
            got = _pread_into(self.fd, view[done : done + _READ_BYTES], offset + done)
            if got == 0:
                break
            done += got
        self.confirm(label, done < nbytes)
        return out

    def confirm(self, label: str, short: bool = False) -> None:
        st = os.fstat(self.fd)
        if short or (st.st_size, st.st_mtime_ns) != self.stamp:
            what = (
                f"it had {self.stamp[0]:,} bytes, now {st.st_size:,}"
                if st.st_size != self.stamp[0]
                else "it was rewritten"
            )
            raise InputError(
                f"{label}: the file changed while being checked ({what}); "
                "check it again once it is written"
            )


_READ_BYTES = 16 * 2**20
"""Bytes per read call: large enough to cost nothing, small enough to stay responsive."""


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


class FileArray(FileBacked):
    """A read-only array in a file, read with ``os.pread`` as it is used.

    Offers what the checks use of an ndarray: ``shape``, ``dtype``,
    ``ndim``, ``size``, ``reshape`` (C order: a new view of the same file),
    slices along the first axis (``a[i:j]`` reads just those rows and returns
    an ndarray), and ``np.asarray(a)``, which reads the whole array. Any
    other index reads the whole array first. Each read confirms the file
    has not changed since it was opened (:class:`_SharedFile`).

    Parameters
    ----------
    file : _SharedFile
    offset : int
        Where the data starts in the file.
    shape, dtype, fortran
        As the ``.npy`` header declares them.
    label : str
        "X (path)", for messages.
    """

    def __init__(self, file: _SharedFile, offset: int, shape, dtype, fortran: bool, label: str):
        self._file, self._offset, self._label = file, offset, label
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        # Fortran order matters only with two or more dimensions longer than 1.
        self._fortran = fortran and sum(d > 1 for d in self.shape) > 1

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FileArray({self._label}, shape={self.shape}, dtype={self.dtype})"

    def reshape(self, *shape) -> FileArray | np.ndarray:
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        if -1 in shape:
            known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
            shape = tuple(self.size // max(known, 1) if d == -1 else d for d in shape)
        if tuple(shape) == self.shape:
            return self
        if self._fortran:  # not a view in C index order: read it
            return np.asarray(self).reshape(shape)
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape {shape}")
        return FileArray(self._file, self._offset, shape, self.dtype, False, self._label)

    @property
    def T(self) -> FileArray | np.ndarray:
        """The transpose: for 2-D, the same bytes in the other index order (nothing read; a
        C-order array becomes a Fortran-order one, whose row slices read column by column)."""
        if self.ndim != 2:
            return np.asarray(self).T
        shape = self.shape[::-1]
        return FileArray(
            self._file, self._offset, shape, self.dtype, not self._fortran, self._label
        )

    def __getitem__(self, index):
        if isinstance(index, tuple) and len(index) == 1:
            index = index[0]
        if not isinstance(index, slice) or not self.shape or self._fortran and self.ndim != 2:
            return np.asarray(self)[index]
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            return np.asarray(self)[index]
        n = max(stop - start, 0)
        rest = self.shape[1:]
        item = self.dtype.itemsize
        if self._fortran:  # (N, D) stored by columns: one read per column
            out = np.empty((n, rest[0]), dtype=self.dtype, order="F")
            col = n * item
            flat = out.reshape(-1, order="F").view(np.uint8)
            for j in range(rest[0] if n else 0):
                at = self._offset + (j * self.shape[0] + start) * item
                flat[j * col : (j + 1) * col] = self._file.read(at, col, self._label)
        else:
            row = int(np.prod(rest, dtype=np.int64)) * item
            raw = self._file.read(self._offset + start * row, n * row, self._label)
            out = raw.view(self.dtype).reshape((n, *rest))
        out.flags.writeable = False
        return out

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError(f"{self!r} is read from its file: it cannot be used without a copy")
        raw = self._file.read(self._offset, self.nbytes, self._label)
        a = raw.view(self.dtype).reshape(self.shape, order="F" if self._fortran else "C")
        return a if dtype is None else a.astype(dtype, copy=False)

    def __reduce__(self):
        return (np.asarray, (np.asarray(self),))  # another process gets the values


# ---------------------------------------------------------------------------
# .safetensors


def _load_safetensors(path: Path | str, shared: _SharedFile | None = None) -> Loaded:
    """One ``.safetensors`` file: its header checked whole (:mod:`lincheck.safetensors_format`)
    before any data is read; arrays over ``MEMMAP_BYTES`` read as used (:class:`FileArray`).
    ``shared``: the file's bytes already read (from a URL)."""
    where = str(path)
    shared = shared or _SharedFile(_open_regular(Path(path), where))
    lead = shared.read(0, min(st.N_LEN, shared.size), where).tobytes()
    n = st.header_length(lead, shared.size, where)
    header = shared.read(st.N_LEN, n, where).tobytes()
    data_start = st.N_LEN + n
    entries, metadata = st.parse_header(header, shared.size - data_start, where)
    sources: dict[str, str] = {}
    wanted = []
    ignored = []
    for entry in sorted(entries, key=lambda e: e.name):
        name = _canonical(entry.name)
        if name is None:
            ignored.append(f"{path}:{entry.name}")
            continue
        _claim(sources, name, f"{path}:{entry.name}")
        wanted.append((name, entry))
    arrays: dict[str, np.ndarray | FileArray] = {}
    for name, entry in wanted:
        label = f"{name} ({sources[name]})"
        dtype = st.numpy_dtype(entry.dtype, label)
        offset, nbytes = data_start + entry.begin, entry.end - entry.begin
        if nbytes > MEMMAP_BYTES:
            arrays[name] = FileArray(shared, offset, entry.shape, dtype, False, label)
        else:
            array = shared.read(offset, nbytes, label).view(dtype).reshape(entry.shape)
            array.flags.writeable = False
            arrays[name] = array
    return Loaded(arrays, sources, tuple(ignored), dict(metadata))


def arithmetic_source(precision: str | None, loaded: Loaded) -> dict | None:
    """Where a case's arithmetic came from, when not from the gradients' dtypes: the
    ``precision`` given (``--precision``), or the metadata (``lincheck.precision``) of a
    ``.safetensors`` dump; None otherwise."""
    if precision is not None:
        return {"precision": precision, "from": "--precision"}
    stored = loaded.metadata.get("lincheck.precision")
    if stored is not None:
        return {"precision": stored, "from": "metadata"}
    return None


def stored_precision(loaded: Loaded, where: str | os.PathLike) -> str | None:
    """The arithmetic a dump's metadata declares (``lincheck.precision``), checked; or None.

    Raises
    ------
    InputError
        ``{where}: its metadata's lincheck.precision ...`` is not a spec
        :func:`lincheck.precision.parse` understands.
    """
    spec = loaded.metadata.get("lincheck.precision")
    if spec is None:
        return None
    from .precision import parse

    try:
        parse(spec)
    except ValueError as exc:
        raise InputError(
            f"{where}: its metadata's lincheck.precision {spec!r} is not an arithmetic: {exc}"
        ) from None
    return spec


# ---------------------------------------------------------------------------
# .npy and .npz


def _read_file(name: str, path: Path) -> np.ndarray | FileArray:
    """One ``.npy`` file, read (or, if large, read as used); errors name the array and file."""
    label = f"{name} ({path})"
    suffix = path.suffix.lower()
    if suffix in (".npz", SAFETENSORS, *PICKLES, *TEXTS):
        _stat(path, label)  # a missing file is missing, whatever its name
        case = suffix in (".npz", SAFETENSORS)
        raise InputError(
            f"{label}: {'holds a whole case: give it as PATH' if case else _unreadable(path)}"
        )
    shared = _SharedFile(_open_regular(path, label))
    try:
        with open(shared.fd, "rb", closefd=False) as fp:
            return _read_npy(fp, shared.size, label, (shared, 0))
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None


DEFLATE_RATIO = 1032
"""Deflate's largest expansion: a 258-byte match costs at least 2 bits."""


def _load_npz(path: Path | str, shared: _SharedFile | None = None) -> Loaded:
    shared = shared or _SharedFile(_open_regular(Path(path), str(path)))
    with shared.stream() as raw:
        try:
            archive = zipfile.ZipFile(raw)
        except Exception as exc:  # BadZipFile, an unsupported zip version or feature, ...
            raise InputError(
                f"{path}: not a readable .npz (zip) file: {_first_line(exc)}"
            ) from None
        with archive:
            members: dict[str, zipfile.ZipInfo] = {}
            sources: dict[str, str] = {}
            ignored = []
            for info in archive.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                name = _canonical(key)
                if name is None or not info.filename.endswith(".npy"):
                    ignored.append(f"{path}:{info.filename}")
                    continue
                _claim(sources, name, f"{path}:{key}")
                members[name] = info
            for name, info in members.items():  # every member, before inflating any
                _check_member_sizes(info, shared.size, f"{name} ({sources[name]})")
            arrays = {}
            for name, info in members.items():
                label = f"{name} ({sources[name]})"
                try:
                    with archive.open(info) as fp:
                        backing = None
                        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
                            backing = (shared, _member_data_offset(shared, info, label))
                        arrays[name] = _read_npy(fp, info.file_size, label, backing)
                except InputError:
                    raise
                except Exception as exc:  # a corrupt member: bad CRC, compression, zip features
                    raise InputError(
                        f"{label}: corrupt archive member: {_first_line(exc)}"
                    ) from None
    return Loaded(arrays, sources, tuple(ignored))


_COMPRESSION = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def _check_member_sizes(info: zipfile.ZipInfo, archive_size: int, label: str) -> None:
    """Refuse, before inflating anything, sizes no archive of this size can hold."""
    packed, size = info.compress_size, info.file_size
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # bzip2 and LZMA have no small bound on their ratio (a few KB can inflate to GB);
        # NumPy writes stored (np.savez) or deflated (np.savez_compressed) members only.
        method = _COMPRESSION.get(info.compress_type, f"method {info.compress_type}")
        raise InputError(
            f"{label}: the archive member is compressed with {method}; lincheck reads "
            "stored or deflated members (np.savez, np.savez_compressed)"
        )
    if packed > archive_size:
        raise InputError(
            f"{label}: the archive member declares {packed:,} compressed bytes but the "
            f"whole archive has {archive_size:,}; the archive is corrupt"
        )
    if info.compress_type == zipfile.ZIP_STORED and size != packed:
        raise InputError(
            f"{label}: the stored (uncompressed) archive member declares {size:,} bytes "
            f"but holds {packed:,}; the archive is corrupt"
        )
    if info.compress_type == zipfile.ZIP_DEFLATED and size > DEFLATE_RATIO * packed:
        raise InputError(
            f"{label}: the archive member declares {size:,} bytes inflated from {packed:,}, "
            f"beyond deflate's largest ratio ({DEFLATE_RATIO}:1); refused unread "
            "(a corrupt archive or a zip bomb)"
        )


def _member_data_offset(shared: _SharedFile, info: zipfile.ZipInfo, label: str) -> int:
    """Where a member's data starts in the archive: after its local header (30 bytes,
    then its name and extra field, whose lengths the local header gives)."""
    local = shared.read(info.header_offset, 30, label).tobytes()
    if local[:4] != b"PK\x03\x04":
        raise InputError(f"{label}: corrupt archive member: bad local file header")
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


MEMMAP_BYTES = 64 * 2**20
"""Data of a ``.npy`` file (or stored ``.npz`` member) beyond this size is not read whole
but read as used (:class:`FileArray`). The name predates that: such files were once
memory-mapped."""

MAX_BYTES = np.iinfo(np.intp).max
"""NumPy's largest array, in bytes (also the largest dimension)."""


def _read_npy(
    fp: IO[bytes],
    size: int,
    label: str,
    backing: tuple[_SharedFile, int] | None = None,
) -> np.ndarray | FileArray:
    """Read one ``.npy`` stream of ``size`` bytes without unpickling or over-allocating.

    ``backing`` is the open file the stream reads and the offset in it of the
    stream's first byte: given, an array with more than ``MEMMAP_BYTES`` of
    data is returned as a :class:`FileArray` reading that file.
    """
    if size == 0:
        raise InputError(f"{label}: empty file")
    start = fp.tell()
    lead = fp.read(12)
    if lead[:6] != npy_format.MAGIC_PREFIX:
        raise InputError(f"{label}: not a .npy file (it does not start with \\x93NUMPY)")
    # Magic (6 bytes), version (2), header length (2 bytes in version 1, 4 after), header.
    width = 2 if lead[6:7] == b"\x01" else 4
    if len(lead) < 8 + width or 8 + width + int.from_bytes(lead[8 : 8 + width], "little") > size:
        raise InputError(f"{label}: not a valid .npy file (its header is cut short)")
    fp.seek(start)
    try:
        # The header is a Python literal that NumPy parses with ast.literal_eval (no code
        # runs); a mangled one can fail in the tokenizer too, and may warn on the way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            version = npy_format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
            else:
                raise InputError(f"{label}: .npy format version {version} is not supported")
    except InputError:
        raise
    except EOFError:
        raise InputError(f"{label}: not a valid .npy file (its header is cut short)") from None
    except Exception:  # any other malformed header is bad input, never a traceback
        fp.seek(start)
        head = fp.read(min(size, 8 + width + 256))
        if re.search(rb"'descr': *'[<>|=]?f1'", head):  # np.save of an ml_dtypes float8_e5m2
            raise InputError(f"{label}: {_narrow_advice('<f1', 'an fp8 (float8_e5m2)')}") from None
        raise InputError(f"{label}: not a valid .npy file (its header is malformed)") from None
    invalid = f"{label}: not a valid .npy file (its header declares"
    # type() is int, not isinstance: True is an int to Python, not a dimension.
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{invalid} shape {shape})")
    if len(shape) > 64:
        raise InputError(f"{invalid} {len(shape)} dimensions; NumPy allows at most 64)")
    if dtype.hasobject:
        raise InputError(
            f"{label}: dtype {dtype} holds Python objects (pickled data); "
            "lincheck never unpickles, save plain numbers"
        )
    if dtype.subdtype is not None:  # np.save writes a subarray's dimensions into the shape
        raise InputError(f"{invalid} the subarray dtype {dtype})")
    if dtype.itemsize == 0:
        raise InputError(f"{invalid} dtype {dtype}, whose items have no bytes)")
    if dtype.kind == "V" and dtype.names is None and dtype.itemsize in (1, 2):
        # np.save writes an ml_dtypes bfloat16 array as |V2, a float8_e4m3fn one as |V1
        what = "a bfloat16" if dtype.itemsize == 2 else "an fp8 (float8_e4m3fn)"
        raise InputError(f"{label}: {_narrow_advice(str(dtype), what)}")
    # NumPy's limit, as it applies it: nonzero dimensions times the item size.
    nonzero = int(np.prod([d for d in shape if d], dtype=object)) * dtype.itemsize
    if nonzero > MAX_BYTES:
        raise InputError(f"{invalid} shape {shape} {dtype}, too large for NumPy)")
    count = int(np.prod(shape, dtype=object))
    needed = count * dtype.itemsize
    available = size - (fp.tell() - start)
    if needed > available:
        raise InputError(
            f"{label}: truncated: the header declares shape {shape} {dtype} "
            f"({needed:,} bytes of data) but the file holds {max(available, 0):,}"
        )
    if needed > MEMMAP_BYTES and backing is not None:
        shared, base = backing
        return FileArray(shared, base + fp.tell() - start, shape, dtype, fortran, label)
    data = np.empty(needed, dtype=np.uint8)
    view, done = memoryview(data), 0  # type: ignore[arg-type]  # an ndarray is a buffer
    while done < needed:  # a chunk at a time: an inflating stream never holds two copies
        got = fp.readinto(view[done : done + _READ_BYTES])  # type: ignore[attr-defined]
        if not got:
            raise InputError(
                f"{label}: truncated: expected {needed:,} bytes of data, read {done:,}"
            )
        done += got
    array = data.view(dtype).reshape(shape, order="F" if fortran else "C")
    array.flags.writeable = False
    return array


def _narrow_advice(descr: str, what: str) -> str:
    return (
        f"dtype {descr} (raw bytes) is what np.save writes for {what} array, which .npy "
        "cannot carry; save the case as one .safetensors file instead: "
        'safetensors.numpy.save_file({"X": X, "W": W, "dY": dY, ...}, "case.safetensors")'
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# What a case costs and whether it changed, from headers and file metadata only


def case_files(path: str | os.PathLike) -> list[Path | str]:
    """The files a case reads: a ``.npz`` or ``.safetensors`` file itself, or a folder's
    ``.npy`` files named like arrays (sorted). Nothing raises: an unreadable path is []."""
    if is_url(path):
        return _url_case_files(str(path))
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return [path] if stat.S_ISREG(os.stat(path).st_mode) else []
        entries = sorted(path.iterdir())
    except (OSError, ValueError):
        return []
    return [e for e in entries if e.suffix.lower() == ".npy" and _canonical(e.stem)]


IDENTITY_BYTES = 4096
"""The bytes hashed at each end of a file for its identity (:func:`file_identity`): its
headers (where shapes and dtypes are) and its last data, read without reading the rest."""


def file_identity(path: Path | str) -> tuple[str, int, int, str] | None:
    """(name, size, mtime_ns, blake2b of its first and last ``IDENTITY_BYTES``): a cheap
    fingerprint that changes when a file is replaced, rewritten, resized or touched.
    None for a path that is not a readable regular file (the check then says why)."""
    import hashlib

    if is_url(path):
        return _url_identity(str(path))
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
        try:
            head = os.pread(fd, IDENTITY_BYTES, 0)
            tail = os.pread(fd, IDENTITY_BYTES, max(info.st_size - IDENTITY_BYTES, 0))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
    digest = hashlib.blake2b(head + b"\0" + tail, digest_size=16).hexdigest()
    return (path.name, info.st_size, info.st_mtime_ns, digest)


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each array of a case, by canonical name: (shape, bytes of data), from the headers
    alone (``.npy`` headers, ``.npz`` members' headers, the ``.safetensors`` header); no
    data is read. An unreadable or malformed case gives what could be read (maybe {})."""
    if is_url(path):
        return _url_header_shapes(str(path))
    path = Path(path)
    found: dict[str, tuple[tuple[int, ...], int]] = {}
    try:
        if is_dir(path):
            for found_file in case_files(path):
                file = Path(found_file)
                with open(_open_regular(file, str(file)), "rb") as fp:
                    _header_into(found, _canonical(file.stem), fp)
        elif path.suffix.lower() == ".npz":
            with open(_open_regular(path, str(path)), "rb") as raw, zipfile.ZipFile(raw) as archive:
                for info in archive.infolist():
                    key = info.filename[:-4] if info.filename.endswith(".npy") else ""
                    if _canonical(key):
                        with archive.open(info) as fp:
                            _header_into(found, _canonical(key), fp)
        elif path.suffix.lower() == SAFETENSORS:
            with open(_open_regular(path, str(path)), "rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                n = st.header_length(fp.read(st.N_LEN), size, str(path))
                entries, _ = st.parse_header(fp.read(n), size - st.N_LEN - n, str(path))
            for entry in entries:
                name = _canonical(entry.name)
                if name:
                    found[name] = (tuple(entry.shape), entry.end - entry.begin)
    except Exception:  # any malformed input: the check itself will say what is wrong
        return found
    return found


def _header_into(found: dict, name: str | None, fp: IO[bytes]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = npy_format.read_magic(fp)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else None
        shape, _, dtype = (read or npy_format.read_array_header_2_0)(fp)
    if name and all(type(d) is int and d >= 0 for d in shape):
        found[name] = (tuple(shape), int(np.prod(shape, dtype=object)) * dtype.itemsize)


# ---------------------------------------------------------------------------
# Dumps at a URL (fsspec): read whole into memory, then parsed as files are


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: object) -> bool:
    """Whether a case is named by a URL (``s3://bucket/dumps/``, ``memory://...``): read
    through fsspec, never as a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


class _Bytes(_SharedFile):
    """A file's bytes read whole from a URL, read as :class:`_SharedFile` reads a file."""

    def __init__(self, data: bytes):  # no descriptor: nothing to close or confirm
        self.data, self.size = data, len(data)

    def stream(self) -> IO[bytes]:
        import io

        return io.BytesIO(self.data)

    def read(self, offset: int, nbytes: int, label: str) -> np.ndarray:
        if offset + nbytes > self.size:
            raise InputError(f"{label}: truncated: {nbytes:,} bytes at {offset:,} past the end")
        return np.frombuffer(self.data, dtype=np.uint8, count=nbytes, offset=offset)

    def confirm(self, label: str, short: bool = False) -> None:
        return None


def _filesystem(url: str):
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError:
        raise InputError(
            f"{url}: reading a URL needs fsspec and its backend (s3fs for s3://): "
            "pip install fsspec"
        ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except Exception as exc:  # an unknown protocol, a backend not installed
        raise InputError(f"{url}: cannot be read: {_first_line(exc)}") from None


def _listing(fs, root: str) -> list[tuple[str, str, bool]]:
    """(url, base name, is a folder) of each entry of a folder at a URL, sorted by name."""
    entries = fs.ls(root, detail=True)
    out = []
    for e in entries:
        name = str(e["name"]).rstrip("/")
        out.append((fs.unstrip_protocol(name), name.rsplit("/", 1)[-1], e["type"] == "directory"))
    return sorted(out, key=lambda e: e[1])


def _url_cases(url: str) -> list[Path | str]:
    try:
        fs, root = _filesystem(url)
        if not fs.isdir(root):
            return [url]
        entries = _listing(fs, root)
    except Exception:  # load() says what is wrong
        return [url]
    own = [e for e in entries if e[1].lower().endswith(".npy") and _canonical(e[1][:-4])]
    inner = [e[0] for e in entries if e[2] or e[1].lower().endswith((".npz", SAFETENSORS))]
    return list(inner) if inner and not own else [url]


def _load_url(url: str) -> Loaded:
    """A case at a URL: a folder of ``.npy`` files, an ``.npz`` or a ``.safetensors`` file,
    each file's bytes read whole, then parsed by the same code as a local file's."""
    fs, root = _filesystem(url)
    try:
        if fs.isdir(root):
            files: dict[str, str] = {}
            ignored = []
            for entry, base, folder in _listing(fs, root):
                stem = base[:-4] if base.lower().endswith(".npy") and not folder else ""
                name = _canonical(stem)
                if name is None:
                    ignored.append(entry)
                else:
                    _claim(files, name, entry)
            arrays = {}
            for name, source in files.items():
                data = _Bytes(fs.cat_file(fs._strip_protocol(source)))
                arrays[name] = _read_npy(data.stream(), data.size, f"{name} ({source})", (data, 0))
            return Loaded(arrays, files, tuple(ignored))
        if not fs.exists(root):
            raise InputError(f"{url}: no such file or folder")
        suffix = "." + root.rsplit(".", 1)[-1].lower() if "." in root else ""
        if suffix not in (".npz", SAFETENSORS):
            raise InputError(
                f"{url}: expected a folder of .npy files, an .npz or a .safetensors file"
            )
        data = _Bytes(fs.cat_file(root))
    except InputError:
        raise
    except Exception as exc:  # the backend's errors: permissions, network, ...
        raise InputError(f"{url}: cannot read: {_first_line(exc)}") from None
    return _load_npz(url, data) if suffix == ".npz" else _load_safetensors(url, data)


def _url_case_files(url: str) -> list[Path | str]:
    try:
        fs, root = _filesystem(url)
        if not fs.isdir(root):
            return [url] if fs.isfile(root) else []
        entries = _listing(fs, root)
    except Exception:
        return []
    return [u for u, base, folder in entries if not folder and _npy_name(base)]


def _npy_name(base: str) -> str | None:
    return _canonical(base[:-4]) if base.lower().endswith(".npy") else None


def _url_identity(url: str) -> tuple[str, int, int, str] | None:
    """:func:`file_identity` of a file at a URL: its size, modification time as the backend
    gives it (0 if none), and its first and last bytes, read by range."""
    import hashlib

    try:
        fs, root = _filesystem(url)
        info = fs.info(root)
        size = int(info["size"])
        head = fs.cat_file(root, 0, min(IDENTITY_BYTES, size))
        tail = fs.cat_file(root, max(size - IDENTITY_BYTES, 0), size)
    except Exception:
        return None
    stamp = info.get("mtime", info.get("LastModified", info.get("created", 0)))
    mtime = int(stamp.timestamp() * 1e9) if hasattr(stamp, "timestamp") else int(stamp or 0)
    digest = hashlib.blake2b(head + b"\0" + tail, digest_size=16).hexdigest()
    return (root.rsplit("/", 1)[-1], size, mtime, digest)


def _url_header_shapes(url: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """:func:`header_shapes` of a case at a URL: the headers read by range (an ``.npz``
    is not read here: its cost is unknown, 0)."""
    import io

    found: dict[str, tuple[tuple[int, ...], int]] = {}
    try:
        fs, root = _filesystem(url)
        if fs.isdir(root):
            for entry in _url_case_files(url):
                head = fs.cat_file(fs._strip_protocol(entry), 0, IDENTITY_BYTES)
                _header_into(found, _npy_name(str(entry).rsplit("/", 1)[-1]), io.BytesIO(head))
        elif root.lower().endswith(SAFETENSORS):
            size = int(fs.info(root)["size"])
            n = st.header_length(fs.cat_file(root, 0, st.N_LEN), size, url)
            header = fs.cat_file(root, st.N_LEN, st.N_LEN + n)
            entries, _ = st.parse_header(header, size - st.N_LEN - n, url)
            for e in entries:
                if _canonical(e.name):
                    found[str(_canonical(e.name))] = (tuple(e.shape), e.end - e.begin)
    except Exception:
        return found
    return found
