"""OpenAI-ES whose perturbations are regenerated from keys, never stored as an array.

evosax's `Open_ES.ask` draws every perturbation at once and returns the whole
(P, D) population; its `tell` needs that array back. `KeyedOpenES` keeps evosax's
state, params, fitness shaping, meta-optimizer and std schedule, but particle i's
perturbation is a function of the ask key and i alone: antithetic sampling gives
pair j = i mod P/2 the normal draw of `jax.random.fold_in(key_ask, j)`, the second
half of the population its negation; without it particle i draws from
`fold_in(key_ask, i)`. So a device builds the thetas of its own particles, and the
gradient `sum_i f_i z_i / (P std)` is summed by regenerating the draws a chunk at a
time on each device (`es_l2o.sharding.sum_population`): no (P, D) array exists
anywhere, and only the fitness is gathered for the tell.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import Open_ES
from evosax.algorithms.distribution_based.open_es import Params, State
from evosax.core.fitness_shaping import centered_rank_fitness_shaping_fn
from jax.sharding import Mesh

from es_l2o import sharding


class KeyedOpenES(Open_ES):
    """evosax's `Open_ES` with perturbations regenerated from (ask key, index).

    `ask` / `tell` behave as in evosax (`ask` materialises the keyed population);
    `perturbation` and `keyed_tell` never build the population. The fitness shaping
    must read the fitness only (evosax's four built-in shapings do), since the
    keyed tell has no population to give it.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> es = KeyedOpenES(4, jnp.zeros(3), optimizer=optax.sgd(0.1))
        >>> state = es.init(jax.random.key(0), jnp.zeros(3), es.default_params)
        >>> key_ask = jax.random.key(1)
        >>> theta = es.perturbation(state, key_ask, 2)  # particle 2 = -particle 0
        >>> bool(jnp.all(theta == -es.perturbation(state, key_ask, 0)))
        True
        >>> state = es.keyed_tell(key_ask, jnp.arange(4.0), state, es.default_params)
        >>> int(state.generation_counter)
        1
    """

    def __init__(
        self,
        population_size: int,
        solution,
        use_antithetic_sampling: bool = True,
        optimizer: optax.GradientTransformation | None = None,
        std_schedule: Callable | None = None,
        fitness_shaping_fn: Callable = centered_rank_fitness_shaping_fn,
        **kwargs,
    ):
        # evosax's defaults: SGD at 1e-3, std 1
        optimizer = optax.sgd(learning_rate=1e-3) if optimizer is None else optimizer
        if std_schedule is None:
            std_schedule = optax.constant_schedule(1.0)
        if population_size < 2 or population_size % 2:
            raise ValueError(
                f"KeyedOpenES needs an even population_size >= 2, got {population_size}"
            )
        super().__init__(
            population_size,
            solution,
            use_antithetic_sampling=use_antithetic_sampling,
            optimizer=optimizer,
            std_schedule=std_schedule,
            fitness_shaping_fn=fitness_shaping_fn,
            **kwargs,
        )
        fitness = jax.ShapeDtypeStruct((population_size,), jnp.float32)
        try:
            jax.eval_shape(lambda f: fitness_shaping_fn(None, f, None, None), fitness)
        except Exception as err:  # noqa: BLE001 - any failure means it needs more
            raise ValueError(
                "KeyedOpenES never builds the population, so its fitness shaping must "
                "use the fitness alone (as evosax's centered_rank, standardize, "
                f"normalize and identity do); this one failed without it: {err}"
            ) from err

    @property
    def num_draws(self) -> int:
        """Independent normal draws per generation: P/2 (antithetic) or P."""
        p = self.population_size
        return p // 2 if self.use_antithetic_sampling else p

    def noise(self, key_ask: jax.Array, index) -> jax.Array:
        """The flat unit perturbation z of particle `index` (D,): antithetic
        partners i and i + P/2 draw from the same key with opposite signs."""
        index = jnp.asarray(index)
        draw = index % self.num_draws
        z = jax.random.normal(jax.random.fold_in(key_ask, draw), (self.num_dims,))
        if not self.use_antithetic_sampling:
            return z
        return z * jnp.where(index < self.num_draws, 1.0, -1.0).astype(z.dtype)

    def perturbation(self, state: State, key_ask: jax.Array, index) -> jax.Array:
        """Flat theta of particle `index`: mean + std * z (as evosax's `_ask`)."""
        return state.mean + state.std * self.noise(key_ask, index)

    def particle_theta(self, state: State, key_ask: jax.Array, index):
        """Particle `index`'s theta pytree (`perturbation`, unravelled)."""
        return self._unravel_solution(self.perturbation(state, key_ask, index))

    def _ask(self, key: jax.Array, state: State, params: Params):
        del params  # evosax's signature: the population needs none
        indices = jnp.arange(self.population_size)
        population = jax.vmap(lambda i: self.perturbation(state, key, i))(indices)
        return population, state

    def noise_dot(
        self,
        key_ask: jax.Array,
        weights: jax.Array,
        mesh: Mesh | None = None,
        chunk: int | None = None,
    ) -> jax.Array:
        """`sum_i weights_i * z_i` over the population (D,), each z regenerated.

        The draws are split over the mesh's devices and each device sums its share
        `chunk` draws at a time (None: all at once), so at most chunk x D noise is
        live per device. Antithetic partners are summed as one draw weighted by
        w_j - w_{j+P/2} where the P/2 draws split evenly over the devices.
        """
        weights = jnp.asarray(weights)
        if weights.shape != (self.population_size,):
            raise ValueError(
                f"weights must have shape ({self.population_size},), "
                f"got {weights.shape}"
            )
        devices = sharding.population_devices(mesh)
        m = self.num_draws
        if self.use_antithetic_sampling and m % devices == 0:
            indices, weights = jnp.arange(m), weights[:m] - weights[m:]
        else:
            indices = jnp.arange(self.population_size)
        if chunk is not None:  # a divisor of every device's share, at most `chunk`
            chunk = math.gcd(int(chunk), indices.size // devices)
        return sharding.sum_population(
            lambda i, w: w * self.noise(key_ask, i), (indices, weights), mesh, chunk
        )

    def keyed_gradient(
        self,
        state: State,
        key_ask: jax.Array,
        fitness: jax.Array,
        mesh: Mesh | None = None,
        chunk: int | None = None,
    ) -> jax.Array:
        """evosax's Open_ES gradient dot(fitness, z) / (P std) from shaped fitness."""
        dot = self.noise_dot(key_ask, fitness, mesh, chunk)
        return dot / (self.population_size * state.std)

    def keyed_tell(
        self,
        key_ask: jax.Array,
        fitness: jax.Array,
        state: State,
        params: Params,
        mesh: Mesh | None = None,
        chunk: int | None = None,
    ) -> State:
        """evosax's `tell` for the population asked with `key_ask`, never built.

        Updates the best solution (regenerating only the best particle's theta),
        shapes the fitness, steps the mean with the meta-optimizer and the std with
        its schedule, and counts the generation, all as evosax's `Open_ES.tell`;
        its metrics are not computed.
        """
        archive = jnp.where(jnp.isnan(fitness), jnp.inf, fitness)
        best = jnp.argmin(archive)
        improved = archive[best] < state.best_fitness
        state = state.replace(
            best_solution=jnp.where(
                improved, self.perturbation(state, key_ask, best), state.best_solution
            ),
            best_fitness=jnp.where(improved, archive[best], state.best_fitness),
        )
        grad = self.shaped_gradient(state, key_ask, fitness, params, mesh, chunk)
        return self.apply_gradient(state, grad)

    def shaped_gradient(
        self,
        state: State,
        key_ask: jax.Array,
        fitness: jax.Array,
        params: Params,
        mesh: Mesh | None = None,
        chunk: int | None = None,
    ) -> jax.Array:
        """The flat gradient estimate of `keyed_tell` (shaped fitness), unapplied."""
        shaped = self.fitness_shaping_fn(None, fitness, state, params)
        shaped = self._postprocess_fitness(fitness, shaped)
        return self.keyed_gradient(state, key_ask, shaped, mesh, chunk)

    def apply_gradient(self, state: State, grad: jax.Array) -> State:
        """One meta-optimizer step of the mean, the std schedule and the counter."""
        updates, opt_state = self.optimizer.update(grad, state.opt_state, state.mean)
        return state.replace(
            mean=optax.apply_updates(state.mean, updates),
            std=self.std_schedule(state.generation_counter),
            opt_state=opt_state,
            generation_counter=state.generation_counter + 1,
        )
