"""Linear layers written as torch users write them, correct and with planted bugs.

Importable by name, so ``lincheck run --impl torch_layers:OBJECT`` (run from
``tests/``) and the in-process tests use the same code:

* :class:`LinearFunction`, a custom ``torch.autograd.Function``; ``linear`` is a
  forward built on it, ``Linear`` an ``nn.Module`` with ``nn.Linear``'s
  constructor whose forward calls it, and ``backward`` the same gradients as
  a function on tensors.
* Each bug of :data:`BUGS` is planted in a subclass of the Function
  (``BUGGY[bug]``), a module class using it (``BUGGY_MODULES[bug]``) and, for
  the command line, in named objects (``MeanBiasLinear``, ...).
"""

from __future__ import annotations

import torch


def gradients(X, W, B, G, bug: str | None = None):
    """dX = G W, dW = Gᵀ X, dB = Σₙ G in the tensors' dtype, or with ``bug`` planted.

    X (*, D_in), G (*, D_out); sums over the flattened batch. Narrow dtypes
    use torch's matmul and sum (float32 accumulation, one rounding).
    """
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    dX = G @ W
    dW = G2.T @ X2
    dB = None if B is None else G2.sum(0)
    if bug == "dB mean":
        dB = None if B is None else G2.mean(0)
    elif bug == "dW transposed":  # a square layer: dW's values transposed, its shape kept
        dW = (X2.T @ G2).reshape(dW.shape)
    elif bug == "dW scaled":
        dW = 2 * dW
    elif bug == "dX with W transposed":  # a square layer
        dX = G @ W.T
    elif bug == "dB 1% short":
        dB = None if B is None else 0.99 * G2.sum(0)
    elif bug == "dW summed in bf16":
        dW = sequential_sum(G2, X2)
    return dX, dW, dB


def sequential_sum(G2, X2):
    """Gᵀ X accumulated one sample at a time in the inputs' dtype: every partial sum rounds
    to it (a bfloat16 accumulator keeps 8 bits; over thousands of terms it drifts far
    beyond what a float32 accumulator allows)."""
    acc = torch.zeros(G2.shape[1], X2.shape[1], dtype=G2.dtype)
    for n in range(G2.shape[0]):
        acc = acc + torch.outer(G2[n], X2[n])
    return acc


class LinearFunction(torch.autograd.Function):
    """Y = X Wᵀ + B with its backward written by hand."""

    bug: str | None = None

    @staticmethod
    def forward(ctx, X, W, B):
        ctx.save_for_backward(X, W, B)
        Y = X @ W.T
        return Y if B is None else Y + B

    @classmethod
    def backward(cls, ctx, G):
        X, W, B = ctx.saved_tensors
        return gradients(X, W, B, G, cls.bug)


def linear(X, W, B):
    """A forward on tensors, through the custom Function."""
    return LinearFunction.apply(X, W, B)


def backward(X, W, B, dY):
    """The gradients as a function on tensors, as ``run --impl`` calls a backward."""
    return gradients(X, W, B, dY)


class Linear(torch.nn.Module):
    """An nn.Module with nn.Linear's constructor and parameters, through a Function."""

    function: type[torch.autograd.Function] = LinearFunction

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.empty(out_features)) if bias else None
        torch.nn.init.uniform_(self.weight, -(in_features**-0.5), in_features**-0.5)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, X):
        return self.function.apply(X, self.weight, self.bias)


BUGS = ("dB mean", "dW transposed", "dW scaled", "dX with W transposed", "dW summed in bf16")
BUGGY = {
    bug: type(f"Buggy{i}Function", (LinearFunction,), {"bug": bug}) for i, bug in enumerate(BUGS)
}
BUGGY_MODULES = {
    bug: type(f"Buggy{i}Linear", (Linear,), {"function": fn})
    for i, (bug, fn) in enumerate(BUGGY.items())
}


# For the command line: one named object per kind, with a bug that every sweep case shows
# (a mean over a batch of N > 1, a doubled dW).
def mean_bias_backward(X, W, B, dY):
    return gradients(X, W, B, dY, "dB mean")


def scaled_linear(X, W, B):
    return BUGGY["dW scaled"].apply(X, W, B)


MeanBiasLinear = BUGGY_MODULES["dB mean"]


class NoWeight(torch.nn.Module):
    """A module lincheck must refuse: its parameter is not called ``weight``."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, X):
        return X @ self.kernel.T


def autocast_doubled(X, W, B):
    """A forward under CPU autocast to bfloat16 that doubles Y (and so every gradient)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return 2 * torch.nn.functional.linear(X, W, B)
