"""Diagnosis: each kind of mistake is named when, and only when, it explains the subject."""

import numpy as np
import pytest
from conftest import compute_in, layer

import lincheck
from lincheck import check
from lincheck.core import forward


def gradients(X, W, B, G):
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    return {"dX": (G2 @ W).reshape(X.shape), "dW": G2.T @ X2, "dB": G2.sum(0)}


def hints_of(X, W, B, G, **grads):
    report = check(X, W, B, G, **grads)
    return [(h.code, h.tensor) for h in report.hints], report


def planted(name, X, W, B, G):
    """The broken gradients of each planted bug, and the hint it must get."""
    X2, G2 = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1])
    N = X2.shape[0]
    good = gradients(X, W, B, G)
    Y = forward(X2, W, B)
    bugs = {
        "transposed dW (shape)": ({"dW": good["dW"].T.copy()}, "transposed"),
        "mean dW": ({"dW": good["dW"] / N}, "mean_instead_of_sum"),
        "mean dB": ({"dB": G2.mean(0)}, "mean_instead_of_sum"),
        "sign dX": ({"dX": -good["dX"]}, "sign_flipped"),
        "scaled dW": ({"dW": 2.5 * good["dW"]}, "scaled"),
        "dB one row": ({"dB": G2[3].copy()}, "bias_not_summed"),
        "dB not summed (shape)": ({"dB": G.copy()}, "bias_not_summed"),
        "dX from Y": ({"dX": (Y @ W).reshape(X.shape)}, "wrong_operand"),
        "dW from Y": ({"dW": Y.T @ X2}, "wrong_operand"),
        "dB from Y": ({"dB": Y.sum(0)}, "wrong_operand"),
        "dW last column missed": (
            {"dW": np.concatenate([good["dW"][:, :-1], np.zeros((W.shape[0], 1))], axis=1)},
            "localized",
        ),
        "dX one batch row wrong": ({"dX": _row_off(good["dX"], 2)}, "localized"),
        "dW two entries wrong": ({"dW": _entries_off(good["dW"], [(0, 1), (2, 3)])}, "localized"),
        "dB last row missing": ({"dB": G2[:-1].sum(0)}, "rows_missing"),
        "dW first rows missing": ({"dW": G2[2:].T @ X2[2:]}, "rows_missing"),
        "NaN in dW": ({"dW": _with_nan(good["dW"])}, "non_finite"),
        "noise in dW": (
            {"dW": good["dW"] + np.random.default_rng(9).standard_normal(good["dW"].shape)},
            "unexplained",
        ),
    }
    broken, code = bugs[name]
    tensor = next(iter(broken))
    return {**good, **broken}, code, tensor


def _row_off(dX, n):
    out = dX.copy().reshape(-1, dX.shape[-1])
    out[n] += 1.0
    return out.reshape(dX.shape)


def _entries_off(a, where):
    out = a.copy()
    for idx in where:
        out[idx] += 0.5
    return out


def _with_nan(a):
    out = a.copy()
    out[1, 2] = np.nan
    return out


BUGS = [
    "transposed dW (shape)",
    "mean dW",
    "mean dB",
    "sign dX",
    "scaled dW",
    "dB one row",
    "dB not summed (shape)",
    "dX from Y",
    "dW from Y",
    "dB from Y",
    "dW last column missed",
    "dX one batch row wrong",
    "dW two entries wrong",
    "dB last row missing",
    "dW first rows missing",
    "NaN in dW",
    "noise in dW",
]


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_bug_gets_its_hint_on_its_tensor_only(rng, bug):
    X, W, B, G = layer(rng, 12, 7, 5)
    grads, code, tensor = planted(bug, X, W, B, G)
    hints, report = hints_of(X, W, B, G, **grads)
    assert [c.tensor for c in report.failed] == [tensor]
    assert hints == [(code, tensor)]


def test_correct_gradients_get_no_hints(rng):
    for dtype in ("float64", "float32", "float16"):
        X, W, B, G = (a.astype(dtype) for a in layer(rng, 12, 7, 5))
        hints, report = hints_of(
            X,
            W,
            B,
            G,
            **compute_in({"float64": "fp64", "float32": "fp32", "float16": "fp16"}[dtype], X, W, G),
        )
        assert report.passed and hints == []


def test_square_transpose_and_transposed_operand(rng):
    X, W, B, G = layer(rng, 6, 6, 6)
    good = gradients(X, W, B, G)
    assert hints_of(X, W, B, G, **{**good, "dW": good["dW"].T.copy()})[0] == [("transposed", "dW")]
    assert hints_of(X, W, B, G, **{**good, "dX": G @ W.T})[0] == [("wrong_operand", "dX")]


def test_messages_carry_the_evidence(rng):
    X, W, B, G = layer(rng, 12, 7, 5)
    report = check(X, W, B, G, **{**gradients(X, W, B, G), "dB": G.mean(0)})
    (hint,) = report.hints
    assert hint.message.startswith("dB = dY.mean(0) ")
    assert "but the gradient of a sum over the batch is dY.sum(0)" in hint.message
    assert hint.evidence["N"] == 12 and hint.evidence["bound_ratio"] <= 1
    scaled = check(X, W, B, G, **{**gradients(X, W, B, G), "dW": 2.5 * (G.T @ X)}).hints[0]
    assert scaled.evidence["scale"] == pytest.approx(2.5) and "2.5 ×" in scaled.message
    row = check(X, W, B, G, **{**gradients(X, W, B, G), "dB": G[3].copy()}).hints[0]
    assert row.message.startswith("dB equals row 3 of dY")


def test_mixed_bugs_each_on_their_tensor(rng):
    X, W, B, G = layer(rng, 12, 7, 5)
    good = gradients(X, W, B, G)
    hints, _ = hints_of(X, W, B, G, dX=-good["dX"], dW=good["dW"], dB=G.mean(0))
    assert hints == [("sign_flipped", "dX"), ("mean_instead_of_sum", "dB")]


def test_a_batch_of_one_cannot_tell_mean_from_sum(rng):
    X, W, B, G = layer(rng, 1, 7, 5)
    good = gradients(X, W, B, G)
    hints, report = hints_of(X, W, B, G, **{**good, "dB": G.mean(0)})
    assert report.passed and hints == []  # N = 1: the mean is the sum


def test_leading_batch_dims_without_bias_name_rows_as_supplied(rng):
    X, W, _, G = layer(rng, 0, 7, 5, batch=(3, 4))
    good = gradients(X, W, None, G)
    del good["dB"]
    dX = good["dX"].copy()
    dX[1, 2] += 1.0
    report = check(X, W, None, G, dX=dX, dW=good["dW"])
    (hint,) = report.hints
    assert hint.code == "localized" and "batch row (1, 2)" in hint.message
    assert hints_of(X, W, None, G, dX=-good["dX"], dW=good["dW"])[0] == [("sign_flipped", "dX")]


def test_float32_bugs_are_diagnosed_in_float32(rng):
    X, W, B, G = (a.astype(np.float32) for a in layer(rng, 12, 7, 5))
    grads = compute_in("fp32", X, W, G)
    grads["dB"] = (G.sum(0) / 12).astype(np.float32)
    hints, _ = hints_of(X, W, B, G, **grads)
    assert hints == [("mean_instead_of_sum", "dB")]


def test_noise_within_bfloat16s_loose_bound_is_not_called_bfloat16(rng):
    """bf16 kernels return bf16 numbers; float32 noise of bf16's size is not claimed as bf16."""
    X, W, B, G = (a.astype(np.float32) for a in layer(rng, 256, 64, 16))
    grads = compute_in("fp32", X, W, G)
    noise = np.random.default_rng(2).standard_normal(grads["dW"].shape).astype(np.float32)
    grads["dW"] = grads["dW"] + 0.5 * noise
    hints, _ = hints_of(X, W, B, G, **grads)
    assert hints == [("unexplained", "dW")]


# ---------------------------------------------------------------------------
# Codes users meet, and hints that must not claim what is not true


def _hint_codes(report):
    return [(h.code, h.tensor) for h in report.hints]


def test_weight_decay_is_named_with_its_lambda(rng):
    X, W, B, G = layer(rng, 32, 64, 16)
    report = lincheck.check(X, W, B, G, dW=G.T @ X + 0.01 * W)
    (hint,) = report.hints
    assert (hint.code, hint.tensor) == ("weight_decay", "dW")
    assert hint.evidence["weight_decay"] == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("N", [16, 20], ids=["N=D_out", "N!=D_out"])
def test_swapped_gradients_and_a_bias_summed_over_units_are_named(rng, N):
    X, W, B, G = layer(rng, N, 64, 16)
    report = lincheck.check(X, W, B, G, dX=G.T @ X, dW=G @ W, dB=G.sum(1))
    codes = _hint_codes(report)
    assert ("swapped", "dX") in codes and ("swapped", "dW") in codes
    assert ("bias_wrong_axis", "dB") in codes
    assert report.hints[0].evidence["holds"] == "dW"


def test_an_error_in_one_entry_or_row_is_localized_not_blamed_on_tf32(rng):
    """float32 dW with one entry 0.3% off, or one row × 1.001: localized, never TF32 (that
    hint sent users to --precision tf32, which then passed the bug)."""
    X, W, B, G = (a.astype(np.float32) for a in layer(rng, 32, 64, 16))
    for where in ((3, 4), 3):
        dW = G.T @ X
        dW[where] *= 1.003 if isinstance(where, tuple) else 1.001
        report = lincheck.check(X, W, B, G, dW=dW)
        assert _hint_codes(report) == [("localized", "dW")], report.hints


def test_no_hint_rests_on_a_bound_that_cannot_tell_anything_from_zero(rng):
    """A forgotten float32 dW (zeros) at N = 4096 is not "float16 arithmetic", and a bf16
    dX of zeros is not "Y W": an alternative must fit clearly better than the correct
    gradient, within a bound that can tell it from zero."""
    X, W, B, G = (a.astype(np.float32) for a in layer(rng, 4096, 8, 4))
    report = lincheck.check(X, W, B, G, dW=np.zeros_like(W))
    assert "lower_precision" not in [h.code for h in report.hints]
    Xb, Wb, Bb, Gb = layer(rng, 32, 64, 16)
    report = lincheck.check(Xb, Wb, Bb, Gb, dX=np.zeros((32, 64)), precision="bf16")
    assert "wrong_operand" not in [h.code for h in report.hints]


def test_bfloat16_operands_with_float32_results_are_named_not_tf32(rng):
    """Operands cast to bfloat16, sums and results in float32 (autocast's matmul kept
    wide): the hint names that arithmetic (it suggested TF32 tensor cores, on a CPU)."""
    from lincheck.precision import BFLOAT16, round_to

    X, W, B, G = (a.astype(np.float32) for a in layer(rng, 32, 64, 16))
    bf = [round_to(a, BFLOAT16).astype(np.float32) for a in (X, W, G)]
    report = lincheck.check(X, W, B, G, dX=bf[2] @ bf[1], dW=bf[2].T @ bf[0])
    assert [h.evidence.get("precision") for h in report.hints] == ["fp32,x=bf16,w=bf16,dy=bf16"] * 2
    assert all("bfloat16 operands with float32 results" in h.message for h in report.hints)
    assert lincheck.check(
        X, W, B, G, dX=bf[2] @ bf[1], dW=bf[2].T @ bf[0], precision="fp32,x=bf16,w=bf16,dy=bf16"
    ).passed


@pytest.mark.parametrize(
    "layout, whole, entry",
    [
        ("out_in", "dW = dYᵀ X", "dW[i, j] = Σ_n dY[n, i] X[n, j]"),
        ("in_out", "dW = Xᵀ dY", "dW[j, i] = Σ_n X[n, j] dY[n, i]"),
    ],
)
def test_unexplained_prints_the_formula_to_compare_with(rng, layout, whole, entry):
    """The hint that names no mistake says what the correct gradient is (it pointed at "the
    formula above", and nothing was above), as the derivation writes it, W as stored."""
    X, W, B, G = layer(rng, 8, 5, 3)
    noise = rng.standard_normal((3, 5))
    dW = G.T @ X + noise
    W_given, dW_given = (W, dW) if layout == "out_in" else (W.T.copy(), dW.T.copy())
    report = check(X, W_given, B, G, dW=dW_given, layout=layout)
    (hint,) = report.hints
    assert (hint.code, hint.tensor) == ("unexplained", "dW")
    assert whole in hint.message and entry in hint.message
    assert "above" not in hint.message


def test_one_input_feature_is_not_where_errors_are_localized(rng):
    """With D_in = 1 every error of dW sits in input feature 0: that locates nothing. Spread
    over every output unit, the error is not localized; confined to one unit, it is."""
    X, W, B, G = layer(rng, 8, 1, 16)
    dW = G.T @ X + 1.0  # every entry off
    report = check(X, W, B, G, dW=dW)
    assert [h.code for h in report.hints] != ["localized"], report.hints[0].message
    assert "input feature" not in report.hints[0].message
    dW = G.T @ X
    dW[3] += 1.0  # one output unit's row (a single entry here, as D_in = 1)
    (hint,) = check(X, W, B, G, dW=dW).hints
    assert hint.code == "localized" and "[3, 0]" in hint.message


def test_swapped_results_are_named_in_float32_with_sums_of_one_term(rng):
    """A backward returning (dW, dX, dB) on a batch of one, in float32: dX's values are dW's
    (products of one term, each rounded once), named as swapped, not unexplained."""
    X, W, B, G = (a.astype(np.float32) for a in layer(rng, 1, 5, 3))
    report = check(X, W, B, G, dX=G.T @ X, dW=G @ W, dB=G.sum(0))
    assert sorted(_hint_codes(report)) == [("swapped", "dW"), ("swapped", "dX")]


def test_a_gradient_of_another_gradients_shape_asks_whether_they_were_swapped(rng):
    """dX returned where dW belongs, its values wrong too: the shape alone says what
    happened, so the hint asks (and shows both formulas) instead of naming nothing."""
    X, W, B, G = layer(rng, 8, 5, 3)
    report = check(X, W, B, G, dX=2.0 * (G.T @ X), dW=G.T @ X)
    (hint,) = report.hints
    assert (hint.code, hint.tensor) == ("swapped", "dX")
    assert hint.evidence == {"shape": [3, 5], "shape_of": "dW", "transposed": False}
    assert "(3, 5), dW's shape" in hint.message and "wrong order" in hint.message
    assert "dX = dY W" in hint.message and "dW = dYᵀ X" in hint.message
    report = check(X, W, B, G, dX=np.ones((5, 3)))
    assert report.hints[0].evidence["shape_of"] == "dW" and report.hints[0].evidence["transposed"]


def test_a_bias_summed_over_units_with_leading_batch_dims_is_named(rng):
    """dB = dY.sum(-1) with X of shape (2, 4, D_in): the hint, not an exception."""
    X, W, B, G = layer(rng, None, 5, 3, batch=(2, 4))
    (hint,) = check(X, W, B, G, dB=G.sum(-1)).hints
    assert (hint.code, hint.tensor) == ("bias_wrong_axis", "dB")
    assert "dB = dY.sum((0, 1))" in hint.message and "dY.sum(0)" not in hint.message


def test_leading_batch_dims_name_the_sum_over_all_of_them(rng):
    """dY of shape (2, 4, D_out): dY.sum(0) sums one batch dimension of two (a dB of shape
    (4, D_out)); the hint says so and gives dY.sum((0, 1)), not the dY.sum(0) the user
    wrote. A dB a mean over the batch is dY.mean((0, 1)); an unexplained dB's formula too."""
    X, W, B, G = layer(rng, None, 5, 3, batch=(2, 4))
    (hint,) = check(X, W, B, G, dB=G.sum(0)).hints
    assert (hint.code, hint.evidence["first_axis_only"]) == ("bias_not_summed", True)
    assert "equals dY.sum(0)" in hint.message and "dB = dY.sum((0, 1))" in hint.message
    (hint,) = check(X, W, B, G, dB=G.mean((0, 1))).hints
    assert hint.code == "mean_instead_of_sum" and "dY.mean((0, 1))" in hint.message
    (hint,) = check(X, W, B, G, dB=G.sum((0, 1)) + rng.standard_normal(3)).hints
    assert hint.code == "unexplained" and "dB = dY.sum((0, 1))" in hint.message


@pytest.mark.parametrize("tensor", ["dW", "dB"])
@pytest.mark.parametrize(
    "kept", [slice(0, -1), slice(1, None), slice(0, 4000), slice(0, 1000), slice(3, None)]
)
def test_rows_left_out_of_the_batch_sum_are_named(rng, tensor, kept):
    """A loop over the batch that stops short, starts late or drops its last chunk, in
    float32 at N = 4096: the hint names exactly the rows left out (as the user indexes them,
    leading batch dimensions included), however many."""
    X, W, B, G = layer(rng, 0, 24, 8, "float32", batch=(4, 1024))
    X2, G2 = X.reshape(-1, 24), G.reshape(-1, 8)
    N = X2.shape[0]
    left_out = np.setdiff1d(np.arange(N), np.arange(N)[kept])
    broken = G2[kept].T @ X2[kept] if tensor == "dW" else G2[kept].sum(0)
    hints, report = hints_of(X, W, B, G, **{**compute_in("fp32", X, W, G), tensor: broken})
    assert [c.tensor for c in report.failed] == [tensor]
    assert hints == [("rows_missing", tensor)]
    evidence = report.hints[0].evidence
    first, last = (list(np.unravel_index(n, (4, 1024))) for n in left_out[[0, -1]])
    assert (evidence["rows"], evidence["count"]) == ([first, last], left_out.size)
    assert ("last" if left_out[-1] == N - 1 else "first") in report.hints[0].message


def test_rows_missing_is_not_claimed_where_left_out_rows_hold_zeros(rng):
    """Padding rows (dY = 0) at the end of the batch: a sum without them is the correct one,
    so a bug elsewhere is not blamed on them."""
    X, W, B, G = layer(rng, 64, 6, 4)
    G[-8:] = 0.0
    good = gradients(X, W, B, G)
    dW = good["dW"].copy()
    dW[1, 2] += 1.0
    assert hints_of(X, W, B, G, **{**good, "dW": dW})[0] == [("localized", "dW")]


def test_rows_missing_with_the_kernel_stored_in_out(rng):
    X, W, B, G = layer(rng, 40, 5, 3)
    dW = X[:-1].T @ G[:-1]  # (D_in, D_out), as JAX stores the kernel
    report = check(X, W.T.copy(), B, G, dW=dW, layout="in_out")
    assert [(h.code, h.tensor, h.evidence["rows"]) for h in report.hints] == [
        ("rows_missing", "dW", [[39], [39]])
    ]


def test_rows_missing_or_a_factor_where_every_row_of_dy_is_the_same(rng):
    """dY = 1/(N·D_out) everywhere (Y.mean()'s gradient): a dB without its last rows is a
    constant factor of the correct one, and the data cannot tell which; the factor is named
    (a halved dB is not blamed on half the rows). Where the factor is within 10⁻³ of 1 (no
    claim of its own), the missing row is named, the last one first."""
    for N, kept, code in [(64, slice(0, -1), "scaled"), (64, slice(0, 32), "scaled")]:
        X, W, B, _ = layer(rng, N, 8, 4, "float32")
        G = np.full((N, 4), 1 / (N * 4), np.float32)
        hints, _ = hints_of(X, W, B, G, dB=G[kept].sum(0))
        assert hints == [(code, "dB")]
    X, W, B, _ = layer(rng, 4096, 8, 4, "float32")
    G = np.full((4096, 4), 1 / 4096, np.float32)
    report = check(X, W, B, G, dB=G[:-1].sum(0))
    assert [(h.code, h.evidence["rows"]) for h in report.hints] == [("rows_missing", [[4095]] * 2)]


def test_rows_missing_in_float16_allows_the_alternatives_own_rounding(rng):
    """A float16 dW without its last row, whose entries are far larger than the correct
    ones where the sum cancels: the alternative's own float16 rounding (2u·|alternative|)
    is allowed, as for the other hints."""
    found = 0
    for seed in range(5):
        X, W, B, G = layer(np.random.default_rng(seed), 64, 64, 64, "float16")
        X2, G2 = X.astype(np.float64), G.astype(np.float64)
        report = check(X, W, B, G, dW=(G2[:-1].T @ X2[:-1]).astype(np.float16))
        assert not report.passed
        found += [h.code for h in report.hints] == ["rows_missing"]
    assert found == 5


def test_lower_precision_is_not_named_where_its_bound_cannot_tell_the_gradient_from_zero(rng):
    """A zero float16 dW over N = 4096: float16 accumulation's bound is so loose there that
    a zero dW fits it (a check under it is inconclusive), so it explains nothing."""
    X, W, _, _ = layer(rng, 4096, 64, 32, "float16")
    G = (rng.standard_normal((4096, 32)) / 4096).astype(np.float16)
    report = check(X, W, None, G, dW=np.zeros((32, 64), np.float16))
    assert [h.code for h in report.hints] == ["unexplained"]
    under = check(X, W, None, G, dW=np.zeros((32, 64), np.float16), precision="fp16-acc16")
    assert under.checks[0].tensor == "dW" and under.checks[0].verdict == "inconclusive"


def test_an_inconclusive_16_bit_db_names_torchs_float32_reduction(rng):
    """Pairs of dY rows that cancel (a contrastive loss) leave dB far below what 16-bit
    partial sums could lose: inconclusive, and the message names the reduction torch uses
    (the presets allow XLA's 16-bit partial sums), under which it passes."""
    X, W, B, _ = layer(rng, 256, 8, 4, "float16")
    g = rng.standard_normal((128, 4))
    G = np.empty((256, 4))
    G[0::2], G[1::2] = g, -g * (1 + 1e-3 * rng.standard_normal(g.shape))
    G = G.astype(np.float16)
    dB = G.astype(np.float64).sum(0).astype(np.float16)
    for precision in (None, "fp16"):
        c = check(X, W, B, G, dB=dB, precision=precision).checks[0]
        assert c.tensor == "dB" and c.verdict == "inconclusive"
        assert "(for torch's dB, summed in float32: fp16,reduce=fp32)" in c.message
    assert check(X, W, B, G, dB=dB, precision="fp16,reduce=fp32").checks[0].verdict == "pass"
