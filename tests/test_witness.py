"""The numerical witness, its rounding bounds, and the error metrics."""

import numpy as np
import oracles
import pytest
from conftest import ORACLE_RTOL, SHAPES, layer, loop_gradients

from lincheck import witness, workspace
from lincheck.core import backward


def _errors_within_bounds(witness, exact):
    for name, est, bound, want in zip(("dX", "dW", "dB"), witness.grads, witness.bounds, exact):
        if want is None:
            continue
        err = np.abs(est - want)
        assert np.all(err <= bound), f"{name}: error {err.max():.3g} exceeds its bound"


WITNESSES = {
    "grouped": dict(method="central"),
    "dense": dict(method="dense"),
    "complex-step": dict(method="complex-step"),
}


@pytest.mark.parametrize("kind", list(WITNESSES))
@pytest.mark.parametrize("shape", SHAPES[:-1], ids=str)
def test_witness_matches_index_loops_within_its_bound(rng, shape, kind):
    X, W, B, G = layer(rng, *shape)
    witness = oracles.witness(X, W, B, G, **WITNESSES[kind])
    exact = loop_gradients(X, W, G)
    # The loop oracle has its own float64 error, at most ORACLE_RTOL of the magnitudes.
    mags = oracles.Magnitudes.of(X, W, B, G)
    for est, bound, want, mag in zip(
        witness.grads, witness.bounds, exact, (mags.dX, mags.dW, mags.dB)
    ):
        assert np.all(np.abs(est - want) <= bound + ORACLE_RTOL["float64"] * mag)


def test_witness_without_bias(rng):
    X, W, _, G = layer(rng, 5, 4, 3)
    witness = oracles.central_differences(X, W, None, G)
    assert witness.grads.dB is None and witness.bounds.dB is None
    assert witness.forward_passes == 2 * 2 * 4
    _errors_within_bounds(witness, backward(X, W, G, bias=False))


def test_grouped_costs_two_passes_per_column_plus_bias(rng):
    X, W, B, G = layer(rng, 32, 64, 16)
    assert oracles.central_differences(X, W, B, G).forward_passes == 2 * (2 * 64 + 1)


@pytest.mark.parametrize("shape", [(3, 4, 2), (6, 6, 6)], ids=str)
def test_grouped_and_dense_agree_within_their_bounds(rng, shape):
    X, W, B, G = layer(rng, *shape)
    grouped = oracles.central_differences(X, W, B, G, grouped=True)
    dense = oracles.central_differences(X, W, B, G, grouped=False)
    for g, d, bg, bd in zip(grouped.grads, dense.grads, grouped.bounds, dense.bounds):
        assert np.all(np.abs(g - d) <= bg + bd)


def test_badly_scaled_inputs(rng):
    """Entries near 1e6 next to entries near 1e-6: still every entry within its bound."""
    N, D_in, D_out = 12, 9, 5
    X, W, B, G = layer(rng, N, D_in, D_out)
    X *= 10.0 ** rng.choice([-6, 6], size=X.shape)
    W *= 10.0 ** rng.choice([-6, 6], size=W.shape)
    G *= 10.0 ** rng.choice([-6, 6], size=G.shape)
    B *= 1e6
    exact = loop_gradients(X, W, G)
    mags = oracles.Magnitudes.of(X, W, B, G)
    for kind in WITNESSES:
        witness = oracles.witness(X, W, B, G, **WITNESSES[kind])
        for est, bound, want, mag in zip(
            witness.grads, witness.bounds, exact, (mags.dX, mags.dW, mags.dB)
        ):
            assert np.all(np.abs(est - want) <= bound + ORACLE_RTOL["float64"] * mag)
            # The bound is useful, not vacuous: a tiny fraction of each entry's magnitude.
            assert np.all(bound <= 1e-9 * mag + 1e-300)


def test_larger_steps_shrink_the_roundoff(rng):
    """L is linear in each entry: no truncation error, so the error falls as h grows."""
    X, W, B, G = layer(rng, 32, 64, 16)
    exact = backward(X, W, G)
    errs = {}
    for rel_step in (1e-8, 1e-3, witness.DEFAULT_REL_STEP):
        w = oracles.central_differences(X, W, B, G, rel_step=rel_step)
        _errors_within_bounds(w, exact)
        errs[rel_step] = max(float(np.max(np.abs(e - x))) for e, x in zip(w.grads, exact))
    assert errs[1e-8] > 100 * errs[1e-3] >= 100 * errs[witness.DEFAULT_REL_STEP]
    assert errs[1e-8] > 1e-10


def test_step_sizes_are_powers_of_two_between_the_scale_and_the_cap():
    values = np.array([0.3, -0.7, 0.1])
    A = 10.0
    M = np.array([100.0, 1.0, 0.0])  # thresholds A/M: 0.1 (below the scale 0.7), 10, infinite
    h = witness.step_sizes(values, A, M, rel_step=1.0)
    assert h.tolist() == [1.0, 16.0, 2.0**64]
    assert witness.step_sizes(np.zeros(2), 1.0, np.ones(2), 2.0).tolist() == [4.0, 4.0]
    assert witness.step_sizes(np.array([1e6]), 0.0, np.ones(1), 1024.0).tolist() == [
        1024.0 * 2.0**20
    ]


def test_complex_step_costs_one_pass_per_column_and_needs_no_large_step(rng):
    X, W, B, G = layer(rng, 8, 6, 4)
    w = oracles.complex_step(X, W, B, G)
    assert w.forward_passes == 2 * 6 + 1 and w.method == "complex-step"
    _errors_within_bounds(w, backward(X, W, G))
    # Its bound has no cancellation term: it is the floor γ·M of the perturbation itself.
    mags = oracles.Magnitudes.of(X, W, B, G)
    assert np.all(w.bounds.dX <= 1e-14 * mags.dX)


def test_typical_scale_is_below_the_worst_case(rng):
    X, W, B, G = layer(rng, 8, 6, 4)
    for kind in WITNESSES:
        w = oracles.witness(X, W, B, G, **WITNESSES[kind])
        for t, b in zip(w.typical, w.bounds):
            assert np.all(t <= b)


def test_unknown_witness_method():
    X = np.ones((2, 2))
    with pytest.raises(ValueError, match="method must be one of"):
        oracles.witness(X, X, None, X, method="forward")


def test_compare_hand_case():
    subject = np.array([1.0, 2.0, 0.0, 5.0])
    oracle = np.array([1.0, 2.5, 0.0, 4.0])
    tol = np.array([0.1, 1.0, 0.0, 0.5])
    c = oracles.compare(subject, oracle, tol)
    assert not c.passed
    assert c.max_abs_error == 1.0
    assert c.max_rel_error == pytest.approx(0.25)
    assert c.bound_ratio == 2.0 and c.worst == 3 and c.tolerance_at_worst == 0.5
    assert c.order == (3, 1, 0, 2)


def test_compare_zero_tolerance_and_zero_oracle():
    c = oracles.compare(np.array([0.0, 1e-30]), np.array([0.0, 0.0]), np.array([0.0, 0.0]))
    assert not c.passed and c.bound_ratio == float("inf") and c.max_rel_error == float("inf")
    c = oracles.compare(np.array([0.0]), np.array([0.0]), np.array([0.0]))
    assert c.passed and c.bound_ratio == 0.0 and c.max_rel_error == 0.0


def test_dX_columns_one_at_a_time_and_stacked_agree(rng):
    """Big layers perturb one column of X at a time, small ones stack them: same estimates."""
    X, W, B, G = layer(rng, 16, 12, 8)
    L = workspace.Workspace(X, W, B, G)
    cols = np.arange(12)
    M, _ = L.magnitude("dX", cols)
    L.column_at_a_time = False
    stacked = witness.witness_block(L, "dX", cols, M)
    L.column_at_a_time = True
    one_by_one = witness.witness_block(L, "dX", cols, M)
    exact = G @ W
    for block in (stacked, one_by_one):
        assert np.all(np.abs(block.estimate - exact) <= block.bound)
    assert stacked.passes == one_by_one.passes == 24
    assert np.array_equal(stacked.bound, one_by_one.bound)
    assert workspace.Workspace(*layer(rng, 64, 128, 128)).column_at_a_time
