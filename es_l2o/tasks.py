"""The optimizee contract: a `Task` to train and a `TaskFamily` that samples them.

A family samples a task *configuration* (a pytree of arrays, everything that varies
between its tasks while shapes stay static) and turns a configuration into a task.
Because configurations are arrays, many tasks of one family train side by side
under `jax.vmap`:

    >>> import jax
    >>> from populations.quadratic import QuadraticFamily
    >>> family = QuadraticFamily()
    >>> cfgs = jax.vmap(family.sample)(jax.random.split(jax.random.key(0), 4))
    >>> def initial_loss(cfg, key):
    ...     task = family.task(cfg)
    ...     return task.loss(task.init(key), key)
    >>> jax.vmap(initial_loss)(cfgs, jax.random.split(jax.random.key(1), 4)).shape
    (4,)
"""

from __future__ import annotations

import abc
from typing import Any

import jax

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
