"""Diagnosis of failed checks: what kind of mistake the errors look like.

A hint is a claim: it is made only when an alternative explains the subject
within the same rigorous bound the verdict uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .precision import PRECISIONS, ErrorBound, Precision, representable, storage_format


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


def lower_precision(
    tensor: str,
    declared: Precision,
    subject: np.ndarray,
    error: np.ndarray,
    oracle_bound: np.ndarray,
    bound_for: Callable[[Precision], ErrorBound],
) -> Hint | None:
    """A ``lower_precision`` hint if the errors fit a less accurate arithmetic.

    ``subject`` holds the values as supplied, ``error`` |subject − oracle|
    per entry, ``oracle_bound`` the oracle's own bound, and ``bound_for(p)``
    the subject's bound under precision p. Candidates whose result format
    holds every value of the subject (a bfloat16 result saved as float32 is
    still made of bfloat16 numbers) are tried first, narrowest format first,
    as that is direct evidence of the arithmetic; then the rest, most
    accurate first. The first in which every entry fits is named.
    """
    stored = storage_format(subject.dtype)
    candidates = [PRECISIONS[name] for name in _LOWER[declared.name]]
    # The narrowest result format that holds every value is the most specific evidence.
    evidence = sorted(
        (p for p in candidates if p.result.bits < stored.bits and representable(subject, p.result)),
        key=lambda p: p.result.bits,
    )
    for candidate in evidence + [p for p in candidates if p not in evidence]:
        tol = bound_for(candidate).worst + oracle_bound
        if np.all(error <= tol):
            ratio = float(np.max(np.where(error == 0, 0.0, error / tol)))
            why = (
                f" and every value is a {candidate.result.name} number"
                if candidate in evidence
                else ""
            )
            return Hint(
                "lower_precision",
                tensor,
                f"{tensor} exceeds the bound of {declared.description} but every entry fits "
                f"{candidate.description} (at most {ratio:.2g} of its bound){why}: "
                f"{_QUESTION[candidate.name]} If so, check with --precision {candidate.name}.",
            )
    return None
