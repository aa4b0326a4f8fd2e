"""Check a JAX layer's gradients in one line: ``lincheck.jax.check_function(linear)``.

Importing this module imports JAX (``import lincheck`` does not); without JAX
it raises ImportError naming the package (lincheck's [jax] extra).

>>> import jax.numpy as jnp, lincheck.jax
>>> lincheck.jax.check_function(lambda X, W, B: X @ W.T + B, dtype="bfloat16").passed
True
"""

from __future__ import annotations

import importlib
from typing import Any

from . import frameworks
from .results import Report

try:
    importlib.import_module("jax")
except ImportError as exc:
    raise ImportError(
        f"lincheck.jax needs JAX ({exc}): {frameworks.EXTRA['jax']}", name="jax"
    ) from None


def check_function(
    fn: Any,
    batch_shape: tuple[int, ...] = (32,),
    D_in: int = 64,
    D_out: int = 16,
    dtype: Any = "float32",
    device: str = "cpu",
    seed: int = 0,
    bias: bool = True,
    **options: Any,
) -> Report:
    """Check a JAX linear layer's dX, dW, dB (and Y) on a seeded random batch.

    Parameters
    ----------
    fn : callable
        A forward ``fn(X, W, B) -> Y`` on JAX arrays (plain, jitted, or a
        ``jax.custom_vjp``/``custom_jvp`` function), differentiated with
        ``jax.vjp`` and dY as the cotangent; Y is checked too. A function of
        four required parameters is a backward ``fn(X, W, B, dY) -> (dX, dW,
        dB)`` instead. ``B`` is None without bias. W has shape (D_out, D_in).
    batch_shape : tuple of int
        The leading dimensions of X and dY (N is their product).
    dtype : str or dtype
        "float32" (default), "float64" (run with ``jax_enable_x64`` on for the
        call), "float16", "bfloat16".
    device : str
        "cpu", "gpu", "tpu", with ":INDEX" (``jax.devices(platform)[index]``).
    seed : int
        Seed of X, W, B and dY.
    **options
        As :func:`lincheck.check` takes them.

    Returns
    -------
    Report
        The arithmetic is the dtype's, or float32 on a GPU or TPU with JAX's
        default matmul precision: TF32, or one bfloat16 pass
        (:func:`lincheck.frameworks.default_precision`).
    """
    impl = frameworks.classify(fn, "check_function", "jax", device)
    name = frameworks.dtype_name(dtype)
    return frameworks.check_layer(impl, batch_shape, D_in, D_out, name, seed, bias, options)


__all__ = ["check_function"]
