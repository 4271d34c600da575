"""Each shared feature on hand-computed inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from es_l2o.lopt import MLPLOpt
from es_l2o.lopt import features as F

TREE = {
    "b": jnp.array([1.0, -2.0]),
    "w": jnp.array([[3.0], [4.0], [0.0]]),
    "s": jnp.array(5.0),
}


def test_layout_flattens_in_leaf_order_and_round_trips():
    layout = F.TensorLayout.of(TREE)
    (flat,) = layout.split(TREE)
    # leaves sorted by key: b, s, w
    np.testing.assert_array_equal(flat, [1.0, -2.0, 5.0, 3.0, 4.0, 0.0])
    assert layout.sizes == (2, 1, 3)
    back = layout.merge([flat])
    for key in TREE:
        np.testing.assert_array_equal(back[key], TREE[key])
        assert back[key].shape == TREE[key].shape


def test_large_leaves_are_parts_of_their_own():
    big = jnp.arange(300.0 * 300.0).reshape(300, 300)
    tree = {"a": jnp.ones(2), "big": big, "c": jnp.full((2, 2), 3.0)}
    layout = F.TensorLayout.of(tree)
    parts = layout.split(tree)
    assert layout.part_shapes == ((6,), (300, 300))
    assert [p.shape for p in parts] == [(6,), (300, 300)]
    assert [z.shape for z in layout.zeros(tree, (4,))] == [(6, 4), (300, 300, 4)]
    back = layout.merge(parts)
    for key in tree:
        np.testing.assert_array_equal(back[key], tree[key])


def test_layout_works_on_abstract_shapes_and_empty_trees():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), TREE)
    layout = F.TensorLayout.of(abstract)
    assert layout.total_size == 6 and layout.dtypes[0] == jnp.bfloat16
    empty = F.TensorLayout.of({})
    assert empty.total_size == 0 and [p.shape for p in empty.split({})] == [(0,)]


def test_progress_and_timescale_features():
    out = F.progress_features(25, 100, centers=(0.0, 0.25, 1.0))
    np.testing.assert_allclose(out, np.tanh(10 * (0.25 - np.array([0.0, 0.25, 1.0]))))
    out = F.timescale_features(10, timescales=(1.0, 10.0, 100.0))
    np.testing.assert_allclose(
        out, np.tanh(np.array([10.0, 1.0, 0.1]) - 1.0), rtol=1e-6
    )


def test_clip_gradient_bounds_and_zeroes_nan():
    out = F.clip_gradient(jnp.array([5e3, -5e3, jnp.nan, 0.5]), bound=1000.0)
    np.testing.assert_array_equal(out, [1000.0, -1000.0, 0.0, 0.5])


@pytest.mark.parametrize("hidden", [(3,), (24, 24)])
def test_mlp_update_matches_a_hand_computed_reference(hidden):
    """Features, per-tensor RMS normalisation and the MLP, against numpy.

    (3,) runs as one fused pass, (24, 24) as matrix products.
    """
    lopt = MLPLOpt(hidden_sizes=hidden, momentum_decays=(0.5,), output_init_scale=1.0)
    assert lopt.fused == (hidden == (3,))
    theta = lopt.init(jax.random.key(4))
    theta["skip"]["w"] = jax.random.normal(jax.random.key(5), (6, 2))
    opt = lopt.transform(theta, num_steps=10)
    grad, param = np.array([1.0, -3.0]), np.array([2.0, 0.5])
    # a second tensor of the same shape shares the vmapped pass
    params = {"w": jnp.asarray(param), "u": jnp.asarray(2 * param)}
    grads = {"w": jnp.asarray(grad), "u": jnp.asarray(-grad)}
    updates, state = opt.update(grads, opt.init(params), params)

    def reference(g, p):
        m, v = 0.5 * g, 0.001 * g * g  # one step from zero accumulators
        root = np.sqrt(v)
        rows = np.stack([g, p, m, root, g / (root + 1e-8), m / (root + 1e-8)])
        feats = rows / np.sqrt(np.mean(rows**2, axis=1, keepdims=True) + 1e-8)
        t = {
            k: {n: np.asarray(x, np.float64) for n, x in v.items()}
            for k, v in theta.items()
        }
        time = np.concatenate(
            [F.progress_features(jnp.array(0), 10), F.timescale_features(jnp.array(0))]
        )
        bias = t["layer_0"]["b"] + time @ t["time"]["w"]
        hidden = np.maximum(t["layer_0"]["w"].T @ feats + bias[:, None], 0.0)
        for i in range(1, len(lopt.hidden_sizes)):
            layer = t[f"layer_{i}"]
            hidden = np.maximum(layer["w"].T @ hidden + layer["b"][:, None], 0.0)
        out = t["output"]["w"].T @ hidden + t["output"]["b"][:, None]
        out = out + t["skip"]["w"].T @ feats
        return out[0] * np.exp(lopt.exp_mult * out[1]) * lopt.step_mult

    np.testing.assert_allclose(updates["w"], reference(grad, param), rtol=1e-4)
    np.testing.assert_allclose(updates["u"], reference(-grad, 2 * param), rtol=1e-4)
    # one group, members in leaf order ("u", then "w")
    np.testing.assert_allclose(state.momenta[0][:, 0], [-0.5 * grad, 0.5 * grad])


@pytest.mark.parametrize("bad", [(0,), (4, -1), ()])
def test_mlp_rejects_bad_hidden_sizes(bad):
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLPLOpt(hidden_sizes=bad)
