"""The checker itself: correct gradients pass, planted bugs fail and are located."""

import numpy as np
import pytest
from conftest import SHAPES, layer

import lincheck
from lincheck import InputError, check
from lincheck.checks import analytic_gradients, random_inputs

DTYPES = ["float64", "float32", "float16"]


def grads_in(dtype, X, W, B, G):
    """dX, dW, dB computed by NumPy in ``dtype`` from inputs rounded to it."""
    X, W, G = (a.astype(dtype) for a in (X, W, G))
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    return {"dX": (G2 @ W).reshape(X.shape), "dW": G2.T @ X2, "dB": G2.sum(axis=0)}


def by_tensor(report, subject="supplied"):
    return {c.tensor: c for c in report.checks if c.subject == subject}


# --- no false alarms ------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_correct_gradients_pass_in_their_own_dtype(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    data = random_inputs(rng, *shape, dtype=dtype)
    grads = analytic_gradients(data)
    args = [data["X"], data["W"], data["B"], data["dY"]]
    against_reference = check(*args, **grads)
    assert against_reference.passed, [c for c in against_reference.failed]
    against_witness = check(*args, **grads, against="witness", subject="analytic")
    assert against_witness.passed, [c for c in against_witness.failed]
    assert {c.tensor for c in against_witness.checks} == {"dX", "dW", "dB"}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gradients_computed_from_rounded_float64_inputs_pass(rng, dtype):
    """float64 inputs, a float32/16 subject computed from their rounded values."""
    X, W, B, G = layer(rng, 16, 24, 8)
    assert check(X, W, B, G, **grads_in(dtype, X, W, B, G)).passed


def test_scales_from_1e_minus_8_to_1e8(rng):
    X, W, B, G = layer(rng, 9, 7, 5)
    for dtype in ("float64", "float32"):
        for scale in (1e-8, 1.0, 1e8):
            Xs, Gs = X * scale, G / scale
            assert check(Xs, W, B, Gs, **grads_in(dtype, Xs, W, B, Gs)).passed, (dtype, scale)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tiny_inputs_with_gradual_underflow_pass(rng, dtype):
    """Products near the smallest normal number lose relative accuracy; the bounds allow for it."""
    tiny = {"float64": 1e-160, "float32": 1e-20}[dtype]
    X, W, B, G = layer(rng, 7, 6, 5)
    X, W, B = X * tiny, W * tiny, B * tiny * tiny
    X, W, B, G = (a.astype(dtype) for a in (X, W, B, G))
    grads = grads_in(dtype, X, W, B, G)
    assert check(X, W, B, G, **grads).passed
    assert check(X, W, B, G, **grads, against="witness").passed


def test_inputs_whose_products_overflow_are_bad_input(rng):
    X, W, B, G = layer(rng, 4, 3, 2)
    with pytest.raises(InputError, match=r"^X, W, dY: values too large: sums of products overflow"):
        check(X * 1e200, W * 1e200, B, G)


def test_integer_and_bool_inputs_are_exact_values(rng):
    X = rng.integers(-5, 6, size=(6, 4))
    W = rng.integers(-3, 4, size=(3, 4)).astype(np.int32)
    B = np.array([True, False, True])
    G = rng.integers(-2, 3, size=(6, 3))
    report = check(X, W, B, G, dX=G @ W, dW=G.T @ X, dB=G.sum(0))
    assert report.passed
    assert report.layer.dtypes == {"X": "int64", "W": "int32", "B": "bool", "dY": "int64"}
    assert all(c.max_abs_error == 0 for c in report.checks if c.subject == "supplied")


def test_no_subjects_checks_the_formulas_against_the_witness(rng):
    X, W, B, G = layer(rng, 5, 4, 3)
    report = check(X, W, B, G)
    assert report.passed
    assert [(c.tensor, c.subject, c.oracle) for c in report.checks] == [
        ("dX", "reference", "witness"),
        ("dW", "reference", "witness"),
        ("dB", "reference", "witness"),
    ]


def test_subjects_are_checked_and_the_reference_is_witnessed(rng):
    X, W, B, G = layer(rng, 5, 4, 3)
    report = check(X, W, B, G, dW=G.T @ X)
    assert [(c.tensor, c.subject, c.oracle) for c in report.checks] == [
        ("dW", "supplied", "reference"),
        ("dW", "reference", "witness"),
    ]


def test_forward_output_is_checked(rng):
    X, W, B, G = layer(rng, 5, 4, 3)
    Y = X.astype("float32") @ W.astype("float32").T + B.astype("float32")
    assert check(X, W, B, G, Y=Y).passed
    Y_bad = Y.copy()
    Y_bad[2, 1] += 1e-3
    bad = by_tensor(check(X, W, B, G, Y=Y_bad))["Y"]
    assert not bad.passed and bad.worst_index == (2, 1)
    no_bias = by_tensor(check(X, W, B, G, Y=X @ W.T))["Y"]
    assert not no_bias.passed  # Y computed without the bias


# --- planted bugs ---------------------------------------------------------


def planted(X, W, B, G):
    """Each entry: a name, the tensor it breaks, and the broken gradients."""
    dX, dW, dB = G @ W, G.T @ X, G.sum(0)
    return {
        "dW transposed (square)": ("dW", dict(dX=dX, dW=dW.T.copy(), dB=dB)),
        "dB mean over the batch": ("dB", dict(dX=dX, dW=dW, dB=G.mean(0))),
        "dB from one row": ("dB", dict(dX=dX, dW=dW, dB=G[0].copy())),
        "dX sign flipped": ("dX", dict(dX=-dX, dW=dW, dB=dB)),
        "dW scaled by 2": ("dW", dict(dX=dX, dW=2 * dW, dB=dB)),
        "dX with W transposed": ("dX", dict(dX=G @ W.T, dW=dW, dB=dB)),
    }


@pytest.mark.parametrize("bug", list(planted(*layer(np.random.default_rng(0), 6, 6, 6))))
@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_bugs_fail_on_the_right_tensor(bug, dtype):
    X, W, B, G = (a.astype(dtype) for a in layer(np.random.default_rng(1), 6, 6, 6))
    tensor, grads = planted(X, W, B, G)[bug]
    report = check(X, W, B, G, **grads)
    assert not report.passed
    assert {c.tensor for c in report.failed} == {tensor}


def test_transposed_dW_of_a_non_square_layer_is_a_shape_failure(rng):
    X, W, B, G = layer(rng, 8, 5, 3)
    c = by_tensor(check(X, W, B, G, dW=(G.T @ X).T))["dW"]
    assert not c.passed
    assert c.shape == (5, 3) and c.expected_shape == (3, 5)
    assert c.message == "wrong shape: expected (3, 5), got (5, 3)"
    assert c.max_abs_error is None and c.worst_index is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tensor", ["dX", "dW", "dB"])
def test_one_entry_off_by_1e_3_relative_is_caught_and_located(rng, tensor, dtype):
    # float16's worst-case bound for a 32-term sum, γ_32(2⁻¹¹) ≈ 1.6% of Σ|terms|, is
    # about 9% of |dB| for random signs, so the planted float16 error is larger.
    rel = {"float64": 1e-3, "float32": 1e-3, "float16": 0.25}[dtype]
    data = random_inputs(rng, 32, 64, 16, dtype)
    grads = analytic_gradients(data)
    g = grads[tensor]
    flat = int(np.argmax(np.abs(g)))  # a well-conditioned entry
    index = np.unravel_index(flat, g.shape)
    g[index] = g[index] * (1 + rel)
    report = check(*(data.get(k) for k in ("X", "W", "B", "dY")), **grads)
    assert [c.tensor for c in report.failed] == [tensor]
    failed = report.failed[0]
    assert failed.worst_index == tuple(int(i) for i in index)
    assert failed.message.startswith(f"1 of {g.size} entries exceed their tolerance (1 beyond")
    assert failed.tier == "certain"


def test_float64_entry_error_far_below_1e_3_is_still_caught(rng):
    data = random_inputs(rng, 32, 64, 16)
    grads = analytic_gradients(data)
    grads["dW"][3, 7] *= 1 + 1e-9
    report = check(*(data.get(k) for k in ("X", "W", "B", "dY")), **grads)
    assert report.failed and report.failed[0].worst_index == (3, 7)


def test_error_in_leading_batch_dims_is_located_in_the_users_shape(rng):
    X, W, B, G = layer(rng, 0, 5, 3, batch=(2, 4))
    grads = grads_in("float64", X, W, B, G)
    assert grads["dX"].shape == (2, 4, 5)
    assert check(X, W, B, G, **grads).passed
    grads["dX"][1, 2, 3] += 0.5
    failed = check(X, W, B, G, **grads).failed
    assert [c.tensor for c in failed] == ["dX"] and failed[0].worst_index == (1, 2, 3)
    flat = check(X, W, B, G, dX=grads["dX"].reshape(8, 5)).failed[0]
    assert flat.message == "wrong shape: expected (2, 4, 5), got (8, 5)"


def test_unbatched_input_like_nn_linear(rng):
    X, W, B, G = layer(rng, 0, 5, 3, batch=())
    assert X.shape == (5,) and G.shape == (3,)
    report = check(X, W, B, G, dX=W.T @ G, dW=np.outer(G, X), dB=G)
    assert report.passed and report.layer.N == 1


def test_no_bias_layer(rng):
    X, W, _, G = layer(rng, 6, 4, 3)
    report = check(X, W, None, G, dX=G @ W, dW=G.T @ X)
    assert report.passed and not report.layer.bias
    assert "dB" not in {c.tensor for c in report.checks}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_subject_is_a_failed_check(rng, bad):
    X, W, B, G = layer(rng, 6, 4, 3)
    dW = G.T @ X
    dW[1, 2] = bad
    dW[2, 0] = bad
    c = by_tensor(check(X, W, B, G, dW=dW))["dW"]
    assert not c.passed and c.worst_index == (1, 2)
    what = "NaN" if np.isnan(bad) else "Inf"
    assert c.message == f"contains 2 {what}, first at [1, 2]"


# --- bad input ------------------------------------------------------------


def _inputs(rng):
    X, W, B, G = layer(rng, 6, 4, 3)
    return dict(X=X, W=W, B=B, dY=G)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(W=np.ones(4)), "W: expected 2 dimensions (D_out, D_in), found shape (4,)"),
        (dict(X=np.ones((6, 5))), "X: shape (6, 5) does not fit W (3, 4)"),
        (dict(B=np.ones(4)), "B: shape (4,) does not fit W (3, 4): expected (3,)"),
        (
            dict(dY=np.ones((6, 4))),
            "dY: shape (6, 4) does not fit X (6, 4) and W (3, 4): expected (6, 3)",
        ),
        (dict(dY=np.ones((5, 3))), "dY: shape (5, 3) does not fit"),
        (dict(X=np.ones((0, 4)), dY=np.ones((0, 3))), "X: a dimension has size 0"),
        (dict(X=np.full((6, 4), 1 + 2j)), "X: dtype complex128 is complex"),
        (dict(W=np.array([["a"] * 4] * 3)), "W: dtype <U1 is string"),
        (dict(B=np.array([None] * 3)), "B: dtype object is object (pickled)"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_array(rng, change, message):
    args = {**_inputs(rng), **change}
    with pytest.raises(InputError) as info:
        check(args["X"], args["W"], args["B"], args["dY"])
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError) and isinstance(info.value, lincheck.LincheckError)


def test_nan_in_an_input_names_the_first_index(rng):
    args = _inputs(rng)
    args["X"][2, 3] = np.nan
    args["X"][4, 0] = np.inf
    with pytest.raises(InputError, match=r"^X: contains 1 NaN and 1 Inf, first at \[2, 3\]$"):
        check(args["X"], args["W"], args["B"], args["dY"])


def test_dB_without_a_bias_is_bad_input(rng):
    args = _inputs(rng)
    with pytest.raises(InputError, match="dB: a bias gradient is given but there is no bias B"):
        check(args["X"], args["W"], None, args["dY"], dB=args["dY"].sum(0))


def test_sources_name_the_file_in_errors(rng):
    args = _inputs(rng)
    with pytest.raises(InputError, match=r"^W \(dump/W.npy\): expected 2 dimensions"):
        check(args["X"], np.ones(4), None, args["dY"], sources={"W": "dump/W.npy"})
