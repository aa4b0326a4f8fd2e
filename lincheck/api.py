"""The Python API for tests and CI: assert on gradients, sweep a user's backward function.

``check`` (from :mod:`lincheck.checks`) returns a :class:`~lincheck.results.Report`;
``assert_gradients`` raises ``AssertionError`` with the failures and hints when it fails;
``check_backward`` and ``check_forward`` call a user's implementation on a
sweep of seeded random layers (the requested shape, the edge shapes and each
requested dtype) and check every case; ``assert_backward`` raises with the
table of cases unless every case passes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import layouts
from .checks import check, random_inputs
from .errors import LincheckError
from .frameworks import classify, detect_framework
from .layouts import check_layout, stored
from .results import Report, json_text
from .worker import (
    DEFAULT_TIMEOUT,
    Worker,
    arithmetic,
    call,
    module_layout_error,
    read_results,
)


def assert_gradients(
    X, W, B, dY, dX=None, dW=None, dB=None, Y=None, full: bool = False, **options
) -> Report:
    """Check gradients like :func:`lincheck.check`; raise ``AssertionError`` if any check fails.

    The message's first line names the failed checks; then what failed and
    the hints (what kind of mistake it looks like), the failed tensors' rows
    (largest error against its tolerance, and where) and their worst entries:
    a screenful whatever the layer. ``full=True`` gives the whole report
    instead (every table, the heatmaps). Returns the report when all pass.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X, W, G = rng.normal(size=(8, 5)), rng.normal(size=(3, 5)), rng.normal(size=(8, 3))
    >>> assert_gradients(X, W, None, G, dX=G @ W, dW=G.T @ X).passed
    True
    >>> assert_gradients(X, W, None, G, dX=G @ W, dW=-(G.T @ X))
    Traceback (most recent call last):
    ...
    AssertionError: lincheck: 1 of 4 checks failed: dW (supplied)
    ...
    """
    from .report import brief_text, to_text

    __tracebackhide__ = True  # pytest shows the caller's line, not this function's code
    report = check(X, W, B, dY, dX=dX, dW=dW, dB=dB, Y=Y, **options)
    if not report.passed:
        failed = ", ".join(f"{c.tensor} ({c.subject})" for c in report.failed)
        head = f"lincheck: {len(report.failed)} of {len(report.checks)} checks failed: {failed}"
        if full:
            raise AssertionError(head + "\n" + to_text(report))
        more = "(the whole report: assert_gradients(..., full=True))"
        raise AssertionError(f"{head}\n{brief_text(report)}\n{more}")
    return report


BRIEF_CASES = 3
"""Failed cases whose problems and hints :func:`assert_backward`'s message shows (the
table names every case; a mistake usually fails many cases alike)."""


def assert_backward(fn: Callable, **options) -> Sweep:
    """:func:`check_backward` that raises ``AssertionError`` unless every case passes.

    The message's first line is the verdict (how many cases failed, and which); then
    a table of the cases, and the problems and hints of the first
    :data:`BRIEF_CASES` failed cases that fail differently (``print(sweep)`` of
    :func:`check_backward`'s result shows them all). Returns the sweep
    when every case passes. Options are :func:`check_backward`'s.

    Examples
    --------
    >>> def backward(X, W, B, dY):
    ...     return dY @ W, dY.T @ X, None if B is None else dY.mean(0)
    >>> assert_backward(backward, N=8, D_in=5, D_out=3, cases="main")
    Traceback (most recent call last):
    ...
    AssertionError: FAIL  2 of 2 cases failed: float64 N=8 D_in=5 D_out=3, ...
    ...
    """
    from .report import sweep_text, verdict_cases

    __tracebackhide__ = True  # pytest shows the caller's line, not this function's code
    sweep = check_backward(fn, **options)
    if not sweep.passed:
        head = verdict_cases(sweep.results, sweep.skipped).plain
        text = sweep_text(sweep.results, sweep.skipped, most=BRIEF_CASES, last_line=False)
        raise AssertionError(f"{head}\n{text}")
    return sweep


# ---------------------------------------------------------------------------
# Sweeps over a user's implementation


CASES = {
    "main": "the requested shape",
    "n1": "a batch of one: sums over the batch of one term, where a mean and a sum agree",
    "din1": "one input feature, where broadcasting hides bugs",
    "dout1": "one output unit: dX's sums of one term",
    "swapped": "D_in and D_out swapped (made unequal for a square layer), so they cannot "
    "be confused",
    "batched": "X with leading batch dimensions (2, ⌈N/2⌉, D_in), as torch.nn.Linear "
    "accepts (leave it out for code that flattens X, as CS231n's affine layers do)",
    "no-bias": "no bias: B and dB are None",
}
"""The kinds of case a sweep checks, by their stable short names, and what each tests."""


def select_cases(cases: str | Iterable[str] | None) -> tuple[str, ...]:
    """The kinds of case to check (of :data:`CASES`, in its order) from names like
    ``"main,n1"``, or exclusions like ``"-batched"`` (every other kind; with names too,
    those names less the excluded ones). None: every kind. ValueError names the kinds."""
    if cases is None:
        return tuple(CASES)
    items = cases.split(",") if isinstance(cases, str) else list(cases)
    names = [str(item).strip() for item in items if str(item).strip()]
    unknown = [n for n in names if n.removeprefix("-") not in CASES]
    if unknown or not names:
        what = f"unknown case {unknown[0]!r}" if unknown else "no case named"
        raise ValueError(f"{what}; the cases are {', '.join(CASES)} (a leading '-' excludes one)")
    chosen = [n for n in names if not n.startswith("-")] or list(CASES)
    excluded = {n[1:] for n in names if n.startswith("-")}
    kinds = tuple(k for k in CASES if k in chosen and k not in excluded)
    if not kinds:
        raise ValueError(f"no case left to check: {', '.join(names)} excludes every case")
    return kinds


@dataclass(frozen=True)
class Case:
    """One layer of a sweep: its sizes, dtype, bias, seed, and a name saying what it tests.

    ``kind`` is its short stable name (:data:`CASES`); ``layout`` how W is given to the
    user's functions (:mod:`lincheck.layouts`).
    """

    name: str
    batch_shape: tuple[int, ...]
    D_in: int
    D_out: int
    dtype: str
    bias: bool
    seed: int
    kind: str = "main"
    layout: str = "out_in"

    @property
    def slug(self) -> str:
        """The name as a folder name."""
        return re.sub(r"[^A-Za-z0-9=._-]+", "_", self.name).strip("_")

    def inputs(self) -> dict[str, np.ndarray]:
        """Seeded random X, W, B, dY for this case (X and dY with the leading dimensions,
        W in the case's layout)."""
        N = int(np.prod(self.batch_shape))
        rng = np.random.default_rng(self.seed)
        data = random_inputs(rng, N, self.D_in, self.D_out, self.dtype, self.bias)
        data["X"] = data["X"].reshape(self.batch_shape + (self.D_in,))
        data["dY"] = data["dY"].reshape(self.batch_shape + (self.D_out,))
        return stored(data, self.layout)


def sweep(
    N: int = 32,
    D_in: int = 64,
    D_out: int = 16,
    dtypes: Iterable[str] = ("float64", "float32"),
    seed: int = 0,
    cases: str | Iterable[str] | None = None,
    layout: str = "out_in",
) -> list[Case]:
    """The cases a sweep checks, per dtype: the requested shape and its edges.

    ``N=1``, ``D_in=1``, ``D_out=1`` (sums of one term, where a mean and a sum
    agree and broadcasting hides bugs), the two sizes swapped (or made unequal,
    for a square layer) so D_in and D_out cannot be confused, leading batch
    dimensions as ``torch.nn.Linear`` accepts, and no bias: the kinds of
    :data:`CASES`, in that order. ``cases`` chooses some of them by name
    (:func:`select_cases`: ``"main,n1"``, or ``"-batched"`` for all but one); a case
    keeps its seed whichever are chosen. ``layout`` is how W is handed to the user's
    functions (:mod:`lincheck.layouts`).

    Examples
    --------
    >>> [c.kind for c in sweep(8, 4, 3, ["float64"], cases="-batched,-no-bias")]
    ['main', 'n1', 'din1', 'dout1', 'swapped']
    """
    kinds = select_cases(cases)
    check_layout(layout)
    return [c for c in _all_cases(N, D_in, D_out, dtypes, seed, layout) if c.kind in kinds]


def _all_cases(N, D_in, D_out, dtypes, seed, layout) -> list[Case]:
    lead = (2, max(1, (N + 1) // 2))
    other = (N, D_out, D_in) if D_in != D_out else (N, D_in, D_out + 1)
    shapes = [
        ("main", f"N={N} D_in={D_in} D_out={D_out}", (N,), D_in, D_out, True),
        ("n1", f"N=1 D_in={D_in} D_out={D_out}", (1,), D_in, D_out, True),
        ("din1", f"N={N} D_in=1 D_out={D_out}", (N,), 1, D_out, True),
        ("dout1", f"N={N} D_in={D_in} D_out=1", (N,), D_in, 1, True),
        (
            "swapped",
            f"N={other[0]} D_in={other[1]} D_out={other[2]}",
            (other[0],),
            other[1],
            other[2],
            True,
        ),
        ("batched", f"X {lead + (D_in,)} D_out={D_out}", lead, D_in, D_out, True),
        ("no-bias", f"N={N} D_in={D_in} D_out={D_out} no bias", (N,), D_in, D_out, False),
    ]
    cases: list[Case] = []
    for dtype in dtypes:
        for kind, label, batch, d_in, d_out, bias in shapes:
            name = f"{dtype} {label}"
            seed_ = seed + len(cases)
            cases.append(Case(name, batch, d_in, d_out, dtype, bias, seed_, kind, layout))
    return cases


def split_sweep(N, D_in, D_out, dtypes, seed, cases, layout) -> tuple[list[Case], tuple[Case, ...]]:
    """(the cases of :func:`sweep` chosen by ``cases``, the rest: skipped)."""
    dtypes = list(dtypes)
    chosen = sweep(N, D_in, D_out, dtypes, seed, cases, layout)
    names = {c.name for c in chosen}
    rest = tuple(
        c for c in sweep(N, D_in, D_out, dtypes, seed, None, layout) if c.name not in names
    )
    return chosen, rest


@dataclass(frozen=True)
class CaseResult:
    """A case's outcome: its report, or the error that stopped it (never both).

    ``name`` says what the case is (a sweep case, or the path of a dump);
    ``arrays`` holds its inputs and whatever the user's function returned, to
    save a failing case for ``verify``; ``bad_input`` marks an error in the
    inputs themselves rather than in what is checked. ``unsupported`` marks a
    case the user's function does not take (leading batch dimensions it
    raises on, while the same rows as one 2-D batch pass): not a wrong
    gradient, but not a pass either; ``error`` then says so and how to leave
    the case out.
    """

    name: str
    report: Report | None
    error: str | None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    case: Case | None = None
    bad_input: bool = False
    unsupported: bool = False
    arithmetic: Mapping[str, str] | None = None
    """Where a dump's arithmetic came from, when not from its dtypes (``verify``: the
    ``--precision`` option or the file's metadata), as one case's JSON report says it."""

    @property
    def passed(self) -> bool:
        return self.error is None and self.report is not None and self.report.passed

    @property
    def status(self) -> str:
        """PASS, FAIL, ERROR (the user's function failed), UNSUPPORTED (it does not take
        this kind of case; never a pass) or BAD (bad input)."""
        if self.passed:
            return "PASS"
        if self.report is not None:
            return "FAIL"
        return "BAD" if self.bad_input else "UNSUPPORTED" if self.unsupported else "ERROR"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.name,
            "kind": None if self.case is None else self.case.kind,
            "passed": self.passed,
            "error": self.error,
            "bad_input": self.bad_input,
            "unsupported": self.unsupported,
        }
        if self.report is not None:
            out["report"] = self.report.as_dict()
            if self.arithmetic:
                out["report"]["arithmetic"] = dict(self.arithmetic)
        return out


@dataclass(frozen=True)
class Sweep:
    """Every case of a sweep. ``passed`` iff every case checked passed; ``skipped`` are the
    cases of the sweep that were not chosen (``cases=``) and so not checked."""

    results: tuple[CaseResult, ...]
    skipped: tuple[Case, ...] = ()

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def __repr__(self) -> str:
        """One line, as pytest shows a value in a failed assertion: the verdict, how many
        cases ended how, and why the first failure failed (``print(sweep)`` for more)."""
        from collections import Counter

        from .report import case_failures

        statuses = Counter(r.status for r in self.results)
        counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
        n = len(self.results)
        text = f"Sweep({'PASS' if self.passed else 'FAIL'}: {n} case{'s' * (n != 1)}, {counts}"
        text += f", {len(self.skipped)} skipped" if self.skipped else ""
        if self.failed:  # pytest shows 240 characters of a repr: the first failure only
            first = self.failed[0]
            text += f"; {first.name}: {case_failures(first)}"
            text += f"; {len(self.failed) - 1} more" if len(self.failed) > 1 else ""
            text += "; print() it for the table"
        return text + ")"

    def __str__(self) -> str:
        """The table of cases, each failure's problems and hints, and the verdict line."""
        from .report import sweep_text

        return sweep_text(self.results, self.skipped)

    def as_dict(self) -> dict[str, Any]:
        """The JSON report: ``passed``, every case's ``checks`` and ``hints`` (each naming
        its ``case``), ``counts`` of cases checked, failed, with bad input (both, so
        neither hides the other), unsupported (the user's function does not take them;
        not counted as failed) and skipped, ``cases`` with one report (or error) per
        case, and ``skipped``: the cases not checked, by name and kind."""
        checks, hints = [], []
        for r in self.results:
            if r.report is not None:
                checks += [{"case": r.name, **c.as_dict()} for c in r.report.checks]
                hints += [{"case": r.name, **h.as_dict()} for h in r.report.hints]
        bad = sum(r.bad_input for r in self.results)
        unsupported = sum(r.unsupported for r in self.results)
        failed = len(self.failed) - bad - unsupported
        return {
            "passed": self.passed,
            "checks": checks,
            "hints": hints,
            "counts": {
                "cases": len(self.results),
                "failed": failed,
                "bad_input": bad,
                "unsupported": unsupported,
                "skipped": len(self.skipped),
            },
            "cases": [r.as_dict() for r in self.results],
            "skipped": [{"case": c.name, "kind": c.kind} for c in self.skipped],
        }

    def to_json(self, **context: Any) -> str:
        """The JSON report as strict JSON text, with ``context`` merged in at the top level."""
        return json_text({**self.as_dict(), **context})


def check_backward(
    fn: Callable,
    N: int = 32,
    D_in: int = 64,
    D_out: int = 16,
    dtypes: Iterable[str] = ("float64", "float32"),
    seed: int = 0,
    forward: Callable | None = None,
    isolate: bool = False,
    timeout: float | None = None,
    cases: str | Iterable[str] | None = None,
    layout: str = "out_in",
    framework: str | None = None,
    device: str = "cpu",
    **options,
) -> Sweep:
    """Check ``fn(X, W, B, dY) -> (dX, dW, dB)`` on every case of :func:`sweep`.

    ``B`` is None for the no-bias cases, and ``dB`` must then be None. With
    ``layout="in_out"``, W is (D_in, D_out) (``x @ w + b``) and dW must be too.
    ``cases`` chooses the kinds of case by name (:data:`CASES`; ``"-batched"``
    for all but one); the others are listed in the result's ``skipped``. The
    arrays are NumPy arrays in the case's dtype; the returned gradients are
    held to that dtype's arithmetic (or ``precision=`` in ``options``). If
    ``forward`` is given, ``forward(X, W, B) -> Y`` is checked too. An
    exception from a user function (``SystemExit`` included), or a result of
    the wrong form, fails that case with the error; it does not stop the sweep.

    With ``isolate=True`` the functions run in a worker process, as
    ``lincheck run --impl`` runs them (:mod:`lincheck.worker`): ``os._exit``,
    a crash in native code or a hang (``timeout`` seconds per case, default
    :data:`lincheck.worker.DEFAULT_TIMEOUT`) then fails the case instead of
    ending or stalling the caller. The functions must be importable by name
    (defined at a module's top level, not in ``__main__`` or a closure).

    ``fn`` may also be a torch or JAX layer, as ``lincheck run --impl`` takes
    it (:func:`lincheck.frameworks.classify`): a backward on the framework's
    arrays, a forward ``fn(X, W, B) -> Y`` differentiated by its autograd
    (then Y is checked too), or a torch module class; ``framework`` ("numpy",
    "torch", "jax") overrides the detection and ``device`` says where it runs.

    Examples
    --------
    >>> def backward(X, W, B, dY):
    ...     X2, G = X.reshape(-1, X.shape[-1]), dY.reshape(-1, dY.shape[-1])
    ...     return (dY @ W, G.T @ X2, None if B is None else G.sum(0))
    >>> check_backward(backward, N=8, D_in=5, D_out=3).passed
    True
    """
    chosen, skipped = split_sweep(N, D_in, D_out, dtypes, seed, cases, layout)
    return _run_sweep(chosen, fn, forward, isolate, timeout, options, skipped, framework, device)


def _run_sweep(
    cases,
    fn,
    forward,
    isolate: bool,
    timeout: float | None,
    options,
    skipped=(),
    framework=None,
    device="cpu",
) -> Sweep:
    layout = cases[0].layout if cases else "out_in"
    if not isolate:
        if fn is not None and (framework or detect_framework(fn)) != "numpy":
            fn = classify(fn, _name(fn), framework, device)
            if fn.role == "module" and layout == "in_out":
                raise ValueError(module_layout_error(fn.name))
        return Sweep(tuple(run_case(case, fn, forward, **options) for case in cases), skipped)
    impl = None if fn is None else _importable(fn)
    spec = None if forward is None else _importable(forward)
    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    paths = tuple(sys.path)
    with Worker(impl, spec, limit, paths, framework, device, layout) as worker:
        results = tuple(run_case(case, None, worker=worker, **options) for case in cases)
    return Sweep(results, skipped)


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _importable(fn: Callable) -> str:
    """``module:qualified.name`` by which a worker process can import ``fn``."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or not name or "<" in name:
        raise ValueError(
            f"isolate=True needs a function a worker can import by name; {name or fn!r} "
            f"(module {module}) is not: define it at the top level of an importable module"
        )
    return f"{module}:{name}"


def check_forward(
    forward: Callable,
    N: int = 32,
    D_in: int = 64,
    D_out: int = 16,
    dtypes: Iterable[str] = ("float64", "float32"),
    seed: int = 0,
    isolate: bool = False,
    timeout: float | None = None,
    cases: str | Iterable[str] | None = None,
    layout: str = "out_in",
    **options,
) -> Sweep:
    """Check ``forward(X, W, B) -> Y`` against X Wᵀ + B (X W + B with ``layout="in_out"``)
    on every case of :func:`sweep` (``isolate``, ``timeout``, ``cases`` as for
    :func:`check_backward`)."""
    chosen, skipped = split_sweep(N, D_in, D_out, dtypes, seed, cases, layout)
    return _run_sweep(chosen, None, forward, isolate, timeout, options, skipped)


def run_case(
    case: Case,
    fn: Callable | None,
    forward: Callable | None = None,
    *,
    worker: Worker | None = None,
    **options,
) -> CaseResult:
    """Call the user's functions on one case and check what they return.

    In this process by default; with ``worker`` (a :class:`lincheck.worker.Worker`,
    as ``lincheck run --impl`` uses), in its child process, which nothing the
    functions do can end or hang. Either way an exception, ``SystemExit``
    included, fails the case with its message.
    """
    data = case.inputs()
    X, W, B, G = data["X"], data["W"], data.get("B"), data["dY"]
    largest = max(a.size for a in data.values())
    if worker is not None:
        returned = worker.run(data)
        subjects, errors = dict(returned.subjects), list(returned.errors)
        savable = {name: subjects[name] for name in returned.savable}
        precision = returned.precision
    else:
        found, errors = call(fn, forward, data)
        precision = arithmetic(fn, data, found)
        subjects = read_results(found, errors)
        savable = {k: v for k, v in subjects.items() if _savable(v, largest)}
    arrays = {**data, **savable}
    if errors:
        if case.kind == "batched":
            note = _without_leading_dims(case, data, errors, fn, forward, worker, options)
            if note is not None:
                return CaseResult(case.name, None, note, arrays, case, unsupported=True)
        if case.layout == "out_in":
            advice = _in_the_other_layout(case, fn, forward, worker, options)
            errors = errors if advice is None else [*errors, advice]
        if case.kind == "no-bias" and any(" raised " in e and "NoneType" in e for e in errors):
            errors = [*errors, NO_BIAS_ADVICE]  # it used B (or dB) as an array: B is None
        return CaseResult(case.name, None, "; ".join(errors), arrays, case)
    if precision is not None and options.get("precision") is None:
        options = {**options, "precision": precision}  # the layer ran under autocast or TF32
    try:
        report = check(X, W, B, G, **subjects, layout=case.layout, **options)
    except LincheckError as exc:  # e.g. a subject that is not an array of numbers
        return CaseResult(case.name, None, str(exc), arrays, case)
    return CaseResult(case.name, report, None, arrays, case)


NO_BIAS_ADVICE = (
    "B is None in this case (a layer without bias; dB must be None too); if your layer "
    'always has a bias, leave the case out: --cases=-no-bias (cases="-no-bias" from Python)'
)

UNSUPPORTED_ADVICE = (
    "if your layer is for 2-D X only, leave this case out: --cases=-batched "
    '(cases="-batched" from Python)'
)


def _without_leading_dims(case, data, errors, fn, forward, worker, options) -> str | None:
    """Why a batched case failed, when the user's functions do not take leading batch
    dimensions: they failed on X of shape (2, ⌈N/2⌉, D_in), and on the same rows as one
    2-D batch they return results that pass every check. None when the 2-D call fails
    too (then the failure is not about the leading dimensions)."""
    flat = dict(data)
    flat["X"] = data["X"].reshape(-1, data["X"].shape[-1])
    flat["dY"] = data["dY"].reshape(-1, data["dY"].shape[-1])
    if not _passes_on(flat, case.layout, fn, forward, worker, options):
        return None
    return (
        f"does not accept leading batch dimensions: on X of shape {data['X'].shape}, "
        f"{'; '.join(errors)}; on the same rows as X of shape {flat['X'].shape} its "
        f"results pass every check. Not a wrong gradient, but torch.nn.Linear takes X of "
        f"shape (*, D_in); {UNSUPPORTED_ADVICE}"
    )


def _in_the_other_layout(case, fn, forward, worker, options) -> str | None:
    """Advice when the user's functions failed on W of shape (D_out, D_in) but, handed the
    same layer with W as (D_in, D_out) (``x @ w + b``), return results that pass every
    check: they take the ``in_out`` layout. None otherwise, and for a square W (the call
    cannot have failed on its shape)."""
    other = replace(case, layout="in_out")
    data = other.inputs()
    if data["W"].shape[0] == data["W"].shape[1]:
        return None
    if not _passes_on(data, "in_out", fn, forward, worker, options):
        return None
    return (
        f"with W as (D_in, D_out) = {data['W'].shape} instead (x @ w + b) its results pass "
        f"every check: it takes W in the in_out layout; use {layouts.advice('in_out')}"
    )


def _passes_on(data, layout, fn, forward, worker, options) -> bool:
    """Whether the user's functions, called again on ``data`` (its W in ``layout``), return
    results that pass every check. False when the call fails, or its worker died or hung."""
    if worker is not None:
        if worker.process is None:
            return False  # the call did not raise: its worker died or hung (not a shape)
        returned = worker.run(data)
        if returned.errors:
            return False
        subjects, precision = dict(returned.subjects), returned.precision
    else:
        found, errors = call(fn, forward, data)
        precision = arithmetic(fn, data, found)
        subjects = read_results(found, errors)
        if errors:
            return False
    if precision is not None and options.get("precision") is None:
        options = {**options, "precision": precision}
    X, W, B, G = data["X"], data["W"], data.get("B"), data["dY"]
    try:
        return check(X, W, B, G, **subjects, layout=layout, **options).passed
    except LincheckError:
        return False


def _savable(value, largest: int) -> bool:
    """Whether a returned value can be saved for ``verify``: numbers, no more of them than
    the layer's largest array (a wrong-shaped result may be a broadcast view of 10¹²)."""
    try:
        a = np.asarray(value)
    except Exception:
        return False
    return a.dtype.kind in "biuf" and a.size <= largest
