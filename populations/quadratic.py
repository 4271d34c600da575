"""The 10-dimensional quadratic family of Andrychowicz et al. 2016 (arXiv 1606.04474).

Each task is f(x) = ||W x - y||^2 with W (dim x dim) and y (dim) drawn i.i.d. from a
standard normal distribution, and x initialised from a standard normal.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from es_l2o.tasks import Task, TaskFamily


class QuadraticConfig(NamedTuple):
    """What varies between quadratic tasks."""

    w: jax.Array
    y: jax.Array


class QuadraticTask(Task):
    """f(x) = ||W x - y||^2, optionally with Gaussian gradient noise on x."""

    def __init__(self, cfg: QuadraticConfig, noise_std: float = 0.0):
        self.cfg = cfg
        self.noise_std = noise_std

    def init(self, key):
        return {"x": jax.random.normal(key, self.cfg.y.shape)}

    def loss(self, params, key):
        x = params["x"]
        if self.noise_std > 0:
            x = x + self.noise_std * jax.random.normal(key, x.shape)
        residual = self.cfg.w @ x - self.cfg.y
        return jnp.sum(residual**2)


class QuadraticFamily(TaskFamily):
    """Random quadratics ||W x - y||^2 in `dim` dimensions.

    Example:
        >>> family = QuadraticFamily(dim=10)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> float(task.loss(task.init(jax.random.key(1)), jax.random.key(2))) > 0
        True
    """

    name = "quadratic"

    def __init__(self, dim: int = 10, noise_std: float = 0.0):
        if dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.dim = int(dim)
        self.noise_std = float(noise_std)

    def sample(self, key):
        key_w, key_y = jax.random.split(key)
        return QuadraticConfig(
            w=jax.random.normal(key_w, (self.dim, self.dim)),
            y=jax.random.normal(key_y, (self.dim,)),
        )

    def task(self, cfg):
        return QuadraticTask(cfg, self.noise_std)
