"""Writing files atomically, and refusing targets that must not be written: the other
half of the file layer (:mod:`lincheck.arrays` reads; no other module touches files).

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
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npy_format

from . import safetensors_format as st
from .arrays import READ_INPUTS, cases, is_dir, kind_of
from .errors import InputError


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
        kind = kind_of(st.st_mode)
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
        for found in cases(given):
            if not isinstance(found, Path):
                continue  # a URL: not a local file
            case = found
            files = [case]
            if is_dir(case):
                with contextlib.suppress(OSError):
                    files += sorted(case.iterdir())
            for file in files:
                with contextlib.suppress(OSError, ValueError):
                    other = os.stat(file)
                    if (other.st_dev, other.st_ino) == key:
                        return str(file)
    return None


def _read_as_input(st: os.stat_result) -> bool:
    return READ_INPUTS.get((st.st_dev, st.st_ino)) == (st.st_size, st.st_mtime_ns)


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


FORMATS = ("npy", "safetensors")


def case_path(path: str | os.PathLike, format: str = "npy") -> Path:
    """Where :func:`save_case` writes: the folder ``path`` (npy), or the file ``path`` with
    ``.safetensors`` appended unless it ends so (safetensors)."""
    path = Path(path)
    if format == "safetensors" and path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path


def save_case(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    *,
    format: str = "npy",
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write the arrays of one case, all or none, as ``verify`` reads them; the paths written.

    Parameters
    ----------
    path : path
        "npy": the folder to write ``NAME.npy`` files into (:func:`save`).
        "safetensors": the file, ``.safetensors`` appended unless its name
        ends so (:func:`case_path`).
    arrays : mapping of name to array
        X, W, B, dY, dX, dW, dB, Y, ... of any real dtype. ``ml_dtypes``
        bfloat16, float8_e4m3fn and float8_e5m2 arrays are stored as BF16,
        F8_E4M3 and F8_E5M2 in safetensors; ``.npy`` cannot carry them (np.save
        writes raw 1- or 2-byte items that read back as void), so "npy"
        refuses them.
    format : {"npy", "safetensors"}
    force : bool
        Replace existing files; without it nothing is written if a target exists.
    metadata : mapping of str to str, optional
        Stored as the safetensors header's ``__metadata__`` (``verify`` reads
        ``lincheck.precision`` from it as the default arithmetic); not stored
        with "npy".

    The safetensors file is written by lincheck itself (not the
    ``safetensors`` package): the header lists the arrays by decreasing item
    size then name, padded with spaces to 8 bytes as the reference writer
    does, so every array's data is aligned to its item size; then the data,
    little-endian, C order. It is written as :func:`save` writes (an unnamed
    file, flushed, then named; never replacing without ``force``; never
    through a symlink; a killed process leaves nothing partial).

    Raises
    ------
    InputError
        A target exists and ``force`` is False, a target is not a regular file,
        an array's dtype cannot be stored in the format, or a write fails.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    if format == "npy":
        for name, array in arrays.items():
            dtype = np.asarray(array).dtype if not hasattr(array, "dtype") else array.dtype
            if (
                dtype.kind == "V" and dtype.names is None
            ) or dtype.name in st.NARROW_DTYPES.values():
                raise InputError(
                    f"{name}: dtype {dtype.name} cannot be stored in .npy (np.save writes raw "
                    f"{dtype.itemsize}-byte items); use --format safetensors "
                    "(format='safetensors')"
                )
        return save(path, arrays, force=force)
    target = case_path(path, format)
    stored = {}
    for name, array in arrays.items():
        a = np.asarray(array)
        if st.stored_dtype(a.dtype) is None:
            raise InputError(f"{name}: dtype {a.dtype} cannot be stored in .safetensors")
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not _LITTLE):
            a = a.astype(a.dtype.newbyteorder("<"))
        stored[name] = a if a.flags.c_contiguous else a.copy(order="C")  # 0-d stays 0-d
    order = sorted(stored, key=lambda n: (-stored[n].dtype.itemsize, n))
    stored = {name: stored[name] for name in order}
    header = st.build_header(stored, metadata)
    if len(header) - st.N_LEN > st.MAX_HEADER_BYTES:
        raise InputError(f"{target}: the header would exceed {st.MAX_HEADER_BYTES:,} bytes")

    def write(fp: IO[bytes]) -> None:
        fp.write(header)
        for a in stored.values():
            fp.write(a.reshape(-1).view(np.uint8).data)

    folder = _folder(target.parent)
    clash = [target] if os.path.lexists(target) else []
    _make_room(folder, clash, force)
    _write_all(folder, {target: write}, replace=force)
    return [target]


_LITTLE = sys.byteorder == "little"


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
        raise InputError(f"{target}: not a regular file ({kind_of(st.st_mode)}); not replaced")
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
