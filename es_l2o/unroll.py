"""Unrolled computations that evolution strategies meta-train.

An `UnrolledSystem` is anything with meta-parameters `theta` that advances one step at
a time. `LOptTraining` is the main one: train a sampled task with a learned optimizer,
restarting on a fresh task when the episode's horizon ends.

Example:
    >>> import jax
    >>> from es_l2o.lopt import MLPLOpt
    >>> from populations.quadratic import QuadraticFamily
    >>> system = LOptTraining(QuadraticFamily(), MLPLOpt(hidden_sizes=(8,)), horizon=20)
    >>> theta = system.lopt.init(jax.random.key(0))
    >>> state = system.init(jax.random.key(1), theta)
    >>> state, out = system.step(jax.random.key(2), theta, state)
    >>> int(state.step), bool(out.reset)
    (1, False)
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from es_l2o.lopt.base import LearnedOptimizer, Theta
from es_l2o.tasks import TaskFamily

#: meta-losses a state can be scored on
META_LOSS_SPLITS = ("train", "validation")


class StepOutput(NamedTuple):
    """What one step of an unrolled system reports.

    loss: the training loss of this step (non-finite values replaced by the
        system's penalty).
    reset: True when this step began a new episode (the state was reset first), so
        the loss belongs to the new episode.
    finite: False when the step produced a non-finite loss or parameters; the
        particle then restarts at its next step.
    """

    loss: jax.Array
    reset: jax.Array
    finite: jax.Array


class UnrolledSystem(abc.ABC):
    """A computation advanced step by step under meta-parameters `theta`."""

    #: True when `meta_loss(..., split="validation")` measures held-out data
    has_validation: bool = False

    @abc.abstractmethod
    def init(self, key: jax.Array, theta: Theta) -> Any:
        """The inner state at the start of meta-training."""

    @abc.abstractmethod
    def step(self, key: jax.Array, theta: Theta, state: Any) -> tuple[Any, StepOutput]:
        """Advances the state by one inner step."""

    def meta_loss(
        self, key: jax.Array, theta: Theta, state: Any, split: str = "train"
    ) -> jax.Array:
        """Scores the current state on `split` ("train" or "validation")."""
        raise NotImplementedError(f"{type(self).__name__} defines no meta_loss")


@struct.dataclass
class LOptTrainingState:
    """Inner state of one particle: a task being trained by the learned optimizer."""

    params: Any
    opt_state: Any
    cfg: Any
    step: jax.Array  # steps taken in the current episode
    horizon: jax.Array  # length of the current episode


def _where_tree(cond, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class LOptTraining(UnrolledSystem):
    """Train tasks of `family` with the learned optimizer `lopt`, episode after episode.

    Args:
        family: where tasks come from; every episode samples a new configuration.
        lopt: the learned optimizer whose `theta` is meta-trained.
        horizon: episode length: an int, or `(low, high)` for a log-uniform draw per
            episode (low == high allowed).
        stagger: start each particle at a random step of its first episode, so that
            particles' episodes end at different times.
        nonfinite_penalty: the loss reported for a step whose loss or parameters are
            not finite; that particle restarts at its next step.
    """

    def __init__(
        self,
        family: TaskFamily,
        lopt: LearnedOptimizer,
        horizon: int | Sequence[int] = 100,
        *,
        stagger: bool = False,
        nonfinite_penalty: float = 1e3,
    ):
        if isinstance(horizon, int | float) and not isinstance(horizon, bool):
            low = high = horizon
        else:
            try:
                low, high = horizon
            except (TypeError, ValueError):
                raise ValueError(
                    f"horizon must be a positive integer or a pair (low, high), got {horizon!r}"
                ) from None
        if int(low) != low or int(high) != high or not 1 <= low <= high:
            raise ValueError(
                "horizon must be a positive integer or a pair of integers 1 <= low <= high,"
                f" got {horizon!r}"
            )
        self.family = family
        self.lopt = lopt
        self.horizon_range = (int(low), int(high))
        self.stagger = bool(stagger)
        self.nonfinite_penalty = float(nonfinite_penalty)
        self.has_validation = bool(family.has_validation)

    @property
    def max_horizon(self) -> int:
        return self.horizon_range[1]

    def _sample_horizon(self, key):
        low, high = self.horizon_range
        if low == high:
            return jnp.asarray(low, jnp.int32)
        u = jax.random.uniform(key, (), minval=math.log(low), maxval=math.log(high + 1))
        return jnp.clip(jnp.floor(jnp.exp(u)), low, high).astype(jnp.int32)

    def _new_episode(self, key, theta) -> LOptTrainingState:
        key_cfg, key_init, key_horizon = jax.random.split(key, 3)
        cfg = self.family.sample(key_cfg)
        params = self.family.task(cfg).init(key_init)
        horizon = self._sample_horizon(key_horizon)
        opt_state = self.lopt.transform(theta, horizon).init(params)
        return LOptTrainingState(
            params, opt_state, cfg, jnp.zeros((), jnp.int32), horizon
        )

    def init(self, key, theta):
        key_episode, key_offset = jax.random.split(key)
        state = self._new_episode(key_episode, theta)
        if self.stagger:
            offset = jax.random.randint(key_offset, (), 0, state.horizon)
            state = state.replace(step=offset)
        return state

    def step(self, key, theta, state):
        key_reset, key_loss = jax.random.split(key)
        reset = state.step >= state.horizon
        state = _where_tree(reset, self._new_episode(key_reset, theta), state)
        task = self.family.task(state.cfg)
        loss, grads = jax.value_and_grad(task.loss)(state.params, key_loss)
        opt = self.lopt.transform(theta, state.horizon)
        updates, opt_state = opt.update(
            grads, state.opt_state, state.params, value=loss
        )
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & _all_finite(params)
        new_state = LOptTrainingState(
            params=_where_tree(finite, params, state.params),
            opt_state=_where_tree(finite, opt_state, state.opt_state),
            cfg=state.cfg,
            # a failed particle ends its episode so that the next step restarts it
            step=jnp.where(finite, state.step + 1, state.horizon),
            horizon=state.horizon,
        )
        loss = jnp.where(finite, loss, self.nonfinite_penalty)
        return new_state, StepOutput(loss=loss, reset=reset, finite=finite)

    def meta_loss(self, key, theta, state, split="train"):
        del theta
        if split not in META_LOSS_SPLITS:
            raise ValueError(f"split must be one of {META_LOSS_SPLITS}, got {split!r}")
        task = self.family.task(state.cfg)
        fn = task.eval_loss if split == "validation" else task.loss
        value = fn(state.params, key)
        return jnp.where(jnp.isfinite(value), value, self.nonfinite_penalty)
