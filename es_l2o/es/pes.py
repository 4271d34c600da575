"""Truncated ES over long unrolls: PES, truncated ES and noise-reuse ES.

PES: Vicol, Metz and Sohl-Dickstein 2021 (arXiv 2112.13835). Noise-reuse ES: Li,
Vicol, Metz, Sohl-Dickstein et al. 2023 (arXiv 2304.12180).

Every particle keeps its own inner state (its own task, horizon and step counter, see
`es_l2o.unroll.LOptTraining`) across meta-iterations. One meta-iteration perturbs the
mean theta, unrolls every particle `truncation_length` steps from where it stopped
(one `lax.scan` over steps of the vmapped population) and updates theta. Antithetic
partners i and i + P/2 share their task, initialisation and minibatches, so a pair
also ends its episodes together. The three estimators differ in which perturbations
weight a loss:

- `PES`: a fresh perturbation every truncation; a loss is weighted by the sum of all
  perturbations its episode has seen (unbiased for the whole-episode objective).
- `TruncatedES`: a fresh perturbation every truncation; a loss is weighted by the
  current one only (the biased baseline: blind to the truncation's past).
- `NoiseReuseES`: one perturbation per episode, reused by every truncation of it
  (unbiased; less variance than PES where an episode's influence spreads over many
  truncations).

Episodes end at different times for different particles, often inside a truncation:
losses before the reset are weighted by the old episode's accumulator, losses after
it by the perturbation the new episode ran with alone. For PES and truncated ES that
is the truncation's perturbation, from which the new accumulator starts; noise-reuse
ES switches a particle to a fresh perturbation at the step its new episode starts
(`UnrolledSystem.episode_done`), so that every episode runs under one perturbation.

The per-pair accumulators live either in memory (`noise="stored"`, two arrays of
P/2 x D floats) or are regenerated from integer counters and one key
(`noise="keys"`, a few integers per pair): PES's accumulated perturbations are then a
Brownian path evaluated by Levy's midpoint construction, log2(episode truncations)
normal draws per pair, so neither memory nor compute grows with the horizon. With
`pair_chunk` the population is unrolled and the gradient summed in chunks of pairs, so
only `pair_chunk` perturbed thetas exist at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms.distribution_based.base import State as DistributionState
from evosax.algorithms.distribution_based.noise_reuse_es import (
    NoiseReuseES as EvosaxNoiseReuseES,
)
from evosax.algorithms.distribution_based.persistent_es import PersistentES
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct
from jax.sharding import Mesh

from es_l2o import sharding
from es_l2o.es import common
from es_l2o.unroll import UnrolledSystem

#: what a truncation is scored by (each averaged over the truncation's steps)
META_LOSSES = ("train_mean", "heldout", "validation")
#: per-task normalisation of every step's meta-loss
LOSS_NORMALIZATIONS = ("none", "initial", "log")
#: where per-pair perturbation accumulators live
NOISE_MODES = ("stored", "keys")
#: default Brownian-path depth for keys-mode PES on systems that never reset
DEFAULT_WALK_DEPTH = 20
_LOG_FLOOR = 1e-8


# ------------------------------------------------------------------------------------
# evosax algorithms with per-pair accumulators and counters


@struct.dataclass
class TruncatedState(DistributionState):
    """evosax state of the per-particle algorithms (M = population_size / 2 pairs).

    pert, score: stored mode only (else None): each pair's current perturbation of
        the positive partner (M, D) and its episode's accumulated score
        sum(eps / std^2) over the distinct perturbations the episode has seen.
    noise_key, episode, index, carry_episode, carry_index, has_carry: keys mode
        only: the perturbation streams that regenerate pert and score (PES's
        carry: the truncation perturbation a new episode began under).
    resample: (M,) draw a new perturbation at the next ask (noise reuse, first ask).
    inner_step_counter: (M,) inner steps since the pair's accumulator restarted.
    ask_key: the key data of the last ask (stored noise reuse regenerates from it
        the perturbations that episodes starting inside the truncation switch to).
    """

    std: jax.Array
    opt_state: Any
    pert: jax.Array | None
    score: jax.Array | None
    noise_key: jax.Array
    episode: jax.Array
    index: jax.Array
    carry_episode: jax.Array
    carry_index: jax.Array
    has_carry: jax.Array
    resample: jax.Array
    inner_step_counter: jax.Array
    ask_key: jax.Array


def brownian_path(key: jax.Array, n: jax.Array, depth: int, dim: int) -> jax.Array:
    """W(n) of a Gaussian random walk with N(0, I) steps, W(0) = 0, n in [0, 2**depth].

    Levy's construction: W(2**depth) is drawn first, then each level draws the
    midpoint of the interval holding n given its ends (a Brownian bridge), so any
    W(n) costs depth + 1 normal draws and W(n) - W(n - 1) are i.i.d. N(0, I).

    Example:
        >>> w = jax.vmap(lambda n: brownian_path(jax.random.key(0), n, 4, 3))(
        ...     jnp.arange(17))
        >>> bool(jnp.all(w[0] == 0)), w.shape
        (True, (17, 3))
    """
    size = 2**depth
    n = jnp.asarray(n, jnp.int32)
    end = math.sqrt(size) * jax.random.normal(jax.random.fold_in(key, 0), (dim,))

    def level(_, carry):
        a, b, wa, wb, node = carry
        m = (a + b) // 2
        scale = jnp.sqrt((b - a).astype(jnp.float32) / 4.0)
        wm = 0.5 * (wa + wb) + scale * jax.random.normal(
            jax.random.fold_in(key, node), (dim,)
        )
        left = n <= m
        return (
            jnp.where(left, a, m),
            jnp.where(left, m, b),
            jnp.where(left, wa, wm),
            jnp.where(left, wm, wb),
            2 * node + jnp.where(left, 0, 1),
        )

    carry = (jnp.int32(0), jnp.int32(size), jnp.zeros((dim,)), end, jnp.int32(1))
    *_, w, _ = jax.lax.fori_loop(0, depth, level, carry)
    return jnp.where(n == 0, 0.0, w)


class _PerParticleMixin:
    """Per-pair perturbations, accumulators and counters on an evosax algorithm.

    Subclasses set `persistent` (a loss is weighted by every perturbation its
    episode has seen) and `reuse_noise` (one perturbation per episode: an episode
    that starts inside a truncation switches to a new perturbation at once, see
    `switch_on_reset`).
    """

    persistent: ClassVar[bool]
    reuse_noise: ClassVar[bool]

    def __init__(
        self,
        population_size: int,
        solution: Any,
        optimizer: optax.GradientTransformation | None = None,
        std_schedule: Callable | None = None,
        fitness_shaping_fn: Callable = identity_fitness_shaping_fn,
        *,
        noise: str = "stored",
        walk_depth: int | None = None,
        pair_chunk: int | None = None,
    ):
        super().__init__(
            population_size,
            solution,
            optax.adam(1e-3) if optimizer is None else optimizer,
            optax.constant_schedule(0.01) if std_schedule is None else std_schedule,
            fitness_shaping_fn,
        )
        self._setup(noise, walk_depth, pair_chunk)

    def _setup(self, noise: str, walk_depth: int | None, pair_chunk: int | None):
        common.choose(noise, dict.fromkeys(NOISE_MODES), "noise mode")
        self.noise = noise
        self.walk_depth = DEFAULT_WALK_DEPTH if walk_depth is None else int(walk_depth)
        if not 1 <= self.walk_depth <= 30:
            raise ValueError(f"walk_depth must lie in [1, 30], got {walk_depth}")
        self.num_pairs = self.population_size // 2
        chunk = self.num_pairs if pair_chunk is None else int(pair_chunk)
        if chunk < 1 or self.num_pairs % chunk:
            raise ValueError(
                f"pair_chunk must divide the number of pairs {self.num_pairs}, "
                f"got {pair_chunk}"
            )
        self.pair_chunk = chunk
        #: where stored per-pair rows live (`sharding.pair_sharding`; None: whole)
        self.pair_spec = None

    @property
    def switch_on_reset(self) -> bool:
        """Particles switch to `pair_noise`'s next perturbation when a new episode
        starts inside a truncation (noise reuse: one perturbation per episode)."""
        return self.reuse_noise

    @property
    def uses_walk(self) -> bool:
        """Keys-mode PES regenerates accumulated perturbations as a Brownian path."""
        return self.noise == "keys" and self.persistent and not self.reuse_noise

    def _init(self, key: jax.Array, params) -> TruncatedState:
        del params
        m, d = self.num_pairs, self.num_dims
        stored = self.noise == "stored"
        zeros_md = jnp.zeros((m, d)) if stored else None
        ints = jnp.zeros((m,), jnp.int32)
        return TruncatedState(
            mean=jnp.full((d,), jnp.nan),
            std=jnp.asarray(self.std_schedule(0), jnp.float32),
            opt_state=self.optimizer.init(jnp.zeros(d)),
            pert=zeros_md,
            score=zeros_md,
            noise_key=jax.random.key_data(key),
            episode=ints,
            index=ints,
            carry_episode=ints,
            carry_index=ints,
            has_carry=jnp.zeros((m,), bool),
            resample=jnp.ones((m,), bool),
            inner_step_counter=ints,
            ask_key=jax.random.key_data(key),
            best_solution=jnp.full((d,), jnp.nan),
            best_fitness=jnp.inf,
            generation_counter=0,
        )

    # -- the ask half: draw this truncation's perturbations -------------------------

    def advance_noise(self, key: jax.Array, state: TruncatedState) -> TruncatedState:
        """Draws this truncation's perturbations (all pairs, or those that must)."""
        draw = state.resample if self.reuse_noise else jnp.ones_like(state.resample)
        if self.noise == "stored":
            # split like the stored rows: each device draws only its own pairs
            fresh = state.std * sharding.constrain(
                jax.random.normal(key, state.pert.shape), self.pair_spec
            )
            pert = jnp.where(draw[:, None], fresh, state.pert)
            fresh_score = fresh / state.std**2
            if self.persistent or self.reuse_noise:
                score = jnp.where(draw[:, None], state.score + fresh_score, state.score)
            else:
                score = fresh_score
            return state.replace(
                pert=pert,
                score=score,
                resample=jnp.zeros_like(draw),
                ask_key=jax.random.key_data(key),
            )
        if self.uses_walk:
            return state.replace(index=state.index + 1, resample=jnp.zeros_like(draw))
        episode = jnp.where(draw, state.episode + 1, state.episode)
        return state.replace(episode=episode, resample=jnp.zeros_like(draw))

    def pair_noise(
        self, state: TruncatedState, pairs: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Perturbations of the positive partners of `pairs`, each (c, D):

        (current perturbation, its episode's accumulated score, the perturbation a
        new episode starting inside this truncation uses: the current one, or for
        noise reuse a fresh one).
        """
        if self.noise == "stored":
            pert = state.pert[pairs]
            switch = self._stored_switch(state)[pairs] if self.reuse_noise else pert
            return pert, state.score[pairs], switch
        key = jax.random.wrap_key_data(state.noise_key)
        dim, depth = self.num_dims, self.walk_depth

        def increment_and_path(stream, n):
            paths = jax.vmap(lambda m: brownian_path(stream, m, depth, dim))(
                jnp.stack([n, n - 1])
            )
            return paths[0] - paths[1], paths[0]

        def one(j, episode, index, carry_episode, carry_index, has_carry):
            base = jax.random.fold_in(key, j)
            stream = jax.random.fold_in(base, episode)
            if self.uses_walk:
                z, total = increment_and_path(stream, index)
                carry_stream = jax.random.fold_in(base, carry_episode)
                carry, _ = increment_and_path(carry_stream, carry_index)
                total = total + jnp.where(has_carry, carry, 0.0)
                switch = z
            else:
                z = total = jax.random.normal(stream, (dim,))
                switch = z
                if self.reuse_noise:  # the next episode's stream
                    next_stream = jax.random.fold_in(base, episode + 1)
                    switch = jax.random.normal(next_stream, (dim,))
            return state.std * z, total / state.std, state.std * switch

        return jax.vmap(one)(
            pairs,
            state.episode[pairs],
            state.index[pairs],
            state.carry_episode[pairs],
            state.carry_index[pairs],
            state.has_carry[pairs],
        )

    def _stored_switch(self, state: TruncatedState) -> jax.Array:
        """Stored noise reuse: the fresh perturbations of this truncation (M, D),
        regenerated from the ask key rather than kept in memory."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.ask_key), 1)
        fresh = jax.random.normal(key, state.pert.shape)
        return state.std * sharding.constrain(fresh, self.pair_spec)

    def noise_overflow(self, state: TruncatedState) -> jax.Array:
        """Pairs whose Brownian path ran past 2**walk_depth truncations (keys PES)."""
        if not self.uses_walk:
            return jnp.zeros((), jnp.int32)
        return jnp.sum(state.index > 2**self.walk_depth)

    # -- the tell half --------------------------------------------------------------

    def meta_gradient(
        self,
        state: TruncatedState,
        old_fitness: jax.Array,
        new_fitness: jax.Array,
        noise: tuple | None = None,
        per_particle: bool = False,
    ) -> jax.Array:
        """The flat ES gradient from each pair's loss differences (M,).

        old_fitness: L(+) - L(-) of the losses that belong to the episode running
            when the truncation began (weighted by its accumulated score);
        new_fitness: the same for losses after a reset inside the truncation
            (weighted by the perturbation the new episode used alone).
        noise: `pair_noise` of all pairs if already at hand (else regenerated);
        per_particle: `noise` holds one row per particle (pair i mod M, e.g. split
            over devices), so every pair appears twice.
        """

        def chunk_sum(pairs, d_old, d_new):
            _, score, switch = self.pair_noise(state, pairs)
            return d_old @ score + d_new @ (switch / state.std**2)

        if noise is not None:
            _, score, switch = noise
            if per_particle:  # both partners carry their pair's noise: halve
                old_fitness = 0.5 * jnp.concatenate([old_fitness, old_fitness])
                new_fitness = 0.5 * jnp.concatenate([new_fitness, new_fitness])
            total = old_fitness @ score + new_fitness @ (switch / state.std**2)
            return total / self.population_size

        chunk = self.pair_chunk
        groups = self.num_pairs // chunk
        pairs = jnp.arange(self.num_pairs).reshape(groups, chunk)
        d_old = old_fitness.reshape(groups, chunk)
        d_new = new_fitness.reshape(groups, chunk)
        if groups == 1:
            total = chunk_sum(pairs[0], d_old[0], d_new[0])
        else:

            def body(acc, xs):
                return acc + chunk_sum(*xs), None

            total, _ = jax.lax.scan(
                body, jnp.zeros((self.num_dims,)), (pairs, d_old, d_new)
            )
        return total / self.population_size

    def end_truncation(
        self,
        state: TruncatedState,
        reset: jax.Array,
        steps_after_reset: jax.Array,
        truncation_length: int,
    ) -> TruncatedState:
        """Restarts the accumulators of pairs whose episode ended in this truncation.

        The new episode has seen one perturbation only (the truncation's, or for
        noise reuse the one it switched to), so that becomes its accumulated score.
        """
        counter = jnp.where(
            reset, steps_after_reset, state.inner_step_counter + truncation_length
        )
        state = state.replace(inner_step_counter=counter)
        if self.reuse_noise:  # new episodes keep the perturbation they switched to
            if self.noise == "keys":
                return state.replace(
                    episode=jnp.where(reset, state.episode + 1, state.episode)
                )
            switch = self._stored_switch(state)
            return state.replace(
                pert=jnp.where(reset[:, None], switch, state.pert),
                score=jnp.where(reset[:, None], switch / state.std**2, state.score),
            )
        if not self.persistent:
            return state
        if self.noise == "stored":
            score = jnp.where(reset[:, None], state.pert / state.std**2, state.score)
            return state.replace(score=score)
        return state.replace(
            carry_episode=jnp.where(reset, state.episode, state.carry_episode),
            carry_index=jnp.where(reset, state.index, state.carry_index),
            has_carry=reset | state.has_carry,
            episode=jnp.where(reset, state.episode + 1, state.episode),
            index=jnp.where(reset, 0, state.index),
        )

    def apply_gradient(self, state: TruncatedState, grad: jax.Array) -> TruncatedState:
        """One meta-optimizer step on the mean; a non-finite gradient is dropped."""
        grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
        updates, opt_state = self.optimizer.update(grad, state.opt_state, state.mean)
        return state.replace(
            mean=optax.apply_updates(state.mean, updates),
            opt_state=opt_state,
            std=jnp.asarray(
                self.std_schedule(state.generation_counter + 1), jnp.float32
            ),
            generation_counter=state.generation_counter + 1,
        )

    # -- evosax's ask / tell, for lock-step use without an estimator ----------------

    def _ask(self, key, state, params):
        state = self.advance_noise(key, state)
        pert, _, _ = self.pair_noise(state, jnp.arange(self.num_pairs))
        return state.mean + jnp.concatenate([pert, -pert]), state

    def _tell(self, key, population, fitness, state, params):
        # lock-step semantics of evosax: every pair resets once params.T steps passed
        del key, population
        m = self.num_pairs
        grad = self.meta_gradient(
            state, fitness[:m] - fitness[m:], jnp.zeros((m,), fitness.dtype)
        )
        done = state.inner_step_counter + params.K >= params.T
        state = self.end_truncation(state, done, jnp.zeros_like(state.index), params.K)
        if self.persistent:
            # the next episode starts with the next truncation: nothing carries over
            state = state.replace(has_carry=state.has_carry & ~done)
            if state.score is not None:
                state = state.replace(score=jnp.where(done[:, None], 0.0, state.score))
        state = self.apply_gradient(state, grad)
        # evosax's tell counts the generation itself
        return state.replace(generation_counter=state.generation_counter - 1)


class PerParticlePersistentES(_PerParticleMixin, PersistentES):
    """evosax's PersistentES with an accumulator and step counter per antithetic pair.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> es = PerParticlePersistentES(4, jnp.zeros(3), optax.sgd(0.1))
        >>> state = es.init(jax.random.key(0), jnp.zeros(3), es.default_params)
        >>> state = es.advance_noise(jax.random.key(1), state)
        >>> state.score.shape  # one accumulator per pair
        (2, 3)
    """

    persistent = True
    reuse_noise = False


class PerParticleTruncatedES(PerParticlePersistentES):
    """Truncated ES: PersistentES whose accumulators restart every truncation."""

    persistent = False
    reuse_noise = False


class PerParticleNoiseReuseES(_PerParticleMixin, EvosaxNoiseReuseES):
    """evosax's NoiseReuseES with one perturbation and counter per antithetic pair."""

    persistent = False
    reuse_noise = True


# ------------------------------------------------------------------------------------
# estimators over an UnrolledSystem


@struct.dataclass
class TruncatedESState:
    """Estimator state: the evosax state, every particle's inner state, counters.

    loss_scale: (P,) each particle's current episode's first training loss (used by
        loss_normalization="initial"; NaN until its first step).
    """

    es_state: TruncatedState
    inner: Any
    loss_scale: jax.Array
    iteration: jax.Array


def _where_particles(mask: jax.Array, on_true, on_false):
    """Per particle (leading axis) `on_true` where `mask`, else `on_false`."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, on_true, on_false)


def _end_where(system: UnrolledSystem, mask: jax.Array, states):
    """Ends the episodes of the particles in `mask` (leading axis of `states`)."""
    return _where_particles(mask, jax.vmap(system.end_episode)(states), states)


def _initial_scale(values, losses, resets, finite, scale):
    """Divides (K, n) step values by the first training loss of their episode.

    `scale` (n,) is each particle's episode's first loss before the truncation (NaN
    before its first step); a finite reset step starts a new episode's scale.
    Returns the normalised values and the scale after the truncation.
    """
    steps = jnp.arange(values.shape[0])[:, None]
    first_finite = finite & (jnp.cumsum(finite, axis=0) == 1)
    anchor = finite & (resets | (jnp.isnan(scale)[None, :] & first_finite))
    last = jax.lax.cummax(jnp.where(anchor, steps, -1), axis=0)
    candidates = jnp.maximum(jnp.abs(losses), _LOG_FLOOR)
    picked = jnp.take_along_axis(candidates, jnp.maximum(last, 0), axis=0)
    scales = jnp.where(last >= 0, picked, scale[None, :])
    return values / scales, scales[-1]


class _TruncatedEstimator:
    """Shared implementation of `PES`, `TruncatedES` and `NoiseReuseES`."""

    algorithm_class: ClassVar[type]

    def __init__(
        self,
        system: UnrolledSystem,
        *,
        population_size: int,
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
        mesh: Mesh | None = None,
    ):
        common.choose(meta_loss, dict.fromkeys(META_LOSSES), "meta_loss")
        common.choose(
            loss_normalization, dict.fromkeys(LOSS_NORMALIZATIONS), "loss_normalization"
        )
        common.choose(noise, dict.fromkeys(NOISE_MODES), "noise mode")
        if meta_loss == "validation" and not system.has_validation:
            raise ValueError(
                "meta_loss='validation' needs a population with a validation split; "
                "use 'train_mean' or 'heldout' for this one"
            )
        if not isinstance(truncation_length, int) or truncation_length < 1:
            raise ValueError(
                "truncation_length must be a positive integer, "
                f"got {truncation_length!r}"
            )
        common.check_population(int(population_size), antithetic=True)
        sharding.check_population(int(population_size), mesh)
        self.mesh = mesh
        if callable(std):
            self.std_schedule = std
            std0 = float(std(0))
        else:
            std0 = float(std)
            self.std_schedule = optax.constant_schedule(std0)
        if std0 <= 0:
            raise ValueError(f"std must be > 0, got {std0}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if nonfinite_penalty <= 0 or not math.isfinite(nonfinite_penalty):
            raise ValueError(
                f"nonfinite_penalty must be finite and > 0, got {nonfinite_penalty}"
            )
        self.system = system
        self.population_size = int(population_size)
        self.std = std0
        optimizer = optax.adam(1e-3) if optimizer is None else optimizer
        if max_grad_norm is not None:
            optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)
        self.optimizer = optimizer
        self.truncation_length = truncation_length
        self.meta_loss = meta_loss
        self.loss_normalization = loss_normalization
        self.nonfinite_penalty = float(nonfinite_penalty)
        self.max_grad_norm = max_grad_norm
        self.noise = noise
        self.pair_chunk = pair_chunk
        if walk_depth is None and noise == "keys":
            max_horizon = getattr(system, "max_horizon", None)
            if max_horizon is not None:
                # a stream spans at most ceil(T / K) + 1 truncations of one episode
                walk_depth = max(
                    1, math.ceil(math.log2(-(-max_horizon // truncation_length) + 2))
                )
        self.walk_depth = walk_depth
        self.algorithm = None
        self.step = jax.jit(self._step)
        self.gradient = jax.jit(self._gradient)
        self._init_inner = jax.jit(self._init_inner_states)

    def _build(self, theta):
        if self.algorithm is None:
            algorithm, params = common.make_algorithm(
                self.algorithm_class,
                population_size=self.population_size,
                solution=theta,
                std=self.std,
                optimizer=self.optimizer,
                fitness_shaping="identity",
                noise=self.noise,
                walk_depth=self.walk_depth,
                pair_chunk=self.pair_chunk,
            )
            algorithm.std_schedule = self.std_schedule
            if self.noise == "stored":
                algorithm.pair_spec = sharding.pair_sharding(
                    self.mesh, algorithm.num_pairs
                )
            self.algorithm, self.params = algorithm, params

    def _init_inner_states(self, key, theta):
        keys = common.particle_keys(key, self.population_size, antithetic=True)
        return jax.vmap(lambda k: self.system.init(k, theta))(keys)

    def init(self, key: jax.Array, theta) -> TruncatedESState:
        """Estimator state centred on `theta`; every particle starts its first episode
        (staggered as the system says), antithetic partners on the same task."""
        self._build(theta)
        key_es, key_inner = jax.random.split(key)
        # checked on shapes first: the stored per-pair rows (P/2 x D, twice) are the
        # largest arrays of all, and nothing is allocated before the check passes
        abstract = jax.eval_shape(
            lambda k: self.algorithm.init(k, theta, self.params), key_es
        )
        common.check_population_memory(
            self.system, theta, self.population_size, self.mesh, abstract
        )
        es_state = self.algorithm.init(key_es, theta, self.params)
        state = TruncatedESState(
            es_state=es_state,
            inner=self._init_inner(key_inner, theta),
            loss_scale=jnp.full((self.population_size,), jnp.nan),
            iteration=jnp.zeros((), jnp.int32),
        )
        return self._place(common.strong_types(state))

    def _place(self, state: TruncatedESState) -> TruncatedESState:
        """Particles' inner states split over the mesh, the ES state replicated."""
        state = sharding.put_replicated(state, self.mesh)
        if self.mesh is None or self.mesh.devices.size == 1:
            return state  # one device: XLA returns such arrays as replicated
        spec = self.algorithm.pair_spec
        if spec is not None:
            es_state = state.es_state
            state = state.replace(
                es_state=es_state.replace(
                    pert=jax.device_put(es_state.pert, spec),
                    score=jax.device_put(es_state.score, spec),
                )
            )
        split = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(sharding.POPULATION_AXIS)
        )
        return state.replace(
            inner=jax.device_put(state.inner, split),
            loss_scale=jax.device_put(state.loss_scale, split),
        )

    def theta(self, state: TruncatedESState):
        """The current mean meta-parameters."""
        return self.algorithm.get_mean(state.es_state)

    # -- one truncation of the whole population -------------------------------------

    def _unroll_group(
        self, es_state, pairs, inner, scale, keys, noise=None, per_particle=False
    ):
        """Unrolls the 2c particles of `pairs` (positive partners first) K steps.

        per_particle: `noise` has one row per particle (see `_particle_noise`).
        """
        algorithm, system = self.algorithm, self.system
        half, k = pairs.shape[0], self.truncation_length
        if noise is None:
            noise = algorithm.pair_noise(es_state, pairs)
        pert, _, switch = noise

        def population(pert):
            if per_particle:
                sign = jnp.where(jnp.arange(2 * half) < half, 1.0, -1.0)
                flat = es_state.mean + sign[:, None] * pert
                flat = sharding.shard_population(flat, self.mesh)
            else:
                flat = es_state.mean + jnp.concatenate([pert, -pert])
            return jax.vmap(algorithm._unravel_solution)(flat)

        thetas = population(pert)
        switching = algorithm.switch_on_reset
        # noise reuse: particles whose episode restarts use the next perturbation
        switched_thetas = population(switch) if switching else thetas
        split = "validation" if self.meta_loss == "validation" else "train"
        evaluate = self.meta_loss != "train_mean"
        # (K, 2c) step keys (and as many evaluation keys), drawn outside the loop
        step_keys = jnp.swapaxes(
            jax.vmap(lambda key: jax.random.split(key, 2 * k if evaluate else k))(keys),
            0,
            1,
        )

        def body(carry, xs):
            inner, switched = carry
            step_key, eval_key = xs
            theta = thetas
            if switching:
                switched = switched | jax.vmap(system.episode_done)(inner)
                theta = _where_particles(switched, switched_thetas, thetas)
            inner, out = system.batch_step(step_key, theta, inner)
            # keep antithetic partners in step: when one fails, both restart
            lone = out.finite & ~jnp.roll(out.finite, half)
            inner = jax.lax.cond(
                jnp.any(lone), lambda s: _end_where(system, lone, s), lambda s: s, inner
            )
            if evaluate:
                value = jax.vmap(lambda q, th, s: system.meta_loss(q, th, s, split))(
                    eval_key, theta, inner
                )
            else:
                value = out.loss
            return (inner, switched), (value, out.loss, out.reset, out.finite)

        xs = (step_keys[:k], step_keys[k:] if evaluate else step_keys)
        switched = jnp.zeros((2 * half,), bool)
        (inner, _), (values, losses, resets, finite) = jax.lax.scan(
            body, (inner, switched), xs
        )
        steps = jnp.arange(k)[:, None]
        if self.loss_normalization == "initial":
            values, scale = _initial_scale(values, losses, resets, finite, scale)
        elif self.loss_normalization == "log":
            values = jnp.log(jnp.maximum(values, _LOG_FLOOR))
        penalty = self.nonfinite_penalty
        ok = finite & jnp.isfinite(values)
        values = jnp.where(ok, jnp.clip(values, -penalty, penalty), penalty)
        first_reset = jnp.where(jnp.any(resets, axis=0), jnp.argmax(resets, axis=0), k)
        old = steps < first_reset[None, :]
        out = {
            "old": jnp.sum(jnp.where(old, values, 0.0), axis=0) / k,
            "new": jnp.sum(jnp.where(old, 0.0, values), axis=0) / k,
            "reset": first_reset < k,
            "steps_after_reset": k - first_reset,
            "nonfinite": jnp.sum(~finite, axis=0),
            "raw_sum": jnp.sum(jnp.where(finite, losses, 0.0), axis=0),
            "finite_steps": jnp.sum(finite, axis=0),
        }
        return inner, scale, out

    def _unroll(self, es_state, inner, scale, key, noise=None, per_particle=False):
        """Unrolls the population in groups of `pair_chunk` pairs."""
        m = self.population_size // 2
        chunk = self.algorithm.pair_chunk
        groups = m // chunk
        keys = common.particle_keys(key, self.population_size, antithetic=True)
        pairs = jnp.arange(m).reshape(groups, chunk)
        if groups == 1:
            return self._unroll_group(
                es_state, pairs[0], inner, scale, keys, noise, per_particle
            )

        def to_groups(x):  # (P, ...) -> (G, 2c, ...), partners inside one group
            x = x.reshape((2, groups, chunk) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1).reshape((groups, 2 * chunk) + x.shape[3:])

        def from_groups(x):
            x = x.reshape((groups, 2, chunk) + x.shape[2:])
            return jnp.swapaxes(x, 0, 1).reshape((2 * m,) + x.shape[3:])

        def group(xs):
            group_pairs, group_inner, group_scale = xs
            group_keys = keys[jnp.concatenate([group_pairs, group_pairs + m])]
            return self._unroll_group(
                es_state, group_pairs, group_inner, group_scale, group_keys
            )

        outs = jax.lax.map(
            group, (pairs, jax.tree.map(to_groups, inner), to_groups(scale))
        )
        return jax.tree.map(from_groups, outs)

    def _estimate(self, key, state: TruncatedESState):
        key_noise, key_unroll = jax.random.split(key)
        algorithm = self.algorithm
        es_state = algorithm.advance_noise(key_noise, state.es_state)
        m = self.population_size // 2
        # without chunks, draw (or regenerate) every pair's noise once for both uses;
        # over several devices, each device makes its own particles' rows
        whole = algorithm.pair_chunk == m
        per_particle = whole and sharding.population_devices(self.mesh) > 1
        noise = None
        if per_particle:
            noise = self._particle_noise(es_state)
        elif whole:
            noise = algorithm.pair_noise(es_state, jnp.arange(m))
        inner, scale, out = self._unroll(
            es_state, state.inner, state.loss_scale, key_unroll, noise, per_particle
        )
        grad = algorithm.meta_gradient(
            es_state,
            out["old"][:m] - out["old"][m:],
            out["new"][:m] - out["new"][m:],
            noise,
            per_particle,
        )
        reset = out["reset"][:m] | out["reset"][m:]
        steps_after = jnp.maximum(
            out["steps_after_reset"][:m], out["steps_after_reset"][m:]
        )
        es_state = algorithm.end_truncation(
            es_state, reset, steps_after, self.truncation_length
        )
        fitness = out["old"] + out["new"]
        metrics = {
            "meta_loss": jnp.mean(fitness),
            "meta_loss_min": jnp.min(fitness),
            "meta_loss_max": jnp.max(fitness),
            "train_loss": jnp.sum(out["raw_sum"])
            / jnp.maximum(jnp.sum(out["finite_steps"]), 1),
            "resets": jnp.sum(out["reset"]),
            "nonfinite_steps": jnp.sum(out["nonfinite"]),
            "nonfinite_particles": jnp.sum(out["nonfinite"] > 0),
            "grad_norm": jnp.linalg.norm(grad),
            "grad_finite": jnp.all(jnp.isfinite(grad)),
            "std": es_state.std,
        }
        if algorithm.uses_walk:
            metrics["noise_overflow"] = algorithm.noise_overflow(es_state)
        new_state = TruncatedESState(
            es_state=es_state, inner=inner, loss_scale=scale, iteration=state.iteration
        )
        return grad, new_state, metrics

    def _split_rows(self, es_state, replicate: bool = False):
        """Stored per-pair rows split over the devices that run their pairs (and,
        with `replicate`, the rest of the ES state whole on every device)."""
        spec = self.algorithm.pair_spec
        if spec is None:
            return sharding.replicate(es_state, self.mesh) if replicate else es_state
        rows = {"pert": es_state.pert, "score": es_state.score}
        if replicate:
            es_state = sharding.replicate(
                es_state.replace(pert=None, score=None), self.mesh
            )
        return es_state.replace(**sharding.constrain(rows, spec))

    def _particle_noise(self, es_state):
        """`pair_noise` with one row per particle (pair i mod M), split over the
        mesh: each device regenerates (keys) or repeats from its own block of the
        split stored rows (stored) only its own particles' rows, and no device holds
        every pair's (M, D) noise."""
        algorithm = self.algorithm
        spec = algorithm.pair_spec
        if spec is not None:  # stored rows: repeat each device's block, no gather
            both = jax.sharding.NamedSharding(
                spec.mesh, jax.sharding.PartitionSpec("sign", "pairs")
            )

            def rows(x):  # (M, D) pair rows -> (P, D) particle rows
                x = sharding.constrain(jnp.broadcast_to(x[None], (2, *x.shape)), both)
                return sharding.shard_population(x.reshape(-1, x.shape[-1]), self.mesh)

            pert = rows(es_state.pert)
            switch = (
                rows(algorithm._stored_switch(es_state))
                if algorithm.reuse_noise
                else pert
            )
            return pert, rows(es_state.score), switch
        m = self.population_size // 2
        particles = sharding.shard_population(
            jnp.arange(self.population_size) % m, self.mesh
        )
        noise = algorithm.pair_noise(es_state, particles)
        return sharding.shard_population(noise, self.mesh)

    def _gradient(self, key, state):
        grad, new_state, metrics = self._estimate(key, state)
        return self.algorithm._unravel_solution(grad), {
            "state": common.strong_types(new_state),
            "metrics": metrics,
        }

    def _step(self, key, state: TruncatedESState):
        grad, state, metrics = self.estimate(key, state)
        es_state = self.apply_gradient(state.es_state, grad)
        mean = es_state.mean
        metrics["theta_norm"] = jnp.linalg.norm(mean)
        metrics["theta_finite"] = jnp.all(jnp.isfinite(mean))
        return self.finish(state.replace(es_state=es_state)), metrics

    # -- the pieces of a step, for estimators that combine several (MultiFamilyES) --

    def estimate(self, key: jax.Array, state: TruncatedESState):
        """One truncation of every particle and its flat gradient estimate, not
        applied: `(grad (D,), state with advanced particles, metrics)`."""
        state = state.replace(
            es_state=self._split_rows(state.es_state),
            inner=sharding.shard_population(state.inner, self.mesh),
            loss_scale=sharding.shard_population(state.loss_scale, self.mesh),
        )
        return self._estimate(key, state)

    def apply_gradient(self, es_state: TruncatedState, grad: jax.Array):
        """One meta-optimizer step of the evosax state with a flat gradient."""
        return self.algorithm.apply_gradient(es_state, grad)

    def finish(self, state: TruncatedESState) -> TruncatedESState:
        """Places the state after an update and counts the iteration."""
        state = state.replace(
            es_state=self._split_rows(state.es_state, replicate=True),
            inner=sharding.shard_population(state.inner, self.mesh),
            loss_scale=sharding.shard_population(state.loss_scale, self.mesh),
            iteration=state.iteration + 1,
        )
        return common.strong_types(state)


_ESTIMATOR_ARGS = """
    Args:
        system: the unrolled system (any `UnrolledSystem`; particles keep their
            inner states between meta-iterations).
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
        noise: "stored" (per-pair accumulators in memory, P/2 x D floats twice) or
            "keys" (regenerated from counters: a few integers per pair; exact for
            a constant std, while a std schedule changes it the score of earlier
            truncations is taken at the current std).
        pair_chunk: unroll and sum the gradient over this many pairs at a time
            (None: all at once); with noise="keys" memory is then independent of P.
        walk_depth: keys-mode PES: log2 of the longest episode in truncations
            (default: from the system's max_horizon, else 20).
        mesh: a `es_l2o.sharding.population_mesh`: particles and their inner
            states are split over its devices (None: wherever JAX puts them).
"""


class PES(_TruncatedEstimator):
    __doc__ = (
        """Persistent ES with a per-particle accumulator (unbiased over episodes).

    The gradient estimate is mean over pairs of (L+ - L-) * sum of the pair's
    perturbations since its episode began / (2 std^2); a pair's accumulator restarts
    when its episode ends, inside a truncation if need be. The raw estimate is read
    with `gradient(key, state) -> (grad, {"state": next_state, "metrics": ...})`,
    which advances the particles without moving theta.
"""
        + _ESTIMATOR_ARGS
        + """
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
    )

    algorithm_class = PerParticlePersistentES


class TruncatedES(_TruncatedEstimator):
    __doc__ = (
        """Truncated ES: each truncation scored against its own perturbation only.

    Biased towards short-horizon behaviour (the baseline PES corrects); same
    surface as `PES`.
"""
        + _ESTIMATOR_ARGS
    )

    algorithm_class = PerParticleTruncatedES


class NoiseReuseES(_TruncatedEstimator):
    __doc__ = (
        """Noise-reuse ES: one perturbation per particle per episode.

    Unbiased like `PES`; same surface as `PES`. A particle whose episode ends
    inside a truncation switches to a fresh perturbation from the step its new
    episode starts, so the system must say when that is (`episode_done`; systems
    that never reset need not).
"""
        + _ESTIMATOR_ARGS
    )

    algorithm_class = PerParticleNoiseReuseES
