"""OpenAI-ES over full unrolls (Salimans et al. 2017, arXiv 1703.03864).

Every meta-iteration perturbs the mean meta-parameters once per particle, trains one
task per particle from scratch for the whole horizon (one `lax.scan`, vmapped over
the population), scores each run by its meta-loss and tells the evosax algorithm.
Antithetic partners train the same task from the same initialisation on the same
minibatches.

With evosax's Open_ES (the default) the population is never built: each particle
regenerates its own perturbation from the ask key and its index inside the sharded
population map, and the tell regenerates them again, a chunk at a time on each
device, to sum the gradient (`es_l2o.es.keyed.KeyedOpenES`). The mean, the ES state
and the fitness are replicated; no device holds more than its own particles'
thetas. Other evosax algorithms ask for and tell the whole population.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import Open_ES, distribution_based_algorithms
from flax import struct
from jax.sharding import Mesh

from es_l2o import sharding
from es_l2o.es import common
from es_l2o.es.estimator import abstract_theta, check_theta, zeros
from es_l2o.es.keyed import KeyedOpenES
from es_l2o.es.lowrank import LowRankOpenES, check_rank
from es_l2o.unroll import UnrolledSystem

#: how a full unroll is scored
META_LOSSES = ("auto", "train_mean", "train_final", "validation")


@struct.dataclass
class ESState:
    """The evosax algorithm's state (mean theta, optimizer state, ...) and counters."""

    es_state: Any
    iteration: jax.Array


def full_unroll(
    system: UnrolledSystem, theta, key: jax.Array, num_steps: int, meta_loss: str
) -> tuple[jax.Array, jax.Array]:
    """Runs `system` from its initial state for `num_steps` steps under `theta`.

    Returns:
        (meta-loss, number of non-finite steps). The meta-loss is the mean training
        loss ("train_mean"), or the final state's training or validation loss
        ("train_final", "validation").
    """
    key_init, key_steps, key_eval = jax.random.split(key, 3)
    state = system.init(key_init, theta)

    def body(state, step_key):
        return system.step(step_key, theta, state)

    state, outs = jax.lax.scan(body, state, jax.random.split(key_steps, num_steps))
    if meta_loss == "train_mean":
        value = jnp.mean(outs.loss)
    else:
        split = "validation" if meta_loss == "validation" else "train"
        value = system.meta_loss(key_eval, theta, state, split)
    return value, jnp.sum(~outs.finite)


def _meta_loss(meta_loss: str, system) -> str:
    common.choose(meta_loss, dict.fromkeys(META_LOSSES), "meta_loss")
    if meta_loss == "auto":
        meta_loss = "validation" if system.has_validation else "train_mean"
    if meta_loss == "validation" and not system.has_validation:
        raise ValueError(
            "meta_loss='validation' needs a population with a validation split; "
            "use 'train_mean' or 'train_final' for this one"
        )
    return meta_loss


def _num_steps(num_steps, system) -> int:
    if num_steps is None:
        num_steps = getattr(system, "max_horizon", None)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return num_steps


def _fitness_metrics(fitness: jax.Array, failed: jax.Array) -> dict:
    return {
        "meta_loss": jnp.mean(fitness),
        "meta_loss_min": jnp.min(fitness),
        "meta_loss_max": jnp.max(fitness),
        "nonfinite_steps": jnp.sum(failed),
    }


class FullES:
    """Full-unroll evolution strategies on any evosax distribution-based algorithm.

    Args:
        system: the unrolled system; its horizon is the unroll length.
        population_size: particles per meta-iteration (even for antithetic algorithms).
        std: perturbation scale of theta.
        optimizer: the meta-optimizer (optax) applied to the ES gradient estimate.
        num_steps: unroll length (default: the system's `max_horizon`).
        algorithm: name of an evosax distribution-based algorithm ("Open_ES", "SNES",
            "PGPE", ...) or its class; Open_ES runs as `KeyedOpenES` (the same
            estimator, its perturbations regenerated from keys).
        meta_loss: "train_mean" (mean training loss over the unroll), "train_final"
            (training loss of the final parameters), "validation" (validation loss of
            the final parameters), or "auto": validation where the system has a
            validation split, else train_mean.
        fitness_shaping: "centered_rank", "standardize", "normalize" or "identity".
        nonfinite_penalty: fitness given to a particle whose meta-loss is not finite.
        mesh: a `es_l2o.sharding.population_mesh`: particles are split over its
            devices (None: wherever JAX puts them).
        particle_chunk: each device unrolls its particles this many at a time (a
            loop over chunks), so populations past the size a device saturates at
            keep its throughput; None unrolls all of them at once.
        rank: low-rank perturbations (`es_l2o.es.lowrank`, EGGROLL): every matrix
            of theta is perturbed by a rank-`rank` product that each particle
            evaluates on the shared mean, so no particle's theta is formed; Open_ES
            only. None or 0: full rank.
        theta: theta's shapes (see `es_l2o.es.estimator.abstract_theta`; default:
            the system's). The evosax algorithm is built from it here.

    Example:
        >>> import jax, optax
        >>> from es_l2o.lopt import MLPLOpt
        >>> from es_l2o.unroll import LOptTraining
        >>> from populations.quadratic import QuadraticFamily
        >>> lopt = MLPLOpt(hidden_sizes=(8,))
        >>> system = LOptTraining(QuadraticFamily(), lopt, horizon=10)
        >>> es = FullES(system, population_size=8, std=0.01, optimizer=optax.adam(1e-2))
        >>> state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        >>> state, metrics = es.step(jax.random.key(2), state)
        >>> sorted(metrics)[:2]
        ['meta_loss', 'meta_loss_max']
    """

    def __init__(
        self,
        system: UnrolledSystem,
        *,
        population_size: int,
        std: float = 0.01,
        optimizer: optax.GradientTransformation | None = None,
        num_steps: int | None = None,
        algorithm: str | type = "Open_ES",
        meta_loss: str = "auto",
        fitness_shaping: str = "centered_rank",
        nonfinite_penalty: float = 1e3,
        algorithm_kwargs: dict | None = None,
        mesh: Mesh | None = None,
        particle_chunk: int | None = None,
        rank: int | None = None,
        theta=None,
    ):
        self.meta_loss = _meta_loss(meta_loss, system)
        self.rank = check_rank(rank)
        self.num_steps = _num_steps(num_steps, system)
        self.system = system
        self.population_size = int(population_size)
        self.std = float(std)
        self.optimizer = optax.adam(1e-2) if optimizer is None else optimizer
        self.nonfinite_penalty = float(nonfinite_penalty)
        self.mesh = mesh
        sharding.check_population(self.population_size, mesh)
        sharding.check_particle_chunk(particle_chunk, self.population_size, mesh)
        self.particle_chunk = particle_chunk
        if isinstance(algorithm, str):
            common.choose(algorithm, distribution_based_algorithms, "evosax algorithm")
        common.choose(fitness_shaping, common.FITNESS_SHAPING, "fitness shaping")
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        common.check_population(
            self.population_size, common.is_antithetic_class(algorithm)
        )
        self.theta_template = abstract_theta(system, theta)
        cls, extra = self._algorithm_class(algorithm)
        self.algorithm, self.params = common.make_algorithm(
            cls,
            population_size=self.population_size,
            solution=zeros(self.theta_template),
            std=self.std,
            optimizer=self.optimizer,
            fitness_shaping=fitness_shaping,
            **extra,
            **dict(algorithm_kwargs or {}),
        )
        self.num_dims = int(self.algorithm.num_dims)
        #: flat (D,) -> theta pytree
        self.unravel = self.algorithm._unravel_solution
        self.antithetic = common.is_antithetic(self.algorithm)
        self.step = jax.jit(self._step)
        #: `step` that consumes its state: the new state is written into the old
        #: one's buffers (`es_l2o.meta.train` runs this)
        self.step_in_place = jax.jit(self._step, donate_argnums=1)
        self.gradient = jax.jit(self._gradient)

    def _algorithm_class(self, algorithm) -> tuple:
        """(class, extra constructor arguments): Open_ES runs keyed, and with a
        rank as `LowRankOpenES`, the only algorithm that takes one."""
        open_es = algorithm == "Open_ES" or algorithm is Open_ES
        if self.rank is None:
            return (KeyedOpenES if open_es else algorithm), {}
        if not open_es:
            name = getattr(algorithm, "__name__", algorithm)
            raise ValueError(
                f"rank={self.rank} needs algorithm='Open_ES' (low-rank perturbations "
                f"are built into its keyed form), got algorithm={name!r}"
            )
        return LowRankOpenES, {"rank": self.rank, "template": self.theta_template}

    @property
    def keyed(self) -> bool:
        """Whether particles regenerate their perturbations from keys (Open_ES)."""
        return isinstance(self.algorithm, KeyedOpenES)

    def _make_state(self, key: jax.Array, theta) -> ESState:
        es_state = self.algorithm.init(key, theta, self.params)
        state = ESState(es_state=es_state, iteration=jnp.zeros((), jnp.int32))
        return common.strong_types(state)

    def state_template(self) -> ESState:
        """The abstract state of `init` (shapes and dtypes only)."""
        return jax.eval_shape(self._make_state, jax.random.key(0), self.theta_template)

    def init(self, key: jax.Array, theta) -> ESState:
        """ES state centred on `theta`."""
        check_theta(self.theta_template, theta)
        # checked on shapes first: nothing large exists before the check passes
        common.check_population_memory(
            self.system,
            theta,
            self.population_size,
            self.mesh,
            jax.eval_shape(self._make_state, key, theta).es_state,
            theta_copies=1 if self.keyed else 2,
        )
        state = sharding.put_replicated(self._make_state(key, theta), self.mesh)
        return common.distinct_arrays(state, jax.tree.leaves(theta))

    def theta(self, state: ESState):
        """The current mean meta-parameters."""
        return self.algorithm.get_mean(state.es_state)

    def unroll(self, theta, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Meta-loss of one full unroll of `theta` and its count of failed steps."""
        return full_unroll(self.system, theta, key, self.num_steps, self.meta_loss)

    def _step(self, key, state: ESState):
        key_ask, key_unroll, key_tell = jax.random.split(key, 3)
        keys = common.particle_keys(key_unroll, self.population_size, self.antithetic)
        if self.keyed:
            update = self._keyed_update(key_ask, keys, state.es_state)
        else:
            update = self._population_update(key_ask, key_tell, keys, state.es_state)
        es_state, fitness, failed = update
        theta_norm, theta_finite = common.norm_and_finite(es_state.mean)
        metrics = {
            **_fitness_metrics(fitness, failed),
            "theta_norm": theta_norm,
            "theta_finite": theta_finite,
        }
        state = ESState(es_state=es_state, iteration=state.iteration + 1)
        return common.strong_types(state), metrics

    # -- the pieces of a step, for estimators that combine several (MultiFamilyES) --

    def estimate(self, key: jax.Array, state: ESState):
        """The flat gradient estimate of one meta-iteration, not applied.

        Returns:
            (flat gradient (D,), state (unchanged: full unrolls keep nothing),
            metrics). Open_ES only: other evosax algorithms update more than the
            mean in their tell.
        """
        if not self.keyed:
            raise ValueError(
                "FullES.estimate needs algorithm='Open_ES' (a gradient estimate "
                f"apart from its update); got {type(self.algorithm).__name__}"
            )
        key_ask, key_unroll, _ = jax.random.split(key, 3)
        keys = common.particle_keys(key_unroll, self.population_size, self.antithetic)
        fitness, failed = self._keyed_fitness(key_ask, keys, state.es_state)
        grad = self.algorithm.shaped_gradient(
            state.es_state,
            key_ask,
            fitness,
            self.params,
            self.mesh,
            self.particle_chunk,
        )
        metrics = _fitness_metrics(fitness, failed)
        metrics["grad_norm"] = jnp.linalg.norm(grad)
        return grad, state, metrics

    def apply_gradient(self, es_state, grad: jax.Array):
        """One meta-optimizer step of the evosax state with a flat gradient."""
        return self.algorithm.apply_gradient(es_state, grad)

    def finish(self, state: ESState) -> ESState:
        """Places the state after an update and counts the iteration."""
        es_state = sharding.replicate(state.es_state, self.mesh)
        state = ESState(es_state=es_state, iteration=state.iteration + 1)
        return common.strong_types(state)

    def _gradient(self, key, state: ESState):
        grad, state, metrics = self.estimate(key, state)
        return self.unravel(grad), {
            "state": state,
            "metrics": metrics,
        }

    def _keyed_fitness(self, key_ask, keys, es_state):
        """Each particle builds its theta from (key_ask, its index) where it runs."""
        algorithm = self.algorithm

        def unroll(index, key):
            return self.unroll(algorithm.particle_theta(es_state, key_ask, index), key)

        indices = jnp.arange(self.population_size)
        raw, failed = sharding.map_population(
            unroll, (indices, keys), self.mesh, self.particle_chunk
        )
        fitness = sharding.replicate(
            common.sanitize_fitness(raw, self.nonfinite_penalty), self.mesh
        )
        return fitness, failed

    def _keyed_update(self, key_ask, keys, es_state):
        algorithm = self.algorithm
        fitness, failed = self._keyed_fitness(key_ask, keys, es_state)
        es_state = algorithm.keyed_tell(
            key_ask, fitness, es_state, self.params, self.mesh, self.particle_chunk
        )
        return sharding.replicate(es_state, self.mesh), fitness, failed

    def _population_update(self, key_ask, key_tell, keys, es_state):
        """evosax's ask and tell on the whole (P, D) population."""
        population, es_state = self.algorithm.ask(key_ask, es_state, self.params)
        raw, failed = sharding.map_population(
            self.unroll, (population, keys), self.mesh, self.particle_chunk
        )
        fitness = common.sanitize_fitness(raw, self.nonfinite_penalty)
        es_state, _ = self.algorithm.tell(
            key_tell, population, fitness, es_state, self.params
        )
        return es_state, fitness, failed
