"""Classic optimisation test functions with sampled shifts and scales.

Each task minimises f(u) with u = s * (x - c) + u*, where f is one of `FUNCTIONS`,
u* its minimiser, c a sampled optimum location (uniform in [-shift, shift] per
coordinate) and s a per-coordinate scale (log-uniform in `scale_range`); the loss
is multiplied by a log-uniform `loss_scale`. Parameters start at x ~ N(0, init_std^2),
so the optimum lies at x = c. The losses are deterministic (the key is unused);
wrap a family in `populations.augment.GradientNoiseFamily` for noisy gradients.

Functions: Rosenbrock (Rosenbrock 1960, the chained n-dimensional form), Rastrigin
(many regular local minima), Ackley (a flat outer region around a sharp basin) and
Styblinski-Tang (2^n local minima, shifted so that its minimum is 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from es_l2o.tasks import Task, TaskFamily
from populations.common import check_positive_int, check_range, log_uniform


def rosenbrock(u: jax.Array) -> jax.Array:
    """sum_i 100 (u_{i+1} - u_i^2)^2 + (1 - u_i)^2; minimum 0 at u = 1."""
    return jnp.sum(100.0 * (u[1:] - u[:-1] ** 2) ** 2 + (1.0 - u[:-1]) ** 2)


def rastrigin(u: jax.Array) -> jax.Array:
    """10 n + sum_i u_i^2 - 10 cos(2 pi u_i); minimum 0 at u = 0."""
    return jnp.sum(u**2 - 10.0 * jnp.cos(2.0 * jnp.pi * u) + 10.0)


def ackley(u: jax.Array) -> jax.Array:
    """Ackley's function; minimum ~0 at u = 0 (smoothed so gradients stay finite)."""
    radius = jnp.sqrt(jnp.mean(u**2) + 1e-12)
    return (
        -20.0 * jnp.exp(-0.2 * radius)
        - jnp.exp(jnp.mean(jnp.cos(2.0 * jnp.pi * u)))
        + 20.0
        + jnp.e
    )


_ST_MIN = -2.903534  # the one-dimensional Styblinski-Tang minimiser


def styblinski_tang(u: jax.Array) -> jax.Array:
    """1/2 sum_i (u_i^4 - 16 u_i^2 + 5 u_i) - n * min; minimum 0 at u = -2.9035."""
    value = 0.5 * jnp.sum(u**4 - 16.0 * u**2 + 5.0 * u)
    floor = 0.5 * (_ST_MIN**4 - 16.0 * _ST_MIN**2 + 5.0 * _ST_MIN)
    return value - u.shape[0] * floor


#: name -> (function, minimiser coordinate, smallest dimension)
FUNCTIONS = {
    "rosenbrock": (rosenbrock, 1.0, 2),
    "rastrigin": (rastrigin, 0.0, 1),
    "ackley": (ackley, 0.0, 1),
    "styblinski_tang": (styblinski_tang, _ST_MIN, 1),
}


class TestFunctionConfig(NamedTuple):
    """What varies between tasks: optimum location, coordinate and loss scales."""

    __test__ = False  # not a pytest test class

    center: jax.Array  # (dim,)
    scale: jax.Array  # (dim,)
    loss_scale: jax.Array  # ()


class TestFunctionTask(Task):
    """f(s * (x - c) + u*) * loss_scale; see `TestFunctionFamily`."""

    __test__ = False

    def __init__(self, family: TestFunctionFamily, cfg: TestFunctionConfig):
        self.family = family
        self.cfg = cfg

    def init(self, key):
        shape = self.cfg.center.shape
        return {"x": self.family.init_std * jax.random.normal(key, shape)}

    def loss(self, params, key):
        del key
        fn, u_star, _ = FUNCTIONS[self.family.function]
        u = self.cfg.scale * (params["x"] - self.cfg.center) + u_star
        return self.cfg.loss_scale * fn(u)


class TestFunctionFamily(TaskFamily):
    """Shifted and scaled copies of one classic test function in `dim` dimensions.

    Args:
        function: one of `FUNCTIONS` ("rosenbrock", "rastrigin", "ackley",
            "styblinski_tang").
        dim: number of coordinates.
        shift: the optimum lies uniformly in [-shift, shift]^dim.
        scale_range: per-coordinate scale s, log-uniform.
        loss_scale_range: multiplier of the loss, log-uniform.
        init_std: standard deviation of the initial parameters.

    Example:
        >>> family = TestFunctionFamily("rosenbrock", dim=2)
        >>> task = family.task(family.sample(jax.random.key(0)))
        >>> float(task.loss(task.init(jax.random.key(1)), jax.random.key(2))) > 0
        True
    """

    __test__ = False

    def __init__(
        self,
        function: str = "rosenbrock",
        dim: int = 2,
        shift: float = 1.0,
        scale_range: tuple[float, float] = (0.5, 2.0),
        loss_scale_range: tuple[float, float] = (1.0, 1.0),
        init_std: float = 1.0,
    ):
        if function not in FUNCTIONS:
            raise ValueError(
                f"function must be one of {sorted(FUNCTIONS)}, got {function!r}"
            )
        dim = check_positive_int(dim, "dim")
        if dim < FUNCTIONS[function][2]:
            raise ValueError(
                f"{function} needs dim >= {FUNCTIONS[function][2]}, got {dim}"
            )
        if shift < 0 or init_std <= 0:
            raise ValueError(
                f"need shift >= 0 and init_std > 0, got shift={shift!r}, "
                f"init_std={init_std!r}"
            )
        self.function = function
        self.name = function
        self.dim = dim
        self.shift = float(shift)
        self.scale_range = check_range(scale_range, "scale_range")
        self.loss_scale_range = check_range(loss_scale_range, "loss_scale_range")
        self.init_std = float(init_std)

    def sample(self, key):
        key_c, key_s, key_l = jax.random.split(key, 3)
        return TestFunctionConfig(
            center=jax.random.uniform(
                key_c, (self.dim,), minval=-self.shift, maxval=self.shift
            ),
            scale=log_uniform(key_s, self.scale_range, (self.dim,)),
            loss_scale=log_uniform(key_l, self.loss_scale_range),
        )

    def task(self, cfg):
        return TestFunctionTask(self, cfg)
