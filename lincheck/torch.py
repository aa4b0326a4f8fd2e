"""Check a torch layer's gradients in one line: ``lincheck.torch.check_module(MyLinear)``.

Importing this module imports torch (``import lincheck`` does not); without
torch it raises ImportError naming the package (lincheck's [torch] extra).

>>> import torch, lincheck.torch
>>> lincheck.torch.check_module(torch.nn.Linear, batch_shape=(4, 8), dtype="bfloat16").passed
True
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np

from . import frameworks
from .results import Report

try:
    _torch: Any = importlib.import_module("torch")
except ImportError as exc:
    raise ImportError(
        f"lincheck.torch needs torch ({exc}): {frameworks.EXTRA['torch']}", name="torch"
    ) from None

from .capture import Captured, capture  # noqa: E402  (after torch: it needs it)

__all__ = ["Captured", "capture", "check_function", "check_module"]


def check_module(
    module: Any,
    batch_shape: tuple[int, ...] = (32,),
    in_features: int = 64,
    out_features: int = 16,
    dtype: Any = None,
    device: Any = None,
    seed: int = 0,
    bias: bool = True,
    **options: Any,
) -> Report:
    """Check an ``nn.Module`` linear layer's dX, dW, dB (and Y) on a seeded random batch.

    Parameters
    ----------
    module : nn.Module class, factory or instance
        A class or factory is called as ``nn.Linear`` is,
        ``module(in_features, out_features, bias=bias)``, moved to ``device``
        and ``dtype``, and its ``weight`` (out_features, in_features) and
        ``bias`` (out_features,) parameters are set to seeded random W and B.
        An instance is used as it is, with its own weights (its shape, bias,
        dtype and device are its own unless ``dtype``/``device`` are given, which
        convert a copy: the instance itself is never changed).
    batch_shape : tuple of int
        The leading dimensions of X and dY (N is their product).
    dtype : torch.dtype or str
        "float32" (default for a class), "float64", "float16", "bfloat16".
    device : str or torch.device
        "cpu" (default for a class), "cuda", "cuda:1", "mps", ...
    seed : int
        Seed of X, W, B and dY.
    **options
        As :func:`lincheck.check` takes them (``precision``, ``certain_only``,
        ``mode``, ...).

    Returns
    -------
    Report
        X requires grad; ``Y = module(X)`` and the gradients of ⟨Y, dY⟩ with
        respect to X, ``weight`` and ``bias`` (``torch.autograd.grad``, which
        leaves the module's ``.grad`` untouched) are checked, and Y against
        X Wᵀ + B. The arithmetic is the dtype's, or what the run shows: a Y
        narrower than X (autocast) or TF32 on CUDA
        (:func:`lincheck.frameworks.default_precision`).

    Raises
    ------
    InputError
        The module has no ``weight`` of shape (out_features, in_features) or
        no ``bias`` of shape (out_features,), or ``device`` is not usable.
    """
    params = None
    if isinstance(module, _torch.nn.Module):
        weight = frameworks.weight_parameter(module, None)
        out_features, in_features = weight.shape
        own_bias = getattr(module, "bias", None)
        bias = isinstance(own_bias, _torch.Tensor)
        if dtype is not None or device is not None:  # on a copy: the user's module stays put
            module = copy.deepcopy(module).to(device=device, dtype=_dtype(dtype))
        dtype, device = weight.dtype if dtype is None else dtype, device or weight.device
        params = {"W": _numpy(module.weight)}
        if bias:
            params["B"] = _numpy(module.bias)
    device = str(device or "cpu")
    impl = frameworks.classify(module, "check_module", "torch", device)
    if impl.role != "module":
        raise ValueError(f"check_module: {impl.name} is not an nn.Module; use check_function")
    name = frameworks.dtype_name(dtype or "float32")
    return frameworks.check_layer(
        impl, batch_shape, in_features, out_features, name, seed, bias, options, params
    )


def check_function(
    fn: Any,
    batch_shape: tuple[int, ...] = (32,),
    in_features: int = 64,
    out_features: int = 16,
    dtype: Any = "float32",
    device: Any = "cpu",
    seed: int = 0,
    bias: bool = True,
    **options: Any,
) -> Report:
    """Check a torch linear layer given as a function, on a seeded random batch.

    ``fn`` is a forward ``fn(X, W, B) -> Y`` on tensors (such as a custom
    ``torch.autograd.Function``'s ``apply``, or the Function class itself),
    differentiated by ``torch.autograd.grad`` with dY as the upstream gradient
    (Y is checked too), or a backward ``fn(X, W, B, dY) -> (dX, dW, dB)`` on
    tensors: four required parameters make a backward, three a forward. ``B``
    is None without bias. The other parameters are :func:`check_module`'s.
    """
    impl = frameworks.classify(fn, "check_function", "torch", str(device))
    name = frameworks.dtype_name(dtype)
    return frameworks.check_layer(
        impl, batch_shape, in_features, out_features, name, seed, bias, options
    )


def _numpy(t: Any) -> np.ndarray:
    a = frameworks.to_numpy(t)
    if a is None:  # a tensor always converts; anything else is not a parameter
        raise TypeError(f"{type(t).__name__} is not a tensor")
    return a


def _dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, _torch.dtype):
        return dtype
    return getattr(_torch, frameworks.dtype_name(dtype))


__all__ = ["check_function", "check_module"]
