"""Meta-validation: how good a theta is on fixed tasks that training never draws,
and which theta of a run was the best.

`meta_validation_loss` scores a theta on `num_tasks` tasks drawn from their own key
stream (`validation_keys`, folded with `META_VALIDATION_STREAM`, which neither
meta-training nor evaluation uses); `mixture_validation_loss` does it per family of
a mixture. A `Validator` says when to score, a `BestTheta` keeps the best so far.

Example:
    >>> import jax
    >>> from es_l2o.lopt import MLPLOpt
    >>> from es_l2o.tasks import ToyQuadraticFamily
    >>> from es_l2o.unroll import LOptTraining
    >>> lopt = MLPLOpt(hidden_sizes=(4,))
    >>> system = LOptTraining(ToyQuadraticFamily(dim=2), lopt, horizon=3)
    >>> validate = meta_validation_loss(system, num_tasks=2, seed=0)
    >>> theta = lopt.init(jax.random.key(0))
    >>> best = BestTheta().offer(validate(theta), 0, theta)
    >>> best.iteration, best.loss > 0
    (0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: folded into meta-validation keys; meta-training and evaluation never fold it in
META_VALIDATION_STREAM = 0x3E7A_0A11


def validation_keys(seed: int, num_tasks: int) -> jax.Array:
    """Keys of the `num_tasks` meta-validation tasks of `seed` (task, init, data).

    Example:
        >>> validation_keys(0, 3).shape
        (3,)
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    base = jax.random.fold_in(jax.random.key(seed), META_VALIDATION_STREAM)
    return jax.random.split(base, num_tasks)


def _meta_loss_of(system, meta_loss: str) -> str:
    from es_l2o.es.full_es import META_LOSSES

    if meta_loss not in META_LOSSES:
        raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")
    if meta_loss == "auto":
        return "validation" if system.has_validation else "train_mean"
    return meta_loss


def meta_validation_loss(
    system, *, num_tasks: int, seed: int, meta_loss: str = "auto"
) -> Callable[[Any], float]:
    """theta -> mean meta-loss of full unrolls of `system` over fixed tasks.

    Args:
        system: an `UnrolledSystem` (unrolled for its `max_horizon` steps).
        num_tasks: how many meta-validation tasks (fixed for the whole run).
        seed: selects the tasks (`validation_keys`).
        meta_loss: one of `es_l2o.es.full_es.META_LOSSES`; "auto" is "validation"
            where the system has a validation split, else "train_mean".

    The loss compiles once: theta goes in as host arrays, whether it is the initial
    theta or an estimator's (placed on its mesh, which would compile a second
    program).
    """
    from es_l2o.es.full_es import full_unroll

    meta_loss = _meta_loss_of(system, meta_loss)
    keys = validation_keys(seed, num_tasks)
    num_steps = system.max_horizon

    @jax.jit
    def mean_loss(theta):
        losses, _ = jax.vmap(
            lambda k: full_unroll(system, theta, k, num_steps, meta_loss)
        )(keys)
        return jnp.mean(losses)

    return lambda theta: float(mean_loss(jax.device_get(theta)))


def mixture_validation_loss(
    systems: Sequence, weights: Sequence[float], theta0, **settings
) -> Callable[[Any], float]:
    """theta -> weighted mean over families of each family's meta-validation loss
    divided by `theta0`'s (1.0 at the start; lower is better).

    `settings` are `meta_validation_loss`'s keywords, shared by every family.
    """
    if len(systems) != len(weights):
        raise ValueError(f"{len(systems)} systems but {len(weights)} weights")
    losses = [meta_validation_loss(s, **settings) for s in systems]
    base = np.asarray([max(abs(loss(theta0)), 1e-8) for loss in losses])
    w = np.asarray(weights, np.float64) / np.sum(weights)

    def validate(theta) -> float:
        return float(np.sum(w * np.asarray([loss(theta) for loss in losses]) / base))

    return validate


class BestTheta(NamedTuple):
    """The theta with the lowest meta-validation loss so far (theta None: none yet).

    Example:
        >>> best = BestTheta().offer(2.0, 0, "a").offer(1.0, 5, "b").offer(3.0, 9, "c")
        >>> best.loss, best.iteration, best.theta
        (1.0, 5, 'b')
    """

    loss: float = math.nan
    iteration: int = 0
    theta: Any = None

    def offer(self, loss: float, iteration: int, theta) -> BestTheta:
        """This record, or `(loss, iteration, theta)` where that is better: a finite
        loss below the best (any finite loss beats a NaN best)."""
        if math.isfinite(loss) and not loss >= self.loss:
            return BestTheta(float(loss), iteration, theta)
        return self


class Validator:
    """When and how a run meta-validates: `validate(theta) -> loss` on the initial
    theta, every `every` iterations (0: only) and after the last one.

    Example:
        >>> validator = Validator(lambda theta: theta**2, every=3)
        >>> [i for i in range(1, 8) if validator.due(i, num_iterations=7)]
        [3, 6, 7]
        >>> validator(0.5)
        0.25
    """

    def __init__(self, validate: Callable[[Any], float], every: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an integer >= 0, got {every!r}")
        self.validate, self.every = validate, every

    def due(self, done: int, num_iterations: int) -> bool:
        """Whether to validate after `done` of `num_iterations` iterations."""
        return done == num_iterations or bool(self.every and done % self.every == 0)

    def __call__(self, theta) -> float:
        return float(self.validate(theta))
