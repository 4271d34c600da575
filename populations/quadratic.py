"""The 10-dimensional quadratic family of Andrychowicz et al. 2016 (arXiv 1606.04474).

Each task is f(x) = ||W x - y||^2 with W (dim x dim) and y (dim) drawn i.i.d. from a
standard normal distribution, and x initialised from a standard normal.

`IllConditionedQuadraticFamily` adds the variants: a sampled condition number, a
random basis, and high dimensions (diagonal Hessian, memory O(dim)).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from es_l2o.tasks import Task, TaskFamily
from populations.common import check_range, log_uniform, normal


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
            w=normal(key_w, (self.dim, self.dim)),  # = jax.random.normal, faster jit
            y=jax.random.normal(key_y, (self.dim,)),
        )

    def task(self, cfg):
        return QuadraticTask(cfg, self.noise_std)


class IllConditionedConfig(NamedTuple):
    """What varies between ill-conditioned quadratic tasks."""

    eigenvalues: jax.Array  # (dim,)
    rotation: jax.Array  # (dim, dim) orthogonal, or (0,) when not rotated
    optimum: jax.Array  # (dim,)


class IllConditionedQuadraticTask(Task):
    """f(x) = 1/2 sum_i lambda_i (Q^T (x - x*))_i^2: minimum 0 at x*."""

    def __init__(self, cfg: IllConditionedConfig):
        self.cfg = cfg

    def init(self, key):
        return {"x": jax.random.normal(key, self.cfg.optimum.shape)}

    def loss(self, params, key):
        del key
        delta = params["x"] - self.cfg.optimum
        if self.cfg.rotation.ndim == 2:
            delta = self.cfg.rotation.T @ delta
        return 0.5 * jnp.sum(self.cfg.eigenvalues * delta**2)


class IllConditionedQuadraticFamily(TaskFamily):
    """Quadratics with a sampled condition number, optionally in a random basis.

    Each task draws a condition number kappa log-uniformly from
    `10 ** log10_condition_range`, eigenvalues log-spaced from `scale / kappa` to
    `scale` (the scale log-uniform in `scale_range`), an optimum x* ~ N(0, I) and,
    when `rotate`, a random orthogonal basis Q (QR of a Gaussian matrix; dim x dim
    per task). Without rotation the Hessian is diagonal, which keeps memory O(dim)
    for high-dimensional variants (dim = 1,000 to 100,000).

    Example:
        >>> family = IllConditionedQuadraticFamily(dim=10)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> float(task.loss(task.init(jax.random.key(1)), jax.random.key(2))) > 0
        True
    """

    name = "quadratic_ill"

    def __init__(
        self,
        dim: int = 10,
        log10_condition_range: tuple[float, float] = (1.0, 4.0),
        rotate: bool = True,
        scale_range: tuple[float, float] = (0.1, 10.0),
    ):
        if isinstance(dim, bool) or int(dim) != dim or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        low, high = check_range(
            log10_condition_range, "log10_condition_range", allow_zero=True
        )
        scale_low, scale_high = check_range(scale_range, "scale_range")
        self.dim = int(dim)
        self.log10_condition_range = (low, high)
        self.rotate = bool(rotate)
        self.scale_range = (scale_low, scale_high)

    def sample(self, key):
        key_k, key_s, key_q, key_x = jax.random.split(key, 4)
        low, high = self.log10_condition_range
        log10_kappa = jax.random.uniform(key_k, (), minval=low, maxval=high)
        scale = log_uniform(key_s, self.scale_range)
        exponents = jnp.linspace(-1.0, 0.0, self.dim) * log10_kappa
        eigenvalues = scale * 10.0**exponents
        if self.rotate:
            q, r = jnp.linalg.qr(normal(key_q, (self.dim, self.dim)))
            rotation = q * jnp.sign(jnp.diagonal(r))  # Haar-distributed
        else:
            rotation = jnp.zeros((0,))
        return IllConditionedConfig(
            eigenvalues=eigenvalues,
            rotation=rotation,
            optimum=jax.random.normal(key_x, (self.dim,)),
        )

    def task(self, cfg):
        return IllConditionedQuadraticTask(cfg)
