"""glibc's malloc while a case is checked: large temporary arrays reused, not mapped afresh.

glibc serves a block at or over its mmap threshold with a mapping of its own, which the
kernel zero-fills page by page on first touch, and unmaps it when it is freed. By default
the threshold is dynamic (mallopt(3)): it starts at 128 KiB and rises to the size of each
larger mapped block freed, up to ``DEFAULT_MMAP_THRESHOLD_MAX`` (32 MiB on 64-bit systems),
with the trim threshold at twice it. Setting any of ``M_TRIM_THRESHOLD``, ``M_TOP_PAD``,
``M_MMAP_THRESHOLD`` or ``M_MMAP_MAX`` disables that adjustment, and so does setting their
variables (``MALLOC_TRIM_THRESHOLD_``...) in a process's environment at startup.

Two kinds of process lose large arrays to the system over and over while a case runs:

* **Dask's workers.** Dask's nanny gives every worker ``MALLOC_TRIM_THRESHOLD_=65536``
  (its ``distributed.nanny.pre-spawn-environ``), which fixes the mmap threshold at
  128 KiB: each of a check's temporaries over 128 KiB is then mapped, zeroed and unmapped
  again (40 small cases in one process: 3.8 s of system time instead of 0.9 s).
* **Any process, with glibc's dynamic thresholds.** A check's per-entry work runs in
  chunks of 2¹⁶ entries (:meth:`lincheck.workspace.Workspace.row_chunks`): a dozen
  temporaries of 512 KiB each, freed together. The trim threshold follows the largest
  block freed (1 MiB here), so the heap's free top, several of them, exceeds it: glibc
  returns it to the system, and the next chunk's arrays are faulted in again, page by
  page. Measured on four layers of the many-cases benchmark's sizes: 18,300 page faults
  per run, against 8 with the thresholds below; the checks took 21% less CPU time on
  the benchmark's 40 small cases (``python benchmarks/bench_many.py``).

:func:`arrays_reused` sets the thresholds where glibc's dynamic adjustment would go at
most while lincheck checks a case: the mmap threshold at ``DEFAULT_MMAP_THRESHOLD_MAX``
and the trim threshold at twice it (or the process's own, if larger). Arrays up to
32 MiB come from the heap and are reused from one chunk and one product to the next;
larger ones are mapped, as glibc always maps them. Where it acts:

* It acts only on glibc on Linux, and only where it knows what to put back or that
  nothing needs putting back. A process whose startup environment (``/proc/self/environ``,
  what glibc read) set ``MALLOC_TRIM_THRESHOLD_`` to a number and set no mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``, or ``mmap_threshold`` or ``trim_threshold`` in
  ``GLIBC_TUNABLES``): the mmap threshold is glibc's fixed default, 128 KiB, and the
  trim threshold that variable's value; both are put back once the process has been
  without a case for IDLE_SECONDS (after the last of the cases that run at once in its
  threads; a case that starts meanwhile keeps them), then ``malloc_trim(0)`` returns
  the free memory of every arena to the system at once, as the startup trim threshold
  would have returned it when each array was freed (measured: the resident size after
  a case is the one without any of this, 42 MB; without the trim it stayed at 100 MB).
  glibc has no call that reads a threshold, so a value that other code in the process
  set with ``mallopt`` itself is not restored: the startup value is.
* A process that is lincheck's own (:func:`lincheck_process`: the ``lincheck`` command,
  and the workers of its local pool) and whose startup environment set none of glibc's
  malloc variables or tunables: the thresholds are set for the case and left set for
  the process's life (a dynamic threshold cannot be turned back on, and the next case
  wants the same), with no trim in between. Up to the trim threshold, 64 MiB, of free
  heap then stays in the process between cases.
* Anything else (another platform or C library, a user's own choice of thresholds, a
  program that calls lincheck's API in its own process, however it was started: even
  a Dask worker running the program's own tasks) is left as it is: the checks act
  there only through :func:`lincheck.batch.check_case`, a case of ``lincheck verify``.

glibc's manual marks ``mallopt`` MT-Unsafe "const": it changes settings that other
threads read without a lock, so a thread allocating meanwhile sees the old threshold or
the new. Each block records whether it was mapped and is freed accordingly, so either
is safe. Another task running in the same process meanwhile gets glibc's usual
behaviour for its own large arrays too. Nothing here raises: a failed call leaves the
settings as they were and the case is checked all the same.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt(3)'s parameter numbers (glibc's malloc.h)."""

DEFAULT_MMAP_THRESHOLD = 128 * 1024
"""glibc's mmap threshold when no one sets it (and where its dynamic adjustment starts)."""

LONG = ctypes.sizeof(ctypes.c_long)
DEFAULT_MMAP_THRESHOLD_MAX = 512 * 1024 if LONG == 4 else 4 * 1024 * 1024 * LONG
"""The highest mmap threshold glibc's dynamic adjustment sets (mallopt(3)): 32 MiB on
64-bit systems, 512 KiB on 32-bit ones. glibc refuses a threshold over half its largest
arena heap, which is twice this."""

INT_MAX = 2**31 - 1
"""mallopt takes an int: a startup value over it cannot be put back."""


@dataclass(frozen=True)
class Settings:
    """The thresholds a case runs with (``during``) and the process's own (``after``), each
    (mmap threshold, trim threshold) in bytes; ``after`` None: left set (lincheck's own
    process, whose thresholds were glibc's dynamic ones)."""

    during: tuple[int, int]
    after: tuple[int, int] | None


MALLOC_VARIABLES = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
)
"""The variables through which glibc reads the thresholds it then keeps fixed."""


def _number(text: str) -> int | None:
    """A size as glibc reads one from the environment (decimal or 0x hexadecimal), or None
    if it is not one this module would dare put back."""
    text = text.strip()
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None
    if text.startswith("0") and not text.lower().startswith("0x") and text != "0":
        return None  # glibc reads a leading 0 as octal: leave such a value alone
    return value if 0 <= value <= INT_MAX else None


def settings(environ: Mapping[str, str], own: bool = False) -> Settings | None:
    """The thresholds to set for a case, from a process's startup environment, or None:
    nothing to do (the dynamic threshold is on in a process not lincheck's ``own``, or
    the user chose an mmap threshold, or a value this module cannot read back exactly)."""
    trim = environ.get("MALLOC_TRIM_THRESHOLD_")
    tunables = environ.get("GLIBC_TUNABLES", "")
    during = (DEFAULT_MMAP_THRESHOLD_MAX, 2 * DEFAULT_MMAP_THRESHOLD_MAX)
    if trim is None:
        untouched = not any(name in environ for name in MALLOC_VARIABLES)
        if own and untouched and "glibc.malloc." not in tunables:
            return Settings(during, None)
        return None
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return None
    if any(f"glibc.malloc.{name}" in tunables for name in ("mmap_threshold", "trim_threshold")):
        return None
    value = _number(trim)
    if value is None:
        return None
    return Settings((during[0], max(during[1], value)), (DEFAULT_MMAP_THRESHOLD, value))


@functools.cache
def startup_environment() -> dict[str, str]:
    """This process's environment as it started (what glibc read), on Linux from
    ``/proc/self/environ``; else, or if that cannot be read, ``os.environ``."""
    import os

    try:
        with open("/proc/self/environ", "rb") as fp:
            raw = fp.read()
    except OSError:
        return dict(os.environ)
    found: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            found.setdefault(name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    return found


@functools.cache
def glibc() -> Any | None:
    """glibc's functions (``mallopt``, ``malloc_trim``), or None if this is not glibc on
    Linux (musl, macOS and Windows have no ``gnu_get_libc_version``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc's own; raises AttributeError elsewhere)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def _planned() -> Settings | None:
    return settings(startup_environment(), _own) if glibc() is not None else None


_own = False  # whether this process is lincheck's own (lincheck_process)


def lincheck_process() -> None:
    """Declare this process lincheck's own, the ``lincheck`` command's or a worker of its
    pool: where glibc's thresholds are its dynamic ones, cases then run with them set
    (:func:`settings`), and they stay set between cases."""
    global _own
    _own = True


IDLE_SECONDS = 1.0
"""How long after its last case ends a process started with ``MALLOC_TRIM_THRESHOLD_``
keeps the case's thresholds, for a next case to reuse its arrays (a Dask worker with
tasks queued starts the next within milliseconds); then the startup values come back
and the free memory is returned. Putting them back after every case cost the 40 small
cases of ``python benchmarks/bench_many.py`` 0.5 s of CPU time on two Dask workers (2.2 s
against 1.7 s), every case's arrays faulted in afresh."""

_lock = threading.Lock()
_running = 0  # cases in the block now, in this process's threads
_undo: tuple[Any, Settings] | None = None  # (glibc, its settings) while they are changed
_timer: threading.Timer | None = None  # puts them back once the process is idle


def _set(libc: Any, mmap: int, trim: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))


def _enter() -> None:
    global _running, _undo, _timer
    with _lock:
        _running += 1
        if _timer is not None:  # a case again before the startup values came back
            _timer.cancel()
            _timer = None
        if _running > 1 or _undo is not None:  # set by a case still running, or kept set
            return
        libc, plan = glibc(), _planned()
        if libc is None or plan is None:
            return
        try:
            if _set(libc, *plan.during):
                _undo = (libc, plan)
            elif plan.after is not None:  # glibc refused a value: put back any it took
                _set(libc, *plan.after)
        except Exception:  # a failed foreign call: the case runs as the process is set up
            pass


def _leave() -> None:
    global _running, _timer
    with _lock:
        _running -= 1
        if _running > 0 or _undo is None or _undo[1].after is None:
            return  # a case still running, nothing set, or lincheck's own process: kept
        timer = threading.Timer(IDLE_SECONDS, lambda: _put_back(timer))
        timer.daemon = True
        _timer = timer
        timer.start()


def _put_back(timer: threading.Timer) -> None:
    """The startup thresholds back and the free memory returned, if ``timer`` is still the
    one the last case's end started: a case that started since cancelled it (even after
    it fired, while it waited for the lock) and, once ended, started another."""
    global _undo, _timer
    with _lock:
        if timer is not _timer:
            return
        _timer = None
        if _running > 0 or _undo is None:
            return
        libc, after = _undo[0], _undo[1].after
        assert after is not None  # a timer is started only where there is a value to put back
        _undo = None
        try:
            _set(libc, *after)
            libc.malloc_trim(0)
        except Exception:
            pass


def applied() -> bool:
    """Whether the thresholds are at :attr:`Settings.during` now."""
    return _undo is not None


@contextmanager
def arrays_reused(own_only: bool = False) -> Iterator[None]:
    """Large arrays reused for the duration of the block, in a process started with
    ``MALLOC_TRIM_THRESHOLD_`` (a Dask worker) or one of lincheck's own (and from then on,
    there); a no-op anywhere else (see the module's text). With ``own_only``, a no-op in
    any process not lincheck's own: a program's process, even one started with
    ``MALLOC_TRIM_THRESHOLD_`` (a Dask worker running the program's own tasks)."""
    if own_only and not _own:
        yield
        return
    _enter()
    try:
        yield
    finally:
        _leave()
