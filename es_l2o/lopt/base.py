"""The learned-optimizer contract: meta-parameters in, an optax transform out."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import numpy as np
import optax

Theta = Any


def check_hidden_sizes(hidden_sizes) -> tuple[int, ...]:
    """`hidden_sizes` as a tuple of ints; ValueError unless one or more are >= 1.

    Example:
        >>> check_hidden_sizes([4, 4])
        (4, 4)
    """
    sizes = tuple(int(h) for h in hidden_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(
            f"hidden_sizes must be one or more positive integers, got {hidden_sizes!r}"
        )
    return sizes


def check_num_steps(num_steps) -> None:
    """Raises ValueError unless `num_steps` is a positive integer.

    Traced values (a per-particle horizon inside jit) pass unchecked.
    """
    if isinstance(num_steps, jax.core.Tracer):
        return
    value = np.asarray(num_steps)
    is_integer = value.ndim == 0 and np.issubdtype(value.dtype, np.integer)
    if isinstance(num_steps, bool) or not is_integer or int(value) <= 0:
        raise ValueError(
            "num_steps must be a positive integer (the training horizon the optimizer "
            f"was asked to plan for), got {num_steps!r}"
        )


class LearnedOptimizer(abc.ABC):
    """An optimizer architecture whose weights `theta` are meta-learned.

    Subclasses set `name`, implement `init`, `transform` and `config`; `config()`
    returns the JSON-serialisable constructor arguments, so that
    `type(lopt)(**lopt.config())` rebuilds the same architecture.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from es_l2o.lopt import MLPLOpt
        >>> lopt = MLPLOpt()
        >>> opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=100)
        >>> params = {"w": jnp.ones(3)}
        >>> updates, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def init(self, key: jax.Array) -> Theta:
        """Initial meta-parameters (a pytree of float32 arrays)."""

    @abc.abstractmethod
    def transform(
        self, theta: Theta, num_steps: int | jax.Array
    ) -> optax.GradientTransformationExtraArgs:
        """The optimizer defined by `theta` for a run of `num_steps` steps."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON values."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
