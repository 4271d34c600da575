"""PES, truncated ES and noise-reuse ES: bias, per-particle resets, failures."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from es_l2o.es import ESTIMATORS, PES, Estimator, NoiseReuseES, TruncatedES
from es_l2o.es.noise import brownian_path
from es_l2o.lopt import MLPLOpt
from es_l2o.toy_systems import InfluenceBalancing
from es_l2o.unroll import LOptTraining, StepOutput, UnrolledSystem
from populations.quadratic import QuadraticFamily

LOPT = MLPLOpt(hidden_sizes=(4,))
#: the scalar theta of the toy systems (they have no learned optimizer to ask)
SCALAR = jax.ShapeDtypeStruct((), jnp.float32)


def _run(es, state, key, num_iterations):
    """`num_iterations` meta-steps in one compiled scan."""

    @jax.jit
    def run(state, keys):
        return jax.lax.scan(lambda s, k: es.step(k, s), state, keys)

    return run(state, jax.random.split(key, num_iterations))


# -- (a) influence balancing (PES paper, section 5.1) ---------------------------------


def _influence_theta(cls, num_iterations=1500):
    es = cls(
        InfluenceBalancing(),
        population_size=1000,
        std=0.1,
        optimizer=optax.sgd(1e-4),
        truncation_length=1,
        theta=SCALAR,
    )
    state = es.init(jax.random.key(0), jnp.asarray(0.5))
    state, _ = _run(es, state, jax.random.key(1), num_iterations)
    return float(es.theta(state))


def test_influence_balancing_pes_reaches_optimum_truncated_es_does_not():
    optimum = InfluenceBalancing().optimum
    assert optimum == pytest.approx(-1 / 6)
    assert _influence_theta(PES) == pytest.approx(optimum, abs=0.02)
    # truncated ES follows the one-step gradient and runs away from the optimum
    assert _influence_theta(TruncatedES) > 1.0


# -- (b) mean estimate against the full-horizon autodiff gradient ---------------------

# episodes of 7 steps, truncations of 3: every reset falls inside a truncation, and
# 7 truncations cover exactly 3 episodes, so their mean estimates d/dtheta of the mean
# episode loss
HORIZON, TRUNCATION, NUM_TRUNCATIONS = 7, 3, 7


def _mean_estimates(cls, population_size, noise="stored", repeats=8, pair_chunk=None):
    system = InfluenceBalancing(horizon=HORIZON)
    es = cls(
        system,
        population_size=population_size,
        std=0.01,
        optimizer=optax.sgd(0.0),
        truncation_length=TRUNCATION,
        noise=noise,
        pair_chunk=pair_chunk,
        theta=SCALAR,
    )
    theta = jnp.asarray(0.5)

    def estimate(key):
        state = es.init(key, theta)

        def body(state, k):
            grad, aux = es.gradient(k, state)
            return aux["state"], grad

        keys = jax.random.split(jax.random.fold_in(key, 1), NUM_TRUNCATIONS)
        return jnp.mean(jax.lax.scan(body, state, keys)[1])

    keys = jax.random.split(jax.random.key(population_size), repeats)
    return np.asarray(jax.jit(jax.vmap(estimate))(keys))


def _relative_error(estimates, exact):
    return float(np.sqrt(np.mean((estimates - exact) ** 2)) / abs(exact))


EXACT = float(jax.grad(InfluenceBalancing(horizon=HORIZON).episode_loss)(0.5))


def test_pes_matches_autodiff_and_improves_with_population():
    small = _relative_error(_mean_estimates(PES, 64), EXACT)
    large = _relative_error(_mean_estimates(PES, 4096), EXACT)
    assert large < 0.05, (small, large)
    assert large < small / 3, (small, large)


@pytest.mark.parametrize(
    ("cls", "noise", "chunk"), [(PES, "keys", 512), (NoiseReuseES, "stored", None)]
)
def test_other_unbiased_estimators_match_autodiff(cls, noise, chunk):
    estimates = _mean_estimates(cls, 4096, noise, pair_chunk=chunk)
    assert _relative_error(estimates, EXACT) < 0.05


def test_truncated_es_is_biased_against_autodiff():
    estimates = _mean_estimates(TruncatedES, 4096)
    assert _relative_error(estimates, EXACT) > 0.3
    # and the bias is systematic, not noise: every repeat is off the same way
    assert np.all(estimates < 0.8 * EXACT)


# -- per-particle episodes and accumulators -------------------------------------------

RESET_K = 4


@pytest.fixture(scope="module")
def staggered():
    """A staggered population whose pairs end their episodes at different times."""
    # horizons >= K: at most one reset per pair per truncation
    system = LOptTraining(QuadraticFamily(dim=2), LOPT, (RESET_K, 9), stagger=True)
    es = PES(
        system,
        population_size=16,
        std=0.01,
        optimizer=optax.sgd(0.0),
        truncation_length=RESET_K,
        meta_loss="heldout",
        loss_normalization="initial",
    )
    state = es.init(jax.random.key(0), LOPT.init(jax.random.key(1)))
    return es, state


def test_antithetic_partners_share_task_horizon_and_offset(staggered):
    es, state = staggered
    inner = state.inner
    for leaf in jax.tree.leaves((inner.cfg, inner.horizon, inner.step, inner.params)):
        np.testing.assert_array_equal(leaf[:8], leaf[8:])
    # while particles differ from each other
    assert len(set(np.asarray(inner.horizon[:8]).tolist())) > 1


def test_accumulators_restart_only_for_pairs_whose_episode_ended(staggered):
    es, state = staggered
    num_reset = num_kept = 0
    for i in range(6):
        before = state
        _, aux = es.gradient(jax.random.key(10 + i), before)
        state = aux["state"]
        inner = before.inner
        # a pair resets inside this truncation iff its episode ends within K steps
        expected = np.asarray(inner.horizon - inner.step < RESET_K)[:8]
        fresh = np.asarray(state.noise.pert / state.es_state.std**2)
        accumulated = np.asarray(before.noise.score) + fresh
        restarted = np.asarray(state.noise.score)
        for j in range(8):
            want = fresh[j] if expected[j] else accumulated[j]
            np.testing.assert_allclose(restarted[j], want, rtol=1e-5, atol=1e-3)
        steps_after = np.asarray(state.inner.step[:8])
        counters = np.asarray(state.pair_steps)
        np.testing.assert_array_equal(
            counters[expected], steps_after[expected]
        )  # reset pairs count from their new episode's start
        np.testing.assert_array_equal(
            counters[~expected], np.asarray(before.pair_steps)[~expected] + 4
        )
        assert int(aux["metrics"]["resets"]) == 2 * int(expected.sum())
        num_reset += int(expected.sum())
        num_kept += int((~expected).sum())
    # both cases were exercised
    assert num_reset > 3 and num_kept > 3


def test_normalised_heldout_meta_loss_is_relative_to_the_first_loss(staggered):
    es, state = staggered
    _, aux = es.gradient(jax.random.key(3), state)
    # heldout losses after a few steps, divided by the first training loss
    value = float(aux["metrics"]["meta_loss"])
    assert 0.0 < value < 2.0
    assert float(aux["metrics"]["train_loss"]) > 2.0 * value


def test_noise_reuse_keeps_a_perturbation_for_the_whole_episode():
    system = InfluenceBalancing(horizon=5, stagger=True)
    es = NoiseReuseES(system, population_size=16, truncation_length=2, theta=SCALAR)
    state = es.init(jax.random.key(0), jnp.asarray(0.5))
    _, aux = es.gradient(jax.random.key(0), state)  # draws the first perturbations
    state = aux["state"]
    kept = switched = 0
    for i in range(1, 6):
        before = state
        _, aux = es.gradient(jax.random.key(i), before)
        state = aux["state"]
        # a pair changes perturbation exactly when its episode ended in between
        ended = np.asarray(system.horizon - before.inner.step < 2)[:8]
        same = np.all(
            np.asarray(state.noise.pert) == np.asarray(before.noise.pert), axis=1
        )
        np.testing.assert_array_equal(same, ~ended)
        np.testing.assert_allclose(
            state.noise.score, state.noise.pert / state.es_state.std**2, rtol=1e-6
        )
        kept += int((~ended).sum())
        switched += int(ended.sum())
    assert kept > 8 and switched > 8


def test_batch_step_matches_the_vmapped_step():
    system = LOptTraining(QuadraticFamily(dim=2), LOPT, (2, 5), stagger=True)
    theta = LOPT.init(jax.random.key(0))

    @jax.jit
    def both(key):
        states = jax.vmap(lambda k: system.init(k, theta))(jax.random.split(key, 6))
        thetas = jax.tree.map(lambda x: jnp.broadcast_to(x, (6, *x.shape)), theta)

        def body(carry, k):
            a, b = carry
            keys = jax.random.split(k, 6)
            a, out_a = jax.vmap(system.step)(keys, thetas, a)
            b, out_b = system.batch_step(keys, thetas, b)
            return (a, b), (out_a, out_b)

        return jax.lax.scan(body, (states, states), jax.random.split(key, 8))[1]

    out_a, out_b = both(jax.random.key(1))
    np.testing.assert_allclose(out_a.loss, out_b.loss, rtol=1e-5)
    np.testing.assert_array_equal(out_a.reset, out_b.reset)
    some_reset = np.any(out_a.reset, axis=1) & ~np.all(out_a.reset, axis=1)
    assert some_reset.any()  # steps where only some particles started anew


@pytest.mark.parametrize("mode", ["offset", "advance"])
def test_stagger_starts_particles_at_different_steps(mode):
    system = LOptTraining(QuadraticFamily(dim=2), LOPT, (5, 20), stagger=mode)
    fresh = LOptTraining(QuadraticFamily(dim=2), LOPT, (5, 20))
    theta = LOPT.init(jax.random.key(0))

    @jax.jit
    def init_both(keys):
        return tuple(
            jax.vmap(lambda k, s=s: s.init(k, theta))(keys) for s in (system, fresh)
        )

    states, fresh_states = init_both(jax.random.split(jax.random.key(1), 32))
    steps, horizons = np.asarray(states.step), np.asarray(states.horizon)
    assert np.all((steps >= 0) & (steps < horizons))
    assert len(set(steps.tolist())) > 3 and len(set(horizons.tolist())) > 3
    moved = np.any(np.asarray(states.params["x"] != fresh_states.params["x"]), axis=1)
    # "offset" starts fresh parameters late; "advance" has trained them that long
    np.testing.assert_array_equal(moved, (steps > 0) if mode == "advance" else False)


def test_stagger_mode_is_checked():
    with pytest.raises(ValueError, match="stagger must be a bool or one of"):
        LOptTraining(QuadraticFamily(), LOPT, 10, stagger="random")


# -- failures -------------------------------------------------------------------------


class Fragile(UnrolledSystem):
    """x <- x + theta, loss (x + theta - 1)^2; a NaN loss whenever theta > 0.5."""

    max_horizon = 10

    def init(self, key, theta):
        del key, theta
        return {"x": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}

    def step(self, key, theta, state):
        del key
        reset = state["step"] >= self.max_horizon
        x = jnp.where(reset, 0.0, state["x"])
        step = jnp.where(reset, 0, state["step"])
        raw = jnp.where(theta > 0.5, jnp.nan, (x + theta - 1.0) ** 2)
        finite = jnp.isfinite(raw)
        new = {
            "x": jnp.where(finite, x + theta, x),
            "step": jnp.where(finite, step + 1, self.max_horizon),
        }
        return new, StepOutput(raw, reset, finite)

    def end_episode(self, state):
        return {**state, "step": jnp.asarray(self.max_horizon, jnp.int32)}

    def episode_done(self, state):
        return state["step"] >= self.max_horizon


def test_nonfinite_steps_restart_pairs_and_never_reach_theta():
    es = PES(
        Fragile(),
        population_size=8,
        std=0.1,
        optimizer=optax.sgd(1e-3),
        truncation_length=3,
        nonfinite_penalty=50.0,
        theta=SCALAR,
    )
    state = es.init(jax.random.key(0), jnp.asarray(0.5))
    # theta sits on the cliff: one partner of every pair fails
    _, aux = es.gradient(jax.random.key(1), state)
    metrics = aux["metrics"]
    assert int(metrics["nonfinite_particles"]) == 4
    assert int(metrics["nonfinite_steps"]) >= 4
    assert float(metrics["meta_loss_max"]) == pytest.approx(50.0)  # bounded
    assert bool(metrics["grad_finite"])
    # the failed particle and its partner restarted together
    steps = np.asarray(aux["state"].inner["step"])
    np.testing.assert_array_equal(steps[:4], steps[4:])
    state, history = _run(es, state, jax.random.key(2), 50)
    assert bool(jnp.all(history["theta_finite"]))
    assert float(es.theta(state)) < 0.5  # pushed off the cliff by the penalty


def test_a_diverging_step_fails_and_restarts_the_task():
    system = LOptTraining(QuadraticFamily(dim=4), LOPT, horizon=10, divergence_factor=3)
    theta = LOPT.init(jax.random.key(0))
    fresh = system.new_episode(jax.random.key(1), theta)
    assert bool(jnp.isnan(fresh.first_loss))
    state, out = system.step(jax.random.key(2), theta, fresh)
    assert bool(out.finite) and int(state.step) == 1
    assert float(state.first_loss) == pytest.approx(float(out.loss))
    # the same step, as if its episode had started at a third of the loss
    low = fresh.replace(first_loss=out.loss / 3.5)
    failed, out = system.step(jax.random.key(2), theta, low)
    assert not bool(out.finite) and float(out.loss) == system.nonfinite_penalty
    assert bool(system.episode_done(failed))  # the next step starts a new task
    jax.tree.map(np.testing.assert_array_equal, failed.params, fresh.params)
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        LOptTraining(QuadraticFamily(dim=4), LOPT, divergence_factor=1.0)


# -- options --------------------------------------------------------------------------


def test_std_schedule_and_gradient_clipping():
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    es = TruncatedES(
        InfluenceBalancing(),
        population_size=8,
        std=schedule,
        optimizer=optax.sgd(1.0),
        truncation_length=2,
        max_grad_norm=1e-3,
        theta=SCALAR,
    )
    state = es.init(jax.random.key(0), jnp.asarray(0.5))
    state, history = _run(es, state, jax.random.key(1), 4)
    np.testing.assert_allclose(history["std"], [0.1, 0.05, 0.025, 0.0125], rtol=1e-5)
    assert np.all(np.asarray(history["grad_norm"]) > 1e-3)  # clipped below
    assert abs(float(es.theta(state)) - 0.5) <= 4e-3 + 1e-6


def test_second_step_does_not_recompile():
    es = PES(InfluenceBalancing(), population_size=4, truncation_length=2, theta=SCALAR)
    state = es.init(jax.random.key(0), jnp.asarray(0.5))
    state, _ = es.step(jax.random.key(1), state)
    state, _ = es.step(jax.random.key(2), state)
    assert es.step._cache_size() == 1


@pytest.mark.parametrize("noise", ["stored", "keys"])
def test_step_in_place_matches_step_on_a_fresh_state(noise):
    """`step_in_place` consumes its state (meta-training runs it): a fresh state
    holds every buffer once (the stored rows start as zeros twice), and its result
    is `step`'s."""
    es = PES(
        InfluenceBalancing(),
        population_size=4,
        truncation_length=2,
        noise=noise,
        theta=SCALAR,
    )
    theta = jnp.asarray(0.5)
    state = es.init(jax.random.key(0), theta)
    expected, _ = es.step(jax.random.key(1), state)
    for _ in range(2):  # its own output goes in again
        state, _ = es.step_in_place(jax.random.key(1), state)
        jax.tree.map(np.testing.assert_array_equal, state, expected)
        expected, _ = es.step(jax.random.key(1), expected)
    assert float(theta) == 0.5  # the caller's theta is not consumed


def test_keys_mode_stores_no_per_pair_vectors():
    es = PES(
        InfluenceBalancing(),
        population_size=8,
        noise="keys",
        pair_chunk=2,
        theta=SCALAR,
    )
    state = es.init(jax.random.key(0), jnp.asarray(0.5))
    noise = jax.tree.leaves(state.noise)
    assert all(leaf.shape in ((), (4,), (2,)) for leaf in noise), noise
    assert state.noise.episode.shape == (4,)  # a few integers per pair


def test_brownian_path_has_independent_unit_increments():
    def increments(key):
        paths = jax.vmap(lambda n: brownian_path(key, n, 4, 1))(jnp.arange(17))
        return jnp.diff(paths[:, 0])

    keys = jax.random.split(jax.random.key(0), 4000)
    inc = np.asarray(jax.jit(jax.vmap(increments))(keys))
    np.testing.assert_allclose(inc.mean(axis=0), 0.0, atol=0.08)
    np.testing.assert_allclose(inc.var(axis=0), 1.0, atol=0.1)
    corr = np.corrcoef(inc.T) - np.eye(16)
    assert np.max(np.abs(corr)) < 0.08


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"population_size": 7}, "population_size=7 is odd"),
        ({"meta_loss": "validation"}, "needs a population with a validation split"),
        ({"meta_loss": "final"}, "unknown meta_loss 'final'"),
        ({"loss_normalization": "rank"}, "unknown loss_normalization 'rank'"),
        ({"noise": "disk"}, "unknown noise mode 'disk'"),
        ({"truncation_length": 0}, "truncation_length must be a positive integer"),
        ({"std": 0.0}, "std must be > 0"),
    ],
)
def test_bad_settings_name_the_value(kwargs, match):
    system = LOptTraining(QuadraticFamily(), LOPT, horizon=5)
    kwargs = {"population_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        PES(system, **kwargs)


def test_pair_chunk_must_divide_the_pairs():
    with pytest.raises(ValueError, match="pair_chunk must divide the number of pairs"):
        PES(InfluenceBalancing(), population_size=8, pair_chunk=3, theta=SCALAR)


def test_theta_must_match_the_template_the_estimator_was_built_from():
    es = PES(InfluenceBalancing(), population_size=4, theta=SCALAR)
    with pytest.raises(ValueError, match="does not match the estimator's theta"):
        es.init(jax.random.key(0), jnp.zeros(3))
    with pytest.raises(ValueError, match="pass theta=jax.ShapeDtypeStruct"):
        PES(InfluenceBalancing(), population_size=4)


@pytest.mark.parametrize("name", ["pes", "tes", "nres"])
def test_each_config_builds_its_estimator_and_steps(name):
    """configs/es/NAME.yaml (composed with its schema) builds `ESTIMATORS[NAME]`,
    whose rule weights a loss as the estimator promises: after two truncations
    without a reset, PES's score is the sum of both perturbations, truncated ES's
    and noise reuse's the current one alone (noise reuse keeping the first
    perturbation)."""
    from es_l2o import cli

    sizes = ["es.population_size=4", "es.truncation_length=2"]
    cfg = cli.compose("config", [f"es={name}", *sizes])
    system = LOptTraining(QuadraticFamily(dim=2), LOPT, horizon=50)
    es = cli.instantiate(cfg.es)(system=system)
    assert type(es) is ESTIMATORS[name] and isinstance(es, Estimator)
    states = [es.init(jax.random.key(0), LOPT.init(jax.random.key(1)))]
    for i in range(2):
        states.append(es.step(jax.random.key(2 + i), states[-1])[0])
    first, second = (np.asarray(s.noise.pert) for s in states[1:])
    std2 = float(states[-1].es_state.std) ** 2
    want = {"pes": first + second, "tes": second, "nres": first}[name]
    score = np.asarray(states[-1].noise.score) * std2
    np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-6)
    assert (name == "nres") == np.array_equal(first, second)
    assert int(states[-1].iteration) == 2
    theta = jax.tree.leaves(es.theta(states[-1]))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in theta)
