"""The affine map and its analytic gradients against loops and a hand-worked case."""

import numpy as np
import pytest
from conftest import ORACLE_RTOL, SHAPES, layer, loop_forward, loop_gradients

from lincheck.core import as_batch, backward, forward, surrogate_loss


def test_hand_worked_case():
    # Y = 1·3 + 2·4 + 5 = 16; with G = 2: dX = G W = [6, 8], dW = Gᵀ X = [2, 4], dB = 2.
    X, W, B, G = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]]), np.array([5.0]), np.array([[2.0]])
    assert forward(X, W, B).tolist() == [[16.0]]
    assert surrogate_loss(X, W, B, G) == 32.0
    dX, dW, dB = backward(X, W, G)
    assert dX.tolist() == [[6.0, 8.0]]
    assert dW.tolist() == [[2.0, 4.0]]
    assert dB.tolist() == [2.0]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_index_loops(rng, shape):
    X, W, _, G = layer(rng, *shape)
    scale = {  # sums of absolute terms, the scale of any float64 reordering difference
        "dX": np.abs(G) @ np.abs(W),
        "dW": np.abs(G).T @ np.abs(X),
        "dB": np.abs(G).sum(0),
    }
    for name, got, want in zip(("dX", "dW", "dB"), backward(X, W, G), loop_gradients(X, W, G)):
        assert got.shape == want.shape, name
        assert np.all(np.abs(got - want) <= ORACLE_RTOL["float64"] * scale[name]), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_index_loop(rng, shape):
    X, W, B, _ = layer(rng, *shape)
    scale = np.abs(X) @ np.abs(W).T + np.abs(B)
    assert np.all(
        np.abs(forward(X, W, B) - loop_forward(X, W, B)) <= ORACLE_RTOL["float64"] * scale
    )
    assert np.all(
        np.abs(forward(X, W, None) - loop_forward(X, W, None)) <= ORACLE_RTOL["float64"] * scale
    )


def test_no_bias_has_no_dB(rng):
    X, W, _, G = layer(rng, 3, 4, 2)
    assert backward(X, W, G, bias=False).dB is None


def test_leading_batch_dims_act_as_one_batch(rng):
    X, W, B, G = layer(rng, 0, 5, 3, batch=(2, 3))
    X2, G2 = as_batch(X, G)
    assert X2.shape == (6, 5) and G2.shape == (6, 3)
    dX, dW, dB = loop_gradients(X2, W, G2)
    got = backward(X2, W, G2)
    assert np.allclose(got.dX.reshape(X.shape), dX.reshape(X.shape))
    assert np.allclose(got.dW, dW) and np.allclose(got.dB, dB)
    # Y of the stacked batch equals the per-example forwards.
    Y = forward(X, W, B)
    assert Y.shape == (2, 3, 3)
    assert np.allclose(Y[1, 2], W @ X[1, 2] + B)


def test_forward_broadcasts_stacks_of_weights(rng):
    X, W, B, _ = layer(rng, 4, 3, 2)
    Ws = np.stack([W, 2 * W])
    Bs = np.stack([B, -B])
    Y = forward(X, Ws, Bs)
    assert Y.shape == (2, 4, 2)
    assert np.allclose(Y[1], X @ (2 * W).T - B)
