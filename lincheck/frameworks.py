"""torch and JAX where the gradients live: their arrays read exactly, their layers run.

Three jobs, none of which imports torch or JAX unless the object at hand comes
from it (known by ``type(obj).__module__``, or by what a function's module
imports):

* **Reading arrays** (:func:`to_numpy`): a torch tensor of any dtype, on any
  device, requiring grad or not, or a JAX array, becomes a NumPy array with the
  same values. bfloat16 and fp8 tensors are read through their bits
  (``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``): no rounding, no
  detour through float32.
* **The arithmetic a framework used** (:func:`default_precision`, a pure
  function of the dtype, the device type and the framework's flags, and
  :func:`arithmetic_of`, which reads those flags from a tensor): float32
  matmuls on CUDA with TF32 allowed are held to the ``tf32`` preset, a layer
  run under autocast to its autocast dtype's preset.
* **Running a user's layer** (:func:`classify`, :class:`Impl`): a torch
  backward on tensors, a torch or JAX forward differentiated by the framework's
  autograd (``torch.autograd.grad``, ``jax.vjp``), or a module class or
  factory with ``nn.Linear``'s constructor. ``lincheck run --impl`` runs them
  in its worker process (:mod:`lincheck.worker`); ``lincheck.torch`` and
  ``lincheck.jax`` in the caller's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

FRAMEWORKS = ("numpy", "torch", "jax")
# Package names that install from any index (lincheck's extras name them, but a checkout
# is not on an index: ``pip install 'lincheck[torch]'`` works only where lincheck is).
EXTRA = {name: f"pip install {name} (lincheck's [{name}] extra)" for name in ("torch", "jax")}
NARROW = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
"""The narrow float dtypes lincheck reads (``ml_dtypes``' names, also torch's and JAX's)."""


def framework_of_type(obj: Any) -> str | None:
    """ "torch" or "jax" when ``type(obj)`` is defined by that framework, else None."""
    top = type(obj).__module__.partition(".")[0]
    return {"torch": "torch", "jax": "jax", "jaxlib": "jax"}.get(top)


def require(framework: str) -> Any:
    """Import ``torch`` or ``jax``, or InputError naming the extra that installs it."""
    try:
        return importlib.import_module(framework)
    except ImportError as exc:
        raise InputError(
            f"{framework} is not installed ({exc}); {EXTRA[framework]} installs it"
        ) from None


def ml_dtypes() -> Any:
    """The ``ml_dtypes`` module (a dependency of lincheck, imported only when needed:
    it takes about 0.7 s)."""
    return importlib.import_module("ml_dtypes")


def narrow_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a narrow float named in :data:`NARROW`."""
    if name not in NARROW:
        raise ValueError(f"{name!r} is not one of {', '.join(NARROW)}")
    return np.dtype(getattr(ml_dtypes(), name))


# ---------------------------------------------------------------------------
# Arrays


def to_numpy(value: Any) -> np.ndarray | None:
    """A torch tensor or JAX array as NumPy, exactly (None for anything else).

    torch: ``detach()``, copied to the CPU, made contiguous; dtypes NumPy lacks
    (bfloat16, the fp8 types) are reinterpreted through an integer view of the
    same width as ``ml_dtypes`` arrays. JAX: ``numpy.asarray``, which copies
    from the device and gives ``ml_dtypes`` arrays for bfloat16 and fp8.
    Exceptions (a tensor on the meta device, a sparse tensor) propagate.
    """
    framework = framework_of_type(value)
    if framework == "torch" and hasattr(value, "detach"):
        torch = sys.modules["torch"]
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if t.dtype.is_floating_point and not hasattr(np, name):
            bits = t.element_size() * 8
            md = ml_dtypes()
            if not hasattr(md, name):
                raise TypeError(f"torch dtype {t.dtype} has no NumPy equivalent")
            ints = {8: torch.uint8, 16: torch.int16}[bits]
            return t.view(ints).numpy().view(getattr(md, name))
        return t.numpy()
    if framework == "jax" and hasattr(value, "__array__"):
        return np.asarray(value)
    return None


def torch_tensor(a: np.ndarray, device: str = "cpu") -> Any:
    """A NumPy array (``ml_dtypes`` narrow floats included) as a torch tensor, exactly."""
    torch = require("torch")
    if a.dtype.name in NARROW:
        ints = np.int16 if a.dtype.itemsize == 2 else np.uint8
        t = torch.from_numpy(np.ascontiguousarray(a).view(ints).copy())
        t = t.view(getattr(torch, a.dtype.name))
    else:
        t = torch.from_numpy(np.array(a, copy=True))
    return t.to(device)


# ---------------------------------------------------------------------------
# The arithmetic a framework used


def default_precision(
    dtype: str, device: str = "cpu", *, tf32: bool | str = False, autocast: str | None = None
) -> str:
    """The preset a framework's gradients of ``dtype`` were computed in.

    A pure function of what can be known about the computation, so that the
    rules are tested on any machine:

    Parameters
    ----------
    dtype : str
        The gradients' dtype name ("float32", "bfloat16", ...).
    device : str
        The device type the layer ran on: "cpu", "cuda" (also ROCm's), "mps",
        "gpu" (JAX), "tpu".
    tf32 : bool or str
        Whether float32 matmuls on that device may use reduced-precision
        operands: ``torch.backends.cuda.matmul.allow_tf32`` (or
        ``torch.get_float32_matmul_precision() != "highest"``) for torch; for
        JAX, ``jax_default_matmul_precision`` not "highest"/"float32" (XLA's
        default on GPUs is TF32, on TPUs one bfloat16 pass). A string names the
        format instead, "tf32" or "bf16", on any device: torch's oneDNN on a CPU
        (``torch.backends.mkldnn.matmul.fp32_precision``, which
        ``set_float32_matmul_precision("high")``/``("medium")`` set) runs float32
        matmuls in TF32 or one bfloat16 pass where the processor has the units
        (AMX); lincheck cannot see whether it did, and holds the gradients to the
        looser arithmetic (a correct gradient never fails; the header says so).
    autocast : str, optional
        The dtype the layer was autocast to ("bfloat16", "float16"), if any.

    Returns
    -------
    str
        * under autocast, float32 gradients → the autocast dtype's preset
          (``bf16``/``fp16``): the matmuls took the inputs rounded to it;
        * float32 on "cuda"/"gpu" with ``tf32`` → ``tf32``;
        * float32 on "tpu" with ``tf32``, or ``tf32="bf16"`` → bfloat16 operands
          with float32 accumulation and results (``bf16,out=fp32,reduce=fp32``);
        * float32 with ``tf32="tf32"`` → ``tf32``;
        * otherwise the dtype's own preset (:func:`lincheck.precision.precision_for`).

    Examples
    --------
    >>> default_precision("float32", "cuda", tf32=True)
    'tf32'
    >>> default_precision("float32", "cpu", tf32=True)
    'fp32'
    >>> default_precision("float32", "cpu", autocast="bfloat16")
    'bf16'
    >>> default_precision("float32", "cpu", tf32="bf16")
    'bf16,out=fp32,reduce=fp32'
    """
    from .precision import precision_for

    narrow = {"bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}
    if dtype == "float32" and autocast in ("bfloat16", "float16"):
        return narrow[autocast]
    reduced = tf32 if isinstance(tf32, str) else None
    if tf32 is True:  # the device's own reduced format
        reduced = {"cuda": "tf32", "gpu": "tf32", "tpu": "bf16"}.get(device)
    if dtype == "float32" and reduced == "tf32":
        return "tf32"
    if dtype == "float32" and reduced == "bf16":
        return "bf16,out=fp32,reduce=fp32"
    return narrow.get(dtype) or precision_for(np.dtype(dtype)).name


def torch_flags(device_type: str) -> tuple[bool | str, str | None]:
    """(TF32 allowed for float32 matmuls on ``device_type`` — on a CPU, the format oneDNN
    may use for them, "tf32" or "bf16", else False —, the autocast dtype if autocast is on
    there now), read from torch's global state."""
    torch = sys.modules["torch"]
    tf32: bool | str = False
    if device_type == "cpu":
        try:
            chosen = getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none")
        except (AttributeError, RuntimeError):
            chosen = "none"
        tf32 = chosen if chosen in ("tf32", "bf16") else False
    if device_type == "cuda":
        # torch ≥ 2.9 keeps cuBLAS's choice in matmul.fp32_precision ("tf32", "ieee", or
        # "none": the legacy setting decides); the legacy allow_tf32 and
        # set_float32_matmul_precision("high") both show in get_float32_matmul_precision.
        # (Reading allow_tf32 itself raises in torch 2.13 once the new API was used.)
        try:
            chosen = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
            if chosen in ("none", None):
                tf32 = torch.get_float32_matmul_precision() != "highest"
            else:
                tf32 = chosen == "tf32"
        except RuntimeError:
            tf32 = True  # mixed settings: torch cannot say; assume the looser arithmetic
    autocast = None
    try:
        if torch.is_autocast_enabled(device_type):
            autocast = str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    except (TypeError, RuntimeError, AttributeError):  # a device type autocast does not know
        pass
    return tf32, autocast


def torch_reduction(preset: str) -> str:
    """The bf16 or fp16 preset as torch computes it: torch sums dB = Σₙ G over the batch
    with a float32 accumulator (its reductions accumulate in ``acc_type``, float for both)
    and rounds once, where the presets' default reduce is XLA's CPU window of 16-bit
    partial sums, whose bound is so loose that a dB 10% wrong (bf16) or 1% wrong (fp16)
    would pass a long batch."""
    return f"{preset},reduce=fp32" if preset in ("bf16", "fp16") else preset


def jax_flags() -> bool:
    """Whether JAX's float32 matmuls may use reduced-precision operands (its default on
    GPUs and TPUs: ``jax_default_matmul_precision`` unset or not "highest")."""
    jax = sys.modules["jax"]
    chosen = str(jax.config.jax_default_matmul_precision or "default").lower()
    return chosen not in ("highest", "float32", "tensorfloat32_3x", "fp32")


def arithmetic_of(value: Any) -> str | None:
    """The preset a framework array's values were computed in, when it is not the dtype's
    own: a torch tensor on CUDA with TF32 allowed, or checked inside autocast. None for
    everything else (then the dtype decides)."""
    framework = framework_of_type(value)
    if framework == "torch" and hasattr(value, "device"):
        device = value.device.type
        tf32, autocast = torch_flags(device)
        dtype = str(value.dtype).removeprefix("torch.")
    elif framework == "jax" and hasattr(value, "devices"):
        device = next(iter(value.devices())).platform
        tf32, autocast, dtype = jax_flags(), None, str(value.dtype)
    else:
        return None
    if dtype not in ("float32", *NARROW, "float16", "float64"):
        return None
    if framework == "torch":
        chosen = torch_reduction(default_precision(dtype, device, tf32=tf32, autocast=autocast))
        return None if chosen == default_precision(dtype) else chosen
    if not (tf32 or autocast):
        return None
    return default_precision(dtype, device, tf32=tf32, autocast=autocast)


# ---------------------------------------------------------------------------
# A user's layer: what it is, and running it on one case


ROLES = ("backward", "forward", "module")


@dataclass(frozen=True)
class Impl:
    """A user's layer, classified: its framework, its role and the callable to run.

    ``role`` is "backward" (``fn(X, W, B, dY) -> (dX, dW, dB)`` on the
    framework's arrays), "forward" (``fn(X, W, B) -> Y``, differentiated by the
    framework) or "module" (a torch module class or factory with
    ``nn.Linear``'s constructor ``(in_features, out_features, bias=...)``, or an
    instance used as it is). Forwards and modules also give ``Y``.
    """

    framework: str
    role: str
    fn: Callable
    name: str
    device: str = "cpu"

    @property
    def gives_forward(self) -> bool:
        return self.role != "backward"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Subjects (dX, dW, dB and, from a forward, Y) for one case, as the framework's
        arrays; a backward's result as it returned it, under "returned". The user's
        exceptions propagate."""
        if self.framework == "torch":
            return run_torch(self, inputs)
        if self.framework == "jax":
            return run_jax(self, inputs)
        raise ValueError(f"{self.name}: a NumPy {self.role} is called directly")

    def arithmetic(
        self, inputs: Mapping[str, np.ndarray], subjects: Mapping[str, Any]
    ) -> str | None:
        """The preset a case ran in when it is not its dtype's, else None: a forward whose Y
        is narrower than its inputs ran under autocast (its gradients come back in the
        inputs' dtype, computed from narrow operands); float32 on CUDA with TF32 allowed,
        or on a GPU or TPU with JAX's default matmul precision (:func:`default_precision`)."""
        if self.framework == "numpy":
            return None
        dtype = inputs["X"].dtype.name
        y = subjects.get("Y")
        y_dtype = None if y is None else str(getattr(y, "dtype", "")).removeprefix("torch.")
        if self.framework == "torch":
            device = sys.modules["torch"].device(self.device).type
            tf32, _ = torch_flags(device)
        else:
            device, tf32 = jax_device(self.device).platform, jax_flags()
        autocast = y_dtype if y_dtype in ("bfloat16", "float16") and y_dtype != dtype else None
        chosen = default_precision(dtype, device, tf32=tf32, autocast=autocast)
        if self.framework == "torch":
            chosen = torch_reduction(chosen)
        return None if chosen == default_precision(dtype) else chosen


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, functools.partial):
        obj = obj.func
    try:
        return inspect.unwrap(obj)
    except ValueError:
        return obj


def _frameworks_in(names: Mapping[str, Any], only: set[str] | None = None) -> set[str]:
    """The frameworks (numpy, torch, jax) among ``names``' values: modules, and classes or
    functions defined in them."""
    found = set()
    for key, value in names.items():
        if only is not None and key not in only:
            continue
        if isinstance(value, types.ModuleType):
            top = value.__name__.partition(".")[0]
        else:
            top = str(getattr(value, "__module__", None) or "").partition(".")[0]
        top = {"jaxlib": "jax"}.get(top, top)
        if top in FRAMEWORKS:
            found.add(top)
    return found


def _referenced(code: types.CodeType) -> set[str]:
    """The global names a function's code (and the functions nested in it) refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced(const)
    return names


def detect_framework(obj: Any) -> str | None:
    """The framework whose arrays ``obj`` takes: "numpy", "torch", "jax", or None when
    its module uses both torch and JAX and its code does not say which.

    1. An object whose type or defining module belongs to torch or JAX (a jitted
       or ``custom_vjp`` function, ``torch.nn.functional.linear``, an
       ``nn.Module`` or ``autograd.Function`` subclass) belongs to it.
    2. A Python function: the frameworks among the global names its code refers
       to (``torch.matmul`` → torch, ``jnp.dot`` → JAX, only ``np`` → NumPy);
       torch or JAX beside NumPy wins (their code uses NumPy too).
    3. If its code names none (``X @ W.T + B``), what its module imports.
    4. Nothing: NumPy (the functions lincheck always took).
    """
    by_type = framework_of_type(obj)
    if by_type:
        return by_type
    target = _unwrap(obj)
    if inspect.isclass(target):
        for base in inspect.getmro(target):
            top = base.__module__.partition(".")[0]
            if top in ("torch", "jax", "jaxlib"):
                return "jax" if top == "jaxlib" else top
    own = str(getattr(target, "__module__", None) or "").partition(".")[0]
    if own in ("torch", "jax", "jaxlib"):
        return "jax" if own == "jaxlib" else own
    if not (inspect.isfunction(target) or inspect.ismethod(target)) and callable(target):
        target = type(target).__call__  # a callable object: its __call__ method
    function = getattr(target, "__func__", target)  # a bound method's function
    code, scope = getattr(function, "__code__", None), getattr(function, "__globals__", None)
    if code is None or scope is None:
        return "numpy"
    for names in (_frameworks_in(scope, _referenced(code)), _frameworks_in(scope)):
        if len(names) > 1:
            names.discard("numpy")
        if len(names) == 1:
            return names.pop()
        if len(names) > 1:
            return None
    return "numpy"


def _arity(fn: Callable) -> tuple[int, int | None] | None:
    """(required positional parameters, most positional parameters or None for *args), or
    None when the signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    required = sum(p.default is inspect.Parameter.empty for p in positional)
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    return required, None if varargs else len(positional)


def _is_factory(fn: Callable) -> bool:
    """A function with ``nn.Linear``'s constructor: parameters ``in_features, out_features``."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["in_features", "out_features"]


def classify(obj: Any, option: str, framework: str | None = None, device: str = "cpu") -> Impl:
    """What ``obj`` (given as ``option``, e.g. "--impl mod:fn") is, or InputError in one line.

    The framework is :func:`detect_framework`'s unless ``framework`` says. Then:

    * a torch ``nn.Module`` subclass, or a function whose first parameters are
      ``in_features, out_features``: a module factory, probed once with
      ``(3, 2, bias=True)`` for a ``weight`` of shape (2, 3) and a ``bias`` of
      shape (2,); an ``nn.Module`` instance: used as it is;
    * a ``torch.autograd.Function`` subclass: its ``apply``, a forward;
    * a function with 4 required positional parameters: a backward
      ``fn(X, W, B, dY)``; with 3 (or 2 and a third with a default): a forward
      ``fn(X, W, B)``; a signature that cannot be read (``*args``): a forward for
      torch and JAX, a backward for NumPy (as lincheck always called it).

    A NumPy forward here is refused: lincheck differentiates torch and JAX
    forwards only (give a NumPy forward with ``--forward``).
    """
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    found = framework or detect_framework(obj)
    if found is None:
        raise InputError(
            f"{option}: {name}'s module uses both torch and JAX; say which with "
            "--framework torch or --framework jax"
        )
    if found not in FRAMEWORKS:
        raise InputError(f"{option}: framework {found!r} is not one of {', '.join(FRAMEWORKS)}")
    if found != "numpy":
        require(found)
    if found != "numpy" or device != "cpu":
        _check_device(found, device)
    if found == "torch":
        torch = sys.modules["torch"]
        if isinstance(obj, torch.nn.Module):
            _probe_module(obj, option, name, instance=True)
            return Impl("torch", "module", obj, name, device)
        if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function):
            function: Any = obj
            return Impl("torch", "forward", function.apply, f"{name}.apply", device)
        if (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)) or _is_factory(obj):
            _probe_module(obj, option, name, instance=False)
            return Impl("torch", "module", obj, name, device)
    elif inspect.isclass(obj):
        raise InputError(
            f"{option}: {name} is a class; lincheck constructs torch nn.Module classes only "
            "(give a function)"
        )
    arity = _arity(obj)
    if arity is None or arity[1] is None:
        role = "backward" if found == "numpy" else "forward"
    elif arity[0] == 4:
        role = "backward"
    elif arity[0] <= 3 <= arity[1] and arity[0] >= 2:
        role = "forward"
    else:
        raise InputError(
            f"{option}: {name} takes {arity[0]} required arguments; lincheck calls a backward "
            "as fn(X, W, B, dY) and a forward as fn(X, W, B)"
        )
    if found == "numpy" and role == "forward":
        raise InputError(
            f"{option}: {name} takes (X, W, B): a NumPy forward, which lincheck cannot "
            "differentiate; check it with --forward, or give a backward fn(X, W, B, dY) "
            "(torch and JAX forwards are differentiated by their autograd)"
        )
    return Impl(found, role, obj, name, device)


def _check_device(framework: str, device: str) -> None:
    """InputError in one line when ``device`` is not usable, with the framework's words."""
    if framework == "numpy":
        raise InputError(f"--device {device}: NumPy functions run on the CPU only")
    try:
        if framework == "torch":
            sys.modules["torch"].empty(0, device=device)
        else:
            jax_device(device)
    except InputError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"--device {device}: {framework} cannot use it: {first}") from None


def jax_device(device: str) -> Any:
    """The JAX device ``platform[:index]`` names ("cpu", "gpu", "cuda:1", "tpu")."""
    jax = sys.modules["jax"]
    platform, _, index = device.partition(":")
    devices = jax.devices(platform)
    i = int(index or 0)
    if not 0 <= i < len(devices):
        raise InputError(f"--device {device}: JAX has {len(devices)} {platform} device(s)")
    return devices[i]


def _probe_module(obj: Any, option: str, name: str, *, instance: bool) -> None:
    """Refuse a module without ``weight`` (D_out, D_in) and ``bias`` (D_out,) parameters."""
    try:
        module = obj if instance else obj(3, 2, bias=True)
    except Exception as exc:
        raise InputError(
            f"{option}: cannot construct {name}(in_features=3, out_features=2, bias=True) "
            f"as nn.Linear is: {type(exc).__name__}: {exc}"
        ) from None
    try:
        weight_parameter(module, None if instance else (2, 3))
        if not instance:
            bias_parameter(module, (2,))
    except ValueError as exc:
        raise InputError(f"{option}: {name}: {exc}") from None


def weight_parameter(module: Any, shape: tuple[int, ...] | None) -> Any:
    """``module.weight``, a tensor of shape (D_out, D_in), or ValueError saying what is wrong."""
    torch = sys.modules["torch"]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(
            "lincheck reads a module's weight as its `weight` parameter, of shape "
            f"(out_features, in_features) as nn.Linear's; found {_what(weight)}"
        )
    if shape is not None and tuple(weight.shape) != shape:
        raise ValueError(
            f"its `weight` has shape {tuple(weight.shape)}; with in_features={shape[1]}, "
            f"out_features={shape[0]} it should be {shape} (out_features, in_features)"
        )
    return weight


def bias_parameter(module: Any, shape: tuple[int, ...] | None) -> Any:
    """``module.bias``: a tensor of ``shape``, or None (``shape`` None: no bias expected)."""
    torch = sys.modules["torch"]
    bias = getattr(module, "bias", None)
    if shape is None:
        if bias is not None:
            raise ValueError("constructed with bias=False, it still has a `bias`")
        return None
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != shape:
        raise ValueError(
            f"lincheck reads a module's bias as its `bias` parameter, of shape {shape} "
            f"(out_features,) as nn.Linear's; found {_what(bias)}"
        )
    return bias


def _what(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return "none" if value is None else f"{type(value).__name__} of shape {tuple(shape or ())}"


def run_torch(impl: Impl, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """One case through a torch layer: the subjects as tensors.

    backward: ``fn(x, w, b, g)`` on tensors. forward: x, w, b are leaves that
    require grad, ``Y = fn(x, w, b)``, and ``torch.autograd.grad(Y, (x, w, b),
    grad_outputs=g)``; an input Y does not depend on gets a zero gradient (its
    true derivative). module: constructed as ``cls(D_in, D_out, bias=...)``
    (an instance is used as it is), moved to the case's device and dtype, its
    ``weight`` and ``bias`` set to W and B, ``Y = module(x)``, ``Y.backward(g)``;
    the subjects are ``x.grad``, ``weight.grad``, ``bias.grad`` and Y. ``g`` is
    cast to Y's dtype where they differ (a forward under autocast).
    """
    torch = sys.modules["torch"]
    device = impl.device
    x, w, g = (torch_tensor(inputs[k], device) for k in ("X", "W", "dY"))
    b = torch_tensor(inputs["B"], device) if "B" in inputs else None
    if impl.role == "backward":
        return {"returned": impl.fn(x, w, b, g)}
    if impl.role == "module":
        module = impl.fn
        if not isinstance(module, torch.nn.Module):
            module = module(w.shape[1], w.shape[0], bias=b is not None)
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"returned {type(module).__name__}, not an nn.Module")
            module = module.to(device=x.device, dtype=x.dtype)
            weight = weight_parameter(module, tuple(w.shape))
            bias = bias_parameter(module, None if b is None else tuple(b.shape))
            with torch.no_grad():
                weight.copy_(w)
                if b is not None:
                    bias.copy_(b)
        params = [x.requires_grad_(), weight_parameter(module, None)]
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            params.append(bias)
        y = module(x)
    else:
        params = [t.requires_grad_() for t in (x, w, b) if t is not None]
        y = impl.fn(*params) if b is not None else impl.fn(*params, None)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"returned {type(y).__name__} instead of a tensor Y")
    grads = torch.autograd.grad(y, params, grad_outputs=g.to(y.dtype), allow_unused=True)
    grads = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads)]
    subjects = dict(zip(("dX", "dW", "dB"), grads))
    subjects["Y"] = y
    return subjects


def run_jax(impl: Impl, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """One case through a JAX forward, differentiated with ``jax.vjp`` (or a JAX backward
    called on JAX arrays). float64 cases run with ``jax_enable_x64`` on (restored after);
    g is cast to Y's dtype where they differ."""
    jax = sys.modules["jax"]
    jnp = importlib.import_module("jax.numpy")
    wide = inputs["X"].dtype.name == "float64"
    before = bool(jax.config.jax_enable_x64)
    if wide and not before:
        jax.config.update("jax_enable_x64", True)
    try:
        device = jax_device(impl.device)
        x, w, g = (jax.device_put(jnp.asarray(inputs[k]), device) for k in ("X", "W", "dY"))
        b = jax.device_put(jnp.asarray(inputs["B"]), device) if "B" in inputs else None
        if impl.role == "backward":
            return {"returned": impl.fn(x, w, b, g)}
        if b is None:
            y, vjp = jax.vjp(lambda x, w: impl.fn(x, w, None), x, w)
        else:
            y, vjp = jax.vjp(impl.fn, x, w, b)
        grads = vjp(g.astype(y.dtype))
        subjects = dict(zip(("dX", "dW", "dB"), grads))
        subjects["Y"] = y
        return subjects
    finally:
        if wide and not before:
            jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------------------
# One layer checked from Python (lincheck.torch, lincheck.jax)


def dtype_name(dtype: Any) -> str:
    """ "float32" for ``torch.float32``, ``jnp.float32``, ``np.float32`` or "float32"."""
    if isinstance(dtype, str):
        return dtype
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    return np.dtype(dtype).name


def check_layer(
    impl: Impl,
    batch_shape: tuple[int, ...],
    D_in: int,
    D_out: int,
    dtype: str,
    seed: int,
    bias: bool,
    options: dict[str, Any],
    params: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """Run ``impl`` on one seeded random layer and check what it returns: a Report.

    X and dY are standard normal, W and B uniform on ±1/√D_in
    (:func:`lincheck.checks.random_inputs`), in ``dtype``; ``params`` replaces W
    and B (a module instance's own). A result of the wrong form (not three
    gradients, a dB without bias) is a ValueError; a wrong gradient is a
    failed check in the report.
    """
    from .checks import check, random_inputs
    from .layouts import advice, check_layout, stored
    from .worker import module_layout_error, unpack

    layout = check_layout(options.pop("layout", "out_in"))
    if layout == "in_out" and impl.role == "module":
        raise ValueError(module_layout_error(impl.name))
    shape = tuple(int(n) for n in batch_shape)
    rng = np.random.default_rng(seed)
    data = random_inputs(rng, int(np.prod(shape)), D_in, D_out, dtype, bias)
    data["X"] = data["X"].reshape(shape + (D_in,))
    data["dY"] = data["dY"].reshape(shape + (D_out,))
    if params is not None:
        data.pop("B", None)
        data.update(params)
    data = stored(data, layout)  # W as the user's function takes it
    try:
        subjects = impl.run(data)
    except Exception as exc:
        if layout == "in_out" or impl.role == "module" or D_in == D_out:
            raise
        try:  # the same layer with W as (D_in, D_out): does the function take x @ w + b?
            other = check_layer(
                impl,
                batch_shape,
                D_in,
                D_out,
                dtype,
                seed,
                bias,
                {**options, "layout": "in_out"},
                params,
            )
        except Exception:
            raise exc from None
        if not other.passed:
            raise
        raise ValueError(
            f"{impl.name} raised {type(exc).__name__} on W of shape (D_out, D_in) = "
            f"{(D_out, D_in)}: {exc}; with W as (D_in, D_out) its results pass every check: "
            f"it takes W in the in_out layout (x @ w + b); use {advice('in_out')}"
        ) from exc
    precision = impl.arithmetic(data, subjects)
    if impl.role == "backward":
        subjects, problem = unpack(subjects["returned"], "B" in data)
        if problem:
            raise ValueError(f"{impl.name} {problem}")
    chosen = options.pop("precision", None) or precision
    X, W, B, G = data["X"], data["W"], data.get("B"), data["dY"]
    return check(X, W, B, G, **subjects, precision=chosen, layout=layout, **options)
