"""The optimizee contract: a `Task` to train and a `TaskFamily` that samples them.

A family samples a task *configuration* (a pytree of arrays, everything that varies
between its tasks while shapes stay static) and turns a configuration into a task.
Because configurations are arrays, many tasks of one family train side by side
under `jax.vmap`:

    >>> import jax
    >>> family = ToyQuadraticFamily(dim=3)
    >>> cfgs = jax.vmap(family.sample)(jax.random.split(jax.random.key(0), 4))
    >>> def initial_loss(cfg, key):
    ...     task = family.task(cfg)
    ...     return task.loss(task.init(key), key)
    >>> jax.vmap(initial_loss)(cfgs, jax.random.split(jax.random.key(1), 4)).shape
    (4,)
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
TaskConfig = Any


class Task(abc.ABC):
    """One optimizee: parameters to initialise and a stochastic loss to minimise."""

    @abc.abstractmethod
    def init(self, key: jax.Array) -> Params:
        """Returns initial parameters drawn from `key`."""

    @abc.abstractmethod
    def loss(self, params: Params, key: jax.Array) -> jax.Array:
        """Training loss on a minibatch that the task samples on device from `key`."""

    @property
    def has_validation(self) -> bool:
        """True when `eval_loss` measures a held-out validation split."""
        return False

    def eval_loss(self, params: Params, key: jax.Array) -> jax.Array:
        """Loss on the held-out validation split (tasks without one: training loss)."""
        return self.loss(params, key)

    def metrics(self, params: Params, key: jax.Array) -> dict[str, jax.Array]:
        """Whole-split figures for reports: `train_loss`, `val_loss`, `val_accuracy`...

        The default measures the training loss on one minibatch; tasks with data
        splits override it with whole-split losses and accuracies.
        """
        return {"train_loss": self.loss(params, key)}


class TaskFamily(abc.ABC):
    """A distribution over tasks of one structure (shapes fixed, values sampled)."""

    #: short name used in logs, configs and reports
    name: str = "task_family"

    @abc.abstractmethod
    def sample(self, key: jax.Array) -> TaskConfig:
        """Draws one task configuration: a pytree of arrays with static shapes."""

    @abc.abstractmethod
    def task(self, cfg: TaskConfig) -> Task:
        """The task described by `cfg` (may be a traced, vmapped configuration)."""

    #: True when this family's tasks hold out a validation split
    has_validation: bool = False


class ToyQuadraticConfig(NamedTuple):
    """What varies between toy quadratic tasks: curvatures and the optimum."""

    scales: jax.Array
    optimum: jax.Array


class ToyQuadraticTask(Task):
    """f(x) = 1/2 sum_i s_i (x_i - x*_i)^2 (deterministic; minimum 0 at x*)."""

    def __init__(self, cfg: ToyQuadraticConfig):
        self.cfg = cfg

    def init(self, key):
        return {"x": jax.random.normal(key, self.cfg.optimum.shape)}

    def loss(self, params, key):
        del key
        delta = params["x"] - self.cfg.optimum
        return 0.5 * jnp.sum(self.cfg.scales * delta**2)


class ToyQuadraticFamily(TaskFamily):
    """Diagonal quadratics in `dim` dimensions: the library's own tiny family, for
    examples and tests that must compile in a moment (real populations live in
    `populations/`, outside the library).

    Example:
        >>> family = ToyQuadraticFamily(dim=2)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> float(task.loss({"x": task.cfg.optimum}, None))
        0.0
    """

    name = "toy_quadratic"

    def __init__(self, dim: int = 4):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim

    def sample(self, key):
        key_s, key_o = jax.random.split(key)
        scales = jnp.exp(jax.random.uniform(key_s, (self.dim,), minval=-1, maxval=1))
        return ToyQuadraticConfig(scales, jax.random.normal(key_o, (self.dim,)))

    def task(self, cfg):
        return ToyQuadraticTask(cfg)

    def enumerate(self, num: int, start: int = 0) -> ToyQuadraticConfig:
        """Fixed tasks `start .. start+num-1` stacked along a leading axis (the
        interface of the held-out families that suite evaluation trains)."""
        ids = jnp.arange(start, start + num)
        return jax.vmap(lambda i: self.sample(jax.random.key(i)))(ids)
