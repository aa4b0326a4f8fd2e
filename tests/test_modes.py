"""Partial witnesses for big layers: sampled entries, random directions, the automatic choice."""

import numpy as np
import pytest
from conftest import ORACLE_RTOL, layer, loop_gradients

from lincheck import check, numeric


def test_entry_values_and_sampled_witness_match_loops(rng):
    X, W, B, G = layer(rng, 9, 7, 5)
    L = numeric.Layer(X, W, B, G)
    exact = dict(zip(("dX", "dW", "dB"), loop_gradients(X, W, G)))
    for tensor in ("dX", "dW", "dB"):
        shape = exact[tensor].shape
        flat = np.arange(0, int(np.prod(shape)), 3)
        rows, cols = np.divmod(flat, shape[-1]) if len(shape) == 2 else (None, flat)
        ref, M, S = numeric.entry_values(L, tensor, rows, cols)
        want = exact[tensor].ravel()[flat]
        oracle_error = ORACLE_RTOL["float64"] * M  # the loops' own rounding
        assert np.all(np.abs(ref - want) <= oracle_error)
        full_M, full_S = L.magnitude(tensor)
        assert np.all(np.abs(M - np.ravel(full_M)[flat]) <= oracle_error)  # other order
        assert np.allclose(S, np.broadcast_to(full_S, shape).ravel()[flat])
        block = numeric.witness_entries(L, tensor, rows, cols, M)
        assert np.all(np.abs(block.estimate - want) <= block.bound + oracle_error)


@pytest.mark.parametrize("tensor", ["dX", "dW"])
def test_directions_pass_a_correct_reference_and_catch_planted_errors(rng, tensor):
    X, W, B, G = layer(rng, 12, 10, 6)
    L = numeric.Layer(X, W, B, G)
    reference = L.reference(tensor)
    clean = numeric.witness_directions(L, tensor, reference, 8, np.random.default_rng(0))
    distance = np.abs(clean.difference - clean.predicted)
    assert np.all(distance <= clean.tolerance)
    detectable = float(np.max((clean.tolerance + distance) / clean.step))
    # One entry off by just over the stated sensitivity: every ±1 direction sees it.
    bad = reference.copy()
    bad[3, 4] += 1.01 * detectable
    caught = numeric.witness_directions(L, tensor, bad, 8, np.random.default_rng(0))
    assert np.all(np.abs(caught.difference - caught.predicted) > caught.tolerance)
    # Two entries that can cancel in half the directions: caught by at least one of 16.
    pair = reference.copy()
    pair[0, 0] += 1.01 * detectable
    pair[1, 1] -= 1.01 * detectable
    some = numeric.witness_directions(L, tensor, pair, 16, np.random.default_rng(1))
    assert np.any(np.abs(some.difference - some.predicted) > some.tolerance)


def test_sample_mode_checks_subjects_everywhere_and_the_witness_at_samples(rng):
    X, W, B, G = layer(rng, 40, 30, 20)
    grads = dict(zip(("dX", "dW", "dB"), (G @ W, G.T @ X, G.sum(0))))
    report = check(X, W, B, G, **grads, mode="sample", samples=25, seed=3)
    assert report.passed and report.witness["mode"] == "sample"
    by = {(c.tensor, c.oracle): c for c in report.checks}
    assert by[("dX", "reference")].checked == 40 * 30  # every entry of the subject
    assert by[("dX", "witness")].mode == "sample" and by[("dX", "witness")].checked == 25
    assert by[("dB", "witness")].mode == "full"  # dB's witness is whole: two passes
    again = check(X, W, B, G, **grads, mode="sample", samples=25, seed=3)
    assert again.as_dict() == report.as_dict()  # seeded: the same samples
    grads["dW"][7, 11] += 1e-6
    failed = check(X, W, B, G, **grads, mode="sample", samples=25).failed
    assert [(c.tensor, c.worst_index) for c in failed] == [("dW", (7, 11))]


def test_directions_mode_report(rng):
    X, W, B, G = layer(rng, 40, 30, 20)
    report = check(X, W, B, G, mode="directions", directions=5)
    by = {c.tensor: c for c in report.checks}
    assert report.passed
    assert by["dX"].mode == "directions" and by["dX"].checked == 5
    assert by["dX"].worst_index is None and by["dX"].min_detectable_error > 0
    assert report.witness["forward_passes"] == 2 * 5 * 2 + 2
    assert report.as_dict()["checks"][0]["mode"] == "directions"


def test_auto_mode_follows_the_budget(rng):
    X, W, B, G = layer(rng, 40, 30, 20)
    full = check(X, W, B, G)
    assert full.witness["mode"] == "full" and "reason" not in full.witness
    tight = check(X, W, B, G, budget=0.0)
    assert tight.witness["mode"] == "directions"
    assert tight.witness["reason"].startswith("a full witness needs 122 forward passes")


def test_bad_mode():
    X = np.ones((2, 2))
    with pytest.raises(ValueError, match="mode must be one of"):
        check(X, X, None, X, mode="some")
