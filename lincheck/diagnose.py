"""Diagnosis of failed checks: what kind of mistake the errors look like.

A hint is a claim: it is made only when an alternative explains the subject
within the same rigorous bound the verdict uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .precision import PRECISIONS, Precision, representable, storage_format


@dataclass(frozen=True)
class Hint:
    """A diagnosis of a failed check: a stable ``code``, the tensor, a sentence."""

    code: str
    tensor: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "tensor": self.tensor, "message": self.message}


# Less accurate arithmetics to try, most accurate first, after a failure under each.
_LOWER = {
    "fp64": ("fp32", "tf32", "fp16", "bf16"),
    "fp32": ("tf32", "fp16", "bf16"),
    "tf32": ("fp16", "bf16"),
    "fp16": ("bf16",),
    "bf16": (),
}

_QUESTION = {
    "fp32": "was it computed in float32 and saved as float64?",
    "tf32": "was TF32 enabled (torch.backends.cuda.matmul.allow_tf32)?",
    "fp16": "was float16 in use (autocast, .half())?",
    "bf16": "was bfloat16 in use (autocast with torch.bfloat16)?",
}


def candidates(declared: Precision) -> tuple[str, ...]:
    """The less accurate precisions a failure under ``declared`` is tested against."""
    return _LOWER[declared.name]


def lower_precision(
    tensor: str,
    declared: Precision,
    subject: np.ndarray,
    fits: dict[str, list],
) -> Hint | None:
    """A ``lower_precision`` hint if the errors fit a less accurate arithmetic.

    ``subject`` holds the values as supplied; ``fits`` maps each candidate
    precision to [whether every entry's error was within the subject's bound
    under it plus the oracle's, the largest ratio of error to that]
    (:class:`lincheck.numeric.Tally` keeps these block by block).
    Candidates whose result format holds every value of the subject (a
    bfloat16 result saved as float32 is still made of bfloat16 numbers) are
    tried first, narrowest format first, as that is direct evidence of the
    arithmetic; then the rest, most accurate first. The first that fits
    every entry is named.
    """
    stored = storage_format(subject.dtype)
    names = [n for n in candidates(declared) if n in fits]
    # The narrowest result format that holds every value is the most specific evidence.
    evidence = sorted(
        (
            n
            for n in names
            if PRECISIONS[n].result.bits < stored.bits
            and representable(subject, PRECISIONS[n].result)
        ),
        key=lambda n: PRECISIONS[n].result.bits,
    )
    for name in evidence + [n for n in names if n not in evidence]:
        fit, ratio = fits[name]
        if fit:
            candidate = PRECISIONS[name]
            why = f" and every value is a {candidate.result.name} number"
            why = why if name in evidence else ""
            return Hint(
                "lower_precision",
                tensor,
                f"{tensor} exceeds the bound of {declared.description} but every entry fits "
                f"{candidate.description} (at most {ratio:.2g} of its bound){why}: "
                f"{_QUESTION[name]} If so, check with --precision {name}.",
            )
    return None
