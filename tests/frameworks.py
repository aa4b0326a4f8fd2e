"""Run Y = X Wᵀ + B and its backward pass in real frameworks (CPU) and bring every
array back to NumPy bit for bit.

Each runner takes float64 NumPy inputs, converts them to the framework's dtype (the
conversion is part of the case: the arrays handed to lincheck are the converted
ones, read back from the framework), runs the forward pass and autograd with
``dY`` as the upstream gradient, and returns a :class:`Run` holding X, W, B, dY as
the framework saw them and Y, dX, dW, dB as it computed them. bfloat16 comes back as
``ml_dtypes.bfloat16`` arrays made from the raw bits, float16 as ``numpy.float16``.

The frameworks are imported inside the runners: this module imports with none of
them installed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Framework dtype names, and the lincheck preset for each (spec: fp64, fp32, bf16, fp16).
PRESET = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# The largest finite and the smallest normal value of each format. A case is generated
# only when its exact results fit: no product or sum reaches a quarter of the largest
# (an overflowing case has no correct gradient to check), and each result's largest
# entry is a normal number (a tensor of subnormals has no digits left to check).
FMAX = {"float64": 1.8e308, "float32": 3.4e38, "bfloat16": 3.39e38, "float16": 65504.0}
FTINY = {"float64": 2.3e-308, "float32": 1.2e-38, "bfloat16": 1.2e-38, "float16": 6.2e-5}


@dataclass(frozen=True)
class Case:
    """One layer: leading shape of X and dY, sizes, bias, scales of X, W, dY, seed."""

    lead: tuple[int, ...]
    D_in: int
    D_out: int
    bias: bool
    scales: tuple[float, float, float]
    seed: int

    @property
    def id(self) -> str:
        lead = "x".join(map(str, self.lead))
        sx, sw, sg = (f"{s:g}" for s in self.scales)
        b = "b" if self.bias else "nob"
        return f"{lead}-{self.D_in}-{self.D_out}-{b}-s{sx},{sw},{sg}-seed{self.seed}"

    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Seeded float64 X, W, B, dY; W and B like a fresh nn.Linear, times the scales."""
        rng = np.random.default_rng(self.seed)
        sx, sw, sg = self.scales
        bound = 1 / np.sqrt(self.D_in)
        X = sx * rng.standard_normal((*self.lead, self.D_in))
        W = sw * rng.uniform(-bound, bound, (self.D_out, self.D_in))
        B = sx * sw * rng.uniform(-bound, bound, self.D_out) if self.bias else None
        G = sg * rng.standard_normal((*self.lead, self.D_out))
        return X, W, B, G

    def fits(self, dtype: str) -> bool:
        """True when the exact results of this case stay in ``dtype``'s normal range."""
        X, W, B, G = self.inputs()
        X2, G2 = X.reshape(-1, self.D_in), G.reshape(-1, self.D_out)
        b = 0 if B is None else B
        magnitudes = [np.abs(X2) @ np.abs(W).T + np.abs(b), np.abs(G2) @ np.abs(W)]
        magnitudes += [np.abs(G2).T @ np.abs(X2), np.abs(G2).sum(0)]
        results = [X2 @ W.T + b, G2 @ W, G2.T @ X2, G2.sum(0)]
        big = max(np.abs(m).max() for m in magnitudes)
        small = min(np.abs(r).max() for r in results)
        return bool(big < FMAX[dtype] / 4 and small >= FTINY[dtype])


@dataclass(frozen=True)
class Run:
    """Inputs as the framework held them and its results, as NumPy arrays."""

    X: np.ndarray
    W: np.ndarray
    B: np.ndarray | None
    dY: np.ndarray
    Y: np.ndarray
    dX: np.ndarray
    dW: np.ndarray
    dB: np.ndarray | None

    def subjects(self) -> dict[str, np.ndarray | None]:
        return {"dX": self.dX, "dW": self.dW, "dB": self.dB, "Y": self.Y}


# ---------------------------------------------------------------- torch


def torch_numpy(t) -> np.ndarray:
    """A CPU tensor as NumPy, exactly; bfloat16 through its bits."""
    import ml_dtypes
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def run_torch(case: Case, dtype: str, *, autocast: bool = False) -> Run:
    """nn.Linear (bias or not) in ``dtype``, or float32 parameters under CPU autocast to bf16.

    The layer's parameters are set to W and B; X requires grad; ``Y.backward(dY)``.
    """
    import torch

    X, W, B, G = case.inputs()
    tdt = getattr(torch, "float32" if autocast else dtype)
    layer = torch.nn.Linear(case.D_in, case.D_out, bias=B is not None, dtype=tdt)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
        if B is not None:
            layer.bias.copy_(torch.from_numpy(B))
    x = torch.from_numpy(X).to(tdt).requires_grad_()
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    else:
        y = layer(x)
    g = torch.from_numpy(G).to(y.dtype)
    y.backward(g)
    bias = layer.bias
    return Run(
        X=torch_numpy(x),
        W=torch_numpy(layer.weight),
        B=None if bias is None else torch_numpy(bias),
        dY=torch_numpy(g),
        Y=torch_numpy(y),
        dX=torch_numpy(x.grad),
        dW=torch_numpy(layer.weight.grad),
        dB=None if bias is None else torch_numpy(bias.grad),
    )


# ---------------------------------------------------------------- JAX


def run_jax(case: Case, dtype: str) -> Run:
    """``jax.vjp`` of ``x @ w.T + b`` (or ``x @ w.T``) in ``dtype``, x64 enabled."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    X, W, B, G = case.inputs()
    jdt = getattr(jnp, dtype)
    x, w, g = (jnp.asarray(A, dtype=jdt) for A in (X, W, G))
    if B is None:
        y, vjp = jax.vjp(lambda x, w: x @ w.T, x, w)
        dx, dw = vjp(g)
        b = db = None
    else:
        b = jnp.asarray(B, dtype=jdt)
        y, vjp = jax.vjp(lambda x, w, b: x @ w.T + b, x, w, b)
        dx, dw, db = vjp(g)

    def arr(a):
        return None if a is None else np.array(a)

    return Run(arr(x), arr(w), arr(b), arr(g), arr(y), arr(dx), arr(dw), arr(db))


# ---------------------------------------------------------------- tinygrad


def tinygrad_usable() -> str | None:
    """None if tinygrad's CPU device can run here, else why not (it compiles with clang)."""
    if shutil.which("clang") is None:
        return "tinygrad's CPU device compiles its kernels with clang, which is not installed"
    return None


def run_tinygrad(case: Case, dtype: str) -> Run:
    """``x.linear(w.T, b)`` (as ``tinygrad.nn.Linear``) in ``dtype``; ``Y.backward(dY)``.

    bfloat16 is emulated (loads widen to float32, stores round to bfloat16): clang
    before 17 has no ``__bf16`` arithmetic on x86.
    """
    import ml_dtypes
    from tinygrad import Context, Tensor, dtypes

    tdt = getattr(dtypes, dtype)
    X, W, B, G = case.inputs()
    emulate = "bfloat16" if dtype == "bfloat16" else ""

    def tensor(A):
        t = Tensor(A.astype(np.float32)).cast(tdt).contiguous().realize()
        t.requires_grad = True
        return t

    def arr(t):
        if t is None:
            return None
        t = t.realize()  # round to the dtype before reading: a lazy cast is folded away
        if t.dtype == dtypes.bfloat16:
            return t.bitcast(dtypes.uint16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    with Context(EMULATED_DTYPES=emulate):
        x, w = tensor(X), tensor(W)
        b = None if B is None else tensor(B)
        g = tensor(G)
        y = x.linear(w.T, b)
        y.backward(g)  # before realizing y, which would cut it from the graph
        return Run(
            arr(x), arr(w), arr(b), arr(g), arr(y), arr(x.grad), arr(w.grad),
            None if b is None else arr(b.grad),
        )  # fmt: skip


RUNNERS: dict[str, Callable[..., Run]] = {
    "torch": run_torch,
    "jax": run_jax,
    "tinygrad": run_tinygrad,
}
