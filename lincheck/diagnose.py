"""Diagnosis of failed checks: what kind of mistake the errors look like.

A hint is a claim: it is made only when an alternative explains the subject
within the same rigorous bound the verdict uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import layouts
from .core import forward
from .precision import (
    FLOAT32,
    PRESETS,
    Arithmetic,
    Format,
    Operand,
    growth,
    model_operands,
    parse,
    reference_bound,
    representable,
    storage_format,
    subject_bound,
)
from .results import Hint
from .scaling import prepare
from .tensors import AXES, OPERANDS
from .tolerances import model_bound
from .validate import is_float

# Less accurate arithmetics to try, most accurate first, after a failure under each.
_LOWER = {
    "fp64": ("fp32", "tf32", "fp16", "bf16"),
    "fp32": ("tf32", "fp16", "bf16"),
    "tf32": ("fp16", "bf16"),
    "fp16": ("fp16-acc16",),
    "bf16": (),
    "fp16-acc16": (),
    "fp8": (),
    "fp8-blockwise": (),
}

_QUESTION = {
    "fp32": "was it computed in float32 and saved as float64?",
    "tf32": "was TF32 enabled (torch.backends.cuda.matmul.allow_tf32)?",
    "fp16": "was float16 in use (autocast, .half())?",
    "bf16": "was bfloat16 in use (autocast with torch.bfloat16)?",
    "fp16-acc16": "were the sums accumulated in float16 (NumPy's float16 sum over an axis is)?",
}


_VARIANTS = (
    # (key, value, how the arithmetic differs, the question to ask)
    (
        "bias",
        "separate",
        "with a separately rounded bias",
        "was X Wᵀ rounded before adding B (as JAX does)?",
    ),
    (
        "products",
        "rounded",
        "with each product rounded",
        "were the products rounded before the sum?",
    ),
    (
        "acc",
        "fp32-rz",
        "with a truncating float32 accumulator",
        "did tensor cores accumulate (they truncate)?",
    ),
    (
        "acc",
        "14bit/1000000000",
        "with 14-bit accumulation: partial sums are not promoted",
        "were the fp8 tensor cores' partial sums never promoted to float32?",
    ),
)


def candidates(declared: Arithmetic, tensor: str = "Y") -> tuple[str, ...]:
    """The less accurate arithmetics a failure under ``declared`` is tested against: lower
    presets, then the declared model with one thing a kernel may do differently (a
    separately rounded bias, rounded products, a truncating accumulator; for fp8, partial
    sums never promoted)."""
    lower = _LOWER.get(declared.name, ())
    if declared.name in ("fp64", "fp32"):  # bfloat16 operands, float32 (or wider) results,
        # tried after TF32 (whose finer conversions fit less) and before the 16-bit results
        at = lower.index("tf32") + 1
        lower = (*lower[:at], f"{declared.name},x=bf16,w=bf16,dy=bf16", *lower[at:])
    variants = []
    fp8 = declared.quantized("X") or declared.quantized("W")
    for key, value, _, _ in _VARIANTS:
        if value.startswith("14bit") != fp8:
            continue
        current = getattr(declared, key)
        current = getattr(current, "name", current)
        narrow = min(declared.x.bits, declared.w.bits) < FLOAT32.bits
        if current == value or (key == "products" and not narrow):
            continue
        if (key == "bias" and tensor != "Y") or (key == "acc" and current != "fp32" and not fp8):
            continue
        kept = [i for i in declared.name.split(",") if not i.strip().startswith(f"{key}=")]
        variants.append(",".join([*kept, f"{key}={value}"]))
    return (*lower, *variants)


def _describe(name: str, declared: Arithmetic) -> tuple[str, str]:
    """(what arithmetic ``name`` is, the question to ask) for a candidate of :func:`candidates`."""
    if name in PRESETS:
        return PRESETS[name].description, _QUESTION[name]
    if name.endswith(",x=bf16,w=bf16,dy=bf16"):
        return (
            f"bfloat16 operands with {declared.out.description} results",
            "were the operands cast to bfloat16 (autocast) with the result kept wider?",
        )
    for key, value, how, question in _VARIANTS:
        if name.endswith(f",{key}={value}"):
            return f"{declared.description} {how}", question
    return name, ""


def lower_precision(
    tensor: str,
    declared: Arithmetic,
    subject: np.ndarray,
    fits: dict[str, list],
) -> Hint | None:
    """A ``lower_precision`` hint if the errors fit a less accurate arithmetic.

    ``subject`` holds the values as supplied; ``fits`` maps each candidate
    precision to [whether every entry's error was within the subject's bound
    under it plus the oracle's, the largest ratio of error to that, whether that
    bound can tell the gradient from zero] (:meth:`lincheck.plan.Tallies.alternative_fits`).
    An arithmetic whose bound cannot tell the gradient from zero is never named: a
    zero gradient fits it too, and a check under it would be inconclusive.
    Candidates whose result format holds every value of the subject (a
    bfloat16 result saved as float32 is still made of bfloat16 numbers) are
    tried first, narrowest format first, as that is direct evidence of the
    arithmetic; then the rest, most accurate first, except that a precision
    whose result format is narrower than the subject's dtype is claimed
    only with that evidence. The first that fits every entry is named.
    """
    stored = storage_format(subject.dtype)
    names = [n for n in candidates(declared, tensor) if n in fits]
    out = {n: parse(n).out for n in names}
    # The narrowest result format that holds every value is the most specific evidence.
    evidence = sorted(
        (n for n in names if out[n].bits < stored.bits and representable(subject, out[n])),
        key=lambda n: out[n].bits,
    )
    # A bfloat16 or float16 kernel returns bfloat16 or float16 numbers: without that
    # signature in the values, those arithmetics are not claimed (noise of their size fits
    # their loose bounds too). TF32 returns float32 and leaves no such trace.
    plausible = [n for n in names if n in evidence or out[n].bits >= stored.bits]
    for name in evidence + [n for n in plausible if n not in evidence]:
        fit, ratio, resolves = fits[name]
        if fit and resolves:
            what, question = _describe(name, declared)
            why = f" and every value is a {out[name].description} number"
            why = why if name in evidence else ""
            return Hint(
                "lower_precision",
                tensor,
                f"{tensor} exceeds the tolerance of {declared.description} but every entry "
                f"fits {what} (at most {ratio:.2g} of its tolerance){why}: "
                f"{question} If so, check with {layouts.option('precision', name)}.",
                {"precision": name, "bound_ratio": ratio, "result_format_holds_values": bool(why)},
            )
    return None


# ---------------------------------------------------------------------------
# What kind of mistake: alternatives that explain the subject within the bound


@dataclass(frozen=True)
class Failure:
    """What the diagnosis needs to know about one failed subject.

    ``layer`` is the float64 layer (:class:`lincheck.workspace.Workspace`);
    ``precision``, ``storage`` and ``rounded`` say how the subject was
    computed, as for its verdict; ``batch_shape`` holds X's leading
    dimensions, to name batch rows as the user indexes them. ``layout`` is
    how the user stores W and dW (:mod:`lincheck.layouts`): ``subject`` and
    ``expected_shape`` are in lincheck's own layout, the hints in the user's.
    """

    tensor: str
    subject: np.ndarray
    expected_shape: tuple[int, ...]
    layer: Any
    precision: Arithmetic
    storage: Format
    operands: tuple[Operand, ...]
    batch_shape: tuple[int, ...]
    certain_only: bool = False
    layout: str = "out_in"

    @property
    def flip(self) -> bool:
        """Whether the subject is the transpose of what the user supplied (dW, ``in_out``)."""
        return self.layout == "in_out" and self.tensor == "dW" and self.subject.ndim == 2

    @property
    def supplied(self):
        """The subject as the user supplied it."""
        return self.subject.T if self.flip else self.subject

    def user_index(self, index) -> list[int]:
        """An index of the subject as the user indexes what they supplied."""
        return [int(i) for i in layouts.user_index(tuple(index), self.flip)]

    @property
    def formulas(self) -> dict[str, str]:
        """The gradients' formulas with W as the user stores it."""
        return layouts.FORMULAS[self.layout]

    def over_batch(self, reduction: str = "sum") -> str:
        """dY summed (or averaged) over the batch, as the user's dY is shaped: ``dY.sum(0)``,
        or ``dY.sum((0, 1))`` with a leading batch dimension."""
        return f"dY.{reduction}({batch_axes(self.batch_shape)})"

    def tolerance(self, M, S, k: int, reference) -> np.ndarray:
        """The tolerance the verdict used: the statistical tier's (or, with ``certain_only``,
        the rigorous bound) plus the reference's bound."""
        own = model_bound(
            self.layer, self.precision, self.tensor, self.operands, self.storage, M, S, reference
        )
        chosen = own.worst if self.certain_only else own.statistical
        return chosen + reference_bound(M, S, k).worst

    def bound(self, M, S, k: int, tensor: str | None = None):
        """The subject's rigorous bound plus the reference's, for magnitudes M, S of k terms."""
        own = subject_bound(
            self.precision, tensor or self.tensor, k, M, S, 0.0, 0.0, self.operands, self.storage
        )
        return own.worst + reference_bound(M, S, k).worst


def explain(case: Failure, lower: Hint | None = None) -> list[Hint]:
    """Hints for one failed subject: the first alternative that fits, else ``unexplained``.

    Tried in order: a shape that is the transpose of the expected one, or
    dY's shape for dB; NaN/Inf; then, for values, a flipped sign, a mean over
    the batch, the transpose, one row of dY for dB, a wrong operand, a sum over
    the batch without its first or last rows; then
    a constant factor, then errors confined to a few rows, columns or entries
    (both before any arithmetic is blamed: a lower precision spreads its errors
    everywhere); then ``lower`` (a lower-precision hint, if the caller found
    one). Every alternative is measured by the tolerance that failed the check
    (:meth:`Failure.tolerance`) and must fit clearly better
    than the correct gradient: at most half its largest error (:func:`_fit`).
    """
    s, tensor, L = case.subject, case.tensor, case.layer
    # The shape first: a wrong-shaped result may be a broadcast view of 10¹² entries
    # that no scan of its values could afford (the shape hints read values only when
    # the size is the expected one).
    if tuple(s.shape) != tuple(case.expected_shape):
        hint = _shape_hint(case)
        return [hint] if hint is not None else [_unexplained(case, "shape")]
    if is_float(s.dtype) and not np.all(np.isfinite(s)):
        return [_non_finite(tensor, case.supplied)]
    swapped = _swapped_or_wrong_axis(case)  # shapes that coincide (N = D_out) hide these
    if swapped is not None:
        return [swapped]
    shape2d = L.shape(tensor)
    values = np.asarray(s, dtype=np.float64).reshape(shape2d)
    M, S = L.magnitude(tensor)
    k = L.terms(tensor)
    reference = L.reference(tensor)
    ref_bound = reference_bound(M, S, k).worst
    tol = case.tolerance(M, S, k, reference)
    err = np.abs(values - reference)
    baseline = float(err.max(initial=0.0))
    hints = _value_hints(case, values, reference, tol - ref_bound, ref_bound, baseline)
    gross = next((h for h in hints if h.code != "scaled"), None)
    if gross is not None:
        return [gross]
    hint = _weight_decay(case, values, reference, tol, baseline)
    if hint is not None:
        return [hint]
    scaled = next(
        _value_hints(case, values, reference, tol - ref_bound, ref_bound, baseline, True), None
    )
    # One factor that fits every entry explains the error everywhere: a few entries beyond
    # their tolerance are then only where a uniform error first shows (dB 1% short over a
    # long batch), not a localized bug. (A wrong entry or row leaves no common factor.)
    hint = scaled or _localized(case, err, tol)
    if hint is not None:
        return [hint]
    if lower is not None:
        return [lower]
    return [_unexplained(case, "values")]


def _how(ratio: float) -> str:
    """How closely an alternative fits: exactly, or within a share of the rounding bound."""
    return "exactly" if ratio == 0 else f"to within {ratio:.2g} of the rounding bound"


def _fit(values, alternative, tolerance, baseline: float = np.inf) -> float | None:
    """The largest |values − alternative| / tolerance if every entry is within it and the
    largest |values − alternative| is at most half ``baseline`` (the correct gradient's
    largest error): an alternative must explain the values clearly better. Else None."""
    err = np.abs(values - alternative)
    if not np.all(np.isfinite(tolerance)) or not np.all(err <= tolerance):
        return None  # an infinite bound fits anything: no claim
    if not float(err.max(initial=0.0)) <= baseline / 2:
        return None
    if not np.any(np.abs(alternative) > tolerance):
        return None  # an alternative its own tolerance cannot tell from zero: no claim
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(np.where(err == 0, 0.0, err / tolerance), initial=0.0))


def _value_hints(case: Failure, values, reference, own, ref_bound, baseline, scaled=False):
    """Hints for the alternatives that fit, in order; the caller takes the first.

    Each alternative is computed only when the ones before it did not fit;
    with ``scaled``, only the constant factor is tried.
    """
    tensor, L = case.tensor, case.layer
    u = max(case.precision.acc.c, case.storage.u, case.precision.out.u)
    tol = own + ref_bound

    ratio = None if scaled else _fit(values, -reference, tol, baseline)
    if ratio is not None:
        yield Hint(
            "sign_flipped",
            tensor,
            f"{tensor} is the correct gradient with its sign flipped ({tensor} = −{tensor} "
            f"{_how(ratio)}): check the sign of dY, or of a subtraction.",
            {"alternative": f"-{tensor}", "bound_ratio": ratio},
        )

    if tensor in ("dW", "dB") and L.N > 1 and not scaled:
        mean = reference / L.N
        # The mean's own rounding: relative u, and below the normal range the subnormal
        # spacing of the format it was stored (or computed) in, which a mean of a small
        # dY reaches where the sum did not.
        eta = max(case.storage.eta, case.precision.out.eta)
        ratio = _fit(values, mean, tol / L.N + 2 * u * np.abs(mean) + 2 * eta, baseline)
        formula = case.over_batch("mean") if tensor == "dB" else f"{case.formulas['dW']} / N"
        right = case.over_batch() if tensor == "dB" else case.formulas["dW"]
        if ratio is not None:
            yield Hint(
                "mean_instead_of_sum",
                tensor,
                f"{tensor} = {formula} {_how(ratio)}: it was averaged over the batch of "
                f"N = {L.N}, but the gradient of a sum over the batch is {right}.",
                {"alternative": f"{tensor} / N", "N": L.N, "bound_ratio": ratio},
            )

    if values.ndim == 2 and values.shape[0] == values.shape[1] and not scaled:
        ratio = _fit(values, reference.T, tol.T, baseline)
        if ratio is not None:
            yield Hint(
                "transposed",
                tensor,
                f"{tensor} is the correct {tensor} transposed ({_how(ratio)}): "
                f"{_transpose_advice(tensor, case.layout)}.",
                {"alternative": f"{tensor}ᵀ", "bound_ratio": ratio},
            )

    if tensor == "dB" and not scaled:
        G = L.G
        exact = case.storage.u * np.abs(G) + case.storage.eta  # dY's row, stored in the dtype
        close = np.all(np.abs(values[None, :] - G) <= exact, axis=1)
        rows = np.flatnonzero(close)
        if rows.size:
            n = int(rows[0])
            where = _batch_index(n, case.batch_shape)
            yield Hint(
                "bias_not_summed",
                tensor,
                f"dB equals row {where} of dY: the sum over the batch is missing "
                f"(dB = {case.over_batch()}, one term per sample).",
                {"row": [int(i) for i in np.unravel_index(n, case.batch_shape or (L.N,))]},
            )

    for name, alternative, bound, advice in [] if scaled else _operands(case, own):
        ratio = _fit(values, alternative, bound, baseline)
        if ratio is not None:
            yield Hint(
                "wrong_operand",
                tensor,
                f"{tensor} = {name} {_how(ratio)}: {advice}.",
                {"alternative": name, "bound_ratio": ratio},
            )

    if tensor in ("dW", "dB") and L.N > 1 and not scaled:
        hint = _rows_missing(case, values, reference, tol, u, baseline)
        if hint is not None:
            yield hint

    factor = _constant_factor(case, values, reference, tol, u, baseline) if scaled else None
    if factor is not None:
        c, ratio = factor
        yield Hint(
            "scaled",
            tensor,
            f"{tensor} = {c:.6g} × the correct {tensor} ({_how(ratio)}): a constant "
            "factor is wrong (a loss scale, a doubled or halved term?).",
            {"scale": c, "bound_ratio": ratio},
        )


_PROJECTIONS = 3
"""Directions the error is projected on to find a run of left-out rows (:func:`_rows_missing`)."""

_TRIES = 4
"""The most runs tried from each end of the batch (:func:`_rows_missing`), best first."""

_TINY = np.finfo(np.float64).tiny


def _rows_missing(case: Failure, values, reference, tol, u: float, baseline) -> Hint | None:
    """A hint if dW or dB is the sum over the batch with its first or last rows left out: a
    loop over the batch that starts late, stops one short, or drops its last partial chunk.

    With a run of rows left out, the error e = values − reference is −Σ_{n ∈ run} Tₙ, the
    run's terms (Tₙ = dY[n]ᵀ X[n] for dW, dY[n] for dB). Projected on fixed directions a
    (and b), aᵀ e b is then −Σ_{n ∈ run} (dY a)ₙ (X b)ₙ: one running sum over the batch from
    each end gives that for every run at once. A run that fits is within the fit's
    tolerance in every direction too, so only the runs whose sums come that close in all
    ``_PROJECTIONS`` directions can fit: the closest ``_TRIES`` of them from each end are
    tried as alternatives like the other hints (:func:`_fit`), the float64 reference less
    the run's terms, within the tolerance that failed the check plus the alternative's own
    rounding (2u·|alternative|, as for a mean or a constant factor). A run that matches the
    directions by chance is refused by the fit. On a tie (rows whose terms are all equal)
    the last rows are named first: a loop that stops short is the commoner slip. A run of
    one row is what an off-by-one leaves out.

    Where a constant factor fits too (:func:`_constant_factor`: the left-out rows' terms
    are a share of the whole, as with dY = 1/N everywhere), the data cannot tell a missing
    run from a wrong scale: no claim here, and ``scaled`` names the factor.
    """
    if _constant_factor(case, values, reference, tol, u, baseline) is not None:
        return None
    L = case.layer
    N = L.N
    e = values - reference
    rng = np.random.default_rng(0)  # fixed directions: the same diagnosis on every run
    a = rng.standard_normal((L.D_out, _PROJECTIONS))
    per_row, size_row = L.G @ a, np.abs(L.G) @ np.abs(a)  # (N, P): (dY a)ₙ, (|dY| |a|)ₙ
    if case.tensor == "dW":
        b = rng.standard_normal((L.D_in, _PROJECTIONS))
        per_row *= L.X @ b
        size_row *= np.abs(L.X) @ np.abs(b)

        def project(m):
            return np.einsum("ip,ij,jp->p", a, m, b)

        def size(m):
            return np.einsum("ip,ij,jp->p", np.abs(a), m, np.abs(b))
    else:

        def project(m):
            return a.T @ m

        def size(m):
            return np.abs(a).T @ m

    target = project(e)
    room = size(tol + 2 * u * np.abs(reference))
    noise = size(np.abs(e))  # for the rounding of these sums themselves
    candidates = []
    for order, (rows_from, end) in enumerate([(np.s_[:0:-1], "last"), (np.s_[:-1], "first")]):
        sums = np.cumsum(per_row[rows_from], axis=0)  # runs N−j..N−1 or 0..j−1, j = 1..N−1
        sizes = np.cumsum(size_row[rows_from], axis=0)
        # A run that fits is within the fit's tolerance in every direction: there, its miss
        # is at most |a|ᵀ (tol + 2u (|reference| + the run's |terms|)) |b|, give or take the
        # float64 rounding of these sums (N + 8 roundings of at most their sizes each).
        bound = room + 2 * u * sizes + (N + 8) * 2.0**-52 * (sizes + noise)
        miss = np.abs(target + sums)
        possible = np.flatnonzero(np.all(miss <= bound, axis=1))
        score = np.sum((miss[possible] / (bound[possible] + _TINY)) ** 2, axis=1)
        ranked = np.argsort(score, kind="stable")[:_TRIES]
        candidates += [(float(score[i]), order, end, int(possible[i]) + 1) for i in ranked]
    for *_, end, j in sorted(candidates):
        rows = slice(0, j) if end == "first" else slice(N - j, N)
        kept = slice(j, N) if end == "first" else slice(0, N - j)
        if 2 * j <= N:  # the fewer rows: the run's terms, or the kept rows' sum
            terms = L.G[rows].T @ L.X[rows] if case.tensor == "dW" else L.G[rows].sum(axis=0)
            alternative = reference - terms
        else:
            alternative = L.G[kept].T @ L.X[kept] if case.tensor == "dW" else L.G[kept].sum(0)
        ratio = _fit(values, alternative, tol + 2 * u * np.abs(alternative), baseline)
        if ratio is None:
            continue
        first, last = (0, j - 1) if end == "first" else (N - j, N - 1)
        where = (
            f"{end} row, {_batch_index(first, case.batch_shape)}"
            if j == 1
            else f"{end} {j} rows, {_batch_index(first, case.batch_shape)} to "
            f"{_batch_index(last, case.batch_shape)}"
        )
        why = {
            "first": "starts late",
            "last": "stops one short" if j == 1 else "stops short, or drops its last partial chunk",
        }[end]
        return Hint(
            "rows_missing",
            case.tensor,
            f"{case.tensor} is the sum over the batch without its {where} "
            f"({_how(ratio)}): a loop over the batch that {why}?",
            {
                "rows": [
                    [int(i) for i in np.unravel_index(n, case.batch_shape or (N,))]
                    for n in (first, last)
                ],
                "count": j,
                "bound_ratio": ratio,
            },
        )
    return None


def _constant_factor(case: Failure, values, reference, tol, u: float, baseline):
    """(c, how closely it fits) if the values are c × the reference within the bound (the
    least-squares c; its own rounding, 2u·|c × reference|, allowed), for a c other than 1,
    −1 and, for dW and dB, 1/N (those have hints of their own, or are no mistake); else
    None."""
    # NumPy's pairwise sums, not BLAS dot products: the same digits with any thread count.
    rr = float(np.sum(reference * reference))
    if rr <= 0:
        return None
    c = float(np.sum(values * reference)) / rr
    ordinary = [1.0, -1.0] + ([1.0 / case.layer.N] if case.tensor in ("dW", "dB") else [])
    if c == 0 or any(abs(c - o) <= 1e-3 * abs(o) for o in ordinary):
        return None
    slack = abs(c) * tol + 2 * u * np.abs(c * reference)
    ratio = _fit(values, c * reference, slack, baseline)
    return None if ratio is None else (c, ratio)


def _transpose_advice(tensor: str, layout: str) -> str:
    F = layouts.FORMULAS[layout]
    return {
        "dW": f"dW = {F['dW']} has W's shape {layouts.W_AXES[layout]}; {F['dW_T']} is its "
        "transpose",
        "dX": f"dX = {F['dX']} has X's shape (N, D_in)",
    }.get(tensor, "the indices are swapped")


def _operands(case: Failure, own):
    """Common wrong products: the forward output Y in place of dY, or Wᵀ in place of W."""
    L, tensor, p = case.layer, case.tensor, case.precision
    F = case.formulas
    Y = forward(L.X, L.W, L.B)
    aY = np.abs(Y)
    # The subject's own Y, if its code computed one, is off by at most γ_{D_in+1}(u)·|X||W|ᵀ.
    dY_err = growth(L.D_in + 1, max(p.acc.c, p.x.u, p.w.u, p.out.u)) * L.MY

    def bound(M, k, extra):
        return case.bound(M, 0.0, k) + extra

    use_y = "the forward output Y was used where the upstream gradient dY belongs"
    if tensor == "dX":
        with_y = F["dX"].replace("dY", "Y")
        yield with_y, Y @ L.W, bound(aY @ L.aW, L.D_out, dY_err @ L.aW), use_y
        if L.D_in == L.D_out:
            yield (
                F["dX_T"],
                L.G @ L.W.T,
                bound(L.aG @ L.aW.T, L.D_out, 0.0),
                f"W was transposed; dX = {F['dX']}",
            )
    elif tensor == "dW":
        with_y = F["dW"].replace("dY", "Y")
        yield with_y, Y.T @ L.X, bound(aY.T @ L.aX, L.N, dY_err.T @ L.aX), use_y
    elif tensor == "dB":
        yield "Y.sum(0)", Y.sum(axis=0), bound(aY.sum(axis=0), L.N, dY_err.sum(axis=0)), use_y


def _shape_hint(case: Failure) -> Hint | None:
    s, tensor, L = case.subject, case.tensor, case.layer
    expected = tuple(case.expected_shape)
    if tensor == "dB" and s.ndim >= 2 and s.shape[-1] == L.D_out and s.size == L.N * L.D_out:
        same = np.all(np.asarray(s, dtype=np.float64).reshape(L.N, L.D_out) == L.G)
        return Hint(
            "bias_not_summed",
            tensor,
            f"dB has shape {tuple(s.shape)}, the shape of dY{' and equals dY' if same else ''}: "
            f"the sum over the batch is missing; dB = {case.over_batch()} has shape "
            f"({L.D_out},).",
            {"shape": list(s.shape), "equals_dY": bool(same)},
        )
    batch = tuple(case.batch_shape)
    if (
        tensor == "dB"
        and len(batch) > 1
        and tuple(s.shape[:-1]) == batch[1:]
        and s.shape[-1] == L.D_out
    ):
        # dY.sum(0) on a dY of shape (B, T, D_out): one batch dimension summed of several
        partial = L.G.reshape(*batch, L.D_out).sum(axis=0)
        # within the rounding of a sum of batch[0] terms, stored in the subject's dtype
        u = max(case.precision.acc.c, case.storage.u)
        tol = growth(batch[0], u) * L.aG.reshape(*batch, L.D_out).sum(axis=0) + case.storage.eta
        first_only = bool(np.all(np.abs(np.asarray(s, dtype=np.float64) - partial) <= tol))
        return Hint(
            "bias_not_summed",
            tensor,
            f"dB has shape {tuple(s.shape)}{', and equals dY.sum(0)' if first_only else ''}: dY "
            f"has the leading batch dimensions {batch}, and dB sums over all of them: "
            f"dB = {case.over_batch()} has shape ({L.D_out},).",
            {"shape": list(s.shape), "equals_dY": False, "first_axis_only": first_only},
        )
    hint = _swapped_or_wrong_axis(case)
    if hint is not None:
        return hint
    if s.ndim == 2 and len(expected) == 2 and tuple(s.shape) == expected[::-1]:
        M, S = L.magnitude(tensor)
        k = L.terms(tensor)
        tol = case.bound(M, S, k)
        ratio = _fit(np.asarray(s, dtype=np.float64).T, L.reference(tensor), tol)
        if ratio is not None:
            shape = list(case.supplied.shape)
            return Hint(
                "transposed",
                tensor,
                f"{tensor} has shape {tuple(shape)} and is the correct {tensor} transposed "
                f"({_how(ratio)}): {_transpose_advice(tensor, case.layout)}.",
                {"shape": shape, "bound_ratio": ratio},
            )
    return _shape_of_other(case)


def _shape_of_other(case: Failure) -> Hint | None:
    """A ``swapped`` question for a subject whose shape is another gradient's (or its
    transpose's) and not its own, when its values are not that gradient's either (that is
    tried first, :func:`_swapped_or_wrong_axis`): results returned in the wrong order, one
    of them computed wrongly too. The shape alone is the evidence, so it is asked, not
    claimed."""
    s, tensor, L = case.supplied, case.tensor, case.layer
    W_shape = (L.D_in, L.D_out) if case.layout == "in_out" else (L.D_out, L.D_in)
    shapes = {"dX": tuple(case.batch_shape) + (L.D_in,), "dW": W_shape, "dB": (L.D_out,)}
    own = shapes.pop(tensor, None)
    got = tuple(s.shape)
    if own is None or got == own:
        return None
    for other, shape in shapes.items():
        for transposed, candidate in ((False, shape), (True, shape[::-1])):
            if got != candidate or (transposed and len(shape) != 2):
                continue
            what = f"{other}'s shape" + (", transposed" if transposed else "")
            return Hint(
                "swapped",
                tensor,
                f"{tensor} has shape {got}, {what}, where {tensor} has shape {own}: were "
                f"the gradients returned in the wrong order (it is dX, dW, dB)? Its values are not "
                f"{other}'s either, so check both: "
                f"{formula(tensor, case.layout, case.batch_shape)}; "
                f"{formula(other, case.layout, case.batch_shape)}.",
                {"shape": list(got), "shape_of": other, "transposed": transposed},
            )
    return None


def _other(case: Failure, name: str, values) -> float | None:
    """How well ``values`` (shaped as tensor ``name``'s 2-D view) fit ``name``'s reference,
    within its bound under the case's arithmetic (see :func:`_fit`); None if not."""
    L = case.layer
    M, S = L.magnitude(name)
    k = L.terms(name)
    twin = Failure(
        name,
        case.subject,
        L.shape(name),
        L,
        case.precision,
        case.storage,
        _operands_of(case.precision, name, L),
        case.batch_shape,
        case.certain_only,
    )
    return _fit(values, L.reference(name), twin.bound(M, S, k))


def _operands_of(precision: Arithmetic, tensor: str, L) -> tuple[Operand, ...]:
    """The operands of ``tensor`` as ``precision``'s kernel saw them, from the layer (its
    float64 arrays hold the given values exactly, so they tell what a conversion changes).
    A subject of another tensor's shape has none of its own: its operands are not known."""
    arrays = {"X": L.X, "W": L.W, "dY": L.G}
    try:
        seen = prepare(precision, {o: arrays[o] for o in OPERANDS[tensor] if o in arrays})
    except Exception:  # a scaled model whose scales cannot be worked out here: no conversion
        seen = {}
    return model_operands(precision, tensor, seen)


def _swapped_or_wrong_axis(case: Failure) -> Hint | None:
    """dX and dW swapped (each has the other's shape and values), or dB summed over the
    wrong axis (dY.sum(1): one value per sample)."""
    s, tensor, L = case.supplied, case.tensor, case.layer
    swap = {"dX": "dW", "dW": "dX"}.get(tensor)
    flip = case.layout == "in_out" and swap == "dW"  # the user's dW is (D_in, D_out)
    swap_shape = L.shape(swap)[::-1] if flip and swap else L.shape(swap) if swap else ()
    if swap is not None and tuple(s.shape) == swap_shape and s.size:
        values = np.asarray(s, dtype=np.float64).reshape(swap_shape)
        ratio = _other(case, swap, values.T if flip else values)
        if ratio is not None:
            formula = case.formulas
            return Hint(
                "swapped",
                tensor,
                f"{tensor} holds {swap} ({formula[swap]}, {_how(ratio)}): the two gradients "
                f"are swapped; {tensor} = {formula[tensor]}.",
                {"holds": swap, "bound_ratio": ratio},
            )
    per_row = s.ndim == 1 or tuple(s.shape) == tuple(case.batch_shape)
    if tensor == "dB" and s.size == L.N and per_row:
        values = np.asarray(s, dtype=np.float64).reshape(-1)
        rows = L.G.sum(axis=1)
        tol = growth(L.D_out, max(case.precision.acc.c, case.storage.u)) * L.aG.sum(axis=1)
        ratio = _fit(values, rows, tol + case.storage.eta)
        if ratio is not None:
            return Hint(
                "bias_wrong_axis",
                tensor,
                f"dB has shape {tuple(s.shape)} and equals dY.sum(-1) ({_how(ratio)}): it was "
                f"summed over the output units instead of the batch; dB = {case.over_batch()} "
                f"has shape ({L.D_out},).",
                {"shape": list(s.shape), "bound_ratio": ratio},
            )
    return None


def _weight_decay(case: Failure, values, reference, tol, baseline) -> Hint | None:
    """dW + λW (L2 regularization folded into the gradient), λ by least squares."""
    if case.tensor != "dW":
        return None
    W = case.layer.W
    ww = float(np.sum(W * W))
    if ww == 0:
        return None
    lam = float(np.sum((values - reference) * W)) / ww
    if lam == 0:
        return None
    alternative = reference + lam * W
    slack = tol + 2 * max(case.precision.acc.c, case.storage.u) * np.abs(lam * W)
    ratio = _fit(values, alternative, slack, baseline)
    if ratio is None:
        return None
    return Hint(
        "weight_decay",
        "dW",
        f"dW = {case.formulas['dW']} + λ·W with λ = {lam:.6g} ({_how(ratio)}): weight decay (L2 "
        "regularization) is folded into the gradient; lincheck checks the loss's gradient "
        "alone: compare before the decay is added.",
        {"weight_decay": lam, "bound_ratio": ratio},
    )


def _non_finite(tensor: str, s: np.ndarray) -> Hint:
    bad = ~np.isfinite(s)
    first = [[int(i) for i in np.unravel_index(f, s.shape)] for f in np.flatnonzero(bad)[:3]]
    n_nan = int(np.count_nonzero(np.isnan(s)))
    n_inf = int(np.count_nonzero(bad)) - n_nan
    return Hint(
        "non_finite",
        tensor,
        f"{tensor} holds {n_nan} NaN and {n_inf} Inf, first at {', '.join(map(str, first))}: "
        "look for a division by zero, a log or sqrt of a negative number, or an overflow "
        "before these entries.",
        {"nan": n_nan, "inf": n_inf, "first": first},
    )


def _localized(case: Failure, err: np.ndarray, tol: np.ndarray) -> Hint | None:
    """A hint if most of the error beyond tolerance sits in a few rows, columns or entries."""
    excess = np.maximum(err - tol, 0.0)
    total = float(excess.sum())
    if total == 0:
        return None
    tensor = case.tensor
    bad = np.flatnonzero(excess)
    if bad.size <= min(5, excess.size // 4):
        shape = tuple(case.expected_shape)
        where = [case.user_index(np.unravel_index(f, shape)) for f in bad]
        return Hint(
            "localized",
            tensor,
            f"only {bad.size} entr{'y' if bad.size == 1 else 'ies'} of {tensor} "
            f"{'is' if bad.size == 1 else 'are'} wrong, at {', '.join(map(str, where))}: an "
            "indexing or boundary bug (an off-by-one, a missed first or last element)?",
            {"entries": where, "share": 1.0},
        )
    if excess.ndim != 2:
        return None
    for axis, role in ((1, 0), (0, 1)):
        mass = excess.sum(axis=axis)
        if mass.size < 2:
            continue  # one row (or column) in all: nothing to localize among
        order = np.argsort(-mass, kind="stable")
        share = np.cumsum(mass[order]) / total
        count = int(np.searchsorted(share, 0.75) + 1)
        limit = min(3, max(1, mass.size // 4))
        if count <= limit:
            picked = sorted(int(i) for i in order[:count])
            name = (AXES[tensor] if tensor != "dB" else ("row", "column"))[role]
            if role == 0 and tensor in ("dX", "Y"):
                labels = [str(_batch_index(i, case.batch_shape)) for i in picked]
            else:
                labels = [str(i) for i in picked]
            return Hint(
                "localized",
                tensor,
                f"{float(share[count - 1]):.0%} of {tensor}'s error sits in {name}"
                f"{'s' if count > 1 else ''} {', '.join(labels)}: an indexing or boundary bug "
                "(an off-by-one, a missed first or last element)?",
                {
                    "axis": "rows" if (role == 0) != case.flip else "columns",
                    "indices": picked,
                    "share": float(share[count - 1]),
                },
            )
    return None


INDEXED = {
    # Each gradient entry by entry, with W as the user stores it (i: output unit, j: input
    # feature, n: batch row), for the hint that names no mistake.
    "out_in": {
        "dX": "dX[n, j] = Σ_i dY[n, i] W[i, j]",
        "dW": "dW[i, j] = Σ_n dY[n, i] X[n, j]",
        "dB": "dB[i] = Σ_n dY[n, i]",
        "Y": "Y[n, i] = Σ_j X[n, j] W[i, j] + B[i]",
    },
    "in_out": {
        "dX": "dX[n, j] = Σ_i dY[n, i] W[j, i]",
        "dW": "dW[j, i] = Σ_n X[n, j] dY[n, i]",
        "dB": "dB[i] = Σ_n dY[n, i]",
        "Y": "Y[n, i] = Σ_j X[n, j] W[j, i] + B[i]",
    },
}


def batch_axes(batch_shape: tuple[int, ...]) -> str:
    """The axes of dY that dB sums over: ``0``, or ``(0, 1)`` with a leading batch dimension."""
    if len(batch_shape) <= 1:
        return "0"
    return f"({', '.join(str(i) for i in range(len(batch_shape)))})"


def formula(tensor: str, layout: str = "out_in", batch_shape: tuple[int, ...] = ()) -> str:
    """The correct ``tensor`` as a product and entry by entry, W as ``layout`` stores it
    (with leading batch dimensions, n runs over all of them)."""
    whole = (
        f"dY.sum({batch_axes(batch_shape)})" if tensor == "dB" else layouts.FORMULAS[layout][tensor]
    )
    if tensor == "dW" and len(batch_shape) > 1:
        whole += " (X and dY flattened to their N rows)"
    return f"{tensor} = {whole}, {INDEXED[layout][tensor]}"


def _unexplained(case: Failure, what: str) -> Hint:
    tensor = case.tensor
    shape = tuple(case.supplied.shape) if what == "shape" else None
    expected = tuple(case.expected_shape)
    if case.layout == "in_out" and tensor == "dW":
        expected = expected[::-1]
    tried = (
        "the shape of its transpose, of another gradient, of dY"
        if what == "shape"
        else "a flipped sign, a mean for a sum, a transpose, a wrong operand, rows left out "
        "of the batch, a constant factor, a lower precision, errors in a few rows or columns"
    )
    has = f" {shape} (expected {expected})" if shape is not None else ""
    return Hint(
        "unexplained",
        tensor,
        f"No common mistake explains {tensor}'s {what}{has} (tried: {tried}). The correct "
        f"gradient is {formula(tensor, case.layout, case.batch_shape)}: compare your code "
        "with it, index by index.",
        {"formula": formula(tensor, case.layout, case.batch_shape)},
    )


def _batch_index(n: int, batch_shape: tuple[int, ...]):
    """Row n of the flattened batch, as the user indexes it (a tuple with leading dims)."""
    if len(batch_shape) <= 1:
        return n
    return tuple(int(i) for i in np.unravel_index(n, batch_shape))


# ---------------------------------------------------------------------------
# A square W in the other layout

_WHO = {
    "in_out": "as JAX/Flax, Keras, TensorFlow and CS231n store the kernel",
    "out_in": "as torch.nn.Linear stores it",
}


def _other_layout_fit(case: Failure, failed: bool) -> float | None:
    """How well a subject (dX, dW or Y of a square layer) fits W read in the other layout:
    dX = dY Wᵀ, dW the transpose of this layout's, Y = X W + B (in lincheck's own terms),
    within the same tolerances as the ``transposed`` and ``wrong_operand`` hints. A failed
    subject must fit clearly better than the correct one (:func:`_fit`); None if it does
    not fit."""
    L, tensor = case.layer, case.tensor
    values = np.asarray(case.subject, dtype=np.float64).reshape(L.shape(tensor))
    M, S = L.magnitude(tensor)
    k = L.terms(tensor)
    reference = L.reference(tensor)
    if tensor == "dW":
        alternative, tol = reference.T, case.tolerance(M, S, k, reference).T
    elif tensor == "dX":
        alternative, tol = L.G @ L.W.T, case.bound(L.aG @ L.aW.T, 0.0, k)
    else:
        alternative = forward(L.X, L.W.T, L.B)
        magnitude = L.aX @ L.aW + (0.0 if L.B is None else np.abs(L.B))
        tol = case.bound(magnitude, 0.0, k)
    baseline = float(np.max(np.abs(values - reference), initial=0.0)) if failed else np.inf
    return _fit(values, alternative, tol, baseline)


def other_layout(cases: dict[str, tuple[Failure, bool]], layout: str) -> dict[str, Hint]:
    """``layout`` hints for a square W stored the other way, by tensor; {} if none applies.

    ``cases`` holds each compared subject among dX, dW and Y with whether it failed.
    With D_in = D_out the shapes fit both layouts, so only the values can tell. The hint
    is given when every one of these subjects fits the other layout (dX = dY Wᵀ, dW
    transposed, Y = X W + B in this layout's terms: the whole case is consistent with it)
    and dX or Y failed in this one: their values show how W was read. dW alone cannot
    show it (the transpose of dW is the ``transposed`` bug in either layout): a failed dW
    that is the only such subject keeps its ``transposed`` hint, which then also names
    the other layout. One subject that does not fit the other layout (a dX that passed
    here, say) means the case is in this layout, and a transposed dW is the bug.
    """
    fits = {}
    for tensor, (case, failed) in cases.items():
        ratio = _other_layout_fit(case, failed)
        if ratio is None:
            return {}
        fits[tensor] = ratio
    failing = [t for t, (_, f) in cases.items() if f]
    other = layouts.OTHER[layout]
    axes = layouts.W_AXES[other]
    if not any(t in failing for t in ("dX", "Y")):
        if failing != ["dW"]:
            return {}
        return {
            "dW": Hint(
                "transposed",
                "dW",
                f"dW is the correct dW transposed ({_how(fits['dW'])}): "
                f"{_transpose_advice('dW', layout)}. If W itself is stored as {axes}, "
                f"{_WHO[other]}, check with {layouts.advice(other)} instead (with D_in = "
                "D_out, dW alone cannot tell the layouts apart; dX or Y can).",
                {"alternative": "dWᵀ", "bound_ratio": fits["dW"], "layout": other},
            )
        }
    names = ", ".join(cases)
    out = {}
    for tensor in failing:
        out[tensor] = Hint(
            "layout",
            tensor,
            f"{tensor} is right for W stored as {axes} (Y = {layouts.FORMULAS[other]['Y']}, "
            f"{_WHO[other]}; {_how(fits[tensor])}), and so is the whole case ({names}): W is "
            f"square, so its shape cannot tell the layouts apart. Check with "
            f"{layouts.advice(other)}.",
            {"layout": other, "fits": list(cases), "bound_ratio": fits[tensor]},
        )
    return out
