"""Reading and writing ``.npy`` / ``.npz`` arrays: the only module that touches files.

Reading
-------
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

Writing
-------
Writing is atomic: a temporary file in the target folder, fsync, then a
rename (or a hard link, which refuses to replace an existing file), so a
reader never sees a half-written array and an interrupted write leaves the
old file (or none) in place. :func:`save` writes every file before naming
any, so a failure (a full disk) leaves the folder as it was. Nothing that is
not a regular file (a device, a FIFO, ``/dev/stdout``) and no file lincheck
has read as an input is ever replaced; :func:`check_output` says so before
any work is done, and the writers refuse again just before renaming.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import uuid
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npy_format

from .core import FileBacked
from .errors import InputError
from .tensors import INPUT_NAMES, SUBJECT_NAMES

ARRAY_NAMES = INPUT_NAMES + SUBJECT_NAMES
_BY_LOWER = {name.lower(): name for name in ARRAY_NAMES}
REQUIRED = ("X", "W", "dY")


@dataclass(frozen=True)
class Loaded:
    """Arrays found at a path, by canonical name (X, W, B, dY, dX, dW, dB, Y).

    ``arrays`` holds ndarrays, and :class:`FileArray` for large files;
    ``sources`` maps each name to the file (or ``file.npz:key``) it came
    from; ``ignored`` lists files or keys that name no array lincheck knows.
    """

    arrays: Mapping[str, np.ndarray | FileArray]
    sources: Mapping[str, str]
    ignored: tuple[str, ...]


def load(
    path: str | os.PathLike | None, files: Mapping[str, str | os.PathLike] | None = None
) -> Loaded:
    """Load a folder of ``.npy`` files or one ``.npz`` file, plus single files by name.

    Names are file stems or ``.npz`` keys, case-insensitive. X, W and dY are
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
    else:
        path = Path(path)
        mode = _stat(path, str(path), missing="no such file or folder").st_mode
        if stat.S_ISDIR(mode):
            loaded = _load_folder(path)
        elif not stat.S_ISREG(mode):
            raise InputError(f"{path}: not a regular file ({_kind(mode)})")
        elif path.suffix.lower() == ".npz":
            loaded = _load_npz(path)
        else:
            raise InputError(f"{path}: expected a folder of .npy files or one .npz file")
    if files:
        arrays, sources = dict(loaded.arrays), dict(loaded.sources)
        for name, file in files.items():
            name = _canonical(name) or name
            _claim(sources, name, f"--{name.lower()} {file}")
            arrays[name] = _read_file(name, Path(file))
            sources[name] = str(file)
        loaded = Loaded(arrays, sources, loaded.ignored)
    missing = [name for name in REQUIRED if name not in loaded.arrays]
    if missing:
        where = path if path is not None else "the files given"
        found = ", ".join(sorted(loaded.arrays)) or "no known array"
        needs = f"needs X, W and dY; found {found}"
        raise InputError(f"{where}: missing {', '.join(missing)} ({needs})")
    return loaded


def cases(path: str | os.PathLike) -> list[Path]:
    """The dumps a path stands for: itself, or each case inside it.

    A folder that holds no array of its own but holds folders or ``.npz``
    files (one per layer of a model, say) stands for each of those, sorted.
    Nothing is opened here (a FIFO named ``case.npz`` is a case that
    :func:`load` then refuses), and nothing raises: a path that cannot be
    listed is one case, for :func:`load` to report.
    """
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return [path]
        entries = sorted(path.iterdir())
    except (OSError, ValueError):
        return [path]
    own = [e for e in entries if e.suffix.lower() == ".npy" and _canonical(e.stem)]
    inner = [e for e in entries if e.suffix.lower() == ".npz" or _is_dir(e)]
    return inner if inner and not own else [path]


def _is_dir(path: Path) -> bool:
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


def _kind(mode: int) -> str:
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
        raise InputError(f"{label}: not a regular file ({_kind(mode)})")
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
        raise InputError(f"{label}: not a regular file ({_kind(mode)})")
    return fd


_INPUTS: dict[tuple[int, int], tuple[int, int]] = {}
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
        _INPUTS[(st.st_dev, st.st_ino)] = self.stamp
        self._close = weakref.finalize(self, os.close, fd)

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
# .npy and .npz


def _read_file(name: str, path: Path) -> np.ndarray | FileArray:
    """One ``.npy`` file, read (or, if large, read as used); errors name the array and file."""
    label = f"{name} ({path})"
    shared = _SharedFile(_open_regular(path, label))
    try:
        with open(shared.fd, "rb", closefd=False) as fp:
            return _read_npy(fp, shared.size, label, (shared, 0))
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None


DEFLATE_RATIO = 1032
"""Deflate's largest expansion: a 258-byte match costs at least 2 bits."""


def _load_npz(path: Path) -> Loaded:
    shared = _SharedFile(_open_regular(path, str(path)))
    with open(shared.fd, "rb", closefd=False) as raw:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Writing


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    what: str,
    force: bool = False,
    folder: bool = False,
    dash_for_stdout: bool = False,
) -> None:
    """Refuse, before any work is done, an output target lincheck must not write.

    Parameters
    ----------
    path : path
        The target: a file (``--json``, ``--junit``) or, with ``folder``, a
        folder to write files into (``--plot``).
    inputs : paths
        What is being checked (folders, ``.npz`` and ``.npy`` files, as given
        to ``verify``); a target that is one of their files, or a symlink to
        one, is refused (compared by device and inode, following symlinks).
    what : str
        The option, for messages ("--json").
    force : bool
        Whether an existing regular file may be replaced (reports: yes).
    folder : bool
        The target is a folder (created if missing).
    dash_for_stdout : bool
        The option takes ``-`` for stdout (``--json``): ``-`` is accepted, and
        a device or ``/dev/stdout`` is refused with that hint.

    A symlink to a regular file is followed: the file it points to is
    replaced (atomically, in its own folder), as a shell's ``>`` would write
    it. Anything else that is not a regular file (a device, a FIFO, a
    socket, ``/dev/stdout`` or another path through ``/proc/*/fd``, a broken
    symlink, a symlink loop) is refused, as is a file target that is a
    folder, a folder target that is a file, and a target whose folder does
    not exist or cannot be written.

    Raises
    ------
    InputError
        One line: ``{what} {path}: <what is wrong>``.
    """
    if dash_for_stdout and str(path) == "-":
        return
    path = Path(path)
    where = f"{what} {path}"
    hint = "; use - for stdout" if dash_for_stdout else ""
    stream = _stream_hop(path)
    if stream:
        raise InputError(f"{where}: {stream}, not a file lincheck can replace{hint}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(
                f"{where}: a symlink to a missing file ({os.readlink(path)}); give the file itself"
            ) from None
        st = None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{where}: a symlink loop") from None
        raise InputError(f"{where}: cannot be used: {exc.strerror or exc}") from None
    if st is not None:
        kind = _kind(st.st_mode)
        if os.path.islink(path):
            kind = f"a symlink to {kind}"
        if folder and not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{where}: exists and is not a folder")
        if not folder and stat.S_ISDIR(st.st_mode):
            raise InputError(f"{where}: is a folder; give a file name")
        if not folder and not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: not a regular file ({kind}); not replaced{hint}")
        same = None if folder else _same_input(st, inputs)  # plots may go beside the arrays
        if same is not None:
            raise InputError(f"{where}: is the input file {same}; not replaced")
        if not folder and not force:
            raise InputError(f"{where}: already exists; not replaced (use --force)")
    if folder:
        parent = path.absolute()
        while not os.path.lexists(parent) and parent != parent.parent:
            parent = parent.parent  # folders that do not exist yet are created
    else:
        parent = Path(os.path.realpath(path)).parent
    if not os.path.isdir(parent):
        raise InputError(f"{where}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{where}: cannot write in {parent} (permission denied)")


def matching_files(folder: str | os.PathLike, pattern: str, depth: int = 2) -> list[Path]:
    """Files in ``folder`` and its subfolders (``depth`` levels) whose name matches the
    regular expression ``pattern``, sorted; none if ``folder`` is not a folder."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for level in range(depth):
        for entry in folder.glob("/".join(["*"] * (level + 1))):
            if re.fullmatch(pattern, entry.name) and entry.is_file():
                found.append(entry)
    return sorted(found)


def _stream_hop(path: Path) -> str:
    """What is wrong when ``path`` is or leads through ``/proc/*/fd`` or ``/dev/fd``
    (``/dev/stdout``): a stream of this process, which a rename would not reach and
    whose file (if stdout goes to one) it would replace; else the empty string."""
    hop, seen = Path(os.path.abspath(path)), 0
    while seen < 40:
        # Anywhere under /proc (/proc/self/fd/1, /proc/self/task/<id>/fd/1, ...) or /dev/fd,
        # also through a linked folder: the kernel's view of processes, never a plain file.
        parts = Path(os.path.realpath(hop.parent)).parts + (hop.name,)
        if (
            hop.parts[:2] == ("/", "proc")
            or parts[:2] == ("/", "proc")
            or (hop.parts[:3] == ("/", "dev", "fd"))
        ):
            return f"leads to {hop}, a stream of this process" if seen else f"{hop} is a stream"
        if not os.path.islink(hop):
            return ""
        hop, seen = Path(os.path.normpath(hop.parent / os.readlink(hop))), seen + 1
    return ""


def _same_input(st: os.stat_result, inputs: Iterable[str | os.PathLike]) -> str | None:
    """The input file (given, or inside a given folder or case) that is the file ``st``."""
    key = (st.st_dev, st.st_ino)
    for given in inputs:
        for case in cases(given):
            files = [case]
            if _is_dir(case):
                with contextlib.suppress(OSError):
                    files += sorted(case.iterdir())
            for file in files:
                with contextlib.suppress(OSError, ValueError):
                    other = os.stat(file)
                    if (other.st_dev, other.st_ino) == key:
                        return str(file)
    return None


def _read_as_input(st: os.stat_result) -> bool:
    return _INPUTS.get((st.st_dev, st.st_ino)) == (st.st_size, st.st_mtime_ns)


def existing_targets(folder: Path, names: Iterable[str]) -> list[Path]:
    """Files in ``folder`` that writing ``NAME.npy`` for these names would replace or shadow.

    Names are matched case-insensitively, since ``x.npy`` next to a new
    ``X.npy`` would make the folder ambiguous for ``verify``.
    """
    if not folder.is_dir():
        return []
    wanted = {name.lower() for name in names}
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.suffix.lower() == ".npy" and entry.stem.lower() in wanted
    )


def save(
    folder: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, force: bool = False
) -> list[Path]:
    """Write each array to ``folder/NAME.npy``, all or none; returns the paths written.

    Every file is written and flushed to disk under no name (or a temporary
    one) before any gets its name, so a failure while writing (a full disk)
    leaves the folder as it was. Without ``force``, nothing is written if any
    target (or a file that differs from it only in case) exists. With
    ``force``, each old file is kept (hard-linked aside) until every new one
    is in place; if naming one fails, the new names are removed and the old
    files put back, so the folder never holds a mix of old and new arrays
    (a process killed in the few renames at the end can leave one, and the
    old files then stay beside them as ``.NAME.npy.*.old``). A symlink among
    the targets is replaced itself, never the file it points to; a folder,
    FIFO, device or socket in a target's place is refused.

    Raises
    ------
    InputError
        ``folder`` is not a folder, a target exists and ``force`` is False, a
        target is not a regular file or symlink, or a write fails.
    """
    folder = _folder(folder)
    clash = existing_targets(folder, arrays)
    _make_room(folder, clash, force)
    writers = {
        folder / f"{name}.npy": partial(_write_npy, array=np.asarray(array))
        for name, array in arrays.items()
    }
    # Replacing X.npy is what --force asks; a differently-cased twin would stay behind.
    stale = [p for p in clash if p not in writers]
    _write_all(folder, writers, replace=force, remove=stale)
    return list(writers)


def _folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    try:
        mode = os.stat(folder).st_mode
    except FileNotFoundError:
        if os.path.islink(folder):
            raise InputError(f"{folder}: a symlink to a missing folder") from None
        return folder
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{folder}: a symlink loop") from None
        raise InputError(f"{folder}: cannot write: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise InputError(f"{folder}: exists and is not a folder")
    return folder


def _make_room(folder: Path, clash: list[Path], force: bool) -> None:
    """Refuse (before writing anything) if files would be replaced without ``force``,
    or if something that is not a regular file is in a target's place; then make sure
    ``folder`` exists."""
    if clash and not force:
        listed = ", ".join(str(p) for p in clash)
        raise InputError(f"{listed}: already exists; nothing was written (use --force to replace)")
    for path in clash:
        _refuse_special(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create folder: {exc.strerror or exc}") from None


def _refuse_special(target: Path, inputs_too: bool = False) -> None:
    """InputError if what is at ``target`` (not following a symlink) must not be replaced:
    anything but a regular file or a symlink, or (``inputs_too``) a file read as input."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise InputError(f"{target}: not a regular file ({_kind(st.st_mode)}); not replaced")
    if inputs_too and _read_as_input(st):
        raise InputError(f"{target}: a file lincheck has read as an input; not replaced")


def _write_npy(fp: IO[bytes], array: np.ndarray) -> None:
    npy_format.write_array(fp, array, allow_pickle=False)


def save_files(
    folder: str | os.PathLike, files: Mapping[str, bytes], *, force: bool = False
) -> list[Path]:
    """Write each ``name: bytes`` to ``folder/name``, all or none (plots); returns the paths.

    Without ``force``, nothing is written if any of the files exists; with
    it, as :func:`save` replaces. A file lincheck has read as an input in
    this process is never replaced.

    Raises
    ------
    InputError
        ``folder`` is not a folder, a file exists and ``force`` is False, a
        target is not a regular file or symlink, or a write fails.
    """
    folder = _folder(folder)
    targets = [folder / name for name in files]
    _make_room(folder, [p for p in targets if os.path.lexists(p)], force)
    writers = {
        folder / name: (lambda fp, data=data: fp.write(data)) for name, data in files.items()
    }
    _write_all(folder, writers, replace=force, inputs_too=True)
    return targets


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` atomically with ``text`` (for reports the user names explicitly).

    A symlink to a regular file is followed (the file it points to is
    replaced, in its own folder); a target that is not a regular file (a
    device, a FIFO, ``/dev/stdout``), a broken symlink, a symlink loop or a
    file lincheck has read as an input in this process is refused
    (:func:`check_output` says the same before any work is done).

    Raises
    ------
    InputError
        The target must not be replaced, or the write fails.
    """
    path = Path(path)
    try:
        check_output(path, what="report", force=True)
    except InputError as exc:  # the same refusal, named by the path alone
        raise InputError(str(exc).removeprefix("report ")) from None
    target = Path(os.path.realpath(path))
    writers = {target: lambda fp: fp.write(text.encode("utf-8"))}
    _write_all(target.parent, writers, replace=True, inputs_too=True)


def _write_all(
    folder: Path,
    writers: Mapping[Path, Callable[[IO[bytes]], object]],
    *,
    replace: bool,
    remove: Iterable[Path] = (),
    inputs_too: bool = False,
) -> None:
    """Write every target so that all appear whole, or none does.

    Each file's data goes to an unnamed file in the target's folder
    (``O_TMPFILE``) and is flushed to disk; only when all are written are
    they given their names: with ``os.link``, which refuses an existing
    file, or, to replace one, under a temporary name and then
    ``os.replace``, which swaps in a symlink's place rather than writing
    through it, after the old file is hard-linked aside. If any step fails,
    the names given so far are taken back (and old files restored), and the
    error names the file. Where unnamed files are not available, a named
    temporary file in the same folder plays their part (a kill then can leave
    that temporary file, never a partial target). Just before each name is
    given, what is in its place is checked again (:func:`_refuse_special`).
    """
    staged: list[tuple[Path, int, Path | None]] = []
    placed: list[tuple[Path, int, Path | None]] = []  # (target, fd, the old file aside)
    current = next(iter(writers), folder)
    try:
        try:
            for current, write in writers.items():
                fd, named = _open_temporary(folder, current.name)
                staged.append((current, fd, named))
                with os.fdopen(fd, "wb", closefd=False) as fp:
                    write(fp)
                    fp.flush()
                    os.fsync(fd)
            for current, fd, named in staged:
                _refuse_special(current, inputs_too)
                old = None
                if replace and os.path.lexists(current):
                    old = folder / f".{current.name}.{uuid.uuid4().hex}.old"
                    os.link(current, old, follow_symlinks=False)
                placed.append((current, fd, old))
                _name(fd, named, current, replace)
        except BaseException:
            _take_back(placed)
            raise
        for path in remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for _, _, old in placed:
            if old is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
    except FileExistsError:
        raise InputError(f"{current}: already exists; nothing was written (use --force)") from None
    except OSError as exc:
        raise InputError(
            f"{current}: cannot write: {exc.strerror or exc}"
            + ("; nothing was written" if len(writers) > 1 else "")
        ) from None
    finally:
        for _, fd, named in staged:
            os.close(fd)
            if named is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(named)


def _name(fd: int, named: Path | None, target: Path, replace: bool) -> None:
    """Give the written file (open as ``fd``, with the temporary name ``named`` or none)
    the name ``target``: replacing what is there only if ``replace``."""
    if named is None:
        if replace:
            staged = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
            _link_open_file(fd, staged)
            try:
                os.replace(staged, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)
                raise
        else:
            _link_open_file(fd, target)
    elif replace:
        os.replace(named, target)
    else:
        try:
            os.link(named, target)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename
            if os.path.lexists(target):
                raise FileExistsError(target) from None
            os.replace(named, target)


def _take_back(placed: list[tuple[Path, int, Path | None]]) -> None:
    """Undo the names given so far: put old files back, remove new names that are ours."""
    for target, fd, old in reversed(placed):
        with contextlib.suppress(OSError):
            if old is not None:
                os.replace(old, target)
                # rename() between two links of one file does nothing: the new file was
                # never named, and the old one is still in place; drop the spare link.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
                continue
            mine = os.fstat(fd)
            there = os.lstat(target)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(target)


def _open_temporary(folder: Path, name: str) -> tuple[int, Path | None]:
    """An unnamed file in ``folder`` (and None), or a named temporary one and its path."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666), None
        except OSError:
            pass  # not supported by this file system
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
    return fd, Path(path)


def _link_open_file(fd: int, target: Path) -> None:
    """Give the unnamed file open as ``fd`` the name ``target`` (linkat, following /proc)."""
    root = os.open("/", os.O_RDONLY)
    try:
        os.link(f"proc/self/fd/{fd}", target, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)
