"""Hand-designed optimizers to compare learned ones against, as optax transforms.

`BASELINES` maps a name to a factory `learning_rate -> optax transform`; every
baseline is usable wherever a learned optimizer's exported transform is. For a
learning-rate sweep compiled once, `swept_baseline` keeps the learning rate in the
optimizer state, so the state (and with it the learning rate) can be vmapped.

Example:
    >>> import jax, jax.numpy as jnp
    >>> opt = BASELINES["adam"](1e-3)
    >>> params = {"w": jnp.ones(2)}
    >>> updates, _ = opt.update({"w": jnp.ones(2)}, opt.init(params))
    >>> [round(float(u), 6) for u in updates["w"]]
    [-0.001, -0.001]
"""

from __future__ import annotations

from collections.abc import Callable

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
    """The factory registered as `name`; a clear error names the valid ones."""
    try:
        return BASELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline optimizer {name!r}; valid: {sorted(BASELINES)}"
        ) from None


def swept_baseline(name: str, **hyperparameters) -> optax.GradientTransformation:
    """Baseline `name` whose learning rate lives in its state (a traced value).

    Set the learning rate with `set_learning_rate` or build states for a whole grid
    with `init_swept`; one compiled update then serves every learning rate.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> opt = swept_baseline("sgd")
        >>> params = {"w": jnp.ones(2)}
        >>> states = init_swept(opt, params, jnp.array([0.1, 1.0]))
        >>> grads = {"w": jnp.ones(2)}
        >>> updates, _ = jax.vmap(opt.update, in_axes=(None, 0))(grads, states)
        >>> [round(float(u), 6) for u in updates["w"][:, 0]]
        [-0.1, -1.0]
    """
    factory = get_baseline(name)
    return optax.inject_hyperparams(factory)(learning_rate=1.0, **hyperparameters)


def set_learning_rate(state, learning_rate):
    """A copy of a `swept_baseline` state with its learning rate replaced."""
    hyperparams = dict(state.hyperparams)
    old = hyperparams["learning_rate"]
    hyperparams["learning_rate"] = jnp.asarray(learning_rate, old.dtype)
    return state._replace(hyperparams=hyperparams)


def init_swept(opt: optax.GradientTransformation, params, learning_rates: jax.Array):
    """States of `opt` for every learning rate, stacked along a leading axis."""
    state = opt.init(params)
    return jax.vmap(lambda lr: set_learning_rate(state, lr))(
        jnp.asarray(learning_rates)
    )
