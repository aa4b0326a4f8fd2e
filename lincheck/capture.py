"""Record every linear layer of a torch model during one forward and backward pass.

::

    with lincheck.torch.capture(model, "dumps/"):
        model(x).sum().backward()

writes one case per call of each ``nn.Linear`` (and of each module registered
as linear-like), named by the module's qualified name
(``dumps/encoder.layers.1.linear2.safetensors``): its input ``X``, parameters
``W`` and ``B``, output ``Y``, the upstream gradient ``dY`` and the
gradients torch produced, ``dX``, ``dW`` and ``dB``. ``lincheck verify
dumps/`` then checks every layer. A call with its input by keyword
(``linear(input=x)``) is recorded as one by position. Names that become the same file
name (``"a b"`` and ``"a_b"`` in a ``ModuleDict``, or names that differ only in case)
get ``~2``, ``~3``; each case's ``lincheck.module`` metadata keeps the real name.

How a call's own gradients are caught
-------------------------------------
``weight.grad`` sums the gradients of every call of a module (and of earlier
steps), so it cannot be checked against one call's ``X`` and ``dY``. Instead,
for the duration of each call, the module's ``weight`` and ``bias`` are
replaced in its ``_parameters`` by *aliases* (``weight.view_as(weight)``, a
view that autograd passes the gradient through unchanged) and the input by
an alias of itself; a hook on each alias receives exactly that call's
gradient as the backward kernel produced it, before it is added into
``.grad``. The parameters are put back when the call returns (or raises).
What torch computes is not changed: nothing that did not require a gradient
is made to, so a first layer whose input needs no gradient has no ``dX``,
and a frozen weight no ``dW``.

The arithmetic
--------------
A gradient computed under autocast is stored in the parameter's dtype
(float32) but was computed in bfloat16 or float16; a float32 matmul on CUDA
with ``torch.backends.cuda.matmul.allow_tf32`` ran on TF32 tensor cores.
Either is recorded in the case as ``lincheck.precision`` (``tf32``, or
``bf16,reduce=fp32``: torch sums dB with a float32 accumulator, also for
bfloat16 and float16 parameters), which ``verify`` uses when no
``--precision`` is given; otherwise the dtypes say it. A ``.npy`` folder
cannot hold that record (nor bfloat16 arrays), so such a capture needs
``format="safetensors"`` (the default).

Eager mode only: a ``torch.compile``-d model fuses the layer into kernels
whose hooks do not run per module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import frameworks
from .errors import InputError, LincheckError
from .validate import NARROW_FLOATS

Accessor = Callable[[Any], tuple[Any, Any]]
"""``fn(module) -> (W, B)``: a linear-like module's weight, shape (D_out, D_in), and bias
(shape (D_out,), or None), as the tensors its forward uses."""

FORMATS = ("safetensors", "npy")
GRADIENTS = ("dY", "dX", "dW", "dB")


@dataclass
class Call:
    """One call of one module: what went in and out, and the gradients that came back."""

    module: str
    index: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    precision: str | None = None
    device: str = "cpu"
    task: int = -1  # the backward pass (autograd graph task) whose gradients are kept

    @property
    def backward(self) -> bool:
        """Whether a backward pass reached this call (dY arrives first in every pass)."""
        return "dY" in self.arrays

    def name(self, calls: int) -> str:
        """The case name: the module's qualified name, and the call's number if it was called
        more than once (``decoder.proj@2`` is its second call)."""
        return self.module if calls == 1 else f"{self.module}@{self.index + 1}"


@dataclass
class Captured:
    """What a :func:`capture` recorded; filled in when the ``with`` block ends.

    ``paths`` lists the cases written, ``calls`` every recorded call,
    ``missing`` the calls whose backward never ran (not written: a case
    needs dY).
    """

    folder: Path
    calls: list[Call] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _numpy(t) -> np.ndarray:
    """A tensor's values on the host, exactly (bfloat16 and fp8 as ``ml_dtypes`` arrays), copied:
    the model may change its tensors in place after the call (an optimizer step)."""
    return np.array(frameworks.to_numpy(t), copy=True)


def _arithmetic(device, dtype) -> str | None:
    """The arithmetic of a matmul on ``device`` with operands of ``dtype``, when the dtypes
    alone do not say it: autocast's dtype, or TF32 tensor cores for float32 on CUDA
    (:func:`lincheck.frameworks.default_precision`)."""
    tf32, autocast = frameworks.torch_flags(device.type)
    name = str(dtype).removeprefix("torch.")
    chosen = frameworks.default_precision(name, device.type, tf32=tf32, autocast=autocast)
    chosen = frameworks.torch_reduction(chosen)  # dB: torch sums in float32
    return None if chosen == frameworks.default_precision(name) else chosen


def _linear_accessor(module) -> tuple[Any, Any]:
    return module.weight, module.bias


def _modules(model, linear_like: Mapping[type, Accessor], include) -> Iterator[tuple]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            accessor: Accessor = _linear_accessor
        else:
            found = [a for cls, a in linear_like.items() if isinstance(module, cls)]
            if not found:
                continue
            accessor = found[0]
        name = name or "root"
        if include is None or include(name, module):
            yield name, module, accessor


def _selector(modules) -> Callable[[str, Any], bool] | None:
    if modules is None or callable(modules):
        return modules
    wanted = set(modules)
    return lambda name, module: name in wanted


@contextmanager
def capture(
    model,
    folder: str | os.PathLike,
    *,
    format: str = "safetensors",
    force: bool = False,
    linear_like: Mapping[type, Accessor] | None = None,
    modules: Iterable[str] | Callable[[str, Any], bool] | None = None,
) -> Iterator[Captured]:
    """Record every linear layer of ``model`` while the block runs; write the cases at its end.

    Parameters
    ----------
    model : torch.nn.Module
    folder : path
        Where the cases go: ``folder/NAME.safetensors``, or ``folder/NAME/`` holding
        ``.npy`` files with ``format="npy"``.
    format : {"safetensors", "npy"}
    force : bool
        Replace cases already in ``folder``; without it, nothing is written if one exists.
    linear_like : mapping, optional
        Module class → accessor ``fn(module) -> (W, B)`` for modules that compute
        ``Y = X Wᵀ + B`` without being ``nn.Linear`` (a LoRA or quantized linear: the
        accessor returns the effective weight, shape (D_out, D_in)). ``nn.Linear`` and its
        subclasses are always recorded. Where an accessor returns the module's own
        parameter, its gradient is recorded too.
    modules : iterable of str, or callable, optional
        Only these qualified names (or those for which ``modules(name, module)`` is true).

    Yields
    ------
    Captured
        Its ``paths`` are filled in when the block ends.

    Raises
    ------
    LincheckError
        ``model`` has no linear layer to record, no recorded call had a backward pass, or the
        cases cannot be written (``InputError``: a case exists and ``force`` is False, or a
        ``.npy`` folder was asked for arrays or an arithmetic it cannot hold).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    chosen = list(_modules(model, dict(linear_like or {}), _selector(modules)))
    if not chosen:
        raise LincheckError(
            f"{type(model).__name__}: no nn.Linear (or linear-like) module to record"
        )
    captured = Captured(Path(folder))
    handles = []
    counts: dict[str, int] = {}
    for name, module, accessor in chosen:
        handles += _hook(module, name, accessor, captured.calls, counts)
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    _write(captured, format, force)


def _hook(module, name: str, accessor: Accessor, calls: list[Call], counts: dict[str, int]):
    """Forward pre- and post-hooks on ``module`` that record each call into ``calls``."""
    import torch

    # One entry per call in progress (pushed before, popped after: a call may nest).
    stack: list[tuple[Call | None, list]] = []

    def before(mod, args, kwargs):
        keyword = _input_key(args, kwargs)
        X = kwargs[keyword] if keyword is not None else args[0] if args else None
        if not torch.is_grad_enabled() or not torch.is_tensor(X):
            stack.append((None, []))
            return None
        if X.numel() == 0:  # an empty batch (an expert that got no tokens): no case
            stack.append((None, []))
            return None
        call = Call(name, counts.get(name, 0))
        counts[name] = call.index + 1
        calls.append(call)
        with torch.no_grad():  # an accessor that computes a weight builds no graph
            W, B = accessor(mod)
        call.precision = _arithmetic(X.device, W.dtype)
        call.device = str(X.device)
        call.arrays["X"] = _numpy(X)
        call.arrays["W"] = _numpy(W)
        if B is not None:
            call.arrays["B"] = _numpy(B)
        # Parameters of the module and its children, by identity: an accessor that returns
        # one of them (not a weight computed from them) gets its gradient recorded.
        owners = {
            id(p): (owner, key)
            for owner in mod.modules()
            for key, p in owner._parameters.items()
            if p is not None
        }
        swapped = []
        for label, tensor in (("dW", W), ("dB", B)):
            if tensor is not None and id(tensor) in owners and tensor.requires_grad:
                owner, key = owners[id(tensor)]
                alias = tensor.view_as(tensor)
                alias.register_hook(_keeper(call, label))
                swapped.append((owner, key, tensor))
                owner._parameters[key] = alias
        stack.append((call, swapped))
        if X.requires_grad:
            alias = X.view_as(X)
            alias.register_hook(_keeper(call, "dX"))
            if keyword is None:
                return (alias, *args[1:]), kwargs
            return args, {**kwargs, keyword: alias}
        return None

    def after(mod, args, kwargs, output):
        call, swapped = stack.pop() if stack else (None, [])
        for owner, key, tensor in swapped:
            owner._parameters[key] = tensor
        if call is None or not torch.is_tensor(output):
            return None
        call.arrays["Y"] = _numpy(output)
        if output.requires_grad:
            output.register_hook(_keeper(call, "dY", last=True))
        return None

    return [
        module.register_forward_pre_hook(before, with_kwargs=True),
        # Prepended: it runs before the user's own forward hooks (which may change the
        # output: Y and dY are the Linear's own), and captures nested in one another
        # restore the parameters in the reverse order of their swaps.
        module.register_forward_hook(after, always_call=True, prepend=True, with_kwargs=True),
    ]


def _input_key(args: tuple, kwargs: dict) -> str | None:
    """Where a call's input is: None for the first positional argument, else its keyword
    (``linear(input=x)``, or the one keyword argument of a subclass's forward)."""
    if args or not kwargs:
        return None
    if "input" in kwargs:
        return "input"
    return next(iter(kwargs)) if len(kwargs) == 1 else None


def _keeper(call: Call, label: str, last: bool = False):
    """A hook storing ``label``'s gradient, from one backward pass only.

    dY's hook runs first in each pass (the output's gradient is complete before the layer's
    backward runs), so a new pass starts a new set: a partial pass before the full one (a
    gradient penalty's ``autograd.grad`` with respect to the input, which computes dX but
    no dW) cannot leave its dY beside the next pass's dW. The last pass's set is kept.
    """
    import torch

    def keep(grad):
        task = torch._C._current_graph_task_id()
        if last:
            for name in GRADIENTS:
                call.arrays.pop(name, None)
            call.task = task
        elif task != call.task:
            return
        call.arrays[label] = _numpy(grad)

    return keep


def _write(captured: Captured, format: str, force: bool) -> None:
    from . import writing

    calls = captured.calls
    done = [c for c in calls if c.backward]
    captured.missing = [c.module for c in calls if not c.backward]
    if not done:
        what = "no recorded call" if not calls else f"none of the {len(calls)} recorded calls"
        raise LincheckError(f"{captured.folder}: {what} had a backward pass inside the capture")
    totals: dict[str, int] = {}
    for c in calls:
        totals[c.module] = totals.get(c.module, 0) + 1
    cases = {}
    taken: set[str] = set()  # lower case: a case-insensitive file system is one name
    for c in done:
        metadata = {"lincheck.module": c.module, "lincheck.device": c.device}
        if c.precision:
            metadata["lincheck.precision"] = c.precision
        name = _file_name(c.name(totals[c.module]))
        unique, k = name, 1
        while unique.lower() in taken:  # "a b" and "a_b", or "Head" and "head"
            k += 1
            unique = f"{name}~{k}"
        taken.add(unique.lower())
        cases[unique] = (c, metadata)
    if format == "npy":  # refused before anything is written
        for c, metadata in cases.values():
            if "lincheck.precision" in metadata:
                raise InputError(
                    f"{captured.folder}: {c.module} ran in {metadata['lincheck.precision']} "
                    "arithmetic, which a .npy folder cannot record; use format='safetensors'"
                )
            narrow = [n for n, a in c.arrays.items() if a.dtype.name in NARROW_FLOATS]
            if narrow:
                raise InputError(
                    f"{captured.folder}: {c.module}'s {narrow[0]} is {c.arrays[narrow[0]].dtype}, "
                    "which .npy cannot carry; use format='safetensors'"
                )
    if captured.folder.exists() and not captured.folder.is_dir():
        raise InputError(f"{captured.folder}: is a file, not a folder; nothing was written")
    targets = {name: writing.case_path(captured.folder / name, format) for name in cases}
    existing = [str(p) for p in targets.values() if os.path.lexists(p)]
    if existing and not force:
        raise InputError(
            f"{existing[0]}: already exists; nothing was written (force=True replaces)"
        )
    try:
        captured.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, no permission, ...
        raise InputError(
            f"{captured.folder}: cannot create the folder ({exc.strerror}); nothing was written"
        ) from None
    for name, (c, metadata) in cases.items():
        writing.save_case(targets[name], c.arrays, format=format, force=force, metadata=metadata)
        captured.paths.append(targets[name])


def _file_name(name: str) -> str:
    """A case name as a file name: qualified names are safe already; anything else is not."""
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", name)
