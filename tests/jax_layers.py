"""A linear layer written as JAX users write it: a ``jax.custom_vjp`` with a hand-written
backward, correct and with planted bugs (the bugs of ``torch_layers.BUGS``).

``linear`` is the correct forward, ``linear_jit`` it jitted, ``BUGGY[bug]`` the
buggy ones (jitted: one compilation per shape instead of one per operation, which
keeps the tests fast); ``scaled_linear`` is the command line's buggy forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BUGS = ("dB mean", "dW transposed", "dW scaled", "dX with W transposed", "dW summed in bf16")


def gradients(X, W, B, G, bug):
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    dX = G @ W
    dW = G2.T @ X2
    dB = None if B is None else G2.sum(0)
    if bug == "dB mean":
        dB = None if B is None else G2.mean(0)
    elif bug == "dW transposed":
        dW = (X2.T @ G2).reshape(dW.shape)
    elif bug == "dW scaled":
        dW = 2 * dW
    elif bug == "dX with W transposed":
        dX = G @ W.T
    elif bug == "dW summed in bf16":  # every partial sum rounded to the inputs' dtype

        def step(acc, pair):
            g, x = pair
            return (acc + jnp.outer(g, x)).astype(acc.dtype), None

        dW, _ = jax.lax.scan(step, jnp.zeros_like(dW), (G2, X2))
    return dX, dW, dB


def make(bug: str | None):
    @jax.custom_vjp
    def linear(X, W, B):
        Y = X @ W.T
        return Y if B is None else Y + B

    def forward(X, W, B):
        return linear(X, W, B), (X, W, B)

    def backward(saved, G):
        X, W, B = saved
        return gradients(X, W, B, G, bug)

    linear.defvjp(forward, backward)
    return linear


linear = make(None)
linear_jit = jax.jit(linear)
BUGGY = {bug: jax.jit(make(bug)) for bug in BUGS}
scaled_linear = BUGGY["dW scaled"]


def flax_style(x, w, b):
    """``x @ w + b`` with w of shape (D_in, D_out): the in_out layout, as Flax stores it."""
    return x @ w + b


def flax_style_dw_doubled(x, w, b):
    """The same forward, with a custom VJP whose dW is twice the right one."""

    @jax.custom_vjp
    def f(x, w, b):
        return x @ w + b

    def fwd(x, w, b):
        return f(x, w, b), (x, w)

    def bwd(res, g):
        x, w = res
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        return g @ w.T, 2 * (x2.T @ g2), g2.sum(0)

    f.defvjp(fwd, bwd)
    return f(x, w, b)
