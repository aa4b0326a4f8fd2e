"""Reading and writing ``.npy`` / ``.npz`` arrays: the only module that touches files.

Loading never unpickles: the ``.npy`` header is parsed first (NumPy's
``read_magic`` and ``read_array_header_*``, which evaluate only literals),
object dtypes are refused before any data is read, a header that declares
more data than the file holds is reported as truncated without allocating
it, and the data is read as raw bytes. Writing is atomic: a temporary file in
the target folder, fsync, then a rename (or a hard link, which refuses to
replace an existing file), so a reader never sees a half-written array and an
interrupted write leaves the old file (or none) in place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npy_format

from .checks import INPUT_NAMES, SUBJECT_NAMES
from .errors import InputError

ARRAY_NAMES = INPUT_NAMES + SUBJECT_NAMES
_BY_LOWER = {name.lower(): name for name in ARRAY_NAMES}
REQUIRED = ("X", "W", "dY")


@dataclass(frozen=True)
class Loaded:
    """Arrays found at a path, by canonical name (X, W, B, dY, dX, dW, dB, Y).

    ``sources`` maps each name to the file (or ``file.npz:key``) it came
    from; ``ignored`` lists files or keys that name no array lincheck knows.
    """

    arrays: Mapping[str, np.ndarray]
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
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            loaded = _load_folder(path)
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
    """
    path = Path(path)
    if path.is_dir():
        entries = sorted(path.iterdir())
        own = [e for e in entries if e.suffix.lower() == ".npy" and _canonical(e.stem)]
        inner = [e for e in entries if e.is_dir() or e.suffix.lower() == ".npz"]
        if not own and inner:
            return inner
    return [path]


def _canonical(stem: str) -> str | None:
    return _BY_LOWER.get(stem.lower())


def _claim(found: dict[str, str], name: str, source: str) -> None:
    if name in found:
        raise InputError(f"{name}: two sources for one array: {found[name]} and {source}")
    found[name] = source


def _load_folder(folder: Path) -> Loaded:
    files: dict[str, str] = {}
    ignored = []
    for entry in sorted(folder.iterdir()):
        name = _canonical(entry.stem) if entry.suffix.lower() == ".npy" else None
        if name is None:
            ignored.append(str(entry))
        else:
            _claim(files, name, str(entry))
    arrays = {name: _read_file(name, Path(source)) for name, source in files.items()}
    return Loaded(arrays, files, tuple(ignored))


def _read_file(name: str, path: Path) -> np.ndarray:
    """One ``.npy`` file, read or memory-mapped; errors name the array and the file."""
    label = f"{name} ({path})"
    if not path.exists():
        raise InputError(f"{label}: no such file")
    try:
        with open(path, "rb") as fp:
            return _read_npy(fp, os.fstat(fp.fileno()).st_size, label)
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror or exc}") from None


def _load_npz(path: Path) -> Loaded:
    try:
        archive = zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, an unsupported zip version or feature, ...
        raise InputError(f"{path}: not a readable .npz (zip) file: {_first_line(exc)}") from None
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
        arrays = {}
        for name, info in members.items():
            label = f"{name} ({sources[name]})"
            try:
                with archive.open(info) as fp:
                    arrays[name] = _read_npy(fp, info.file_size, label)
            except InputError:
                raise
            except Exception as exc:  # a corrupt member: bad CRC, compression, zip features
                raise InputError(f"{label}: corrupt archive member: {_first_line(exc)}") from None
    return Loaded(arrays, sources, tuple(ignored))


MEMMAP_BYTES = 64 * 2**20
"""Data of a ``.npy`` file beyond this size is memory-mapped (read-only) instead of read."""


def _read_npy(fp: IO[bytes], size: int, label: str) -> np.ndarray:
    """Read one ``.npy`` stream of ``size`` bytes without unpickling or over-allocating.

    A large array in a real file is memory-mapped read-only instead, so its
    pages are read as the check needs them and never copied.
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
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(f"{label}: not a valid .npy file (its header declares shape {shape})")
    if dtype.hasobject:
        raise InputError(
            f"{label}: dtype {dtype} holds Python objects (pickled data); "
            "lincheck never unpickles, save plain numbers"
        )
    count = int(np.prod(shape, dtype=object))
    needed = count * dtype.itemsize
    available = size - fp.tell()
    if needed > available:
        raise InputError(
            f"{label}: truncated: the header declares shape {shape} {dtype} "
            f"({needed:,} bytes of data) but the file holds {max(available, 0):,}"
        )
    order = "F" if fortran else "C"
    if needed > MEMMAP_BYTES and hasattr(fp, "fileno"):
        offset = fp.tell()
        return np.memmap(fp, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    data = fp.read(needed)
    if len(data) != needed:
        raise InputError(
            f"{label}: truncated: expected {needed:,} bytes of data, read {len(data):,}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count)
    return flat.reshape(shape, order=order)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Writing


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
    """Write each array to ``folder/NAME.npy`` atomically; returns the paths written.

    Without ``force``, nothing is written if any target (or a file that
    differs from it only in case) exists.

    Raises
    ------
    InputError
        ``folder`` is not a folder, or a target exists and ``force`` is False.
    """
    folder = _folder(folder)
    clash = existing_targets(folder, arrays)
    _make_room(folder, clash, force)
    if force:
        # Replacing X.npy is what --force asks; a differently-cased twin would stay behind.
        stale = [p for p in clash if p.name not in {f"{n}.npy" for n in arrays}]
        for p in stale:
            p.unlink()
    written = []
    for name, array in arrays.items():
        target = folder / f"{name}.npy"

        _atomic_write(target, partial(_write_npy, array=np.asarray(array)), replace=force)
        written.append(target)
    return written


def _folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder")
    return folder


def _make_room(folder: Path, clash: list[Path], force: bool) -> None:
    """Refuse (before writing anything) if files would be replaced without ``force``;
    then make sure ``folder`` exists."""
    if clash and not force:
        listed = ", ".join(str(p) for p in clash)
        raise InputError(f"{listed}: already exists; nothing was written (use --force to replace)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: cannot create folder: {exc.strerror or exc}") from None


def _write_npy(fp: IO[bytes], array: np.ndarray) -> None:
    npy_format.write_array(fp, array, allow_pickle=False)


def save_files(
    folder: str | os.PathLike, files: Mapping[str, bytes], *, force: bool = False
) -> list[Path]:
    """Write each ``name: bytes`` to ``folder/name`` atomically (plots); returns the paths.

    Without ``force``, nothing is written if any of the files exists.

    Raises
    ------
    InputError
        ``folder`` is not a folder, or a file exists and ``force`` is False.
    """
    folder = _folder(folder)
    _make_room(folder, [folder / name for name in files if (folder / name).exists()], force)
    written = []
    for name, data in files.items():
        target = folder / name
        _atomic_write(target, lambda fp, data=data: fp.write(data), replace=force)
        written.append(target)
    return written


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` atomically with ``text`` (for reports the user names explicitly)."""
    _atomic_write(Path(path), lambda fp: fp.write(text.encode("utf-8")), replace=True)


def _atomic_write(target: Path, write, *, replace: bool) -> None:
    """Write ``target`` so that it appears whole or not at all.

    The data goes to an unnamed file in the target's folder (``O_TMPFILE``),
    is flushed to disk, and only then is given its name: with ``os.link``,
    which refuses an existing file, or, to replace one, under a temporary
    name and then ``os.replace``, which swaps in a symlink's place rather than
    writing through it. A process killed while writing leaves nothing behind.
    Where unnamed files are not available, a named temporary file in the same
    folder plays their part (a kill then can leave that temporary file, never
    a partial target).
    """
    folder = target.parent
    try:
        fd, named = _open_temporary(folder, target.name)
    except OSError as exc:
        raise InputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb", closefd=False) as fp:
            write(fp)
            fp.flush()
            os.fsync(fd)
        if named is None:
            if replace:
                staged = folder / f".{target.name}.{uuid.uuid4().hex}.tmp"
                _link_open_file(fd, staged)
                os.replace(staged, target)
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
                if target.exists() or target.is_symlink():
                    raise FileExistsError(target) from None
                os.replace(named, target)
    except FileExistsError:
        raise InputError(f"{target}: already exists; not replaced (use --force)") from None
    except OSError as exc:
        raise InputError(f"{target}: cannot write: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
        if named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(named)


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
