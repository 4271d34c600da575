"""Truncated ES over long unrolls: one driver, `TruncatedEstimator`, and its three
estimators `PES`, `TruncatedES` and `NoiseReuseES`.

PES: Vicol, Metz and Sohl-Dickstein 2021 (arXiv 2112.13835). Noise-reuse ES: Li,
Vicol, Metz, Sohl-Dickstein et al. 2023 (arXiv 2304.12180).

One meta-iteration perturbs the mean theta once per antithetic pair, unrolls every
particle one truncation from where it stopped (`es_l2o.es.truncation`), weights each
loss by the perturbations the estimator's rule names (`es_l2o.es.weighting`), sums
the ES gradient over pairs (`es_l2o.es.pairs`) and steps theta with the optax
meta-optimizer. The noise lives in a `es_l2o.es.noise.NoiseStore`: stored rows
(`noise="stored"`) or regenerated from keys (`noise="keys"`). With `pair_chunk` the
population is unrolled and the gradient summed in chunks of pairs, so only
`pair_chunk` perturbed thetas exist at once.

Episodes end at different times for different particles, often inside a truncation:
losses before the reset are weighted by the old episode's accumulated score, losses
after it by the perturbation the new episode ran under alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from es_l2o import sharding
from es_l2o.es import common, pairs, truncation
from es_l2o.es.estimator import (
    SearchState,
    abstract_theta,
    check_theta,
    init_search,
    meta_optimizer,
    search_step,
    zeros,
)
from es_l2o.es.lowrank import LowRankLayout, LowRankStoredNoise, check_rank
from es_l2o.es.noise import make_store
from es_l2o.es.weighting import WEIGHTINGS, Weighting
from es_l2o.unroll import UnrolledSystem


@struct.dataclass
class TruncatedESState:
    """The state of a truncated estimator (M = population_size / 2 pairs).

    es_state: the search distribution (mean theta, std, meta-optimizer state),
        the part `MultiFamilyES` shares between families.
    noise: the noise store's per-pair perturbations (`es_l2o.es.noise`).
    resample: (M,) pairs that draw a new perturbation at the next truncation even
        under noise reuse (their first).
    pair_steps: (M,) inner steps since each pair's accumulator restarted.
    inner: every particle's inner state (leading axis P).
    loss_scale: (P,) each particle's current episode's first training loss (used by
        loss_normalization="initial"; NaN until its first step).
    iteration: meta-iterations applied.
    """

    es_state: SearchState
    noise: Any
    resample: jax.Array
    pair_steps: jax.Array
    inner: Any
    loss_scale: jax.Array
    iteration: jax.Array


class TruncatedEstimator:
    """Truncated ES with per-pair state: the driver of `PES`, `TruncatedES` and
    `NoiseReuseES`, which differ only in their `weighting` rule.

    Args:
        system: the unrolled system (any `UnrolledSystem`; particles keep their
            inner states between meta-iterations).
        weighting: "pes", "tes", "nres" or a `Weighting` (default: the class's).
        population_size: particles (even: antithetic pairs i and i + P/2).
        std: perturbation scale, or a schedule `iteration -> std` (optax schedule).
        optimizer: the optax meta-optimizer applied to the gradient estimate.
        truncation_length: inner steps per particle per meta-iteration (K).
        meta_loss: what each inner step contributes, averaged over the truncation:
            "train_mean" (its training loss), "heldout" (the loss after its update
            on a fresh training batch) or "validation" (the loss after its update on
            the validation split; costs an evaluation per step).
        loss_normalization: "none", "initial" (divide by the first training loss of
            the particle's episode, so tasks of any scale weigh alike) or "log".
        nonfinite_penalty: the bounded value a step contributes when its loss or
            parameters are not finite (the particle and its partner then restart);
            every contribution is also clipped to +-this value.
        max_grad_norm: clip the gradient estimate to this global norm (None: off).
        noise: "stored" (per-pair rows in memory, P/2 x D floats twice) or "keys"
            (regenerated from counters: a few integers per pair; exact for a
            constant std, while a std schedule changes it the score of earlier
            truncations is taken at the current std).
        pair_chunk: unroll and sum the gradient over this many pairs at a time
            (None: all at once); with noise="keys" memory is then independent of P.
        walk_depth: keyed PES: log2 of the longest episode in truncations
            (default: from the system's max_horizon, else 20).
        rank: low-rank perturbations (`es_l2o.es.lowrank`): every matrix of theta
            is perturbed by a rank-`rank` product evaluated on the shared mean
            (no particle's theta is formed); needs noise="stored" (per-pair
            factors, the accumulated scores dense per pair). None or 0: full rank.
        mesh: a `es_l2o.sharding.population_mesh`: particles and their inner
            states are split over its devices (None: wherever JAX puts them).
        theta: theta's shapes (see `es_l2o.es.estimator.abstract_theta`; default:
            the system's).

    The raw estimate is read with `gradient(key, state) -> (grad, {"state":
    next_state, "metrics": ...})`, which advances the particles without moving
    theta.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from es_l2o.toy_systems import InfluenceBalancing
        >>> es = TruncatedEstimator(
        ...     InfluenceBalancing(), weighting="nres", population_size=4,
        ...     truncation_length=2, theta=jax.ShapeDtypeStruct((), jnp.float32))
        >>> state = es.init(jax.random.key(0), jnp.asarray(0.5))
        >>> state, metrics = es.step(jax.random.key(1), state)
        >>> int(state.iteration), state.noise.pert.shape
        (1, (2, 1))
    """

    weighting: ClassVar[Weighting] = WEIGHTINGS["pes"]

    def __init__(
        self,
        system: UnrolledSystem,
        *,
        population_size: int,
        weighting: str | Weighting | None = None,
        std: float | Callable[[int], float] = 0.01,
        optimizer: optax.GradientTransformation | None = None,
        truncation_length: int = 20,
        meta_loss: str = "train_mean",
        loss_normalization: str = "none",
        nonfinite_penalty: float = 1e3,
        max_grad_norm: float | None = None,
        noise: str = "stored",
        pair_chunk: int | None = None,
        walk_depth: int | None = None,
        rank: int | None = None,
        mesh: Mesh | None = None,
        theta=None,
    ):
        self.population_size = int(population_size)
        self.rank = check_rank(rank)
        if self.rank is not None and noise != "stored":
            raise ValueError(
                f"rank={rank} needs noise='stored' (low-rank factors per pair), got "
                f"noise={noise!r}"
            )
        truncation.check_settings(
            system,
            self.population_size,
            truncation_length,
            meta_loss=meta_loss,
            loss_normalization=loss_normalization,
            noise=noise,
            mesh=mesh,
            max_grad_norm=max_grad_norm,
            nonfinite_penalty=nonfinite_penalty,
        )
        self.std_schedule, self.std = truncation.std_schedule_of(std)
        if weighting is not None:
            self.weighting = common.choose_rule(weighting, WEIGHTINGS, "weighting")
        self.system, self.mesh, self.noise = system, mesh, noise
        self.num_pairs = self.population_size // 2
        self.truncation_length, self.meta_loss = truncation_length, meta_loss
        self.loss_normalization = loss_normalization
        self.nonfinite_penalty = float(nonfinite_penalty)
        self.max_grad_norm = max_grad_norm
        self.optimizer = meta_optimizer(optimizer, max_grad_norm, optax.adam(1e-3))
        self.theta_template = abstract_theta(system, theta)
        flat, self.unravel = ravel_pytree(zeros(self.theta_template))
        self.num_dims = int(flat.size)
        self.pair_chunk = truncation.pair_chunk_of(pair_chunk, self.num_pairs)
        self.store, self.population = self._population(walk_depth)
        self.step = jax.jit(self._step)
        #: `step` that consumes its state: the new state is written into the old
        #: one's buffers (`es_l2o.meta.train` runs this)
        self.step_in_place = jax.jit(self._step, donate_argnums=1)
        self.gradient = jax.jit(self._gradient)
        self._init_inner = jax.jit(
            lambda key, theta: pairs.init_particles(
                system, key, theta, 2 * self.num_pairs
            )
        )
        self._init_search = jax.jit(
            lambda theta: init_search(theta, self.optimizer, self.std_schedule)
        )

    def _population(self, walk_depth: int | None):
        """The noise store and the pair population, built once from the settings."""
        if walk_depth is None and self.noise == "keys":
            walk_depth = truncation.walk_depth_for(self.system, self.truncation_length)
        spec = sharding.pair_sharding(self.mesh, self.num_pairs)
        layout = None
        if self.rank is None:
            store = make_store(
                self.noise,
                self.num_pairs,
                self.num_dims,
                spec=spec,
                walk_depth=walk_depth,
            )
        else:
            layout = LowRankLayout(self.theta_template, self.rank)
            store = LowRankStoredNoise(layout, self.num_pairs, spec)
        unroll = truncation.Truncation(
            self.system,
            self.truncation_length,
            self.meta_loss,
            self.loss_normalization,
            self.nonfinite_penalty,
        )
        population = pairs.PairPopulation(
            store,
            self.weighting,
            unroll,
            self.unravel,
            self.mesh,
            self.pair_chunk,
            layout,
        )
        return store, population

    # -- the state ------------------------------------------------------------------

    def _make_state(self, key, theta) -> TruncatedESState:
        key_es, key_inner = jax.random.split(key)
        m = self.num_pairs
        state = TruncatedESState(
            es_state=self._init_search(theta),
            noise=self.store.init(key_es),
            resample=jnp.ones((m,), bool),
            pair_steps=jnp.zeros((m,), jnp.int32),
            inner=self._init_inner(key_inner, theta),
            loss_scale=jnp.full((self.population_size,), jnp.nan),
            iteration=jnp.zeros((), jnp.int32),
        )
        return common.strong_types(state)

    def state_template(self) -> TruncatedESState:
        """The abstract state of `init` (shapes and dtypes only)."""
        return jax.eval_shape(self._make_state, jax.random.key(0), self.theta_template)

    def init(self, key: jax.Array, theta) -> TruncatedESState:
        """Estimator state centred on `theta`; every particle starts its first episode
        (staggered as the system says), antithetic partners on the same task."""
        check_theta(self.theta_template, theta)
        # checked on shapes first: the stored per-pair rows (P/2 x D, twice) are the
        # largest arrays of all, and nothing is allocated before the check passes
        abstract = jax.eval_shape(self._make_state, key, theta)
        common.check_population_memory(
            self.system,
            theta,
            self.population_size,
            self.mesh,
            (abstract.es_state, abstract.noise, abstract.pair_steps),
        )
        state = self._place(self._make_state(key, theta))
        return common.distinct_arrays(state, jax.tree.leaves(theta))

    def _place(self, state: TruncatedESState) -> TruncatedESState:
        """Particles' inner states split over the mesh, the rest replicated (stored
        rows split over the devices that run their pairs)."""
        noise = self.store.place(state.noise, self.mesh)
        state = sharding.put_replicated(state.replace(noise=None), self.mesh)
        if self.mesh is None or self.mesh.devices.size == 1:
            return state.replace(noise=noise)
        split = NamedSharding(self.mesh, PartitionSpec(sharding.POPULATION_AXIS))
        return state.replace(
            noise=noise,
            inner=jax.device_put(state.inner, split),
            loss_scale=jax.device_put(state.loss_scale, split),
        )

    def theta(self, state: TruncatedESState):
        """The current mean meta-parameters."""
        return self.unravel(state.es_state.mean)

    # -- one truncation of the whole population -------------------------------------

    def _estimate(self, key, state: TruncatedESState):
        key_noise, key_unroll = jax.random.split(key)
        rule, store, std = self.weighting, self.store, state.es_state.std
        draw = rule.draws(state.resample)
        noise = store.advance(state.noise, key_noise, std, draw, rule)
        population = self.population
        rows, per = population.rows(noise, std)
        mean, inner, scale = state.es_state.mean, state.inner, state.loss_scale
        inner, scale, out = population.unroll(
            mean, noise, std, inner, scale, key_unroll, rows, per
        )
        grad = population.gradient(noise, std, out, rows, per)
        reset = pairs.either(out["reset"])
        steps_after_reset = pairs.larger(out["steps_after_reset"])
        counts = truncation.pair_step_counts(
            state.pair_steps, reset, steps_after_reset, self.truncation_length
        )
        noise = store.restart(noise, reset, std, rule)
        state = state.replace(
            noise=noise,
            resample=jnp.zeros_like(draw),
            pair_steps=counts,
            inner=inner,
            loss_scale=scale,
        )
        metrics = truncation.truncation_metrics(out, grad, std)
        if self.noise == "keys" and rule.accumulates:  # a Brownian path per pair
            metrics["noise_overflow"] = store.overflow(noise, rule)
        return grad, state, metrics

    def _gradient(self, key, state):
        grad, new_state, metrics = self._estimate(key, state)
        return self.unravel(grad), {
            "state": common.strong_types(new_state),
            "metrics": metrics,
        }

    def _step(self, key, state: TruncatedESState):
        grad, state, metrics = self.estimate(key, state)
        es_state = self.apply_gradient(state.es_state, grad)
        norm, finite = common.norm_and_finite(es_state.mean)
        metrics["theta_norm"], metrics["theta_finite"] = norm, finite
        return self.finish(state.replace(es_state=es_state)), metrics

    # -- the pieces of a step, for estimators that combine several (MultiFamilyES) --

    def estimate(self, key: jax.Array, state: TruncatedESState):
        """One truncation of every particle and its flat gradient estimate, not
        applied: `(grad (D,), state with advanced particles, metrics)`."""
        state = state.replace(
            noise=self.store.constrain(state.noise),
            inner=sharding.shard_population(state.inner, self.mesh),
            loss_scale=sharding.shard_population(state.loss_scale, self.mesh),
        )
        return self._estimate(key, state)

    def apply_gradient(self, es_state: SearchState, grad: jax.Array) -> SearchState:
        """One meta-optimizer step of the mean; a non-finite gradient is dropped."""
        return search_step(self.optimizer, self.std_schedule, es_state, grad)

    def finish(self, state: TruncatedESState) -> TruncatedESState:
        """Places the state after an update and counts the iteration."""
        mesh = self.mesh
        state = state.replace(
            es_state=sharding.replicate(state.es_state, mesh),
            noise=self.store.constrain(state.noise, replicate=True, mesh=mesh),
            resample=sharding.replicate(state.resample, mesh),
            pair_steps=sharding.replicate(state.pair_steps, mesh),
            inner=sharding.shard_population(state.inner, mesh),
            loss_scale=sharding.shard_population(state.loss_scale, mesh),
            iteration=state.iteration + 1,
        )
        return common.strong_types(state)


class PES(TruncatedEstimator):
    """Persistent ES with a per-pair accumulator (unbiased over whole episodes).

    The gradient estimate is the mean over pairs of (L+ - L-) times the sum of the
    pair's perturbations since its episode began / (2 std^2); a pair's accumulator
    restarts when its episode ends, inside a truncation if need be. Arguments as
    `TruncatedEstimator`.

    Example:
        >>> import jax, optax
        >>> from es_l2o.lopt import MLPLOpt
        >>> from es_l2o.unroll import LOptTraining
        >>> from populations.quadratic import QuadraticFamily
        >>> lopt = MLPLOpt(hidden_sizes=(8,))
        >>> system = LOptTraining(QuadraticFamily(), lopt, (10, 40), stagger=True)
        >>> es = PES(system, population_size=8, std=0.01, optimizer=optax.adam(1e-3),
        ...          truncation_length=5)
        >>> state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        >>> state, metrics = es.step(jax.random.key(2), state)
        >>> bool(metrics["theta_finite"]), int(state.iteration)
        (True, 1)
    """

    weighting = WEIGHTINGS["pes"]


class TruncatedES(TruncatedEstimator):
    """Truncated ES: each truncation scored against its own perturbation only.

    Biased towards short-horizon behaviour (the baseline PES corrects). Arguments
    as `TruncatedEstimator`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from es_l2o.toy_systems import InfluenceBalancing
        >>> es = TruncatedES(InfluenceBalancing(), population_size=4,
        ...                  theta=jax.ShapeDtypeStruct((), jnp.float32))
        >>> es.weighting.name
        'tes'
    """

    weighting = WEIGHTINGS["tes"]


class NoiseReuseES(TruncatedEstimator):
    """Noise-reuse ES: one perturbation per pair per episode (unbiased like PES).

    A particle whose episode ends inside a truncation switches to a fresh
    perturbation from the step its new episode starts, so the system must say when
    that is (`episode_done`; systems that never reset need not). Arguments as
    `TruncatedEstimator`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from es_l2o.toy_systems import InfluenceBalancing
        >>> es = NoiseReuseES(InfluenceBalancing(), population_size=4, noise="keys",
        ...                   theta=jax.ShapeDtypeStruct((), jnp.float32))
        >>> es.weighting.reuses
        True
    """

    weighting = WEIGHTINGS["nres"]
