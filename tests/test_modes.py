"""Partial witnesses for big layers: sampled entries, random directions, the automatic choice."""

import math

import numpy as np
import oracles
import pytest
from conftest import ORACLE_RTOL, layer, loop_gradients

from lincheck import check, checks, streaming, witness, workspace
from lincheck.bounds import upper_sum
from lincheck.errors import InputError


def test_entry_values_and_sampled_witness_match_loops(rng):
    X, W, B, G = layer(rng, 9, 7, 5)
    L = workspace.Workspace(X, W, B, G)
    exact = dict(zip(("dX", "dW", "dB"), loop_gradients(X, W, G)))
    for tensor in ("dX", "dW", "dB"):
        shape = exact[tensor].shape
        flat = np.arange(0, int(np.prod(shape)), 3)
        rows, cols = np.divmod(flat, shape[-1]) if len(shape) == 2 else (None, flat)
        ref, M, S = witness.entry_values(L, tensor, rows, cols)
        want = exact[tensor].ravel()[flat]
        oracle_error = ORACLE_RTOL["float64"] * M  # the loops' own rounding
        assert np.all(np.abs(ref - want) <= oracle_error)
        full_M, full_S = L.magnitude(tensor)
        assert np.all(np.abs(M - np.ravel(full_M)[flat]) <= oracle_error)  # other order
        combined = sum(np.broadcast_to(x, shape) for x in full_S)  # Σ(|a| + |b|)
        assert np.allclose(S, np.ravel(combined)[flat])
        block = witness.witness_entries(L, tensor, rows, cols, M)
        assert np.all(np.abs(block.estimate - want) <= block.bound + oracle_error)


@pytest.mark.parametrize("tensor", ["dX", "dW"])
def test_directions_pass_a_correct_reference_and_catch_planted_errors(rng, tensor):
    X, W, B, G = layer(rng, 12, 10, 6)
    L = workspace.Workspace(X, W, B, G)
    reference = L.reference(tensor)
    clean = oracles.witness_directions(L, tensor, reference, 8, seed=0)
    distance = np.abs(clean.difference - clean.predicted)
    assert np.all(distance <= clean.tolerance)
    detectable = float(np.max((clean.tolerance + distance) / clean.step))
    # One entry off by just over the stated sensitivity: every ±1 direction sees it.
    bad = reference.copy()
    bad[3, 4] += 1.01 * detectable
    caught = oracles.witness_directions(L, tensor, bad, 8, seed=0)
    assert np.all(np.abs(caught.difference - caught.predicted) > caught.tolerance)
    # Two entries that can cancel in half the directions: caught by at least one of 16.
    pair = reference.copy()
    pair[0, 0] += 1.01 * detectable
    pair[1, 1] -= 1.01 * detectable
    some = oracles.witness_directions(L, tensor, pair, 16, seed=1)
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
    # 5 rows through the layer for dX's directions, 5 units for dW's, two passes of one
    # row for dB's slopes: about 0.4 of one forward pass of the 40 rows, counted whole.
    assert report.witness["forward_passes"] == np.ceil(5 / 40 + 5 / 20 + 2 / 40) == 1
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


# ---------------------------------------------------------------------------
# The partial modes stream the batch a block of rows at a time


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of a few rows, so that small layers go through many blocks."""
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 2**14)


def test_small_blocks_split_the_batch(small_blocks):
    blocks = streaming.row_blocks(103, 12, 7)
    assert len(blocks) > 10
    assert [b.start for b in blocks] == sorted({b.start for b in blocks})
    assert blocks[0].start == 0 and blocks[-1].stop == 103
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("mode", ["sample", "directions"])
def test_streamed_checks_pass_correct_subjects_and_locate_planted_errors(rng, small_blocks, mode):
    X, W, B, G = layer(rng, 103, 12, 7)
    dX, dW, dB = loop_gradients(X, W, G)
    good = {"dX": dX, "dW": dW, "dB": dB, "Y": X @ W.T + B}
    report = check(X, W, B, G, **good, mode=mode, samples=40, seed=5)
    assert report.passed, report.to_json()
    assert {c.tensor: c.checked for c in report.checks if c.oracle == "reference"} == {
        "dX": 103 * 12,
        "dW": 7 * 12,
        "dB": 7,
        "Y": 103 * 7,
    }
    plants = {"dX": (97, 3), "dW": (6, 11), "dB": (4,), "Y": (51, 2)}
    for tensor, index in plants.items():
        bad = {name: a.copy() for name, a in good.items()}
        bad[tensor][index] += 1e-6 * (1 + abs(bad[tensor][index]))
        failed = check(X, W, B, G, **bad, mode=mode, samples=40, seed=5).failed
        assert [(c.tensor, c.worst_index) for c in failed] == [(tensor, index)]


def test_sampled_entries_streamed_over_blocks_match_loops(rng, small_blocks):
    X, W, B, G = layer(rng, 57, 9, 5)
    exact = dict(zip(("dX", "dW"), loop_gradients(X, W, G)))
    rows = streaming.Rows(X, W, B, G)
    totals = streaming.Totals(rows)
    for _, block in rows:
        totals.add(block)
    assert totals.blocks > 5
    for tensor in ("dX", "dW"):
        flat = np.arange(0, exact[tensor].size, 4)
        entry_rows, cols = np.divmod(flat, exact[tensor].shape[1])
        witness = streaming.SampleWitness(tensor, entry_rows, cols, totals)
        for r, block in rows:
            witness.add(r, block)
        (ref, M, _), block = witness.result()
        want = exact[tensor].ravel()[flat]
        oracle_error = ORACLE_RTOL["float64"] * M
        assert np.all(np.abs(ref - want) <= oracle_error)
        assert np.all(np.abs(block.estimate - want) <= block.bound + oracle_error)
        bias = streaming.BiasWitness(rows.N)
    for r, block in rows:
        bias.add(r, block)
    dB = bias.result()
    assert np.all(
        np.abs(dB.estimate - G.sum(0))
        <= dB.bound + ORACLE_RTOL["float64"] * totals.magnitude("dB")[0]
    )


@pytest.mark.parametrize("tensor", ["dX", "dW"])
def test_directions_do_not_depend_on_the_blocks(rng, monkeypatch, tensor):
    X, W, B, G = layer(rng, 61, 10, 6)
    L = workspace.Workspace(X, W, B, G)
    one = oracles.witness_directions(L, tensor, L.reference(tensor), 6, seed=2)
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 2**14)
    assert len(streaming.row_blocks(61, 10, 6)) > 5
    many = oracles.witness_directions(L, tensor, L.reference(tensor), 6, seed=2)
    # The same directions and steps: the same ⟨r, Δ⟩ up to the order of the sums.
    assert np.allclose(one.predicted, many.predicted, rtol=1e-12, atol=0)
    assert np.all(np.abs(many.difference - many.predicted) <= many.tolerance)
    assert np.all(many.tolerance <= 4 * one.tolerance)


def test_memory_mapped_inputs_are_checked_a_block_at_a_time(tmp_path, monkeypatch):
    """Partial modes never hold a float64 copy of X or dY: a file larger than memory fits."""
    import tracemalloc

    # Blocks and the diagnosis limit cut to 1 MiB, so 40 000 rows stand for files far larger.
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 2**20)
    monkeypatch.setattr(checks, "DIAGNOSIS_BYTES", 2**20)
    rng = np.random.default_rng(0)
    N, D_in, D_out = 40_000, 48, 16
    arrays = {}
    for name, shape in (("X", (N, D_in)), ("dY", (N, D_out))):
        arrays[name] = np.lib.format.open_memmap(
            tmp_path / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape
        )
        for start in range(0, N, 10_000):
            arrays[name][start : start + 10_000] = rng.standard_normal((10_000, shape[1]))
    W = rng.standard_normal((D_out, D_in)).astype(np.float32)
    B = rng.standard_normal(D_out).astype(np.float32)
    X, G = (np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("X", "dY"))
    dW = (G.T.astype(np.float64) @ X).astype(np.float32)
    dX = np.lib.format.open_memmap(tmp_path / "dX.npy", mode="w+", dtype=np.float32, shape=X.shape)
    for start in range(0, N, 10_000):
        dX[start : start + 10_000] = G[start : start + 10_000] @ W
    dX[39_123, 7] += 1.0
    tracemalloc.start()
    try:
        report = check(X, W, B, G, dX=dX, dW=dW, mode="directions", directions=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(c.tensor, c.worst_index) for c in report.failed] == [("dX", (39_123, 7))]
    assert [h.code for h in report.hints] == ["not_diagnosed"]  # a diagnosis holds it all
    float64_X = 8 * N * D_in
    assert peak < float64_X / 4, (peak, float64_X)


@pytest.mark.parametrize("tensor", ["dX", "dW"])
def test_rank_one_directions_are_within_their_bound_of_the_exact_derivative(rng, tensor):
    """Each direction's witness against ⟨∇L, a bᵀ⟩ summed exactly (fractions), on inputs
    spread over 40 orders of magnitude, whose sums cancel: the bound must hold there too,
    and stay far below the sizes involved (a vacuous bound would hold anywhere)."""
    from fractions import Fraction

    N, D_in, D_out, K, seed = 7, 5, 4, 6, 3
    spread = lambda *shape: rng.standard_normal(shape) * 10.0 ** rng.integers(-20, 20, shape)  # noqa: E731
    X, W, B, G = spread(N, D_in), spread(D_out, D_in), spread(D_out), spread(N, D_out)
    L = workspace.Workspace(X, W, B, G)
    found = oracles.witness_directions(L, tensor, L.reference(tensor), K, seed)
    code = 0 if tensor == "dX" else 1
    b = streaming._signs(np.random.default_rng([seed, 3, code]), K, D_in)
    if tensor == "dX":
        a = streaming._signs(np.random.default_rng([seed, 2, code]), N, K).T  # K × N
    else:
        a = streaming._signs(np.random.default_rng([seed, 4, code]), K, D_out)  # u: K × D_out
    x, w, g = ([[Fraction(v) for v in row] for row in M] for M in (X, W, G))
    terms = [(n, i, j) for n in range(N) for i in range(D_out) for j in range(D_in)]
    if tensor == "dX":  # dX[n, j] = Σᵢ G[n, i] W[i, j], along a[n] b[j]
        term = {t: g[t[0]][t[1]] * w[t[1]][t[2]] for t in terms}
        row = {t: t[0] for t in terms}
    else:  # dW[i, j] = Σₙ G[n, i] X[n, j], along u[i] v[j]
        term = {t: g[t[0]][t[1]] * x[t[0]][t[2]] for t in terms}
        row = {t: t[1] for t in terms}
    size = sum(abs(v) for v in term.values())
    for k in range(K):
        exact = sum(int(a[k, row[t]]) * int(b[k, t[2]]) * term[t] for t in terms)
        assert abs(Fraction(found.difference[k]) - exact) <= Fraction(found.tolerance[k])
        assert abs(Fraction(found.predicted[k]) - exact) <= Fraction(found.tolerance[k])
        assert found.tolerance[k] < 1e-12 * float(size)


def test_the_partial_witnesses_catch_a_wrong_reference(rng, monkeypatch):
    """A planted bug in the reference itself (one entry of dX and of dW, one of dB) fails the
    reference's check against the witness, in both partial modes, and nothing else."""
    X, W, B, G = layer(rng, 30, 9, 6)
    plants = {"dX": (17, 4), "dW": (5, 2), "dB": (3,)}
    true_reference = workspace.Workspace.reference
    true_totals = streaming.Totals.reference

    def planted(tensor, ref):
        ref = np.array(ref, copy=True)
        if tensor in plants:
            index = plants[tensor]
            if tensor == "dX" and ref.shape[0] != 30:  # a row block: the plant's row only
                return ref
            ref[index] += 1e-3 * (1 + abs(ref[index]))
        return ref

    def workspace_reference(self, t, cols=None):
        return planted(t, true_reference(self, t, cols))

    def totals_reference(self, t, cols=None):
        return planted(t, true_totals(self, t, cols))

    monkeypatch.setattr(workspace.Workspace, "reference", workspace_reference)
    monkeypatch.setattr(streaming.Totals, "reference", totals_reference)
    for mode in ("directions", "sample"):
        report = check(X, W, B, G, mode=mode, samples=54 * 9, seed=1)
        failed = sorted((c.tensor, c.oracle) for c in report.failed)
        assert ("dB", "witness") in failed
        if mode == "directions":
            assert failed == [("dB", "witness"), ("dW", "witness"), ("dX", "witness")]


def test_directions_with_an_infinite_bound_certify_nothing():
    """Sums beyond float64's range give an infinite tolerance: every distance is 'within' it,
    so the check is inconclusive (exit 1), never a pass."""
    from lincheck.results import TensorCheck
    from lincheck.witness import Directions

    one = np.ones(3)
    d = Directions(one, one, np.array([1.0, np.inf, 1.0]), one, one, passes=1)
    c = TensorCheck.from_directions("dW", d, (4, 5), "rule")
    assert not c.passed and c.verdict == "inconclusive" and "nothing certified" in c.message
    fine = TensorCheck.from_directions("dW", Directions(one, one, one, one, one, 1), (4, 5), "r")
    assert fine.passed and fine.verdict == "pass"


def test_directions_whose_sums_overflow_are_inconclusive_not_failed():
    """A correct layer whose entries of dX are finite but whose witness along a direction,
    (Gᵀa)·(W b), overflows: the distance is NaN there and the tolerance infinite, which
    certifies nothing (inconclusive), but is no evidence of a wrong gradient either."""
    X = np.full((2, 2), 1e-300)
    W, G = np.full((1, 2), 1.2e154), np.full((2, 1), 1.2e154)  # dX = 1.44e308 per entry
    assert check(X, W, None, G, mode="full").passed
    by = {c.tensor: c for c in check(X, W, None, G, mode="directions", directions=40).checks}
    assert by["dX"].verdict == "inconclusive" and by["dW"].passed


@pytest.mark.parametrize("N", [1, 2, 7, 64, 100, 1000])
@pytest.mark.parametrize("K", [4, 16])
def test_a_windowed_tree_over_streamed_rows_is_the_whole_batch_s(rng, monkeypatch, N, K):
    """dB's tree of K-term windows (the bf16 preset's accumulator), summed from rows read a
    block at a time with windows across the blocks, equals the in-memory computation."""
    X, W, B, G = layer(rng, N, 3, 5)
    G += rng.uniform(-3, 3, size=5)  # a mean the fluctuations are taken from
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 2**11)  # blocks of a few rows
    rows = streaming.Rows(X, W, B, G)
    assert N < 7 or len(rows.slices) > 3
    totals = streaming.Totals(rows)
    for _, block in rows:
        totals.add(block)
    whole = workspace.Workspace(X, W, B, G).tree_squares(K)
    assert np.allclose(totals.tree_squares(K), whole, rtol=1e-12, atol=0)


def test_a_correct_bf16_bias_gradient_is_conclusive_in_every_mode():
    a = checks.random_inputs(np.random.default_rng(1), 130, 16, 16, "bfloat16")
    dB = checks.analytic_gradients(a)["dB"]
    for mode in ("full", "directions"):
        report = check(a["X"], a["W"], a["B"], a["dY"], dB=dB, mode=mode, directions=2)
        assert report.passed, mode


@pytest.mark.parametrize("mode", ["sample", "directions"])
@pytest.mark.parametrize("big", ["dX", "dW"])
def test_inputs_whose_gradient_overflows_are_bad_input_in_every_mode(mode, big):
    """|G||W| (dX's magnitudes) or |G|ᵀ|X| (dW's) beyond float64 while Y's are not: bad
    input in the partial modes as in the full one; just below, a verdict in every mode."""
    G = np.full((3, 2), 1e160)
    if big == "dX":  # X tiny, W huge
        X, W, smaller = np.full((3, 2), 1e-300), np.full((2, 2), 1e160), (1.0, 1e-20)
    else:  # X huge, W tiny
        X, W, smaller = np.full((3, 2), 1e160), np.full((2, 2), 1e-300), (1e-20, 1.0)
    with pytest.raises(InputError):
        check(X, W, None, G, mode="full")
    with pytest.raises(InputError):
        check(X, W, None, G, mode=mode)
    fine = check(X * smaller[0], W * smaller[1], None, G, mode=mode)
    assert fine.passed or all(c.verdict == "inconclusive" for c in fine.checks if not c.passed)


def test_the_directions_bound_of_dw_uses_row_sums_bounded_up():
    """γ_{D_out} Σₙ σₙ|p̂ₙ| needs the exact σₙ = Σᵢ|G[n, i]|: a row of one 1 and 999 values
    under half its spacing, which a float64 sum drops, must not shrink the bound's sum."""
    D_out = 1000
    G = np.full((1, D_out), 0.49 * 2.0**-52)
    G[0, 0] = 1.0
    X, W = np.ones((1, 1)), np.ones((D_out, 1))
    rows = streaming.Rows(X, W, None, G)
    d = streaming.DirectionsWitness("dW", rows, 4, 0, lambda t: 1.0, lambda: G.T @ X)
    for r, block in rows:
        d.add(r, block)
    exact = math.fsum(G[0])  # σ of the one row; |p̂| = |X v| = 1 exactly
    assert np.all(upper_sum(d.terms[0], 1) >= exact)
