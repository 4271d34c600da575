"""A task family built to diverge, shared by the tests of non-finite handling."""

import jax
import jax.numpy as jnp

from es_l2o.tasks import Task, TaskFamily


class ExplodingTask(Task):
    """exp(growth * x): with growth 100 the loss overflows to inf at the start."""

    def __init__(self, growth):
        self.growth = growth

    def init(self, key):
        del key
        return {"x": jnp.ones(3)}

    def loss(self, params, key):
        del key
        return jnp.sum(jnp.exp(self.growth * params["x"]))


class ExplodingFamily(TaskFamily):
    """Half of its tasks (growth 100) produce non-finite losses and gradients."""

    name = "exploding"

    def sample(self, key):
        return jax.random.choice(key, jnp.array([1.0, 100.0]))

    def task(self, cfg):
        return ExplodingTask(cfg)
