"""JAX layers checked where they live: a ``jax.custom_vjp`` linear (tests/jax_layers.py),
plain and jitted, differentiated with ``jax.vjp``. Correct, it passes in float32,
bfloat16 and float16 (and float64, with x64 switched on for the call only); each
planted bug fails and is named."""

from __future__ import annotations

import pytest
from conftest import NAMED_BUGS

import lincheck

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install '.[test]')")
import jax_layers as jl  # noqa: E402

import lincheck.jax  # noqa: E402

# (batch shape, D_in, D_out, bias, seed), as in tests/test_torch_api.py.
SHAPES = [((2, 3), 7, 5, True, 0), ((2048,), 16, 8, True, 1), ((33,), 64, 16, False, 2)]


def describe(report) -> str:
    return "; ".join(f"{c.subject} {c.tensor}: {c.verdict} {c.bound_ratio}" for c in report.checks)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}-b{s[3]:d}")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_custom_vjp_passes(dtype, shape):
    batch, D_in, D_out, bias, seed = shape
    report = lincheck.jax.check_function(
        jl.linear_jit, batch_shape=batch, D_in=D_in, D_out=D_out, dtype=dtype, bias=bias, seed=seed
    )
    assert report.passed, describe(report)
    supplied = {c.tensor for c in report.checks if c.subject == "supplied"}
    assert supplied == {"dX", "dW", "Y"} | ({"dB"} if bias else set())


def test_eager_and_float64():
    before = jax.config.jax_enable_x64
    report = lincheck.jax.check_function(jl.linear, batch_shape=(5, 2), dtype="float64")
    assert report.passed and report.layer.dtypes["X"] == "float64"
    assert jax.config.jax_enable_x64 == before  # switched on for the call only
    assert {c.precision for c in report.checks if c.subject == "supplied"} == {"fp64"}


@pytest.mark.parametrize(("bug", "code", "tensor"), NAMED_BUGS, ids=[b for b, _, _ in NAMED_BUGS])
def test_planted_bugs_are_named(bug, code, tensor):
    """In bfloat16 (float32 is tested on torch's layers, and each JAX case compiles)."""
    report = lincheck.jax.check_function(
        jl.BUGGY[bug], batch_shape=(4, 8), D_in=12, D_out=12, dtype="bfloat16", seed=5
    )
    assert {c.tensor for c in report.failed} == {tensor}, describe(report)
    assert [h.code for h in report.hints if h.tensor == tensor] == [code]


def test_bfloat16_sequential_accumulation_fails():
    """As in tests/test_torch_api.py: a scan that rounds every partial sum of dW to
    bfloat16 over N = 2048 fails the bf16 preset (float32 accumulation)."""
    fn = jl.BUGGY["dW summed in bf16"]
    report = lincheck.jax.check_function(
        fn, batch_shape=(2048,), D_in=16, D_out=16, dtype="bfloat16"
    )
    assert {c.tensor for c in report.failed} == {"dW"}, describe(report)
    assert [h.code for h in report.hints] == ["unexplained"]


def test_jax_arrays_are_read_exactly():
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.linspace(-3, 3, 12).reshape(4, 3), dtype=jnp.bfloat16)
    report = lincheck.check(x, jnp.ones((2, 3), jnp.bfloat16), None, jnp.ones((4, 2), jnp.bfloat16))
    assert report.layer.dtypes == {"X": "bfloat16", "W": "bfloat16", "dY": "bfloat16"}


def test_missing_device_is_one_line():
    with pytest.raises(lincheck.InputError) as info:
        lincheck.jax.check_function(jl.linear, device="tpu:3")
    assert str(info.value).startswith("--device tpu:3: ") and "\n" not in str(info.value)


def test_an_in_out_forward_is_checked_in_its_layout_and_named_without_it():
    """``x @ w + b`` takes W as (D_in, D_out): layout="in_out" checks it (and catches a dW
    doubled, indexed as supplied); without it, the function's own error is kept and the
    message names the keyword, as the same layer in the other layout passes."""
    shape = dict(batch_shape=(6,), D_in=5, D_out=3)
    assert lincheck.jax.check_function(jl.flax_style, layout="in_out", **shape).passed
    wrong = lincheck.jax.check_function(jl.flax_style_dw_doubled, layout="in_out", **shape)
    failed = [c for c in wrong.failed if c.subject == "supplied"]
    assert [c.tensor for c in failed] == ["dW"] and len(failed[0].worst_index) == 2
    assert [h.code for h in wrong.hints] == ["scaled"]
    with pytest.raises(ValueError, match=r'takes W in the in_out layout.*layout="in_out"') as e:
        lincheck.jax.check_function(jl.flax_style, **shape)
    assert "TypeError" in str(e.value) and "\n" not in str(e.value)
