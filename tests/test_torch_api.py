"""torch layers checked where they live: tensors read exactly, custom Functions and modules run.

The layers are ``tests/torch_layers.py``: a custom ``torch.autograd.Function`` with a
hand-written backward and an ``nn.Module`` using it. Correct, they pass in float32,
bfloat16 and float16 on every shape and seed (no false alarm); with a planted bug
they fail, and the hint names the bug. Everything runs on the CPU; the CUDA rules
are tested through the pure :func:`lincheck.frameworks.default_precision` and the
flags torch keeps even without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NAMED_BUGS

import lincheck
from lincheck import frameworks
from lincheck.errors import InputError

torch = pytest.importorskip("torch", reason="torch is not installed (pip install '.[test]')")
ml_dtypes = pytest.importorskip("ml_dtypes")
import torch_layers as tl  # noqa: E402

import lincheck.torch  # noqa: E402

DTYPES = ["float32", "bfloat16", "float16"]
# (batch shape, in_features, out_features, bias, seed): leading batch dims, a batch long
# enough that bfloat16 and float16 sums round many times (N = 2048), D_in > D_out, no bias.
SHAPES = [((2, 3), 7, 5, True, 0), ((2048,), 16, 8, True, 1), ((33,), 64, 16, False, 2)]
SHAPES += [((4, 4, 2), 3, 9, True, 3)]
KINDS = {
    "autograd.Function": lambda **kw: lincheck.torch.check_function(tl.LinearFunction, **kw),
    "nn.Module": lambda **kw: lincheck.torch.check_module(tl.Linear, **kw),
}


def describe(report) -> str:
    return "; ".join(f"{c.subject} {c.tensor}: {c.verdict} {c.bound_ratio}" for c in report.checks)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}-b{s[3]:d}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_correct_layers_pass(kind, dtype, shape):
    batch, D_in, D_out, bias, seed = shape
    report = KINDS[kind](
        batch_shape=batch,
        in_features=D_in,
        out_features=D_out,
        dtype=dtype,
        bias=bias,
        seed=seed,
    )
    supplied = {c.tensor: c for c in report.checks if c.subject == "supplied"}
    assert set(supplied) == {"dX", "dW", "Y"} | ({"dB"} if bias else set())
    assert report.passed, describe(report)
    assert report.layer.batch_shape == batch
    assert report.layer.dtypes["X"] == dtype


@pytest.mark.parametrize(("bug", "code", "tensor"), NAMED_BUGS, ids=[b for b, _, _ in NAMED_BUGS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["autograd.Function", "nn.Module"])
def test_planted_bugs_are_named(kind, dtype, bug, code, tensor):
    shape = dict(batch_shape=(4, 8), in_features=12, out_features=12, dtype=dtype, seed=5)
    if kind == "nn.Module":
        report = lincheck.torch.check_module(tl.BUGGY_MODULES[bug], **shape)
    else:
        report = lincheck.torch.check_function(tl.BUGGY[bug].apply, **shape)
    failed = {c.tensor for c in report.failed}
    assert failed == {tensor}, describe(report)
    assert [h.code for h in report.hints if h.tensor == tensor] == [code]


def test_a_uniform_error_that_shows_in_few_entries_is_scaled_not_localized():
    """dB 1% short in float16 over N = 65536: only the entries with the largest sums cross
    their tolerance, but one factor fits them all; an indexing bug would leave none."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).half()
    X = torch.randn(65536, 16).half().requires_grad_()
    dY = torch.randn(65536, 8).half()
    layer(X).backward(dY)
    W, B = layer.weight, layer.bias
    report = lincheck.check(X, W, B, dY, dX=X.grad, dW=W.grad, dB=B.grad * 0.99)
    assert [(h.code, h.tensor) for h in report.hints] == [("scaled", "dB")], describe(report)
    dB = B.grad.clone()
    dB[3] *= 0.9  # one entry wrong: localized, as before
    report = lincheck.check(X, W, B, dY, dX=X.grad, dW=W.grad, dB=dB)
    assert [(h.code, h.tensor) for h in report.hints] == [("localized", "dB")], describe(report)


def test_float16_layer_with_small_values_is_decided():
    """|X|, |dY| ~ 1e-3 in float16: many products lie below float16's normal range. torch
    forms them exactly in float32, and so does the fp16 preset (rounding them to float16
    would allow 2⁻²⁵ each, which made this correct layer inconclusive); dW 1% short fails."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).half()
    X = (torch.randn(4096, 64) * 1e-3).half().requires_grad_()
    dY = (torch.randn(4096, 32) * 1e-3).half()
    layer(X).backward(dY)
    W, B, dW = layer.weight, layer.bias, layer.weight.grad
    report = lincheck.check(X, W, B, dY, dX=X.grad, dW=dW, dB=B.grad)
    assert report.passed, describe(report)
    short = lincheck.check(X, W, B, dY, dX=X.grad, dW=dW * 0.99, dB=B.grad)
    assert {c.tensor for c in short.failed} == {"dW"}, describe(short)


def test_float16_bias_one_percent_short_fails():
    """torch sums a float16 dB in float32 and rounds once: a dB 1% short is far beyond that
    over N = 512 (and is named a scaling), though within the fp16 preset's float16 windows;
    the correct layer passes the tighter bound."""
    shape = dict(batch_shape=(512,), in_features=8, out_features=4, dtype="float16")
    correct = lincheck.torch.check_function(tl.LinearFunction, **shape)
    assert correct.passed, describe(correct)
    short = type("ShortBiasFunction", (tl.LinearFunction,), {"bug": "dB 1% short"})
    report = lincheck.torch.check_function(short, **shape)
    assert {c.tensor for c in report.failed} == {"dB"}, describe(report)
    assert [h.code for h in report.hints] == ["scaled"], describe(report)
    assert {c.precision for c in report.checks if c.subject == "supplied"} == {"fp16,reduce=fp32"}


@pytest.mark.parametrize("kind", ["autograd.Function", "nn.Module"])
def test_bfloat16_sequential_accumulation_fails(kind):
    """dW accumulated one sample at a time in bfloat16 over N = 2048 (every partial sum
    rounded to 8 bits: once the sum is large, small terms are lost): beyond what float32
    accumulation of bfloat16 products allows, so it fails. No arithmetic lincheck bounds
    explains it usefully (a bfloat16 accumulator's bound over 2048 terms exceeds the
    gradient itself), so the hint says so rather than guess."""
    bug = "dW summed in bf16"
    shape = dict(batch_shape=(2048,), in_features=16, out_features=16, dtype="bfloat16")
    if kind == "nn.Module":
        report = lincheck.torch.check_module(tl.BUGGY_MODULES[bug], **shape)
    else:
        report = lincheck.torch.check_function(tl.BUGGY[bug], **shape)
    assert {c.tensor for c in report.failed} == {"dW"}, describe(report)
    assert [h.code for h in report.hints] == ["unexplained"]
    # The same bug in float32 is within float32's bound: it is the bfloat16 sums that fail.
    shape["dtype"] = "float32"
    assert lincheck.torch.check_function(tl.BUGGY[bug], **shape).passed


def test_backward_on_tensors_and_sweeps():
    """A backward on tensors and a forward through the Function, swept by check_backward
    (in this process) over the edge shapes in float32 and bfloat16."""
    sweep = lincheck.check_backward(tl.backward, N=6, D_in=5, D_out=3, dtypes=["bfloat16"])
    assert sweep.passed and len(sweep.results) == 7
    sweep = lincheck.check_backward(tl.linear, N=6, D_in=5, D_out=3, dtypes=["float32"])
    assert sweep.passed
    assert all("Y" in {c.tensor for c in r.report.checks} for r in sweep.results)
    sweep = lincheck.check_backward(tl.mean_bias_backward, N=6, D_in=5, D_out=3)
    codes = {h.code for r in sweep.failed for h in r.report.hints}
    assert codes == {"mean_instead_of_sum"}


def test_module_instance_is_used_as_it_is():
    torch.manual_seed(0)
    layer = torch.nn.Linear(9, 4).to(torch.bfloat16)
    before = layer.weight.detach().clone()
    report = lincheck.torch.check_module(layer, batch_shape=(3, 5))
    assert report.passed, describe(report)
    assert (report.layer.D_in, report.layer.D_out) == (9, 4)
    assert report.layer.dtypes["W"] == "bfloat16"
    assert torch.equal(layer.weight, before) and layer.weight.grad is None
    no_bias = torch.nn.Linear(9, 4, bias=False)
    assert lincheck.torch.check_module(no_bias).layer.bias is False
    # dtype= checks a converted copy: the user's bfloat16 layer is left as it was.
    wide = lincheck.torch.check_module(layer, batch_shape=(3, 5), dtype="float64")
    assert wide.passed and wide.layer.dtypes["W"] == "float64", describe(wide)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, before)


def test_module_without_weight_is_refused_in_one_line():
    with pytest.raises(InputError) as info:
        lincheck.torch.check_module(tl.NoWeight)
    message = str(info.value)
    assert "\n" not in message
    assert "`weight` parameter" in message and "(out_features, in_features)" in message


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float16"])
def test_tensors_are_read_exactly(dtype):
    """Narrow tensors (requiring grad or not) become ml_dtypes arrays bit for bit."""
    values = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)) * 3
    t = values.to(getattr(torch, dtype))
    for value in (t, t.clone().requires_grad_()):
        a = frameworks.to_numpy(value)
        assert a.dtype.name == dtype and a.shape == (6, 5)
        assert np.array_equal(a.astype(np.float64), t.double().numpy())
    # and through lincheck.check: the fp8 and bfloat16 presets follow from the dtype
    X, W = t.float().numpy(), torch.ones(2, 5).to(t.dtype)
    report = lincheck.check(X, W, None, np.ones((6, 2), np.float32), dW=None)
    assert report.layer.dtypes["W"] == dtype


def test_bfloat16_gradients_of_nn_linear_assert_in_one_line():
    layer = torch.nn.Linear(16, 8, dtype=torch.bfloat16)
    X = torch.randn(4, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    dY = torch.randn(4, 32, 8, dtype=torch.bfloat16)
    layer(X).backward(dY)
    report = lincheck.assert_gradients(
        X, layer.weight, layer.bias, dY, dX=X.grad, dW=layer.weight.grad, dB=layer.bias.grad
    )
    assert {c.precision for c in report.checks if c.subject == "supplied"} == {
        "bf16,reduce=fp32"
    }  # torch sums dB in float32


def test_autocast_is_read_from_the_run():
    """A forward under CPU autocast returns a bfloat16 Y from float32 inputs: its float32
    gradients are held to the bf16 preset (fp32 would fail them); checked inside autocast,
    float32 tensors are too."""

    def autocast_linear(X, W, B):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.linear(X, W, B)

    report = lincheck.torch.check_function(autocast_linear, batch_shape=(64,), dtype="float32")
    assert report.passed, describe(report)
    assert {c.precision for c in report.checks if c.subject == "supplied"} == {"bf16,reduce=fp32"}
    assert not lincheck.torch.check_function(
        autocast_linear, batch_shape=(64,), precision="fp32"
    ).passed
    t = torch.ones(2, 2)
    assert frameworks.arithmetic_of(t) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frameworks.arithmetic_of(t) == "bf16,reduce=fp32"


def test_tf32_flag_is_read():
    """torch keeps the CUDA matmul settings without a GPU: the TF32 choice is read (the rule
    is default_precision's, tests/test_framework_run.py); so is oneDNN's on a CPU, which
    "high" sets to TF32 and "medium" to one bfloat16 pass (used where the CPU has AMX)."""
    assert frameworks.torch_flags("cuda") == (False, None)
    assert frameworks.torch_flags("cpu") == (False, None)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert frameworks.torch_flags("cuda") == (True, None)
        assert frameworks.torch_flags("cpu") == ("tf32", None)
        torch.set_float32_matmul_precision("medium")
        assert frameworks.torch_flags("cpu") == ("bf16", None)
        assert frameworks.arithmetic_of(torch.ones(2)) == "bf16,out=fp32,reduce=fp32"
        assert frameworks.arithmetic_of(torch.ones(2, dtype=torch.float64)) is None
    finally:
        torch.set_float32_matmul_precision(before)
    assert frameworks.torch_flags("cuda")[0] is False
    assert frameworks.torch_flags("cpu")[0] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_module_with_tf32():  # pragma: no cover - GPU machines only
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        report = lincheck.torch.check_module(tl.Linear, device="cuda")
    finally:
        torch.set_float32_matmul_precision(before)
    assert report.passed, describe(report)
    assert {c.precision for c in report.checks if c.subject == "supplied"} == {"tf32"}
    assert lincheck.torch.check_module(tl.Linear, device="cuda", dtype="bfloat16").passed


def test_missing_device_is_one_line():
    with pytest.raises(InputError) as info:
        lincheck.torch.check_module(tl.Linear, device="cuda:99")
    assert str(info.value).startswith("--device cuda:99: torch cannot use it: ")
    assert "\n" not in str(info.value)
