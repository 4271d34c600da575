"""Low-rank (EGGROLL) perturbations: unbiased estimates, shared bases, settings."""

import re

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from es_l2o.es import PES, FullES, MultiFamilyES, NoiseReuseES
from es_l2o.es.families import family_state
from es_l2o.es.lowrank import LowRankLayout, check_rank
from es_l2o.lopt import DeepMomentumLOpt, HierarchicalLOpt, LSTMLOpt, MLPLOpt
from es_l2o.lowrank import LowRankPerturbed, materialize
from es_l2o.toy_systems import MatrixFeedback
from es_l2o.unroll import LOptTraining
from populations.quadratic import QuadraticFamily

# w (4, 3) and v (3, 4): rank 3 = min(m, n) is every matrix's full rank
SYSTEM = MatrixFeedback(m=4, n=3, horizon=7)
THETA = SYSTEM.initial_theta(jax.random.key(0))
EXACT = ravel_pytree(jax.grad(SYSTEM.episode_loss)(THETA))[0]


def _relative_error(estimate) -> float:
    return float(jnp.linalg.norm(estimate - EXACT) / jnp.linalg.norm(EXACT))


# -- the estimates' mean: full rank, rank min(m, n), autodiff --------------------------


def _full_es_mean(rank, population_size=16384, repeats=2):
    system = MatrixFeedback(m=4, n=3, horizon=7)
    es = FullES(
        system,
        population_size=population_size,
        std=0.01,
        optimizer=optax.sgd(0.0),
        fitness_shaping="identity",  # shaping would change the expectation
        meta_loss="train_mean",
        rank=rank,
    )
    state = es.init(jax.random.key(0), THETA)
    keys = jax.random.split(jax.random.key(1), repeats)
    grads = [ravel_pytree(es.gradient(k, state)[0])[0] for k in keys]
    return jnp.mean(jnp.stack(grads), axis=0)


def test_full_es_low_rank_matches_full_rank_and_autodiff():
    # std 0.01 on a smooth objective: both estimate the gradient of the episode loss
    full, low = _full_es_mean(None), _full_es_mean(3)
    assert _relative_error(full) < 0.1
    assert _relative_error(low) < 0.1
    rel = float(jnp.linalg.norm(low - full) / jnp.linalg.norm(full))
    assert rel < 0.15, rel


@pytest.mark.parametrize(("cls", "rank"), [(PES, 3), (NoiseReuseES, 1)])
def test_truncated_low_rank_matches_autodiff(cls, rank):
    # as tests/test_truncated_es.py: episodes of 7, truncations of 3, 7 truncations
    es = cls(
        SYSTEM,
        population_size=4096,
        std=0.01,
        optimizer=optax.sgd(0.0),
        truncation_length=3,
        rank=rank,
        theta=THETA,
    )

    def estimate(key):
        state = es._make_state(key, THETA)

        def body(state, k):
            grad, aux = es.gradient(k, state)
            return aux["state"], ravel_pytree(grad)[0]

        keys = jax.random.split(jax.random.fold_in(key, 1), 7)
        return jnp.mean(jax.lax.scan(body, state, keys)[1], axis=0)

    estimates = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(2), 4))
    assert _relative_error(jnp.mean(estimates, axis=0)) < 0.1


def test_unit_perturbation_has_identity_covariance():
    layout = LowRankLayout(SYSTEM.theta_template, rank=2)
    factors = jax.random.normal(jax.random.key(0), (20000, layout.num_factors))
    z = layout.expand(factors)
    cov = np.cov(np.asarray(z), rowvar=False)
    assert np.allclose(cov, np.eye(layout.num_dims), atol=0.05)


# -- particles run the shared base: no P x D theta -----------------------------------

P = 8
HIER = HierarchicalLOpt(lstm_size=16, bank_size=4, mix_size=16)


def _largest_matrix(theta) -> int:
    return max(int(np.prod(x.shape)) for x in jax.tree.leaves(theta) if x.ndim >= 2)


def _shapes(jaxpr):
    """Every intermediate array's shape, sub-programs (scan, cond, jit) included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _shapes(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _shapes(sub)


def _per_particle_thetas(es, theta) -> list:
    """Arrays of the meta-step with a particle axis and at least P matrices' worth
    of entries (P copies of the largest theta matrix or more)."""
    del theta  # shapes alone: nothing is compiled or allocated
    key = jax.eval_shape(lambda: jax.random.key(0))
    jaxpr = jax.make_jaxpr(es.step)(key, es.state_template()).jaxpr
    floor = P * _largest_matrix(es.theta_template)
    return [s for s in _shapes(jaxpr) if P in s and int(np.prod(s)) >= floor]


def _mixture(rank, weights=(1.0, 1.0)):
    """PES over 3-d and 5-d quadratics, 2 P particles split by `weights`."""
    systems = [
        LOptTraining(QuadraticFamily(dim=d), HIER, (4, 8), stagger=True) for d in (3, 5)
    ]
    return MultiFamilyES.build(
        PES, systems, weights, population_size=2 * P, truncation_length=2, rank=rank
    )


@pytest.mark.parametrize("kind", ["full_es", "pes", "mixture"])
def test_low_rank_step_never_builds_per_particle_thetas(kind):
    system = LOptTraining(QuadraticFamily(dim=3), HIER, (4, 8), stagger=kind == "pes")
    theta = HIER.init(jax.random.key(0))

    def make(rank):
        if kind == "full_es":
            return FullES(system, population_size=P, num_steps=4, rank=rank)
        if kind == "mixture":
            return _mixture(rank)
        return PES(system, population_size=P, truncation_length=2, rank=rank)

    assert _per_particle_thetas(make(None), theta)  # the check sees full rank's
    assert _per_particle_thetas(make(2), theta) == []


def _largest_array_drawing_normals(hlo: str) -> int:
    """The most entries of any float32 array in an XLA computation that also turns
    random bits into normals (erf_inv), over the compiled program's computations."""
    largest = 0
    for body in re.split(r"\n(?=%\S+ \()", hlo):
        if "erf_inv" in body:
            dims = re.findall(r"f32\[([\d,]*)\]", body)
            sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in dims]
            largest = max(largest, *sizes)
    return largest


def test_low_rank_factors_are_drawn_once_not_again_in_the_score_update():
    # fused into the pairs' dense score update, the normal draw would run once per
    # score entry: the computations that draw hold no more than the M x E factors
    system = LOptTraining(QuadraticFamily(dim=3), HIER, (4, 8), stagger=True)
    es = PES(system, population_size=P, truncation_length=2, rank=1)
    key = jax.eval_shape(lambda: jax.random.key(0))
    hlo = es.step.lower(key, es.state_template()).compile().as_text()
    layout = es.store.layout
    assert max(leaf.size for leaf in layout.leaves) > layout.num_factors
    assert 0 < _largest_array_drawing_normals(hlo) <= P // 2 * layout.num_factors


def test_low_rank_mixture_sums_its_families_estimates():
    es = _mixture(rank=2, weights=(1.0, 3.0))
    assert es.population_sizes == (P // 2, 3 * P // 2)
    state = es.init(jax.random.key(0), HIER.init(jax.random.key(1)))
    key = jax.random.key(2)
    grad = ravel_pytree(es.gradient(key, state)[0])[0]
    parts = [
        ravel_pytree(e.gradient(es.family_key(key, i), family_state(state, i))[0])[0]
        for i, e in enumerate(es.estimators)
    ]
    assert float(jnp.linalg.norm(parts[0] - parts[1])) > 0  # two different estimates
    np.testing.assert_allclose(
        grad, 0.25 * parts[0] + 0.75 * parts[1], rtol=1e-5, atol=1e-7
    )


def test_learned_optimizers_read_low_rank_theta_as_its_matrix():
    # the hierarchical optimizer multiplies its matrices through `dense`
    template = jax.eval_shape(HIER.init, jax.random.key(0))
    layout = LowRankLayout(template, rank=2)
    t, h = 3, HIER.lstm_size

    @jax.jit
    def compare(key):
        keys = jax.random.split(key, 3)
        flat, unravel = ravel_pytree(jax.tree.map(jnp.zeros_like, template))
        theta = unravel(0.1 * jax.random.normal(keys[0], flat.shape))
        factors = layout.draw(keys[1])
        low = layout.theta(theta, factors, 0.3)
        assert isinstance(low["lstm"]["w"], LowRankPerturbed)
        inputs = jax.random.normal(keys[2], (t, HIER.num_tensor_features))
        state = (jnp.zeros((t, h)), jnp.zeros((t, h)))
        network = HIER.tensor_network
        got, want = (
            network(low, inputs, *state),
            network(materialize(low), inputs, *state),
        )
        perturbed = ravel_pytree(theta)[0] + 0.3 * layout.expand(factors)
        return got, want, ravel_pytree(materialize(low))[0], perturbed

    got, want, formed, perturbed = compare(jax.random.key(0))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(formed, perturbed, atol=1e-6)


@pytest.mark.parametrize(
    "lopt",
    [MLPLOpt(hidden_sizes=(4,)), LSTMLOpt(hidden_sizes=(4,)), DeepMomentumLOpt()],
    ids=lambda lopt: lopt.name,
)
def test_other_learned_optimizers_take_low_rank_theta(lopt):
    # they read theta entry by entry and form each perturbed (small) matrix
    template = jax.eval_shape(lopt.init, jax.random.key(0))
    layout = LowRankLayout(template, rank=1)
    params = {"w": jnp.ones((3, 2))}

    def update(theta, factors):
        low = layout.theta(theta, factors, 0.3)
        opt = lopt.transform(low, 10)
        return opt.update(params, opt.init(params), params, value=jnp.ones(()))[0]

    factors = jax.ShapeDtypeStruct((layout.num_factors,), jnp.float32)
    assert jax.eval_shape(update, template, factors)["w"].shape == (3, 2)


# -- settings --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [-1, 1.5, "2", True])
def test_bad_rank_names_the_value(rank):
    with pytest.raises(ValueError, match=rf"rank must be .*got {rank!r}"):
        check_rank(rank)


def test_rank_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"rank=2 needs algorithm='Open_ES'.*SNES"):
        FullES(SYSTEM, population_size=4, algorithm="SNES", rank=2)
    with pytest.raises(ValueError, match=r"rank=2 needs noise='stored'.*'keys'"):
        PES(SYSTEM, population_size=4, noise="keys", rank=2, theta=THETA)
    assert FullES(SYSTEM, population_size=4, rank=0).rank is None
