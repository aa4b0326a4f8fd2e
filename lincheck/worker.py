"""Your code in a worker process: ``run --impl/--forward`` cannot end, hang or garble lincheck.

lincheck's verdict is only worth something if the code it checks cannot end
the check early or skip it. A backward that calls ``sys.exit(0)`` or ``os._exit(0)``, crashes in a
native kernel, never returns, eats the memory, or prints to stdout must end in
a failed case with a message, never in lincheck exiting 0, dying, hanging, or
a JSON report on stdout with the user's text in it. So the CLI imports and
calls the user's functions in a child interpreter, never in its own process:

* The child is ``python -c`` of :func:`main` (a fresh interpreter, not a fork:
  forking a process whose BLAS already started threads is unsafe, and JAX
  and torch warn about it). lincheck's own process never imports the user's
  module, so nothing at import time can touch it either.
* The child's file descriptor 1 is moved to a private pipe for the protocol,
  and 1 then points at stderr: whatever the user prints goes to stderr.
* Each call has a deadline (``--timeout``). A child that misses it is killed;
  a child that dies (``os._exit``, a signal such as SIGSEGV, or the kernel's
  out-of-memory killer) fails the case it was running with how it ended, and
  a fresh child serves the next case.
* ``SystemExit`` and every other exception from the user's function is a
  failed case with the exception's text, in the child as in-process
  (:func:`describe`).

The protocol never unpickles: a message is a JSON header frame followed by
one ``.npy`` frame per array, read back with ``allow_pickle=False``. The child
converts what the user returned to NumPy itself (torch and JAX tensors
included) and sends an array larger than every array of the layer (it has
the wrong shape) as its shape and dtype only, so a broadcast view of 10¹²
entries costs nothing to report.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import numpy.lib.format as npy_format

from .errors import InputError
from .frameworks import EXTRA, NARROW, classify, narrow_dtype

DEFAULT_TIMEOUT = 60.0
"""Seconds a user's function may take on one case (and to import) before it is stopped.

A sweep's layers are small (the requested shape and its edges): a correct
backward takes milliseconds on them, so a minute means it is stuck. Importing
a framework (torch, JAX) takes seconds, well inside it.
"""


@dataclass(frozen=True)
class Returned:
    """What the user's functions gave back for one case.

    ``subjects`` holds the arrays to check by name (dX, dW, dB, Y); an array
    larger than every array of the layer is a zero-strided stand-in of its
    shape (a wrong shape, whose values are never read). ``errors`` are the
    failures that stopped a call; ``savable`` names the subjects worth saving
    with ``--save-failures``; ``precision`` is the preset a torch or JAX layer
    computed in when it is not its dtype's (autocast, TF32), else None.
    """

    subjects: Mapping[str, np.ndarray] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    savable: tuple[str, ...] = ()
    precision: str | None = None


def describe(exc: BaseException, name: str) -> str:
    """One line for an exception the user's function let out (SystemExit included)."""
    if isinstance(exc, SystemExit):
        code = "" if exc.code is None else repr(exc.code)
        return f"{name} called sys.exit({code}); a check cannot end lincheck"
    return f"{name} raised {type(exc).__name__}: {exc}"


def unpack(out: Any, bias: bool) -> tuple[dict[str, Any], str]:
    """A backward's result as subjects by name, and what is wrong with its form ("" if nothing)."""
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        size = len(out) if isinstance(out, (tuple, list)) else type(out).__name__
        return {}, f"returned {size!r} instead of (dX, dW, dB)"
    dX, dW, dB = out
    subjects = {"dX": dX, "dW": dW}
    if bias:
        if dB is None:
            return subjects, "returned dB = None for a layer with a bias"
        subjects["dB"] = dB
    elif dB is not None:
        return subjects, "returned a dB for a layer without bias (B is None); return None"
    return subjects, ""


def module_layout_error(name: str) -> str:
    """Why an ``nn.Module`` cannot be checked in the ``in_out`` layout."""
    return (
        f"{name} is a torch nn.Module, whose weight is (out_features, in_features): the "
        "out_in layout; the in_out layout is for functions that compute x @ w + b"
    )


def call(
    fn: Callable | None, forward: Callable | None, inputs: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], list[str]]:
    """Call the user's backward and forward on one case's inputs (copies): (subjects, errors).

    ``fn`` may be an :class:`~lincheck.frameworks.Impl` (a torch or JAX layer,
    run by its framework) or a NumPy backward.
    """
    from .frameworks import Impl

    X, W, B, G = inputs["X"], inputs["W"], inputs.get("B"), inputs["dY"]
    subjects: dict[str, Any] = {}
    errors = []
    if isinstance(fn, Impl) and fn.framework == "numpy":
        fn = fn.fn
    if fn is not None:
        try:
            if isinstance(fn, Impl):
                found = fn.run(inputs)
                problem = ""
                if fn.role == "backward":
                    found, problem = unpack(found["returned"], B is not None)
            else:
                out = fn(X.copy(), W.copy(), None if B is None else B.copy(), G.copy())
                # (inside the try: a result's own len() or iteration is the user's code too)
                found, problem = unpack(out, B is not None)
        except BaseException as exc:  # SystemExit too: the user's code cannot end the check
            if isinstance(exc, KeyboardInterrupt):
                raise
            errors.append(describe(exc, _name(fn)))
        else:
            subjects.update(found)
            if problem:
                errors.append(f"{_name(fn)} {problem}")
    if forward is not None:
        try:
            subjects["Y"] = forward(X.copy(), W.copy(), None if B is None else B.copy())
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            errors.append(describe(exc, _name(forward)))
    return subjects, errors


def arithmetic(fn: Any, inputs: Mapping[str, np.ndarray], subjects: Mapping[str, Any]):
    """The preset a torch or JAX layer's case ran in when it is not its dtype's, else None
    (:meth:`lincheck.frameworks.Impl.arithmetic`); what cannot be read is None."""
    from .frameworks import Impl

    if not isinstance(fn, Impl) or "Y" not in subjects and fn.gives_forward:
        return None
    try:
        return fn.arithmetic(inputs, subjects)
    except Exception:
        return None


def read_results(subjects: Mapping[str, Any], errors: list[str]) -> dict[str, np.ndarray]:
    """The user's results as arrays of real numbers; what cannot be read adds to ``errors``.

    Reading runs the user's code too (``__array__``, ``detach()``, DLPack): an
    exception from it, ``SystemExit`` included, fails the case like one from
    the function itself.
    """
    from .validate import real_array

    arrays = {}
    for name, value in subjects.items():
        try:
            arrays[name] = real_array(name, value, {})
        except InputError as exc:
            errors.append(str(exc))
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            errors.append(f"{name}: reading it as an array {describe(exc, '')[1:]}")
    return arrays


def _name(fn: Any) -> str:
    from .frameworks import Impl

    if isinstance(fn, Impl):
        return fn.name
    return getattr(fn, "__qualname__", None) or repr(fn)


def stand_in(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array of ``shape`` that takes no memory: for a result whose shape alone fails it."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


# ---------------------------------------------------------------------------
# The protocol: length-prefixed frames, a JSON header and then .npy arrays


def _send(fp: BinaryIO, header: dict, arrays: Mapping[str, np.ndarray] = {}) -> None:
    # .npy has no code for ml_dtypes' types (bfloat16, fp8): they travel as unsigned integers
    # of their width, the bits unchanged, with their dtype's name in the header.
    narrow = {name: a.dtype.name for name, a in arrays.items() if a.dtype.name in NARROW}
    frames = [json.dumps({**header, "arrays": list(arrays), "narrow": narrow}).encode()]
    for name, a in arrays.items():
        if name in narrow:
            a = np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")
        buf = io.BytesIO()
        npy_format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
        frames.append(buf.getvalue())
    fp.write(b"".join(struct.pack("<Q", len(f)) + f for f in frames))
    fp.flush()


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = read(left)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _receive(read: Callable[[int], bytes]) -> tuple[dict, dict[str, np.ndarray]]:
    def frame() -> bytes:
        (size,) = struct.unpack("<Q", _read_exactly(read, 8))
        return _read_exactly(read, size)

    header = json.loads(frame())
    narrow = header.pop("narrow", {})
    arrays = {}
    for name in header.pop("arrays"):
        a = npy_format.read_array(io.BytesIO(frame()), allow_pickle=False)
        if name in narrow:
            dtype = narrow_dtype(str(narrow[name]))  # one of NARROW, or ValueError: garbled
            if a.dtype.kind != "u" or a.dtype.itemsize != dtype.itemsize:
                raise ValueError(f"{name}: {a.dtype} cannot hold {dtype.name}")
            a = a.view(dtype)
        arrays[name] = a
    return header, arrays


# ---------------------------------------------------------------------------
# lincheck's side


class Worker:
    """A child interpreter that imports ``impl`` and ``forward`` (``module:function``) and
    calls them on each case, with ``timeout`` seconds per case (None: no limit).

    Use as a context manager. :meth:`start` raises ``InputError`` when a
    function cannot be imported (bad usage, exit 2, as before any check).
    """

    def __init__(
        self,
        impl: str | None,
        forward: str | None,
        timeout: float | None,
        paths: tuple[str, ...] = (),
        framework: str | None = None,
        device: str = "cpu",
        layout: str = "out_in",
    ):
        self.specs = {"impl": impl, "forward": forward}
        self.framework, self.device, self.layout = framework, device, layout
        self.gives_forward = False  # whether --impl is a forward (or module): it gives Y too
        self.paths = list(paths)  # where else the child looks for modules (the caller's sys.path)
        self.names = {k: v.partition(":")[2] for k, v in self.specs.items() if v}
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> subprocess.Popen[bytes]:
        """Start the child and import the user's functions in it."""
        code = "import sys; del sys.path[0]; from lincheck.worker import main; main()"
        process = self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A session of its own: Ctrl-C at the terminal reaches lincheck alone, which
            # stops the child, and stopping it ends whatever the user's code forked too.
            start_new_session=os.name == "posix",
        )
        try:
            _send_to(
                process,
                {
                    "specs": self.specs,
                    "cwd": os.getcwd(),
                    "paths": self.paths,
                    "framework": self.framework,
                    "device": self.device,
                    "layout": self.layout,
                },
            )
            header, _ = _reply(process, self.timeout, f"importing {self._label()}")
        except _LostError as lost:
            self.stop()
            raise InputError(f"cannot load {self._label()}: {lost}") from None
        except BaseException:  # Ctrl-C while the user's module imports: no child left behind
            self.stop()
            raise
        if "bad_input" in header:
            self.stop()
            raise InputError(header["bad_input"])
        self.gives_forward = bool(header.get("gives_forward"))
        return process

    def stop(self) -> None:
        """End the child and everything it started (its process group)."""
        process, self.process = self.process, None
        if process is not None:
            _kill_group(process)
            process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()

    def run(self, inputs: Mapping[str, np.ndarray]) -> Returned:
        """Call the user's functions on one case's inputs in the child.

        The reply must hold every subject the case needs (dX, dW, and dB with
        a bias, from a backward; Y from a forward) or say why not: a reply
        without one of them and without an error fails the case, so that
        nothing done in the child (lincheck's own code there can be patched
        by the user's) can skip a check. A malformed reply is "garbled".
        """
        process = self.process or self.start()
        expected: tuple[str, ...] = ()
        if self.specs["impl"]:
            expected += ("dX", "dW", "dB") if "B" in inputs else ("dX", "dW")
        if self.specs["forward"] or self.gives_forward:
            expected += ("Y",)
        try:
            _send_to(process, {"call": True}, inputs)
            header, arrays = _reply(process, self.timeout, "this case")
            returned = _returned(header, arrays, expected)
        except _LostError as lost:
            self.stop()  # the next case gets a fresh child
            return Returned(errors=(f"{self._label()} {lost}",))
        return returned

    def _label(self) -> str:
        return " and ".join(self.names.values())


def _returned(header: dict, arrays: dict[str, np.ndarray], expected: tuple[str, ...]) -> Returned:
    """A reply as a Returned, or _LostError("garbled ...") if it is not one lincheck sent."""
    try:
        errors = [str(e) for e in header["errors"]]
        stand_ins = {
            str(name): stand_in(tuple(int(n) for n in shape), _dtype(str(dtype)))
            for name, (shape, dtype) in header["stand_ins"].items()
        }
        precision = header.get("precision")
        precision = None if precision is None else str(precision)
    except Exception as exc:
        raise _LostError(f"garbled its worker's reply ({type(exc).__name__}: {exc})") from None
    names = set(arrays) | set(stand_ins)
    if not names <= set(expected) or (not errors and names != set(expected)):
        got = ", ".join(sorted(names)) or "nothing"
        raise _LostError(f"garbled its worker's reply (expected {', '.join(expected)}, got {got})")
    return Returned({**arrays, **stand_ins}, tuple(errors), tuple(arrays), precision)


def _dtype(text: str) -> np.dtype:
    """A dtype sent by name: NumPy's (``a.dtype.str``) or one of :data:`NARROW`."""
    return narrow_dtype(text) if text in NARROW else np.dtype(text)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (itself and what it forked), or the child alone."""
    if os.name == "posix":
        try:
            os.killpg(process.pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.kill()


def _send_to(process: subprocess.Popen[bytes], header: dict, arrays: Mapping = {}) -> None:
    try:
        _send(process.stdin, header, arrays)  # type: ignore[arg-type]  # a pipe, never None
    except OSError:  # the child is gone (a broken pipe): say how it ended
        raise _LostError(_how_it_ended(process)) from None


def _reply(process: subprocess.Popen[bytes], timeout: float | None, doing: str):
    """The child's next message, or _LostError saying how the child ended or that it hung."""
    fd = process.stdout.fileno()  # type: ignore[union-attr]  # a pipe, never None
    deadline = None if timeout is None else time.monotonic() + timeout

    def read(n: int) -> bytes:
        if os.name != "posix":  # select() takes no pipes there: no deadline
            return os.read(fd, n)
        while True:
            left = 0.25 if deadline is None else min(max(deadline - time.monotonic(), 0.0), 0.25)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                return os.read(fd, n)
            if process.poll() is not None:
                # The child ended, but something it forked may hold the pipe open: no EOF.
                raise EOFError
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError

    try:
        return _receive(read)
    except TimeoutError:
        _kill_group(process)
        process.wait()
        raise _LostError(
            f"did not return within {timeout:g} s ({doing}); stopped (--timeout)"
        ) from None
    except (EOFError, OSError):
        raise _LostError(_how_it_ended(process)) from None
    except Exception as exc:  # the user's code wrote into the protocol's pipe
        _kill_group(process)
        process.wait()
        raise _LostError(f"garbled its worker's reply ({type(exc).__name__}: {exc})") from None


class _LostError(Exception):
    """The child ended or hung during a call."""


def _how_it_ended(process: subprocess.Popen) -> str:
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom = " (out of memory?)" if name == "SIGKILL" else ""
        return f"crashed: its worker process was killed by {name}{oom}"
    return f"ended its worker process with exit code {code} (os._exit?) instead of returning"


# ---------------------------------------------------------------------------
# The child's side


def _load(spec: str, option: str) -> Callable:
    """Import ``package.module:function`` or raise InputError in one line."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise InputError(f"{option} {spec}: expected package.module:function")
    if module_name.endswith(".py"):  # a file name: modules are named without it
        dotted = module_name.removesuffix(".py").replace("/", ".").replace(os.sep, ".")
        raise InputError(
            f"{option} {spec}: a module name, not a file: {option} {dotted}:{attribute} "
            "(from the folder that holds it)"
        )
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # the user's module failed to import (or exited): one line
        missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
        top = str(missing or "").partition(".")[0]
        extra = f" ({EXTRA[top]})" if top in EXTRA else ""
        raise InputError(
            f"{option} {spec}: cannot import {module_name}: {type(exc).__name__}: {exc}{extra}"
        ) from None
    fn: Any = module
    for part in attribute.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InputError(f"{option} {spec}: {module_name} has no {attribute}")
    if not callable(fn):
        raise InputError(f"{option} {spec}: {attribute} is not callable")
    return fn


def main() -> None:
    """Serve calls on stdin/stdout until lincheck closes the pipe."""
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    # The user's prints go to stderr and input() reads nothing: stdout is the report's.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    try:
        header, _ = _receive(proto_in.read)
    except EOFError:
        return
    os.chdir(header["cwd"])
    sys.path.insert(0, header["cwd"])
    sys.path += [p for p in header["paths"] if p not in sys.path]
    specs = header["specs"]
    fn: Any = None
    try:
        if specs["impl"]:
            option = f"--impl {specs['impl']}"
            obj = _load(specs["impl"], "--impl")
            fn = classify(obj, option, header.get("framework"), header.get("device") or "cpu")
            if fn.role == "module" and header.get("layout") == "in_out":
                raise InputError(module_layout_error(option))
        forward = _load(specs["forward"], "--forward") if specs["forward"] else None
        if fn is not None and fn.gives_forward and forward is not None:
            raise InputError(
                f"--forward {specs['forward']}: --impl {specs['impl']} is a {fn.framework} "
                f"{fn.role}, whose Y is checked already; drop --forward"
            )
    except InputError as exc:
        _send(proto_out, {"bad_input": str(exc)})
        return
    _send(proto_out, {"ready": True, "gives_forward": fn is not None and fn.gives_forward})

    while True:
        try:
            _, inputs = _receive(proto_in.read)
        except EOFError:
            return
        subjects, errors = call(fn, forward, inputs)
        precision = arithmetic(fn, inputs, subjects)
        largest = max(a.size for a in inputs.values())
        arrays, stand_ins = {}, {}
        for name, a in read_results(subjects, errors).items():
            if a.size <= largest:  # the values of a transposed dW or a dY-shaped dB tell
                arrays[name] = a
            else:
                stand_ins[name] = (
                    list(a.shape),
                    a.dtype.name if a.dtype.name in NARROW else a.dtype.str,
                )
        reply = {"errors": errors, "stand_ins": stand_ins, "precision": precision}
        _send(proto_out, reply, arrays)
