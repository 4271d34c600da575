"""Unrolled computations that evolution strategies meta-train.

An `UnrolledSystem` is anything with meta-parameters `theta` that advances one step at
a time. `LOptTraining` is the main one: train a sampled task with a learned optimizer,
restarting on a fresh task when the episode's horizon ends. Every particle of an
estimator carries its own state, so each has its own horizon, step counter and resets.
Systems may also never reset (a toy dynamical system, say): their steps simply never
report `reset`.

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
from es_l2o.lowrank import particle_axes
from es_l2o.tasks import TaskFamily

#: meta-losses a state can be scored on
META_LOSS_SPLITS = ("train", "validation")

#: how `LOptTraining` staggers particles' first episodes (`stagger=True` is "offset")
STAGGER_MODES = ("none", "offset", "advance")
#: how `LOptTraining` draws horizons in `(low, high)`: log-uniform per episode or step
HORIZON_DRAWS = ("episodes", "steps")


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
    """A computation advanced step by step under meta-parameters `theta`.

    Subclasses implement `init` and `step` for one particle. Estimators call
    `batch_step` on a whole population (leading axis on keys, thetas and states);
    its default vmaps `step`, and systems override it where a population-level
    shortcut exists. A system whose episodes never end reports `reset=False` forever
    and keeps `max_horizon = None`.
    """

    #: True when `meta_loss(..., split="validation")` measures held-out data
    has_validation: bool = False
    #: the longest episode in steps; None when episodes never end
    max_horizon: int | None = None

    @abc.abstractmethod
    def init(self, key: jax.Array, theta: Theta) -> Any:
        """The inner state at the start of meta-training."""

    @abc.abstractmethod
    def step(self, key: jax.Array, theta: Theta, state: Any) -> tuple[Any, StepOutput]:
        """Advances the state by one inner step."""

    def batch_step(
        self, keys: jax.Array, thetas: Theta, states: Any
    ) -> tuple[Any, StepOutput]:
        """`step` for a population: every argument has a leading particle axis."""
        axes = (0, particle_axes(thetas), 0)
        return jax.vmap(self.step, in_axes=axes)(keys, thetas, states)

    def episode_done(self, state: Any) -> jax.Array:
        """True when the next `step` starts a new episode (resets the state first).

        Noise-reuse ES reads it to switch perturbations as a new episode starts.
        Systems whose episodes never end (`max_horizon is None`) need not define it.
        """
        del state
        if self.max_horizon is None:
            return jnp.asarray(False)
        raise NotImplementedError(
            f"{type(self).__name__} resets but defines no episode_done(state)"
        )

    def end_episode(self, state: Any) -> Any:
        """Marks the current episode as finished, so the next step starts a new one.

        Estimators call it to keep antithetic partners in step when only one of
        them failed. Systems that never reset return `state` unchanged.
        """
        return state

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
    first_loss: jax.Array  # the episode's first training loss (NaN before it)


def _where_tree(cond, on_true, on_false):
    def pick(a, b):
        c = jnp.reshape(cond, jnp.shape(cond) + (1,) * (jnp.ndim(a) - jnp.ndim(cond)))
        return jnp.where(c, a, b)

    return jax.tree.map(pick, on_true, on_false)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _stagger_mode(stagger) -> str:
    if stagger is True:
        return "offset"
    if stagger is False or stagger is None:
        return "none"
    if stagger not in STAGGER_MODES:
        raise ValueError(
            f"stagger must be a bool or one of {STAGGER_MODES}, got {stagger!r}"
        )
    return stagger


class LOptTraining(UnrolledSystem):
    """Train tasks of `family` with the learned optimizer `lopt`, episode after episode.

    Each particle's state holds its task configuration, parameters, optimizer state,
    step counter and horizon. When the step counter reaches the horizon the next step
    first starts a new episode: a new task configuration, new initial parameters, a
    fresh optimizer state and a new horizon.

    Args:
        family: where tasks come from; every episode samples a new configuration.
        lopt: the learned optimizer whose `theta` is meta-trained.
        horizon: episode length: an int, or `(low, high)` for a draw per episode
            (low == high allowed).
        horizon_draw: how `(low, high)` is drawn (`HORIZON_DRAWS`):
            - "episodes": log-uniform per episode. A truncated estimator spends a
              step's share of the meta-gradient on every inner step, so long
              episodes get most of it: the steps' horizons are uniform in [low, high].
            - "steps": density proportional to 1 / horizon**2, so that the inner
              steps' horizons are log-uniform: every octave of horizons gets the
              same share of the meta-gradient (with [50, 2000], half the episodes
              are under 100 steps and a fifth of the steps are in them).
        stagger: how particles' first episodes are staggered, so that episodes end
            at different times:
            - False / "none": every particle starts at step 0.
            - True / "offset": a fresh episode whose step counter starts at a random
              step in [0, horizon): the first episode is cut short. Free, and every
              state is one the optimizer reaches from a fresh initialisation, so a
              persistent estimator stays unbiased (its accumulator starts with the
              episode); the first episode only covers the early part of a run.
            - "advance": actually trains each particle a random number of steps in
              [0, horizon) with the initial `theta` (one masked `lax.scan` of
              `max_horizon - 1` steps in `init`). States are genuine mid-training
              states from the first iteration, but the first episode's meta-gradient
              misses the influence of those steps (truncation bias until the first
              reset), and `init` costs up to `max_horizon` inner steps per particle.
              Not for full-unroll ES, which calls `init` in every unroll.
        nonfinite_penalty: the loss reported for a step whose loss or parameters are
            not finite; that particle restarts at its next step.
        divergence_factor: a step whose training loss exceeds this multiple of its
            episode's first loss (where that is > 0) fails as a non-finite one
            does: it scores `nonfinite_penalty`, keeps the parameters and restarts
            the task, so a diverging optimizer is penalised once and its particle
            goes on giving signal from a fresh task. None: never.

    Example:
        >>> import jax
        >>> from es_l2o.lopt import MLPLOpt
        >>> from populations.quadratic import QuadraticFamily
        >>> lopt = MLPLOpt(hidden_sizes=(8,))
        >>> system = LOptTraining(QuadraticFamily(), lopt, (10, 100), stagger=True)
        >>> state = system.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        >>> bool(10 <= state.horizon <= 100), bool(0 <= state.step < state.horizon)
        (True, True)
    """

    def __init__(
        self,
        family: TaskFamily,
        lopt: LearnedOptimizer,
        horizon: int | Sequence[int] = 100,
        *,
        stagger: bool | str = False,
        horizon_draw: str = "episodes",
        nonfinite_penalty: float = 1e3,
        divergence_factor: float | None = None,
    ):
        if isinstance(horizon, int | float) and not isinstance(horizon, bool):
            low = high = horizon
        else:
            try:
                low, high = horizon
            except (TypeError, ValueError):
                raise ValueError(
                    "horizon must be a positive integer or a pair (low, high), "
                    f"got {horizon!r}"
                ) from None
        if int(low) != low or int(high) != high or not 1 <= low <= high:
            raise ValueError(
                "horizon must be a positive integer or a pair of integers "
                f"1 <= low <= high, got {horizon!r}"
            )
        self.family = family
        self.lopt = lopt
        if horizon_draw not in HORIZON_DRAWS:
            raise ValueError(
                f"horizon_draw must be one of {HORIZON_DRAWS}, got {horizon_draw!r}"
            )
        self.horizon_range = (int(low), int(high))
        self.horizon_draw = horizon_draw
        self.stagger_mode = _stagger_mode(stagger)
        self.stagger = self.stagger_mode != "none"
        self.nonfinite_penalty = float(nonfinite_penalty)
        if divergence_factor is not None and not divergence_factor > 1:
            raise ValueError(
                f"divergence_factor must be > 1 or None, got {divergence_factor!r}"
            )
        self.divergence_factor = divergence_factor
        self.has_validation = bool(family.has_validation)

    @property
    def max_horizon(self) -> int:
        return self.horizon_range[1]

    def sample_horizon(self, key: jax.Array) -> jax.Array:
        """An episode length in [low, high], drawn as `horizon_draw` says."""
        low, high = self.horizon_range
        if low == high:
            return jnp.asarray(low, jnp.int32)
        u = jax.random.uniform(key)
        if self.horizon_draw == "episodes":
            draw = jnp.exp(math.log(low) + u * math.log((high + 1) / low))
        else:  # inverse CDF of 1 / h**2 on [low, high + 1)
            draw = 1.0 / (1.0 / low - u * (1.0 / low - 1.0 / (high + 1)))
        return jnp.clip(jnp.floor(draw), low, high).astype(jnp.int32)

    def new_episode(self, key: jax.Array, theta: Theta) -> LOptTrainingState:
        """A fresh episode: new task, initial parameters, optimizer state, horizon."""
        key_cfg, key_init, key_horizon = jax.random.split(key, 3)
        cfg = self.family.sample(key_cfg)
        params = self.family.task(cfg).init(key_init)
        horizon = self.sample_horizon(key_horizon)
        opt_state = self.lopt.transform(theta, horizon).init(params)
        return LOptTrainingState(
            params,
            opt_state,
            cfg,
            jnp.zeros((), jnp.int32),
            horizon,
            jnp.full((), jnp.nan, jnp.float32),
        )

    def init(self, key, theta):
        key_episode, key_offset, key_advance = jax.random.split(key, 3)
        state = self.new_episode(key_episode, theta)
        if self.stagger_mode == "none":
            return state
        offset = jax.random.randint(key_offset, (), 0, state.horizon)
        if self.stagger_mode == "offset":
            return state.replace(step=offset)
        return self._advance(key_advance, theta, state, offset)

    def _advance(self, key, theta, state, num_steps):
        """Trains `num_steps` (< horizon, traced) steps: a masked scan of max length."""
        length = self.max_horizon - 1
        if length == 0:
            return state

        def body(state, xs):
            i, step_key = xs
            trained, _ = self._train_step(step_key, theta, state)
            return _where_tree(i < num_steps, trained, state), None

        xs = (jnp.arange(length), jax.random.split(key, length))
        state, _ = jax.lax.scan(body, state, xs)
        return state

    def end_episode(self, state):
        return state.replace(step=state.horizon)

    def episode_done(self, state):
        return state.step >= state.horizon

    def _train_step(self, key, theta, state):
        """One optimizer step on the current task (no reset check)."""
        task = self.family.task(state.cfg)
        loss, grads = jax.value_and_grad(task.loss)(state.params, key)
        opt = self.lopt.transform(theta, state.horizon)
        updates, opt_state = opt.update(
            grads, state.opt_state, state.params, value=loss
        )
        params = optax.apply_updates(state.params, updates)
        first_loss = jnp.where(jnp.isnan(state.first_loss), loss, state.first_loss)
        finite = jnp.isfinite(loss) & _all_finite(params)
        if self.divergence_factor is not None:
            diverged = (first_loss > 0) & (loss > self.divergence_factor * first_loss)
            finite = finite & ~diverged
        new_state = LOptTrainingState(
            params=_where_tree(finite, params, state.params),
            opt_state=_where_tree(finite, opt_state, state.opt_state),
            cfg=state.cfg,
            # a failed particle ends its episode so that the next step restarts it
            step=jnp.where(finite, state.step + 1, state.horizon),
            horizon=state.horizon,
            first_loss=first_loss.astype(jnp.float32),
        )
        loss = jnp.where(finite, loss, self.nonfinite_penalty)
        return new_state, (loss, finite)

    def step(self, key, theta, state):
        key_reset, key_loss = jax.random.split(key)
        reset = state.step >= state.horizon
        state = _where_tree(reset, self.new_episode(key_reset, theta), state)
        state, (loss, finite) = self._train_step(key_loss, theta, state)
        return state, StepOutput(loss=loss, reset=reset, finite=finite)

    def batch_step(self, keys, thetas, states):
        # Same keys and results as vmapping `step`, but new episodes (task sampling
        # and parameter initialisation, as costly as a training step) are drawn
        # only when some particle's episode has ended: under vmap a per-particle
        # `cond` would run both branches for everyone at every step.
        split = jax.vmap(jax.random.split)(keys)
        key_reset, key_loss = split[:, 0], split[:, 1]
        reset = states.step >= states.horizon
        # low-rank perturbed thetas share their base matrices: not batched
        axes = (0, particle_axes(thetas), 0)
        fresh = jax.lax.cond(
            jnp.any(reset),
            lambda: _where_tree(
                reset,
                jax.vmap(self.new_episode, in_axes=axes[:2])(key_reset, thetas),
                states,
            ),
            lambda: states,
        )
        train_step = jax.vmap(self._train_step, in_axes=axes)
        states, (loss, finite) = train_step(key_loss, thetas, fresh)
        return states, StepOutput(loss=loss, reset=reset, finite=finite)

    def meta_loss(self, key, theta, state, split="train"):
        del theta
        if split not in META_LOSS_SPLITS:
            raise ValueError(f"split must be one of {META_LOSS_SPLITS}, got {split!r}")
        task = self.family.task(state.cfg)
        fn = task.eval_loss if split == "validation" else task.loss
        value = fn(state.params, key)
        return jnp.where(jnp.isfinite(value), value, self.nonfinite_penalty)
