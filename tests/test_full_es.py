"""Full-unroll ES: it meta-learns, pairs share tasks, keyed noise is evosax's Open_ES
on the materialised population, and bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from diverging import ExplodingFamily
from evosax.algorithms import Open_ES
from evosax.core.fitness_shaping import (
    add_weight_decay,
    centered_rank_fitness_shaping_fn,
)

from es_l2o import sharding
from es_l2o.es import FullES, common
from es_l2o.es.keyed import KeyedOpenES
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


# -- keyed perturbations: evosax's Open_ES without the (P, D) population -----------

SOLUTION = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(5)}  # D = 11


def _pair(antithetic, optimizer):
    kwargs = dict(
        use_antithetic_sampling=antithetic,
        optimizer=optimizer,
        std_schedule=optax.constant_schedule(0.3),
        fitness_shaping_fn=centered_rank_fitness_shaping_fn,
    )
    return KeyedOpenES(8, SOLUTION, **kwargs), Open_ES(8, SOLUTION, **kwargs)


def _mean(key):  # a mean away from zero
    return jax.tree.map(lambda x: jax.random.normal(key, x.shape), SOLUTION)


def _explicit_population(state, key_ask, antithetic):
    """The documented key scheme, materialised: z_j from fold_in(key_ask, j)."""
    draws = 4 if antithetic else 8
    z = jnp.stack(
        [jax.random.normal(jax.random.fold_in(key_ask, j), (11,)) for j in range(draws)]
    )
    z = jnp.concatenate([z, -z]) if antithetic else z
    return state.mean + state.std * z


@pytest.mark.parametrize("antithetic", [True, False])
def test_keyed_gradient_is_evosax_open_es_gradient(antithetic):
    keyed, evosax_es = _pair(antithetic, optax.sgd(1.0))  # mean - new mean = grad
    params = keyed.default_params
    state = keyed.init(jax.random.key(0), _mean(jax.random.key(1)), params)
    key_ask = jax.random.key(2)
    flat = _explicit_population(state, key_ask, antithetic)
    asked = jax.vmap(keyed._ravel_solution)(keyed.ask(key_ask, state, params)[0])
    np.testing.assert_allclose(asked, flat, rtol=1e-6)  # ask: the same thetas
    shaped = jnp.array([0.3, -0.5, 0.1, 0.5, -0.1, 0.2, -0.3, -0.2])
    expected = state.mean - evosax_es._tell(None, flat, shaped, state, params).mean
    gradient = jax.jit(keyed.keyed_gradient, static_argnums=(3, 4))
    one = sharding.population_mesh(1)
    for mesh, chunk in ((None, None), (one, 2)):
        got = gradient(state, key_ask, shaped, mesh, chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("antithetic", [True, False])
def test_keyed_tell_is_evosax_tell_on_the_materialised_population(antithetic):
    keyed, evosax_es = _pair(antithetic, optax.adam(0.1))
    params = keyed.default_params
    state = keyed.init(jax.random.key(0), _mean(jax.random.key(1)), params)
    ours = theirs = state
    fitnesses = [  # the first improves on inf; the second (a NaN, worse) does not
        jnp.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0]),
        jnp.array([7.0, jnp.nan, 8.0, 1.2, 9.0, 7.5, 3.0, 8.0]),
    ]
    tell = jax.jit(keyed.keyed_tell)
    populations = []
    for i, fitness in enumerate(fitnesses):
        key_ask = jax.random.key(10 + i)
        population = keyed.ask(key_ask, ours, params)[0]
        populations.append(jax.vmap(keyed._ravel_solution)(population))
        theirs, _ = evosax_es.tell(None, population, fitness, theirs, params)
        ours = tell(key_ask, fitness, ours, params)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the best is particle 1 of the first generation, regenerated from its key
    assert float(ours.best_fitness) == 1.0
    np.testing.assert_allclose(ours.best_solution, populations[0][1], rtol=1e-6)


def test_full_es_step_is_evosax_ask_and_tell():
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=3)
    es = FullES(system, population_size=8, std=0.01, optimizer=optax.adam(1e-2))
    state = es.init(jax.random.key(0), LOPT.init(jax.random.key(1)))
    assert es.keyed
    key = jax.random.key(2)
    new_state, metrics = es.step(key, state)
    # the same step through evosax's own Open_ES on the whole population
    key_ask, key_unroll, key_tell = jax.random.split(key, 3)
    population, _ = es.algorithm.ask(key_ask, state.es_state, es.params)
    keys = common.particle_keys(key_unroll, 8, antithetic=True)
    raw, _ = jax.jit(jax.vmap(es.unroll))(population, keys)
    evosax_es, params = common.make_algorithm(
        "Open_ES",
        population_size=8,
        solution=LOPT.init(jax.random.key(1)),
        std=0.01,
        optimizer=es.optimizer,
        fitness_shaping="centered_rank",
    )
    assert type(evosax_es) is Open_ES
    expected, _ = evosax_es.tell(key_tell, population, raw, state.es_state, params)
    np.testing.assert_allclose(float(metrics["meta_loss"]), float(jnp.mean(raw)), 1e-5)
    # evosax recovers z as (theta - mean) / std, to about eps * |mean| / std = 1e-5
    for a, b in zip(
        jax.tree.leaves(new_state.es_state), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_keyed_open_es_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="fitness shaping must use the fitness alone"):
        KeyedOpenES(
            4,
            jnp.zeros(3),
            fitness_shaping_fn=add_weight_decay(centered_rank_fitness_shaping_fn),
        )
    with pytest.raises(ValueError, match="even population_size >= 2, got 5"):
        KeyedOpenES(5, jnp.zeros(3))
    es = KeyedOpenES(4, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\), got \(3,\)"):
        es.noise_dot(jax.random.key(0), jnp.zeros(3))
