"""The ``.safetensors`` format, parsed and built by hand: header bytes in, checked entries out.

A file is an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8
JSON, then the data region: ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}`` (the metadata optional), each
tensor's bytes little-endian in C order at ``data_offsets`` (relative to the
data region). This module touches no files (:mod:`lincheck.arrays` reads them,
:mod:`lincheck.writing` writes them); it checks a header as the reference
implementation does (huggingface/safetensors, ``safetensors/src/tensor.rs``:
``read_metadata`` and ``Metadata::validate``) and more:

- the header length is at most :data:`MAX_HEADER_BYTES` (16 MiB; the
  reference allows 100 MB, far beyond any case file) and within the file;
- the header is UTF-8 JSON (no ``NaN`` or ``Infinity``, no lone surrogates),
  an object whose keys are all different (the reference refuses a second
  ``__metadata__``; lincheck refuses any repeated key, which JSON leaves
  undefined);
- every entry has a dtype the format defines, a shape of non-negative
  integers (at most 64 of them, NumPy's limit), and two non-negative
  integer offsets;
- ``end - begin`` is the shape's element count times the item size;
- sorted by offset, the tensors tile the data region from 0 without gap or
  overlap, and the last one ends where the file ends.

Why by hand, rather than with the ``safetensors`` package: lincheck's
runtime dependencies stay NumPy, Typer, Rich and ``ml_dtypes``; it never
imports torch; every malformed file must be one line naming the file and
the problem; and the package's NumPy loader does not read every dtype a
low-precision dump holds (in safetensors 0.8.0, ``safetensors.numpy.load``
fails on BF16 and F8_E4M3 with a ``KeyError``, ``load_file`` on F8_E4M3 with
an ``AttributeError``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_HEADER_BYTES = 16 * 2**20
"""The largest header read (the reference implementation's limit is 100,000,000 bytes). A
case file's header takes a few hundred bytes; a model's with thousands of tensors, a few
hundred KB."""

N_LEN = 8
"""Bytes of the header length."""

NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
"""Stored dtypes NumPy has itself."""

NARROW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
"""Stored dtypes read as ``ml_dtypes`` types (imported only when one is read)."""

BITS = {
    **{name: np.dtype(d).itemsize * 8 for name, d in NUMPY_DTYPES.items()},
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "C64": 64,
}
"""Every dtype the format defines, with its bits per element (as the reference's
``Dtype::bitsize``); those not in :data:`NUMPY_DTYPES` or :data:`NARROW_DTYPES` are
refused when an array lincheck reads has one."""

READABLE = "F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I8..I64, U8..U64 and BOOL"


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: its name, stored dtype, shape and byte range in the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def header_length(lead: bytes, file_size: int, where: str) -> int:
    """The header length from the file's first 8 bytes, checked against the file's size."""
    invalid = f"{where}: not a valid .safetensors file"
    if file_size == 0:
        raise InputError(f"{where}: empty file")
    if len(lead) < N_LEN:
        raise InputError(f"{invalid} (it has {file_size} bytes, fewer than the 8 of its length)")
    n = int.from_bytes(lead[:N_LEN], "little")
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{invalid} (its header length is {n:,} bytes; lincheck reads headers up to "
            f"{MAX_HEADER_BYTES:,})"
        )
    if N_LEN + n > file_size:
        raise InputError(
            f"{invalid} (its header length is {n:,} bytes but the file holds {file_size - N_LEN:,} "
            "after the length)"
        )
    return n


def parse_header(header: bytes, data_size: int, where: str) -> tuple[list[Entry], dict[str, str]]:
    """Check a header and the data region's size; the entries (sorted by offset) and metadata.

    Parameters
    ----------
    header : bytes
        The ``n`` bytes after the length.
    data_size : int
        Bytes in the file after the header (the data region).
    where : str
        The file, for messages.

    Raises
    ------
    InputError
        ``{where}: not a valid .safetensors file (...)``, saying what is wrong.
    """
    invalid = f"{where}: not a valid .safetensors file"
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{invalid} (its header is not UTF-8: byte {exc.start})") from None
    try:
        top = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except _RefusedError as exc:
        raise InputError(f"{invalid} (its header {exc})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        what = exc.msg if isinstance(exc, json.JSONDecodeError) else "nests too deeply"
        raise InputError(f"{invalid} (its header is not JSON: {what})") from None
    if not isinstance(top, dict):
        raise InputError(f"{invalid} (its header is {_kind(top)}, not a JSON object)")
    metadata = top.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{invalid} (its __metadata__ is not an object of strings)")
    entries = [_entry(name, info, invalid) for name, info in top.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    start = 0
    for i, e in enumerate(entries):
        if e.end < e.begin:
            raise InputError(
                f"{invalid} (tensor {_short(e.name)}: data_offsets [{e.begin}, {e.end}] end "
                "before they begin)"
            )
        bits = BITS[e.dtype] * int(np.prod(e.shape, dtype=object))
        if bits % 8 or bits // 8 != e.end - e.begin:
            needs = f"{bits:,} bits" if bits % 8 else f"{bits // 8:,} bytes"
            raise InputError(
                f"{invalid} (tensor {_short(e.name)}: shape {_short(list(e.shape))} {e.dtype} "
                f"needs {needs} but data_offsets [{e.begin}, {e.end}] hold {e.end - e.begin:,})"
            )
        if e.begin > start:
            raise InputError(
                f"{invalid} (bytes [{start}, {e.begin}) of its data belong to no tensor; "
                "the tensors must cover the data without gaps)"
            )
        if e.begin < start:
            other = entries[i - 1]
            raise InputError(
                f"{invalid} (tensors {_short(other.name)} [{other.begin}, {other.end}] and "
                f"{_short(e.name)} [{e.begin}, {e.end}] overlap)"
            )
        start = e.end
    if start > data_size:
        raise InputError(
            f"{invalid} (truncated: its tensors need {start:,} bytes of data but the file "
            f"holds {data_size:,})"
        )
    if start < data_size:
        raise InputError(
            f"{invalid} ({data_size - start:,} bytes after the last tensor's data belong to "
            "no tensor)"
        )
    return entries, metadata


class _RefusedError(ValueError):
    """A header JSON parses but lincheck will not read (repeated keys, NaN, lone surrogates)."""


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _RefusedError(f"repeats the key {_short(key)}")
        _utf8(key)
        if isinstance(value, str):
            _utf8(value)
        out[key] = value
    return out


def _utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _RefusedError(f"has a string that is not Unicode text ({_short(text)})") from None


def _no_constant(name: str) -> object:
    raise _RefusedError(f"holds {name}, which is not JSON")


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _is_count(value: object) -> bool:
    # type() is int, not isinstance: True is an int to Python, not a count.
    return type(value) is int and value >= 0


MAX_ARRAY_BYTES = np.iinfo(np.intp).max
"""NumPy's largest array, in bytes (also its largest dimension)."""


def _short(value: object, limit: int = 60) -> str:
    """``value`` as JSON, cut to ``limit`` characters: a message stays one short line."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entry(name: str, info: object, invalid: str) -> Entry:
    what = f"{invalid} (tensor {_short(name)}"
    if not isinstance(info, dict):
        raise InputError(f"{what} is {_kind(info)}, not a JSON object)")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise InputError(f"{what} has no {field})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in BITS:
        raise InputError(f"{what}: dtype {_short(dtype)} is not a safetensors dtype)")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InputError(f"{what}: shape {_short(shape)} is not a list of counts)")
    if len(shape) > 64:
        raise InputError(f"{what}: {len(shape)} dimensions; NumPy allows at most 64)")
    # NumPy's limit, as it applies it: nonzero dimensions times the item size (a zero-size
    # shape such as [2**70, 0] holds no bytes, so the offsets cannot refuse it).
    nonzero = int(np.prod([d for d in shape if d], dtype=object)) * max(BITS[dtype] // 8, 1)
    if nonzero > MAX_ARRAY_BYTES:
        raise InputError(f"{what}: shape {_short(shape)} is too large for NumPy)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise InputError(f"{what}: data_offsets {_short(offsets)} are not two counts)")
    return Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


def numpy_dtype(stored: str, label: str) -> np.dtype:
    """The NumPy dtype an array stored as ``stored`` is read as (``ml_dtypes`` for BF16, F8).

    Raises
    ------
    InputError
        ``{label}: dtype C64 is not supported; ...``: a dtype lincheck does not read.
    """
    if stored in NUMPY_DTYPES:
        return np.dtype(NUMPY_DTYPES[stored])
    if stored in NARROW_DTYPES:
        try:
            import ml_dtypes  # about 0.7 s: only when a narrow array is read
        except ImportError:
            raise InputError(
                f"{label}: dtype {stored} needs ml_dtypes, which is not installed: "
                "pip install ml_dtypes"
            ) from None

        return np.dtype(getattr(ml_dtypes, NARROW_DTYPES[stored]))
    what = " (complex)" if stored == "C64" else ""
    raise InputError(f"{label}: dtype {stored}{what} is not supported; lincheck reads {READABLE}")


_STORED_AS = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def stored_dtype(dtype: np.dtype) -> str | None:
    """The safetensors dtype of an array of ``dtype``, or None if the format has none."""
    if dtype.name in _STORED_AS:
        return _STORED_AS[dtype.name]
    if dtype.kind == "b":
        return "BOOL"
    if dtype.kind in "fiu" and dtype.names is None:
        name = {"f": "F", "i": "I", "u": "U"}[dtype.kind] + str(dtype.itemsize * 8)
        return name if name in NUMPY_DTYPES else None
    return None


def build_header(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    """The length and header of a file holding ``arrays`` in the order given, padded with
    spaces to a multiple of 8 bytes as the reference writer does (the data then starts
    aligned)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, a in arrays.items():
        stored = stored_dtype(a.dtype)
        header[name] = {
            "dtype": stored,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % N_LEN)
    return len(text).to_bytes(N_LEN, "little") + text
