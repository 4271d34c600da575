"""The learned-optimizer zoo (hierarchical, LSTM, deep momentum), the features they
add, the hand-designed baselines and the lopt configs."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from es_l2o import baselines, export
from es_l2o.es import FullES
from es_l2o.lopt import (
    LOPTS,
    DeepMomentumLOpt,
    HierarchicalLOpt,
    LSTMLOpt,
)
from es_l2o.lopt import features as F
from es_l2o.unroll import LOptTraining
from populations.quadratic import QuadraticFamily

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "lopt"
SMALL_HIERARCHICAL = dict(lstm_size=8, bank_size=4, mix_size=8)


# --- features ------------------------------------------------------------------------


def test_lstm_preprocessing_equals_the_formula_on_hand_inputs():
    g = jnp.array([2.0, -0.5, 1e-6, 0.0, -3e-5, 1e-4])
    out = np.asarray(F.lstm_preprocess(g, p=10.0))
    threshold = math.exp(-10)  # 4.54e-5
    expected = []
    for x in [2.0, -0.5, 1e-6, 0.0, -3e-5, 1e-4]:
        if abs(x) >= threshold:
            expected.append([math.log(abs(x)) / 10, math.copysign(1.0, x)])
        else:
            expected.append([-1.0, math.exp(10) * x])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
    # the hand values themselves, for the record
    np.testing.assert_allclose(out[0], [0.0693147, 1.0], rtol=1e-5)
    np.testing.assert_allclose(out[2], [-1.0, 0.0220265], rtol=1e-5)
    np.testing.assert_allclose(out[4], [-1.0, -0.6607939], rtol=1e-5)
    # another p moves the threshold: |g| = 1e-2 >= exp(-5)
    np.testing.assert_allclose(
        F.lstm_preprocess(jnp.array([1e-2]), p=5.0), [[math.log(1e-2) / 5, 1.0]]
    )


def test_rank_one_hot_and_bounded_log_features():
    np.testing.assert_array_equal(
        F.rank_one_hot([0, 1, 2, 4, 7]),
        np.eye(5)[[0, 1, 2, 4, 4]],
    )
    np.testing.assert_allclose(
        F.log_feature(jnp.array([0.1, 1.0, 1e9, 0.0])),
        [0.0, 0.5 * math.log(10), 2.5, -2.5],
        rtol=1e-6,
    )


def test_loss_emas_follow_their_half_lives():
    np.testing.assert_allclose(
        F.loss_half_lives(1000, count=4),
        [10.0, 46.41589, 215.4435, 1000.0],
        rtol=1e-4,
    )
    state = F.init_loss_emas(count=3)
    np.testing.assert_array_equal(F.loss_features(state), [0.0, 0.0])  # no loss yet
    assert F.update_loss_emas(state, None, 100) is state
    state = F.update_loss_emas(state, 4.0, 100)  # the first loss sets every average
    np.testing.assert_allclose(state.emas, [4.0, 4.0, 4.0])
    state = F.update_loss_emas(state, 2.0, 100)
    half_lives = [10.0, math.sqrt(10 * 100), 100.0]
    expected = [0.5 ** (1 / h) * 4 + (1 - 0.5 ** (1 / h)) * 2 for h in half_lives]
    np.testing.assert_allclose(state.emas, expected, rtol=1e-5)
    e = expected
    np.testing.assert_allclose(
        F.loss_features(state),
        [(e[0] - e[1]) / e[1], (e[1] - e[2]) / e[2]],
        rtol=1e-4,
    )
    assert float(F.loss_features(state)[0]) < 0  # the loss is falling
    # a non-finite loss is ignored
    same = F.update_loss_emas(state, jnp.nan, 100)
    np.testing.assert_array_equal(same.emas, state.emas)


def test_factored_accumulators_on_hand_values():
    g2 = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    stats = F.update_factored(F.init_factored((2, 3), 2), g2, decays=(0.0, 0.5))
    # rows: means over the last axis; columns: means over the first axis
    np.testing.assert_allclose(stats.rows[0, 0], [2.0, 5.0])
    np.testing.assert_allclose(stats.cols[0, 0], [2.5, 3.5, 4.5])
    np.testing.assert_allclose(stats.rows[1], 0.5 * stats.rows[0])
    # Adafactor's row * col / mean(row)
    np.testing.assert_allclose(
        F.factored_second_moment(stats, (2, 3))[0],
        [
            [2 * 2.5 / 3.5, 2 * 3.5 / 3.5, 2 * 4.5 / 3.5],
            [5 * 2.5 / 3.5, 5, 5 * 4.5 / 3.5],
        ],
        rtol=1e-5,
    )
    # a vector is one column: each entry is its own row, so the estimate is exact
    vec = F.update_factored(F.init_factored((2,), 1), jnp.array([7.0, 9.0]), (0.0,))
    assert vec.rows.shape == (1, 1, 2) and vec.cols.shape == (1, 1, 1)
    np.testing.assert_allclose(F.factored_second_moment(vec, (2,))[0], [7.0, 9.0])


def test_factored_estimate_is_exact_for_rank_one_and_conv_tensors():
    u, w = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 4.0])
    conv = jnp.stack([jnp.outer(u, w), 2 * jnp.outer(u, w)])[None]  # (1, 2, 3, 2)
    stats = F.update_factored(F.init_factored(conv.shape, 1), conv, (0.0,))
    assert stats.rows.shape == (1, 2, 3)  # two (3, 2) matrices
    np.testing.assert_allclose(
        F.factored_second_moment(stats, conv.shape)[0], conv, rtol=1e-5
    )


def test_compute_once_is_transparent_to_vmap_and_grad():
    fn = lambda x: (jnp.sin(x), x**2)
    x = jnp.linspace(0.0, 1.0, 6).reshape(2, 3)
    flag = jnp.array(True)
    out = jax.vmap(lambda v: F.compute_once(fn, v[0] > -1.0, v))(x)
    np.testing.assert_allclose(out[0], jnp.sin(x), rtol=1e-6)
    grad = jax.grad(lambda v: F.compute_once(fn, flag, v)[1].sum())(x)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-6)


# --- hierarchical -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hierarchical():
    lopt = HierarchicalLOpt(**SMALL_HIERARCHICAL)
    return lopt, lopt.init(jax.random.key(0))


def _descend(opt, params, grad_fn, steps):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for i in range(steps):
        updates, state = update(grad_fn(params, i), state, params, value=1.0 / (1 + i))
        params = optax.apply_updates(params, updates)
    return params, state, updates


def test_hierarchical_handles_every_rank(hierarchical):
    lopt, theta = hierarchical
    params = {
        "scalar": jnp.array(0.3),
        "vector": jnp.linspace(-1.0, 1.0, 5),
        "matrix": jnp.ones((3, 4)),
        "conv": jnp.full((3, 3, 2, 4), 0.1),
        "zeros": jnp.zeros((7,)),  # moves thanks to the floor on rms(p)
    }
    opt = lopt.transform(theta, num_steps=10)
    _, state, updates = _descend(opt, params, lambda p, _: p, steps=2)
    for name, u in updates.items():
        assert u.shape == params[name].shape
        assert bool(jnp.all(jnp.isfinite(u))) and float(jnp.abs(u).max()) > 0, name
    assert state.lstm_h.shape == (5, lopt.lstm_size)
    # f = sum p^2 / 2: the initial optimizer descends (updates oppose gradients)
    for name in ("vector", "matrix", "conv"):
        assert float(jnp.vdot(updates[name], params[name])) < 0, name


def test_hierarchical_on_a_pytree_of_100_tensors(hierarchical):
    lopt, theta = hierarchical
    shapes = [(), (3,), (2, 3), (2, 1, 3, 2)]
    params = {
        f"t{i:03d}": jnp.full(shapes[i % 4], 0.1 * (1 + i % 7)) for i in range(100)
    }
    opt = lopt.transform(theta, num_steps=10)
    _, state, updates = _descend(opt, params, lambda p, _: p, steps=2)
    assert state.lstm_h.shape == (100, lopt.lstm_size)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    flat = jnp.concatenate([u.reshape(-1) for u in jax.tree.leaves(updates)])
    assert bool(jnp.all(jnp.isfinite(flat))) and bool(jnp.all(flat < 0))


def test_hierarchical_graph_grows_with_shapes_not_tensors(hierarchical):
    """Tensors of one shape share one vmapped pass: only stack / split grows."""
    lopt, theta = hierarchical
    opt = lopt.transform(theta, num_steps=10)

    def num_eqns(count):
        params = {f"t{i:03d}": jnp.ones((4, 5)) for i in range(count)}
        state = opt.init(params)
        jaxpr = jax.make_jaxpr(lambda g, s, p: opt.update(g, s, p, value=1.0))(
            params, state, params
        )
        return len(jaxpr.jaxpr.eqns)

    small, large = num_eqns(10), num_eqns(100)
    per_tensor = (large - small) / 90
    assert per_tensor <= 8, (small, large)  # stack g, p; slice, reshape, cast
    assert small > 200  # (the per-parameter network alone is hundreds of ops)


def test_hierarchical_updates_follow_their_tensors(hierarchical):
    """Swapping two same-shape tensors swaps their updates (group bookkeeping)."""
    lopt, theta = hierarchical
    opt = lopt.transform(theta, num_steps=10)
    keys = jax.random.split(jax.random.key(3), 3)
    a, c = jax.random.normal(keys[0], (3, 4)), 5.0 * jax.random.normal(keys[1], (3, 4))
    b = jax.random.normal(keys[2], (7,))

    @jax.jit
    def step(params):
        return opt.update(params, opt.init(params), params, value=1.0)[0]

    first = step({"a": a, "b": b, "c": c})
    swapped = step({"a": c, "b": b, "c": a})
    np.testing.assert_allclose(swapped["a"], first["c"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(swapped["c"], first["a"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(swapped["b"], first["b"], rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(first["a"] - first["c"]).max()) > 1e-6


def test_generated_weights_follow_tensor_statistics(hierarchical):
    lopt, theta = hierarchical
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    g = jax.random.normal(jax.random.key(1), (4, 4))
    same, lr_same = lopt.generated_weights(theta, params, {"a": g, "b": g})
    np.testing.assert_allclose(same[0], same[1], rtol=1e-6)
    np.testing.assert_allclose(lr_same[0], lr_same[1], rtol=1e-6)
    # a larger gradient spread in "b" changes b's statistics and its weights
    other, lr_other = lopt.generated_weights(theta, params, {"a": g, "b": 30.0 * g})
    assert float(jnp.abs(other[1] - other[0]).max()) > 1e-4
    assert float(jnp.abs(other[1] - same[1]).max()) > 1e-4
    assert float(jnp.abs(lr_other[1] - lr_same[1])) > 1e-6
    assert other.shape == (2, lopt.num_mlp_weights)


def test_hierarchical_stays_finite_on_nan_and_inf_gradients():
    """Statistics read the raw gradient (no clipped copy): their sums saturate."""
    lopt = HierarchicalLOpt(**SMALL_HIERARCHICAL)
    opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=50)
    params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
    bad = {
        "w": jnp.ones((6, 5)).at[2, 3].set(jnp.nan).at[1, 1].set(jnp.inf),
        "b": jnp.full(5, -1e38),  # its square overflows
    }
    update = jax.jit(opt.update)
    state = opt.init(params)
    finite = lambda tree: all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
    )
    updates, state = update(bad, state, params, value=jnp.float32(1.0))
    assert finite(updates) and finite(state)
    good = jax.tree.map(jnp.ones_like, params)
    updates, state = update(good, state, params, value=jnp.float32(1.0))
    assert finite(updates) and finite(state)
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_hierarchical_per_parameter_mlp_equals_a_dense_reference():
    """The fused pass (folded scales, shared factors, row and column terms) computes
    the documented 30 inputs times a plain 30-4-4-2 MLP."""
    lopt = HierarchicalLOpt(**SMALL_HIERARCHICAL)
    rng = np.random.default_rng(0)
    batch, rows, cols, nm = 2, 5, 7, len(lopt.momentum_decays)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    positive = lambda *shape: np.abs(normal(*shape)) + 0.1
    g, p, v = (
        normal(batch, rows, cols),
        normal(batch, rows, cols),
        positive(batch, rows, cols),
    )
    momenta = normal(nm, batch, rows, cols)
    row_f, col_f, col_mean = (
        positive(3, batch, rows),
        positive(3, batch, cols),
        positive(3),
    )
    scales = {
        "inv_rms_g": 3.0,  # large enough that the clipped gradient differs
        "inv_scale_p": 0.7,
        "inv_rms_m": np.asarray([1.5, 0.8, 2.0], np.float32),
        "inv_rms_sv": 1.3,
        "rms_sv": 0.6,
        "eps_v": 1e-3,
    }
    weights = normal(lopt.num_mlp_weights)
    features = lopt.param_features(g, p, momenta, v, (row_f, col_f, col_mean), scales)
    direction, magnitude = lopt.per_param_mlp(features, jnp.asarray(weights))

    rinv = 1.0 / np.sqrt(v + scales["eps_v"])
    inputs = [g * 3.0, np.clip(g * 3.0, -1, 1), p * 0.7]
    inputs += [momenta[d] * scales["inv_rms_m"][d] for d in range(nm)]
    inputs += [np.sqrt(v) * 1.3, *(momenta[d] * rinv for d in range(nm))]
    inputs += [rinv * 0.6, g * rinv]
    for d in range(3):
        r = np.broadcast_to(row_f[d][:, :, None], g.shape)
        c = np.broadcast_to(col_f[d][:, None, :], g.shape)
        ada = 1.0 / np.sqrt(r + 1e-3) / np.sqrt(c + 1e-3) / np.sqrt(col_mean[d])
        inputs += [r, c, 1.0 / np.sqrt(r + 1e-3), 1.0 / np.sqrt(c + 1e-3)]
        inputs += [g * ada, momenta[d] * ada]
    x = np.stack(inputs, axis=-1)
    assert x.shape[-1] == lopt.num_param_features
    w = {
        k: np.asarray(a) for k, a in lopt._unpack_weights(jnp.asarray(weights)).items()
    }
    h = np.maximum(x @ w["w0"] + w["b0"], 0.0)
    h = np.maximum(h @ w["w1"] + w["b1"], 0.0)
    out = h @ w["w2"] + w["b2"]
    np.testing.assert_allclose(direction, out[..., 0], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(magnitude, out[..., 1], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["mlp", "hierarchical"])
def test_padded_buckets_do_not_change_the_updates(name, monkeypatch):
    """Small tensors share zero-padded buckets; padding must not leak into updates."""
    lopt = LOPTS[name]()
    opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
    keys = jax.random.split(jax.random.key(7), 4)
    params = {
        "m": jax.random.normal(keys[0], (3, 5)),
        "n": jax.random.normal(keys[1], (3, 6)),
        "v": jax.random.normal(keys[2], (5,)),
        "c": jax.random.normal(keys[3], (3, 2, 3, 3)),
    }

    def two_steps():
        if name == "hierarchical":  # (mlp pads every one of these vectors)
            assert len(F.ShapeGroups.of(params, F.matrix_shape)) == groups
        state, update = opt.init(params), jax.jit(opt.update)
        for i in range(2):
            grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params)
            updates, state = update(grads, state, params, value=1.0 / (i + 1))
        return updates

    groups = 3  # (3, 5) and (3, 6) share the (1, 4, 8) bucket
    padded = two_steps()
    monkeypatch.setattr(F, "BUCKET_MAX_ENTRIES", 0)
    groups = 4  # every tensor its own exact view
    exact = two_steps()
    for key in params:
        np.testing.assert_allclose(padded[key], exact[key], rtol=2e-4, atol=1e-7)


def test_large_tensors_of_one_shape_are_read_in_place(hierarchical, monkeypatch):
    """Large tensors keep a group each (a stack would copy them every step); the
    updates equal those of the stacked, zero-padded bucket that small ones share."""
    lopt, theta = hierarchical
    opt = lopt.transform(theta, num_steps=10)
    keys = jax.random.split(jax.random.key(3), 4)
    params = {
        "a": jax.random.normal(keys[0], (4, 5)),
        "b": jax.random.normal(keys[1], (4, 5)),
        "c": jax.random.normal(keys[2], (3,)),
        "d": jax.random.normal(keys[3], (4,)),
    }
    grads = jax.tree.map(jnp.sin, params)

    def update():
        """(updates, compiled HLO text) of one compiled update."""
        state = opt.init(params)
        fn = jax.jit(lambda g, s, p: opt.update(g, s, p, value=1.0))
        compiled = fn.lower(grads, state, params).compile()
        return compiled(grads, state, params)[0], compiled.as_text()

    bucketed, _ = update()  # every tensor is small: two zero-padded buckets
    monkeypatch.setattr(F, "BUCKET_MAX_ENTRIES", 8)  # now a and b are large
    groups = F.ShapeGroups.of(params, F.matrix_shape)
    assert [g.leaves for g in groups] == [(0,), (1,), (2, 3)]
    in_place, hlo = update()
    assert "f32[2,1,4,5]" not in hlo  # no stacked copy of a and b
    assert "f32[2,1,4,1]" in hlo  # the small c and d still share one bucket
    monkeypatch.setattr(F, "STACK_LARGE_TENSORS", True)  # a and b share a program
    groups = F.ShapeGroups.of(params, F.matrix_shape)
    assert [g.leaves for g in groups] == [(0, 1), (2, 3)]
    stacked, hlo = update()
    assert "f32[2,1,4,5]" in hlo
    for key in params:
        np.testing.assert_allclose(in_place[key], bucketed[key], rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(stacked[key], bucketed[key], rtol=2e-4, atol=1e-7)


def test_hierarchical_refuses_a_per_parameter_mlp_too_large_to_fuse():
    with pytest.raises(ValueError, match=r"768 multiply-adds .* at most 600"):
        HierarchicalLOpt(hidden_sizes=(16, 16))
    assert HierarchicalLOpt(hidden_sizes=(8, 8)).num_mlp_weights > 0


def test_hierarchical_size_presets_and_velo_meta_parameter_count():
    velo = yaml.safe_load((CONFIGS / "hierarchical_velo.yaml").read_text())
    velo.pop("_target_")
    shapes = jax.eval_shape(HierarchicalLOpt(**velo).init, jax.random.key(0))
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert 2_250_000 < count < 2_350_000, count  # VeLO: 2,320,385
    small = HierarchicalLOpt().init(jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(small)) < 20_000
    assert HierarchicalLOpt().num_param_features == 30


# --- LSTM -------------------------------------------------------------------------


def test_lstm_keeps_one_state_per_coordinate_and_layer():
    lopt = LSTMLOpt()
    opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(4)}
    state = opt.init(params)
    assert [[x.shape for x in h] for h in state.hidden] == [[(10, 20)], [(10, 20)]]
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.full((4,), -1e-7)}
    updates, state = jax.jit(opt.update)(grads, state, params)
    # the warm start descends along the sign of the gradient
    assert bool(jnp.all(updates["w"] < 0))
    assert float(jnp.abs(state.cell[1][0]).max()) > 0
    # equal preprocessed inputs give equal updates (shared weights, coordinatewise)
    np.testing.assert_allclose(updates["w"], updates["w"][0, 0], rtol=1e-6)


# --- deep momentum ----------------------------------------------------------------


def _random_grads(key, params, steps):
    keys = jax.random.split(key, steps)
    return [
        jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params) for k in keys
    ]


def test_linear_dot_product_deep_momentum_equals_momentum_sgd():
    lopt = DeepMomentumLOpt(
        hidden_sizes=(),
        objective="dot",
        key_features="none",
        init_learning_rate=0.05,
        init_decay=0.8,
        init_inner_lr=1.0,
    )
    opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
    reference = optax.sgd(0.05, momentum=0.8)
    params = {"w": jnp.ones((3, 2)), "s": jnp.array(0.5)}
    state, ref_state = opt.init(params), reference.init(params)
    p_opt = p_ref = params
    update = jax.jit(opt.update)
    for grads in _random_grads(jax.random.key(3), params, 6):
        u, state = update(grads, state, p_opt)
        r, ref_state = reference.update(grads, ref_state, p_ref)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
        p_opt, p_ref = optax.apply_updates(p_opt, u), optax.apply_updates(p_ref, r)
    for a, b in zip(jax.tree.leaves(p_opt), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5)


def test_linear_delta_rule_memory_is_an_ema_of_gradients():
    lopt = DeepMomentumLOpt(
        hidden_sizes=(),
        objective="delta",
        key_features="none",
        init_learning_rate=1.0,
        init_decay=0.9,
        init_inner_lr=0.3,
    )
    opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    b = np.zeros(3)
    update = jax.jit(opt.update)
    for grads in _random_grads(jax.random.key(4), params, 4):
        u, state = update(grads, state, params)
        # b <- alpha b - eta (b - g)
        b = 0.9 * b - 0.3 * (b - np.asarray(grads["w"]))
        np.testing.assert_allclose(u["w"], -b, rtol=1e-5, atol=1e-7)


def test_deep_memory_learns_from_its_keys():
    lopt = DeepMomentumLOpt(hidden_sizes=(4,), objective="delta")
    theta = lopt.init(jax.random.key(0))
    opt = lopt.transform(theta, num_steps=10)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    u, state = jax.jit(opt.update)({"w": jnp.array([1.0, -1.0])}, state, params)
    assert state.memory[0]["w0"].shape == (
        2,
        2,
        4,
    )  # (coordinates, key features, units)
    # the memory maps different keys to different values, opposing the gradient
    assert float(u["w"][0]) < 0 < float(u["w"][1])
    with pytest.raises(ValueError, match="objective must be one of"):
        DeepMomentumLOpt(objective="cosine")


# --- meta-training with OpenAI-ES ---------------------------------------------------

ES_CASES = {
    "hierarchical": HierarchicalLOpt(
        **SMALL_HIERARCHICAL, momentum_decays=(0.9,), factored_decays=(0.99,)
    ),
    "lstm": LSTMLOpt(hidden_sizes=(8, 8)),
    "deep_momentum": DeepMomentumLOpt(hidden_sizes=(2,), init_learning_rate=0.003),
}


@pytest.mark.parametrize("name", sorted(ES_CASES))
def test_meta_loss_falls_with_open_es(name):
    lopt = ES_CASES[name]
    system = LOptTraining(QuadraticFamily(dim=4), lopt, horizon=16)
    es = FullES(
        system,
        population_size=8,
        std=0.01,
        optimizer=optax.adam(0.05),
        meta_loss="train_mean",
    )
    theta0 = lopt.init(jax.random.key(0))
    state = es.init(jax.random.key(1), theta0)
    for i in range(10):
        state, metrics = es.step(jax.random.key(100 + i), state)
    assert bool(metrics["theta_finite"])
    evaluate = jax.jit(jax.vmap(es.unroll, in_axes=(None, 0)))
    keys = jax.random.split(jax.random.key(7), 32)  # the same tasks for both
    before = float(jnp.mean(evaluate(theta0, keys)[0]))
    after = float(jnp.mean(evaluate(es.theta(state), keys)[0]))
    assert after < 0.95 * before, (before, after)


# --- registry, configs and baselines ----------------------------------------------


@pytest.mark.parametrize("name", ["hierarchical", "lstm", "deep_momentum"])
def test_registered_and_config_round_trip(name):
    cls = LOPTS[name]
    lopt = cls()
    rebuilt = cls(**lopt.config())
    assert rebuilt.config() == lopt.config()
    shapes = lambda t: [x.shape for x in jax.tree.leaves(t)]
    key = jax.random.key(0)
    assert shapes(jax.eval_shape(rebuilt.init, key)) == shapes(lopt.init(key))


@pytest.mark.parametrize(
    "config", ["hierarchical", "hierarchical_velo", "lstm", "deep_momentum"]
)
def test_lopt_configs_build_their_class_and_survive_an_export(config, tmp_path):
    cfg = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    target = cfg.pop("_target_")
    cls = {c.__name__: c for c in LOPTS.values()}[target.rsplit(".", 1)[1]]
    assert target == f"es_l2o.lopt.{cls.__name__}"
    lopt = cls(**cfg)
    # the file's settings reach the optimizer (YAML lists, tuples in Python);
    # a null setting means "the class's default" and comes back resolved
    config = lopt.config()
    given = {k: v for k, v in cfg.items() if v is not None}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()
            if k in given} == given  # fmt: skip
    assert all(config[k] is not None for k in cfg)
    # an exported optimizer comes back as the same class, settings and theta
    theta = jax.tree.map(lambda x: x + 0.25, lopt.init(jax.random.key(0)))
    export.save(tmp_path / "opt.safetensors", lopt, theta)
    loaded, loaded_theta, _ = export.load_theta(tmp_path / "opt.safetensors")
    assert type(loaded) is cls and loaded.config() == config
    for a, b in zip(jax.tree.leaves(loaded_theta), jax.tree.leaves(theta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _final_quadratic_loss(curvature: float, num_steps: int = 10):
    """run(optimizer) -> loss after `num_steps` steps on 1/2 h x^2 from x = 1."""

    def run(opt):
        def step(carry, _):
            x, state = carry
            updates, state = opt.update(curvature * x, state, x)
            return (optax.apply_updates(x, updates), state), None

        x = jnp.ones(())
        (x, _), _ = jax.lax.scan(step, (x, opt.init(x)), None, length=num_steps)
        return 0.5 * curvature * x**2

    return run


def test_a_sweep_picks_the_rate_that_is_known_to_be_best():
    # gradient descent on 1/2 h x^2 contracts by |1 - lr h| per step: the best rate
    # is 1 / h, rates above 2 / h diverge
    rates = jnp.array([0.05, 0.1, 0.25, 0.4, 0.6])
    losses = jax.jit(lambda r: baselines.sweep("sgd", r, _final_quadratic_loss(4.0)))(
        rates
    )
    assert float(rates[jnp.argmin(losses)]) == 0.25
    assert float(losses[-1]) > 1.0  # 0.6 > 2 / h: diverged
    with pytest.raises(ValueError, match="unknown baseline optimizer 'adamw'"):
        baselines.get_baseline("adamw")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        baselines.sweep("sgd", [], _final_quadratic_loss(4.0))


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_a_sweep_is_each_rate_run_alone_compiled_once(name):
    run = _final_quadratic_loss(2.0, num_steps=3)
    swept = jax.jit(lambda r: baselines.sweep(name, r, run))
    rates = [0.01, 0.1]
    losses = swept(jnp.array(rates))
    swept(jnp.array([0.02, 0.3]))
    assert swept._cache_size() == 1
    for lr, loss in zip(rates, losses, strict=True):
        alone = run(baselines.get_baseline(name)(lr))
        np.testing.assert_allclose(float(loss), float(alone), rtol=1e-5)
    # every baseline descends at a small rate
    assert float(losses[0]) < 1.0


def test_adam_steps_by_the_learning_rate_whatever_the_gradient_scale():
    # Adam's first step is lr * sign(g), however large or small g is; SGD's is lr * g
    adam, sgd = baselines.get_baseline("adam")(0.1), baselines.get_baseline("sgd")(0.1)
    grads = {"w": jnp.array([1e-3, -5.0, 200.0])}
    params = jax.tree.map(jnp.zeros_like, grads)
    step, _ = adam.update(grads, adam.init(params), params)
    np.testing.assert_allclose(step["w"], [-0.1, 0.1, -0.1], rtol=1e-3)
    step, _ = sgd.update(grads, sgd.init(params), params)
    np.testing.assert_allclose(step["w"], [-1e-4, 0.5, -20.0], rtol=1e-5)
