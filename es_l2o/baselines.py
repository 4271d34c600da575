"""Hand-designed optimizers to compare learned ones against, as optax transforms.

`BASELINES` maps a name to a factory `learning_rate -> optax transform`; every
baseline is usable wherever a learned optimizer's exported transform is. `sweep` is
the one way to try a baseline at many learning rates: the learning rate is traced,
so the whole sweep is one vmapped computation (one compile per baseline).

Example:
    >>> import jax.numpy as jnp, optax
    >>> def final_loss(opt):  # 20 steps on f(x) = x^2 from x = 1
    ...     x, state = jnp.ones(()), opt.init(jnp.ones(()))
    ...     for _ in range(20):
    ...         updates, state = opt.update(2 * x, state)
    ...         x = optax.apply_updates(x, updates)
    ...     return x**2
    >>> rates = [0.01, 0.1, 0.4, 1.2]
    >>> losses = sweep("sgd", rates, final_loss)  # one vmapped run per rate
    >>> losses.shape, rates[int(jnp.argmin(losses))]  # 1.2 diverges
    ((4,), 0.4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

Factory = Callable[..., optax.GradientTransformation]


def _sgd(learning_rate):
    return optax.sgd(learning_rate)


def _momentum(learning_rate, momentum=0.9):
    return optax.sgd(learning_rate, momentum=momentum)


def _nesterov(learning_rate, momentum=0.9):
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def _adagrad(learning_rate):
    return optax.adagrad(learning_rate)


def _rmsprop(learning_rate, decay=0.9):
    return optax.rmsprop(learning_rate, decay=decay)


def _adam(learning_rate, b1=0.9, b2=0.999):
    return optax.adam(learning_rate, b1=b1, b2=b2)


#: name -> factory(learning_rate, **hyperparameters) -> optax transform
BASELINES: dict[str, Factory] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": _nesterov,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
}


def get_baseline(name: str) -> Factory:
    """The factory registered as `name`; a clear error names the valid ones.

    Example:
        >>> get_baseline("lbfgs")
        Traceback (most recent call last):
        ...
        ValueError: unknown baseline optimizer 'lbfgs'; valid: ['adagrad', 'adam', \
'momentum', 'nesterov', 'rmsprop', 'sgd']
    """
    try:
        return BASELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline optimizer {name!r}; valid: {sorted(BASELINES)}"
        ) from None


def sweep(
    name: str,
    learning_rates: Sequence[float] | jax.Array,
    run: Callable[[optax.GradientTransformation], Any],
    **hyperparameters,
) -> Any:
    """`run(baseline at lr)` for every learning rate, as one vmapped computation.

    Args:
        name: a key of `BASELINES`.
        learning_rates: the rates to try (a sequence or a 1-D array).
        run: maps an optax transform to a pytree of arrays (say, the losses of a
            training run); it must be traceable (no Python branching on values).
        hyperparameters: the baseline's other settings (e.g. `momentum=0.8`).

    Returns:
        `run`'s pytree with a leading axis over `learning_rates`. Call it inside
        `jax.jit` to compile the whole sweep once.
    """
    factory = get_baseline(name)
    rates = jnp.asarray(learning_rates, jnp.float32)
    if rates.ndim != 1 or rates.size == 0:
        raise ValueError(
            f"learning_rates must be a non-empty 1-D sequence, got shape {rates.shape}"
        )
    return jax.vmap(lambda lr: run(factory(lr, **hyperparameters)))(rates)
