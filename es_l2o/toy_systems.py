"""Small unrolled systems with known answers, for estimator tests and analysis.

`InfluenceBalancing` is the linear system of the PES paper (Vicol, Metz and
Sohl-Dickstein 2021, arXiv 2112.13835, section 5.1): the loss right after a step
pulls theta one way while its influence on later losses pulls it the other way, so
estimators that ignore the unroll's past (truncated ES, truncated backprop) move theta
the wrong way. `MatrixFeedback` is a smooth system whose theta holds matrices, for
the low-rank estimators (`es_l2o.es.lowrank`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from es_l2o.lowrank import dense
from es_l2o.unroll import StepOutput, UnrolledSystem


@struct.dataclass
class InfluenceState:
    s: jax.Array  # the n-dimensional state
    step: jax.Array  # steps taken in the current episode


class InfluenceBalancing(UnrolledSystem):
    """s <- A s + theta b with A = 0.5 I + 0.5 superdiagonal, loss 0.5 (s[0] - 1)^2.

    b has `num_positive` entries +1 followed by -1; s starts at ones. The stationary
    state gives s[0] = 2 theta sum(b), so the long-run optimum is
    theta* = 1 / (2 sum(b)) (-1/6 for the paper's n = 23, 10 positive entries).
    `theta` is a 0-d array.

    Args:
        n: state dimension.
        num_positive: how many leading entries of b are +1 (the rest are -1).
        horizon: episode length after which s restarts at ones; None: never reset.
        stagger: start each particle's first episode at a random step in
            [0, horizon) (from s0), so that particles reset at different times.

    Example:
        >>> system = InfluenceBalancing()
        >>> theta = jnp.asarray(0.5)
        >>> state = system.init(jax.random.key(0), theta)
        >>> state, out = system.step(jax.random.key(1), theta, state)
        >>> round(float(out.loss), 4)  # s[0] = 0.5 + 0.5 + 0.5
        0.125
        >>> round(system.optimum, 4)
        -0.1667
    """

    def __init__(
        self,
        n: int = 23,
        num_positive: int = 10,
        horizon: int | None = None,
        *,
        stagger: bool = False,
    ):
        if not 0 <= num_positive <= n or n < 1:
            raise ValueError(
                f"need n >= 1 and 0 <= num_positive <= n, got n={n}, "
                f"num_positive={num_positive}"
            )
        if horizon is not None and (int(horizon) != horizon or horizon < 1):
            raise ValueError(
                f"horizon must be a positive integer or None, got {horizon}"
            )
        self.n = int(n)
        self.num_positive = int(num_positive)
        self.horizon = None if horizon is None else int(horizon)
        if stagger and self.horizon is None:
            raise ValueError("stagger needs a horizon: this system never resets")
        self.stagger = bool(stagger)
        self.max_horizon = self.horizon
        self.b = jnp.concatenate(
            [jnp.ones(num_positive), -jnp.ones(n - num_positive)]
        ).astype(jnp.float32)

    @property
    def optimum(self) -> float:
        """theta* of the never-resetting system (None when sum(b) == 0)."""
        total = float(jnp.sum(self.b))
        return None if total == 0 else 1.0 / (2.0 * total)

    def _dynamics(self, theta, s):
        shifted = jnp.concatenate([s[1:], jnp.zeros((1,), s.dtype)])
        return 0.5 * s + 0.5 * shifted + jnp.reshape(theta, ()) * self.b

    def init(self, key, theta):
        del theta
        step = jnp.zeros((), jnp.int32)
        if self.stagger:
            step = jax.random.randint(key, (), 0, self.horizon)
        return InfluenceState(jnp.ones((self.n,)), step)

    def step(self, key, theta, state):
        del key
        if self.horizon is None:
            reset = jnp.asarray(False)
        else:
            reset = state.step >= self.horizon
            state = InfluenceState(
                jnp.where(reset, jnp.ones_like(state.s), state.s),
                jnp.where(reset, 0, state.step),
            )
        s = self._dynamics(theta, state.s)
        loss = 0.5 * (s[0] - 1.0) ** 2
        finite = jnp.isfinite(loss)
        return InfluenceState(s, state.step + 1), StepOutput(loss, reset, finite)

    def episode_done(self, state):
        if self.horizon is None:
            return jnp.asarray(False)
        return state.step >= self.horizon

    def end_episode(self, state):
        if self.horizon is None:
            return state
        return state.replace(step=jnp.asarray(self.horizon, state.step.dtype))

    def meta_loss(self, key, theta, state, split="train"):
        del key, theta, split
        return 0.5 * (state.s[0] - 1.0) ** 2

    def episode_loss(self, theta, num_steps: int | None = None) -> jax.Array:
        """Mean loss over one episode of `num_steps` (default: the horizon) from s0.

        Differentiable in theta: `jax.grad(system.episode_loss)(theta)` is the exact
        full-horizon meta-gradient that unbiased estimators must match on average.
        """
        num_steps = self.horizon if num_steps is None else num_steps
        if num_steps is None:
            raise ValueError("this system never resets: pass num_steps")

        def body(s, _):
            s = self._dynamics(theta, s)
            return s, 0.5 * (s[0] - 1.0) ** 2

        _, losses = jax.lax.scan(body, jnp.ones((self.n,)), None, length=num_steps)
        return jnp.mean(losses)


@struct.dataclass
class FeedbackState:
    s: jax.Array  # the m-dimensional state
    step: jax.Array  # steps taken in the current episode


class MatrixFeedback(UnrolledSystem):
    """A smooth system whose theta holds matrices, for the low-rank estimators.

    theta = {"w": (m, n), "v": (n, m), "b": (n,)}; each step reads
    `out = s w + b`, scores `0.5 mean((out - 1)^2)` and moves
    `s <- 0.5 s + 0.5 tanh(out v)`; s starts at ones and restarts every `horizon`
    steps. Every product goes through `es_l2o.lowrank.dense`, so particles with
    low-rank perturbed matrices run on the shared base. `episode_loss` is the
    exact objective (`jax.grad` gives the meta-gradient estimators must match).

    Example:
        >>> system = MatrixFeedback(m=4, n=3, horizon=5)
        >>> theta = system.initial_theta(jax.random.key(0))
        >>> sorted(theta), theta["w"].shape
        (['b', 'v', 'w'], (4, 3))
        >>> bool(jnp.isfinite(system.episode_loss(theta)))
        True
    """

    def __init__(self, m: int = 4, n: int = 3, horizon: int = 5):
        if min(m, n, horizon) < 1:
            raise ValueError(f"need m, n, horizon >= 1, got {m}, {n}, {horizon}")
        self.m, self.n, self.horizon = int(m), int(n), int(horizon)
        self.max_horizon = self.horizon
        shapes = {"w": (self.m, self.n), "v": (self.n, self.m), "b": (self.n,)}
        self.theta_template = {
            k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()
        }

    def initial_theta(self, key: jax.Array) -> dict:
        """A theta of moderate scale (loss and gradient of order one)."""
        keys = jax.random.split(key, 3)
        return {
            name: 0.5 * jax.random.normal(k, spec.shape)
            for (name, spec), k in zip(self.theta_template.items(), keys, strict=True)
        }

    def _dynamics(self, theta, s):
        out = dense(s, theta["w"]) + theta["b"]
        loss = 0.5 * jnp.mean((out - 1.0) ** 2)
        return 0.5 * s + 0.5 * jnp.tanh(dense(out, theta["v"])), loss

    def init(self, key, theta):
        del key, theta
        return FeedbackState(jnp.ones((self.m,)), jnp.zeros((), jnp.int32))

    def step(self, key, theta, state):
        del key
        reset = state.step >= self.horizon
        s = jnp.where(reset, jnp.ones_like(state.s), state.s)
        s, loss = self._dynamics(theta, s)
        step = jnp.where(reset, 0, state.step) + 1
        return FeedbackState(s, step), StepOutput(loss, reset, jnp.isfinite(loss))

    def episode_done(self, state):
        return state.step >= self.horizon

    def end_episode(self, state):
        return state.replace(step=jnp.asarray(self.horizon, state.step.dtype))

    def meta_loss(self, key, theta, state, split="train"):
        del key, split
        return self._dynamics(theta, state.s)[1]

    def episode_loss(self, theta) -> jax.Array:
        """Mean loss over one episode from s0 (differentiable in theta)."""

        def body(s, _):
            return self._dynamics(theta, s)

        _, losses = jax.lax.scan(body, jnp.ones((self.m,)), None, length=self.horizon)
        return jnp.mean(losses)
