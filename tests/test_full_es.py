"""Full-unroll ES: it meta-learns, pairs share tasks, and bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from diverging import ExplodingFamily

from es_l2o.es import FullES, common
from es_l2o.lopt import MLPLOpt
from es_l2o.unroll import LOptTraining
from populations.quadratic import QuadraticFamily

LOPT = MLPLOpt(hidden_sizes=(8,))


def _mean_meta_loss(es, theta, keys):
    return float(
        jnp.mean(jax.jit(jax.vmap(es.unroll, in_axes=(None, 0)))(theta, keys)[0])
    )


def test_meta_loss_falls_on_quadratics():
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=20)
    es = FullES(system, population_size=16, std=0.01, optimizer=optax.adam(3e-2))
    theta0 = LOPT.init(jax.random.key(0))
    state = es.init(jax.random.key(1), theta0)
    for i in range(25):
        state, metrics = es.step(jax.random.key(100 + i), state)
    assert bool(metrics["theta_finite"])
    keys = jax.random.split(jax.random.key(7), 64)  # the same held-out tasks for both
    before, after = (
        _mean_meta_loss(es, theta0, keys),
        _mean_meta_loss(es, es.theta(state), keys),
    )
    assert after < 0.5 * before, (before, after)


def test_particle_keys_pair_antithetic_partners():
    keys = common.particle_keys(jax.random.key(0), 8, antithetic=True)
    data = jax.random.key_data(keys)
    np.testing.assert_array_equal(data[:4], data[4:])
    assert len({tuple(np.asarray(k)) for k in data[:4]}) == 4
    independent = jax.random.key_data(common.particle_keys(jax.random.key(0), 8, False))
    assert len({tuple(np.asarray(k)) for k in independent}) == 8


def test_antithetic_partners_train_the_same_task():
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=10)
    es = FullES(system, population_size=8, std=1e-5, meta_loss="train_final")
    state = es.init(jax.random.key(0), LOPT.init(jax.random.key(1)))
    population, _ = es.algorithm.ask(jax.random.key(2), state.es_state, es.params)
    keys = common.particle_keys(jax.random.key(3), 8, es.antithetic)
    losses, _ = jax.vmap(es.unroll)(population, keys)
    within_pairs = jnp.abs(losses[:4] - losses[4:])
    across_pairs = jnp.std(losses[:4])
    assert float(jnp.max(within_pairs)) < 1e-3 * float(across_pairs)


def test_odd_population_is_refused_with_antithetic_sampling():
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=5)
    with pytest.raises(ValueError, match="population_size=7 is odd"):
        FullES(system, population_size=7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"meta_loss": "validation"}, "needs a population with a validation split"),
        ({"meta_loss": "best"}, "unknown meta_loss 'best'"),
        ({"algorithm": "Nope_ES"}, "unknown evosax algorithm 'Nope_ES'"),
        ({"fitness_shaping": "rank"}, "unknown fitness shaping 'rank'"),
        ({"std": -1.0}, "std must be > 0"),
    ],
)
def test_bad_settings_name_the_value(kwargs, match):
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=5)
    with pytest.raises(ValueError, match=match):
        es = FullES(system, population_size=4, **kwargs)
        es.init(jax.random.key(0), LOPT.init(jax.random.key(0)))


def test_another_evosax_algorithm_by_name():
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=5)
    es = FullES(system, population_size=8, std=0.01, algorithm="SNES")
    theta0 = LOPT.init(jax.random.key(0))
    state = es.init(jax.random.key(1), theta0)
    state, metrics = es.step(jax.random.key(2), state)
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, es.theta(state), theta0))
    assert bool(metrics["theta_finite"]) and float(moved) > 0


def test_diverging_tasks_never_make_theta_nonfinite():
    system = LOptTraining(ExplodingFamily(), LOPT, horizon=5, nonfinite_penalty=1e3)
    es = FullES(system, population_size=8, std=0.1, optimizer=optax.sgd(1.0))
    state = es.init(jax.random.key(0), LOPT.init(jax.random.key(1)))
    failures = 0
    for i in range(3):
        state, metrics = es.step(jax.random.key(i), state)
        failures += int(metrics["nonfinite_steps"])
        assert bool(metrics["theta_finite"])
        assert np.isfinite(float(metrics["meta_loss"]))
    assert failures > 0, "the exploding tasks should have produced non-finite steps"
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(es.theta(state)))
