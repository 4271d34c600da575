"""Pieces every estimator shares: building the evosax algorithm, pairing particles."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import distribution_based_algorithms
from evosax.core import fitness_shaping as shaping

FITNESS_SHAPING: dict[str, Callable] = {
    "centered_rank": shaping.centered_rank_fitness_shaping_fn,
    "standardize": shaping.standardize_fitness_shaping_fn,
    "normalize": shaping.normalize_fitness_shaping_fn,
    "identity": shaping.identity_fitness_shaping_fn,
}

#: evosax algorithms whose population is mean +- the same perturbations (i, i + P/2)
ANTITHETIC_ALGORITHMS = (
    "Open_ES",
    "PGPE",
    "PersistentES",
    "NoiseReuseES",
    "ARS",
    "ESMC",
)


def choose(name: str, options, what: str):
    """`options[name]`, or a ValueError naming the valid choices."""
    if name not in options:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(options)}")
    return options[name]


def choose_rule(rule, options, what: str):
    """`rule` itself, or the option it names (see `choose`)."""
    return choose(rule, options, what) if isinstance(rule, str) else rule


def make_algorithm(
    name: str | type,
    *,
    population_size: int,
    solution: Any,
    std: float,
    optimizer: optax.GradientTransformation,
    fitness_shaping: str,
    **kwargs,
):
    """Builds an evosax distribution-based algorithm and its params.

    The meta-optimizer, the perturbation scale and the fitness shaping are passed to
    whichever of them the algorithm takes (`std_schedule` or params' `std_init`).

    Returns:
        (algorithm, params)
    """
    cls = (
        choose(name, distribution_based_algorithms, "evosax algorithm")
        if isinstance(name, str)
        else name
    )
    if population_size < 2:
        raise ValueError(f"population_size must be >= 2, got {population_size}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    accepted = inspect.signature(cls.__init__).parameters
    extra = {
        "fitness_shaping_fn": choose(
            fitness_shaping, FITNESS_SHAPING, "fitness shaping"
        )
    }
    if "optimizer" in accepted:
        extra["optimizer"] = optimizer
    if "std_schedule" in accepted:
        extra["std_schedule"] = optax.constant_schedule(std)
    algorithm = cls(
        population_size=population_size, solution=solution, **extra, **kwargs
    )
    params = algorithm.default_params
    if hasattr(params, "std_init"):
        params = params.replace(std_init=std)
    return algorithm, params


def is_antithetic_class(algorithm: str | type) -> bool:
    """Whether an evosax algorithm (name or class, subclasses included) pairs
    antithetic particles by default."""
    if isinstance(algorithm, str):
        return algorithm in ANTITHETIC_ALGORITHMS
    return any(c.__name__ in ANTITHETIC_ALGORITHMS for c in algorithm.__mro__)


def is_antithetic(algorithm) -> bool:
    """Whether a built evosax algorithm pairs particles i and i + P/2."""
    return is_antithetic_class(type(algorithm)) and getattr(
        algorithm, "use_antithetic_sampling", True
    )


def check_population(population_size: int, antithetic: bool) -> None:
    if antithetic and population_size % 2:
        raise ValueError(
            f"population_size={population_size} is odd, but antithetic sampling pairs "
            f"particles: use an even population such as {population_size + 1}"
        )


def particle_keys(key: jax.Array, population_size: int, antithetic: bool) -> jax.Array:
    """One key per particle; antithetic partners i and i + P/2 share their key.

    Sharing the key gives a pair the same task, initialisation and minibatches, so
    their loss difference measures the perturbation alone (common random numbers).
    """
    if not antithetic:
        return jax.random.split(key, population_size)
    half = jax.random.split(key, population_size // 2)
    return jnp.concatenate([half, half])


def sanitize_fitness(fitness: jax.Array, penalty: float) -> jax.Array:
    """Replaces NaN and inf fitness by `penalty` so that no NaN reaches the mean."""
    return jnp.where(jnp.isfinite(fitness), fitness, penalty)


def norm_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(norm, finite)` of a flat vector from one pass: a vector holding a NaN or
    an infinity has a non-finite norm (so does one whose squares overflow float32,
    around 1e19 per entry at this size, which no usable theta reaches).

    Example:
        >>> norm, finite = norm_and_finite(jnp.array([3.0, 4.0]))
        >>> float(norm), bool(finite)
        (5.0, True)
        >>> bool(norm_and_finite(jnp.array([1.0, jnp.nan]))[1])
        False
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(x)))
    return norm, jnp.isfinite(norm)


def strong_types(tree):
    """Drops weak types (Python-scalar defaults in evosax states), so that the state
    that `init` returns and the one a jitted step returns share one signature and the
    second step does not recompile."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


def _buffers(x) -> set:
    """Where an array's data lives: (device, address) of each local shard (two
    Array objects may share one buffer: a `device_put` to where it already is)."""
    try:
        return {
            (shard.device.id, shard.data.unsafe_buffer_pointer())
            for shard in x.addressable_shards
        }
    except Exception:  # no address to read (a PRNG key array, a deleted array)
        return {("id", id(x))}


def distinct_arrays(tree, taken=()):
    """`tree` with a copy of every array whose buffer it already holds, or that
    shares one with `taken`, so that a step that consumes its state
    (`step_in_place`) is given every buffer once and nothing of the caller's."""
    seen = set()
    for x in taken:
        if isinstance(x, jax.Array):
            seen |= _buffers(x)

    def own(x):
        if not isinstance(x, jax.Array):
            return x
        where = _buffers(x)
        if where & seen:
            x = x.copy()
            where = _buffers(x)
        seen.update(where)
        return x

    return jax.tree.map(own, tree)


def check_population_memory(
    system, theta, population_size: int, mesh, es_state=None, theta_copies: int = 2
):
    """Refuses a population whose particles cannot fit on the mesh's devices.

    Per particle: `theta_copies` thetas (2: its perturbed theta and its noise, where
    the population is drawn as an array; 1 where each particle regenerates its noise
    from a key) and three copies of its inner state (state, gradients, updates);
    replicated: the ES state.

    Example:
        >>> from es_l2o.lopt import MLPLOpt
        >>> from es_l2o.unroll import LOptTraining
        >>> from populations.quadratic import QuadraticFamily
        >>> lopt = MLPLOpt(hidden_sizes=(8,))
        >>> system = LOptTraining(QuadraticFamily(), lopt, horizon=10)
        >>> theta = lopt.init(jax.random.key(0))
        >>> check_population_memory(system, theta, 64, None, theta_copies=1)  # fits
    """
    from es_l2o import sharding

    sharding.check_memory(
        population_size=population_size,
        bytes_per_particle=particle_bytes(system, theta, theta_copies),
        replicated_bytes=sharding.tree_bytes(es_state) if es_state is not None else 0,
        mesh=mesh,
    )


def particle_bytes(system, theta, theta_copies: int = 2) -> int:
    """Planned bytes of one particle (see `check_population_memory`), from shapes
    alone: nothing is allocated."""
    from es_l2o import sharding

    inner = jax.eval_shape(system.init, jax.random.key(0), theta)
    return theta_copies * sharding.tree_bytes(theta) + 3 * sharding.tree_bytes(inner)
