"""What every estimator offers (`Estimator`), and the state all of them share.

An estimator is built from an unrolled system and an abstract theta (its pytree of
shapes and dtypes): from `theta=`, else the system's `theta_template`, else its
learned optimizer's `init` (`abstract_theta`). Everything that depends on theta's
shape (evosax's algorithm, the flat <-> pytree maps, the noise store) is made in
`__init__`; `init(key, theta)` then only makes the state, and nothing is changed on
the estimator afterwards.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_l2o.toy_systems import InfluenceBalancing
    >>> abstract_theta(InfluenceBalancing(), jnp.asarray(0.5))
    ShapeDtypeStruct(shape=(), dtype=float32)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree


@runtime_checkable
class Estimator(Protocol):
    """A meta-gradient estimator over an `UnrolledSystem`.

    `FullES` and the truncated family (`PES`, `TruncatedES`, `NoiseReuseES`) offer
    it; `MultiFamilyES` combines several through their `estimate`,
    `apply_gradient` and `finish`.
    """

    population_size: int
    num_dims: int

    def init(self, key: jax.Array, theta) -> Any:
        """The estimator's state centred on `theta` (shaped as its template)."""

    def step(self, key: jax.Array, state) -> tuple[Any, dict]:
        """One meta-iteration (jitted): `(next state, metrics)`."""

    def theta(self, state):
        """The current mean meta-parameters (a theta pytree)."""

    def state_template(self) -> Any:
        """The abstract state `init` returns (shapes and dtypes, nothing made)."""

    def estimate(self, key: jax.Array, state) -> tuple[jax.Array, Any, dict]:
        """One meta-iteration's flat gradient estimate, not applied:
        `(grad (D,), state, metrics)`."""

    def apply_gradient(self, es_state, grad: jax.Array):
        """One meta-optimizer step of the shared `state.es_state` on a gradient."""

    def finish(self, state) -> Any:
        """Places the state after an update and counts the iteration."""


@struct.dataclass
class SearchState:
    """The search distribution of a truncated estimator, shared by every family.

    mean: flat theta (D,); std: the perturbation scale; opt_state: the optax
    meta-optimizer's state; generation_counter: updates applied so far.
    """

    mean: jax.Array
    std: jax.Array
    opt_state: Any
    generation_counter: jax.Array


def abstract_theta(system, theta=None):
    """Theta's shapes and dtypes: of `theta` if given (arrays or ShapeDtypeStructs),
    else the system's `theta_template`, else its learned optimizer's `init`.

    Raises:
        ValueError: where none of these says what theta is.
    """
    if theta is None:
        theta = getattr(system, "theta_template", None)
    if theta is None and hasattr(system, "lopt"):
        theta = jax.eval_shape(system.lopt.init, jax.random.key(0))
    if theta is None:
        raise ValueError(
            f"cannot tell the shape of theta for {type(system).__name__}; pass "
            "theta=jax.ShapeDtypeStruct(shape, dtype) (or a pytree of them)"
        )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), theta
    )


def zeros(template):
    """Concrete zeros shaped as an abstract theta (what evosax's `solution` needs)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)


def check_theta(template, theta) -> None:
    """Raises ValueError unless `theta` has the template's structure and shapes."""
    given = abstract_theta(None, theta)
    same = jax.tree.structure(given) == jax.tree.structure(template) and all(
        a.shape == b.shape
        for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(template), strict=True)
    )
    if not same:
        raise ValueError(
            f"theta {given} does not match the estimator's theta {template}; build "
            "the estimator with theta= shaped like the one it starts from"
        )


def init_search(
    theta, optimizer: optax.GradientTransformation, std_schedule
) -> SearchState:
    """The search state centred on `theta`, at the schedule's first std."""
    mean = ravel_pytree(theta)[0]
    return SearchState(
        mean=mean,
        std=jnp.asarray(std_schedule(0), jnp.float32),
        opt_state=optimizer.init(jnp.zeros(mean.shape)),
        generation_counter=jnp.zeros((), jnp.int32),
    )


def meta_optimizer(
    optimizer: optax.GradientTransformation | None,
    max_grad_norm: float | None,
    default: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """`optimizer` (else `default`), behind a global-norm clip where one is asked."""
    optimizer = default if optimizer is None else optimizer
    if max_grad_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)


def search_step(
    optimizer: optax.GradientTransformation, std_schedule, state: SearchState, grad
) -> SearchState:
    """One meta-optimizer step of the mean on a flat gradient; a non-finite
    gradient is dropped. The std follows its schedule."""
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.mean)
    return SearchState(
        mean=optax.apply_updates(state.mean, updates),
        std=jnp.asarray(std_schedule(state.generation_counter + 1), jnp.float32),
        opt_state=opt_state,
        generation_counter=state.generation_counter + 1,
    )
