"""Many cases (``verify`` of a model's dumps): plan them, run them, stream their results.

The plan is pure: each case's estimated cost from its headers alone
(:func:`estimate`), the order (largest first, :func:`order`) and a cheap
fingerprint of its files and of the options that change verdicts
(:func:`fingerprint`), which ``--resume`` compares with an earlier run's
records (:func:`read_records`, :func:`resumable`).

The engines yield each case's outcome (:class:`Done`) as it finishes: in
this process (one job), in a pool of fresh worker processes
(:func:`run_local`), or as tasks on a Dask distributed cluster
(:func:`run_dask`, ``distributed`` imported only there). A case's bad
input, a worker that dies and a lost connection are that case's outcome;
the other cases go on. Each outcome becomes one JSON line (:func:`record`):
the per-case report of the JSON report (:meth:`lincheck.api.CaseResult.as_dict`)
plus the case's fingerprint, timing, worker and note, appended and flushed
to disk line by line (:class:`JsonlWriter`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__

VERDICT_OPTIONS = (
    "precision",
    "certain_only",
    "layout",
    "method",
    "mode",
    "samples",
    "directions",
    "seed",
    "budget",
    "atol",
    "rtol",
)
"""The options that can change a case's verdict: a record made with others is not reused."""


@dataclass(frozen=True)
class Task:
    """One case to check: ``name`` as the user gave it (the record's ``case``), ``where``
    the workers open it (an absolute path), its estimated ``work`` (N·D_in·D_out) and
    ``nbytes`` (its arrays' data), and its ``fingerprint`` (None: not readable now)."""

    name: str
    where: str
    work: int = 0
    nbytes: int = 0
    fingerprint: str | None = None
    seconds: float = 0.0  # its nominal time (:func:`nominal_seconds`)


@dataclass(frozen=True)
class Done:
    """A case's outcome: its result, how long it took, where it ran, and a ``note`` (the
    partial mode a case too large for its worker ran in). ``resumed``: read back from an
    earlier run's record, not checked in this one."""

    task: Task
    result: Any  # api.CaseResult
    seconds: float
    worker: str
    note: str | None = None
    resumed: bool = False


# ---------------------------------------------------------------------------
# The plan: pure functions of headers, file metadata and options


def dimensions(
    shapes: Mapping[str, tuple[tuple[int, ...], int]], layout: str = "out_in"
) -> tuple[int, int, int] | None:
    """(N, D_in, D_out) of a case from its arrays' shapes (N counts every leading
    dimension of X), or None for shapes that make no layer (the check will say why)."""
    if not all(name in shapes for name in ("X", "W")) or len(shapes["W"][0]) != 2:
        return None
    w, x = shapes["W"][0], shapes["X"][0]
    D_out, D_in = w if layout == "out_in" else w[::-1]
    N = 1
    for d in x[:-1]:
        N *= d
    return N, D_in, D_out


def estimate(shapes: Mapping[str, tuple[tuple[int, ...], int]], layout: str = "out_in"):
    """(work, bytes) of a case from its arrays' (shape, data bytes): work is N·D_in·D_out,
    the size of each of the three products a check computes (Y, dX, dW); bytes all the
    data it reads. Shapes that make no layer give work 0 (the check will say why)."""
    nbytes = sum(size for _, size in shapes.values())
    dims = dimensions(shapes, layout)
    return (0 if dims is None else dims[0] * dims[1] * dims[2]), nbytes


CASE_SECONDS = 0.01
"""A case's own cost beside its products (reading its files, planning, the report): about
6 ms for a tiny case, measured with ``verify --jobs 1`` on 50 cases of (8, 5, 3)."""

WORKER_START = 0.3
"""CPU seconds a worker process takes to start: a fresh interpreter importing NumPy and
lincheck's checks (measured 0.29–0.32 s on a 2-core machine)."""


def nominal_seconds(dims: tuple[int, int, int] | None, options: Mapping[str, Any]) -> float:
    """A case's nominal time: its check's at :data:`lincheck.checks.NOMINAL_RATE`
    (:func:`lincheck.checks.nominal_seconds`, for the options' mode) plus CASE_SECONDS."""
    from .checks import cost_options
    from .checks import nominal_seconds as check_seconds

    if dims is None:
        return CASE_SECONDS
    return CASE_SECONDS + check_seconds(*dims, **cost_options(options))


def default_workers(tasks: Iterable[Task], cores: int) -> int:
    """Worker processes when ``--jobs`` is not given: one per core, or none (the cases run in
    the command's own process) when they are too little work to pay for starting them.

    With c workers a run of nominal time T saves at most T·(1 − 1/c) of wall time, and the
    workers, started together, cost about WORKER_START of it (c·WORKER_START of CPU): so
    workers start only if T·(1 − 1/c) > WORKER_START. (50 cases of (8, 5, 3) took 0.69 s
    in one process and 1.05 s with two workers.) The nominal rate may be twice a loaded
    machine's, so a run kept in one process loses at most about WORKER_START of wall time,
    and saves c·WORKER_START of CPU."""
    tasks = list(tasks)
    cores = min(cores, len(tasks))
    if cores <= 1:
        return 1
    total = sum(t.seconds for t in tasks)
    return cores if total * (1 - 1 / cores) > WORKER_START else 1


def order(tasks: Iterable[Task]) -> list[Task]:
    """Largest first (by work, then bytes), so that the long cases start first and the small
    ones fill the gaps at the end; ties by name, so the order is the same every run."""
    return sorted(tasks, key=lambda t: (-t.work, -t.nbytes, t.name))


def verdict_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that change verdicts (:data:`VERDICT_OPTIONS`), as plain values."""
    return {k: options.get(k) for k in VERDICT_OPTIONS}


def fingerprint(files: Iterable[tuple | None], options: Mapping[str, Any]) -> str | None:
    """A digest of a case's files' identities (name, size, mtime_ns, hash of both ends:
    :func:`lincheck.arrays.file_identity`), lincheck's version and the verdict options.
    None if a file could not be read (such a case is never skipped)."""
    import hashlib

    files = list(files)
    if not files or any(f is None for f in files):
        return None
    text = json.dumps(
        {"lincheck": __version__, "files": files, "options": verdict_options(options)},
        sort_keys=True,
        default=str,
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def plan(paths: Iterable[os.PathLike | str], options: Mapping[str, Any]) -> list[Task]:
    """Each case's task (cost and fingerprint from headers and metadata only), largest first."""
    from . import arrays

    tasks = []
    for path in paths:
        shapes = arrays.header_shapes(path)
        layout = options.get("layout", "out_in")
        work, nbytes = estimate(shapes, layout)
        seconds = nominal_seconds(dimensions(shapes, layout), options)
        files = [arrays.file_identity(f) for f in arrays.case_files(path)]
        where = str(path) if arrays.is_url(path) else os.path.abspath(path)
        tasks.append(Task(str(path), where, work, nbytes, fingerprint(files, options), seconds))
    return order(tasks)


# ---------------------------------------------------------------------------
# One case, in whichever process runs it


def partial_mode(shapes, options: Mapping[str, Any], limit: int | None):
    """Options for a case under a memory ``limit`` per worker, and a note: with ``--mode
    auto``, a case whose full check needs more than the limit runs along directions (which
    needs some 25 copies of W, whatever N) when that fits; the note says so. Any other case
    keeps its options (and the memory guard refuses it if it does not fit)."""
    from .checks import memory_needed

    if options.get("mode") != "auto" or limit is None:
        return dict(options), None
    method, budget = options.get("method", "central"), options.get("budget", 10.0)
    full = memory_needed(shapes, "full", method, budget)
    if memory_needed(shapes, "auto", method, budget) <= limit:
        return dict(options), None
    if memory_needed(shapes, "directions", method, budget) > limit:
        return dict(options), None
    from .output import _size

    note = (
        f"checked along directions: a full check needs about {_size(full)}, "
        f"over this worker's {_size(limit)}"
    )
    return {**options, "mode": "directions"}, note


def worker_limit(max_memory: str | None, share: int) -> tuple[int | None, str]:
    """Bytes one worker may use, and where that comes from: ``--max-memory`` (per worker),
    else half the memory available (as one check would take), shared among the ``share``
    workers of this machine; on a Dask worker, half its own memory limit."""
    from .options import parse_size

    if max_memory is not None:
        return parse_size(max_memory), "--max-memory"
    dask = _dask_worker()
    own = getattr(getattr(dask, "memory_manager", None), "memory_limit", None)
    if own:
        return int(own) // 2, "half this Dask worker's memory limit"
    from .output import _available_memory

    available = _available_memory()
    if available is None:
        return None, ""
    if share > 1:
        return available // 2 // share, f"half the available memory, shared by {share} workers"
    return available // 2, "half the available memory"


def memory_guard(shapes, options: Mapping[str, Any], limit: int | None, why: str) -> None:
    """Refuse a case whose check needs more memory than its worker's ``limit`` (bad input:
    that case fails, the others go on)."""
    from .checks import memory_needed
    from .errors import InputError
    from .output import _size

    if limit is None:
        return
    method, budget = options.get("method", "central"), options.get("budget", 10.0)
    need = memory_needed(shapes, options["mode"], method, budget)
    if need > limit:
        raise InputError(
            f"this check needs about {_size(need)} of memory beyond its inputs, over "
            f"{_size(limit)} ({why}); free memory, raise --max-memory or use fewer --jobs"
        )


def _dask_worker():
    import sys

    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def worker_name() -> str:
    """Where this case runs: a Dask worker's address, else this process's id."""
    dask = _dask_worker()
    return str(dask.address) if dask is not None else f"pid {os.getpid()}"


def check_case(task: Task, options: dict, max_memory: str | None = None, share: int = 1):
    """Check one case (in whichever process runs it): (CaseResult, seconds, worker, note).
    Bad input is the case's result (``bad_input``), never an exception. In a process
    started with ``MALLOC_TRIM_THRESHOLD_`` (a Dask worker), or one of lincheck's own,
    glibc keeps the case's large arrays for reuse while it runs
    (:func:`lincheck.allocator.arrays_reused`)."""
    from .allocator import arrays_reused

    start = time.perf_counter()
    with arrays_reused():
        result, note = _check(task, options, max_memory, share)
    return result, time.perf_counter() - start, worker_name(), note


def _check(task: Task, options: dict, max_memory: str | None, share: int):
    from . import api, arrays, checks, layouts, tensors
    from .errors import LincheckError
    from .layouts import internal_shapes

    note = None
    try:
        loaded = arrays.load(task.where)
        a = loaded.arrays
        arithmetic = arrays.arithmetic_source(options.get("precision"), loaded)
        if options.get("precision") is None:  # --precision wins over the file's metadata
            stored = arrays.stored_precision(loaded, task.name)
            options = {**options, "precision": stored} if stored else options
        limit, why = worker_limit(max_memory, share)
        shapes = internal_shapes(
            {n: tuple(x.shape) for n, x in a.items()}, options.get("layout", "out_in")
        )
        if all(n in shapes for n in ("X", "W", "dY")) and len(shapes["W"]) == 2:
            options, note = partial_mode(shapes, options, limit)
            memory_guard(shapes, options, limit, why)  # else the check says what is wrong
        subjects = (*tensors.SUBJECT_NAMES, *tensors.SCALE_NAMES)
        with layouts.command_line_advice():
            report = checks.check(
                a["X"],
                a["W"],
                a.get("B"),
                a["dY"],
                **{name: a[name] for name in subjects if name in a},
                **options,
                sources=loaded.sources,
            )
        result = api.CaseResult(task.name, report, None, arithmetic=arithmetic)
    except LincheckError as exc:
        result = api.CaseResult(task.name, None, as_named(str(exc), task), bad_input=True)
    return result, note


def as_named(message: str, task: Task) -> str:
    """A message about a case's files with the case's path as the user gave it (its name):
    the workers open it by an absolute path, which the user did not type."""
    if task.where == task.name:
        return message
    return re.sub(re.escape(task.where) + r"(?=[/\\):,\s]|$)", lambda _: task.name, message)


Check = Callable[..., tuple]


# ---------------------------------------------------------------------------
# Engines


WORKER_DIED = "its worker process died (killed by a signal, or out of memory)"


def _failed(task: Task, error: str, worker: str = "") -> Done:
    from . import api

    return Done(task, api.CaseResult(task.name, None, error), 0.0, worker)


def run_serial(
    tasks: list[Task], options: dict, max_memory: str | None = None, check: Check | None = None
) -> Iterator[Done]:
    """Each case in this process, in order."""
    check = check or check_case
    for task in tasks:
        result, seconds, worker, note = check(task, options, max_memory, 1)
        yield Done(task, result, seconds, worker, note)


TRACKER_WARNING = "ignore::UserWarning:multiprocessing.resource_tracker"


def _quiet_resource_tracker() -> None:
    """Keep multiprocessing's resource tracker from warning about the pool's semaphores.

    Ctrl-C ends lincheck at once (``os._exit``, :func:`lincheck.cli.main`: the interpreter's
    exit handlers could wait forever on a pool whose worker was killed mid-reply), so the
    pool's named semaphores are left to the tracker, a process of its own, which unlinks
    them and prints a UserWarning after lincheck's one line. It takes its warning options
    from this process's (``-W``, when it starts with the pool's first semaphore).
    """
    import sys

    if TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_WARNING)


def run_local(
    tasks: list[Task],
    options: dict,
    max_memory: str | None,
    workers: int,
    check: Check | None = None,
) -> Generator[Done, None, None]:
    """Cases in ``workers`` fresh processes (spawn), largest first, yielded as they finish;
    a worker that dies fails the cases it leaves. Closing the generator (Ctrl-C) kills
    the workers now, not after their current case."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    check = check or check_case
    if workers <= 1:
        yield from run_serial(tasks, options, max_memory, check)
        return
    # Fresh interpreters (spawn), each told to use its share of the cores for BLAS: forked
    # workers would inherit the parent's BLAS threads, one per core each, and OpenBLAS's
    # spinning threads, oversubscribed, made 4 cases on 2 cores take 72 s instead of 11.
    context = multiprocessing.get_context("spawn")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    _quiet_resource_tracker()
    pool = ProcessPoolExecutor(workers, context, initializer=start_worker)
    rank = {task.name: i for i, task in enumerate(tasks)}
    try:
        with environment({name: threads for name in BLAS_THREADS}):  # while workers start
            pending = {
                pool.submit(check, task, options, max_memory, workers): task for task in tasks
            }
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: rank[pending[f].name]):
                task = pending.pop(future)
                try:
                    result, seconds, worker, note = future.result()
                except BrokenProcessPool:
                    yield _failed(task, WORKER_DIED)
                    continue
                yield Done(task, result, seconds, worker, note)
    except BaseException:
        stop_workers(pool)
        raise
    pool.shutdown()


BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""The variables BLAS libraries read for their thread count when NumPy is first imported."""


@contextmanager
def environment(defaults: dict[str, str]):
    """Set the variables the user has not set, for the processes started in the block."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def start_worker() -> None:
    """Set up a worker of the local pool: Ctrl-C is the command's to handle (it kills the
    workers), and the process is lincheck's own (:func:`lincheck.allocator.lincheck_process`)."""
    import signal

    from .allocator import lincheck_process

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lincheck_process()


def stop_workers(pool) -> None:
    """Kill a process pool's workers now, not after their current case (about a minute)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # public in 3.14 only
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=1)


def dask_worker_died(attempts: str) -> str:
    return (
        f"its worker died while checking it ({attempts}: killed by a signal, or out of "
        "memory); the scheduler stopped retrying it"
    )


CONNECT_TIMEOUT = 10.0
"""Seconds to reach a Dask scheduler before ``--scheduler ADDRESS`` is refused."""


def connect(address: str, timeout: float | None = None):
    """A ``distributed.Client`` of the scheduler at ``address``.

    Raises
    ------
    InputError
        ``--scheduler ADDRESS: cannot connect ...`` (no scheduler there, a bad address).
    """
    import distributed

    from .errors import InputError

    try:
        return distributed.Client(address, timeout=timeout or CONNECT_TIMEOUT)
    except Exception as exc:  # OSError, TimeoutError, ValueError of a malformed address
        raise InputError(
            f"--scheduler {address}: cannot connect to a Dask scheduler there "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def run_dask(
    tasks: list[Task],
    options: dict,
    max_memory: str | None,
    address: str | Any,
    check: Check | None = None,
    timeout: float | None = None,
) -> Generator[Done, None, None]:
    """Cases as tasks on a Dask distributed cluster (its scheduler's ``address``, or a
    ``distributed.Client``), largest first (by priority), yielded as they finish.

    A case whose worker dies is retried on another by the scheduler, up to its
    ``distributed.scheduler.allowed-failures`` (Dask's default: 3); past that it is
    reported as such (an out-of-memory case would kill every worker it lands on). Any
    other failure to get a result (a lost connection) is reported for that case; the
    other cases go on. Closing the generator cancels the cases not finished.
    """
    import distributed

    check = check or check_case
    own = not isinstance(address, distributed.Client)
    client: Any = connect(address, timeout) if own else address
    try:
        futures = {}
        for rank, task in enumerate(tasks):
            future = client.submit(
                check,
                task,
                options,
                max_memory,
                1,
                key=f"lincheck-case-{rank}-{os.getpid()}-{time.time_ns()}",
                pure=False,
                priority=len(tasks) - rank,  # higher first: the largest cases
            )
            futures[future] = task
        try:
            for future in distributed.as_completed(list(futures)):
                task = futures[future]
                try:
                    result, seconds, worker, note = future.result()
                except distributed.KilledWorker as exc:
                    yield _failed(task, dask_worker_died(_attempts(exc)))
                    continue
                except Exception as exc:  # a lost connection, a cancelled task, ...
                    yield _failed(task, _lost(exc))
                    continue
                finally:
                    future.release()
                yield Done(task, result, seconds, worker, note)
        finally:
            client.cancel([f for f in futures if not f.done()])
    finally:
        if own:
            client.close()


def _lost(exc: BaseException) -> str:
    """Why a case's result never came: Dask's reason for cancelling it (the scheduler's
    connection lost, say), else the exception's first line."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return f"lost: Dask cancelled it ({reason})"
    return f"lost: {type(exc).__name__}: {_first_line(exc)}"


def _attempts(exc: BaseException) -> str:
    allowed = getattr(exc, "allowed_failures", None)
    return "tried once" if allowed is None else f"tried {int(allowed) + 1} times"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no message"


# ---------------------------------------------------------------------------
# JSON lines: one record per case


def record(done: Done) -> dict[str, Any]:
    """A case's JSON line: its per-case report (as in the JSON report's ``cases``), its
    ``verdict`` (pass, fail, bad input, error), ``fingerprint``, ``seconds``, ``worker``
    and ``note``, and lincheck's ``version``."""
    result = done.result
    if result.report is not None:
        verdict = "pass" if result.passed else "fail"
    else:
        verdict = "bad input" if result.bad_input else "error"
    return {
        **result.as_dict(),
        "verdict": verdict,
        "fingerprint": done.task.fingerprint,
        "note": done.note,
        "seconds": round(done.seconds, 6),
        "worker": done.worker,
        "version": __version__,
    }


DECIDED = ("pass", "fail")
"""The verdicts ``--resume`` keeps: a case with bad input, or whose worker died or whose
result was lost, is checked again."""


def read_records(path: os.PathLike | str) -> tuple[list[dict], int]:
    """The records of a JSON lines file, in order, and how many lines were unreadable (a
    line cut short when a run was killed mid-write: its case is checked again).

    Raises OSError if the file cannot be read."""
    records: list[dict] = []
    unreadable = 0
    with open(path, "rb") as fp:
        for line in fp:
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if isinstance(item, dict) and "case" in item:
                records.append(item)
            else:
                unreadable += 1
    return records, unreadable


def resumable(tasks: list[Task], records: Iterable[dict]) -> tuple[list[Done], list[Task]]:
    """(the cases an earlier run decided with the same inputs and options, read back from
    their records; the cases left to check). For each case the last record with its
    fingerprint counts (a file may hold runs with other options or older inputs too); it
    is reused only if its verdict is pass or fail and its report reads back."""
    from . import api
    from .results import report_from_dict

    last = {(_place(str(r["case"])), r.get("fingerprint")): r for r in records}
    kept, rest = [], []
    for task in tasks:
        item = last.get((_place(task.name), task.fingerprint))
        reusable = (
            item is not None and task.fingerprint is not None and item.get("verdict") in DECIDED
        )
        if reusable:
            assert item is not None
            try:
                report = report_from_dict(item["report"])
            except (KeyError, TypeError, ValueError):
                rest.append(task)
                continue
            seconds = float(item.get("seconds") or 0.0)
            arithmetic = item["report"].get("arithmetic")
            result = api.CaseResult(task.name, report, None, arithmetic=arithmetic)
            kept.append(
                Done(task, result, seconds, str(item.get("worker")), item.get("note"), True)
            )
        else:
            rest.append(task)
    return kept, rest


def _place(name: str) -> str:
    """A case's name as a place (``dumps/a`` and ``./dumps/a`` are one case)."""
    from .arrays import is_url

    return name if is_url(name) else os.path.abspath(name)


class JsonlWriter:
    """Appends one JSON line per case to a file, flushed and synced to disk line by line,
    so that ``tail -f`` follows a run and a killed run keeps what it finished. A file whose
    last line was cut short (a kill mid-write) first gets the newline it lacks."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.fp = open(self.path, "ab")
        if self.fp.tell() > 0:
            with open(self.path, "rb") as fp:
                fp.seek(-1, os.SEEK_END)
                if fp.read(1) != b"\n":
                    self.fp.write(b"\n")

    def write(self, item: Mapping[str, Any]) -> None:
        from .results import _valid_text

        line = json.dumps(_valid_text(item), allow_nan=False, separators=(",", ":"))
        self.fp.write(line.encode("utf-8") + b"\n")
        self.fp.flush()
        os.fsync(self.fp.fileno())

    def close(self) -> None:
        self.fp.close()
