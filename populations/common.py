"""Small helpers every family shares: checked ranges and log-uniform draws."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def check_range(value: Sequence[float], what: str, *, allow_zero: bool = False):
    """`(low, high)` as floats, or a ValueError naming `what` and the rule.

    Example:
        >>> check_range([0.5, 2], "init_scale_range")
        (0.5, 2.0)
    """
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (low, high), got {value!r}") from None
    ok = (0 <= low <= high) if allow_zero else (0 < low <= high)
    if not ok:
        rule = "0 <= low <= high" if allow_zero else "0 < low <= high"
        raise ValueError(f"{what} must satisfy {rule}, got {(low, high)}")
    return low, high


def check_positive_int(value, what: str) -> int:
    """`value` as an int, or a ValueError unless it is a positive integer."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def log_uniform(key: jax.Array, bounds: tuple[float, float], shape=()) -> jax.Array:
    """Draws from a log-uniform distribution on `bounds` (a point mass if equal;
    `(0, 0)` gives zeros).

    Example:
        >>> x = log_uniform(jax.random.key(0), (0.1, 10.0), (3,))
        >>> bool(jnp.all((x >= 0.1) & (x <= 10.0)))
        True
    """
    low, high = bounds
    if low == high:
        return jnp.full(shape, low, jnp.float32)
    u = jax.random.uniform(key, shape, minval=jnp.log(low), maxval=jnp.log(high))
    return jnp.exp(u)


def normal(key: jax.Array, shape: tuple[int, ...], std=1.0) -> jax.Array:
    """`std * jax.random.normal(key, shape)`, drawn flat and reshaped.

    The values are the same as `jax.random.normal(key, shape)` gives, but XLA on
    CPU compiles the flat draw much faster: with jax's default partitionable
    threefry a rank-4 draw (a conv kernel) costs ~5 s of compilation, a flat one
    ~0.4 s.

    Example:
        >>> key, shape = jax.random.key(0), (3, 3, 1, 4)
        >>> bool(jnp.all(normal(key, shape) == jax.random.normal(key, shape)))
        True
    """
    size = 1
    for dim in shape:
        size *= int(dim)
    return std * jax.random.normal(key, (size,)).reshape(shape)


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays (or of shape-dtype structs)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))
