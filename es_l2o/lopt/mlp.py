"""A per-parameter MLP learned optimizer (the small MLP of learned_optimization / VeLO).

Every parameter is updated by the same small MLP, which reads per-parameter features
(gradient, parameter, momenta at several decays, root second moment, Adam-style
ratios; each divided by its tensor RMS) and global training-progress features, and
outputs a direction d and a log-magnitude m. The update is
`d * exp(exp_mult * m) * step_mult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from es_l2o.lopt import features as F
from es_l2o.lopt.base import LearnedOptimizer, check_num_steps


class MLPLOptState(NamedTuple):
    """Optimizer state: a step counter and the flat gradient statistics."""

    count: jax.Array
    stats: F.GradientStats


def _dense_init(key, fan_in, fan_out, scale=1.0):
    return {
        "w": scale * jax.random.normal(key, (fan_in, fan_out)) / jnp.sqrt(fan_in),
        "b": jnp.zeros((fan_out,)),
    }


class MLPLOpt(LearnedOptimizer):
    """Per-parameter MLP optimizer over the shared features of `features.py`.

    Args:
        hidden_sizes: widths of the MLP's hidden layers.
        momentum_decays: decays of the momentum accumulators fed as features.
        second_moment_decay: decay of the second-moment accumulator.
        exp_mult: alpha in `d * exp(alpha * m) * beta`.
        step_mult: beta in `d * exp(alpha * m) * beta`.
        output_init_scale: scale of the initial output and skip weights; small values
            start meta-training from an optimizer that barely moves the parameters.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> lopt = MLPLOpt(hidden_sizes=(8,))
        >>> opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
        >>> params = {"w": jnp.ones((2, 2))}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": jnp.ones((2, 2))}, state, params)
        >>> params = optax.apply_updates(params, updates)
    """

    name = "mlp"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32, 32),
        momentum_decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999),
        second_moment_decay: float = 0.999,
        exp_mult: float = 0.001,
        step_mult: float = 0.01,
        output_init_scale: float = 0.01,
    ):
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(
                "hidden_sizes must be one or more positive integers, "
                f"got {hidden_sizes!r}"
            )
        self.momentum_decays = tuple(float(b) for b in momentum_decays)
        if not all(0.0 <= b < 1.0 for b in self.momentum_decays):
            raise ValueError(
                f"momentum_decays must lie in [0, 1), got {momentum_decays!r}"
            )
        if not 0.0 <= second_moment_decay < 1.0:
            raise ValueError(
                f"second_moment_decay must lie in [0, 1), got {second_moment_decay!r}"
            )
        self.second_moment_decay = float(second_moment_decay)
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.output_init_scale = float(output_init_scale)

    def config(self):
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.momentum_decays),
            "second_moment_decay": self.second_moment_decay,
            "exp_mult": self.exp_mult,
            "step_mult": self.step_mult,
            "output_init_scale": self.output_init_scale,
        }

    @property
    def num_param_features(self) -> int:
        """g, p, momenta, sqrt(v), g / sqrt(v), momenta / sqrt(v)."""
        return 4 + 2 * len(self.momentum_decays)

    @property
    def num_time_features(self) -> int:
        return len(F.PROGRESS_CENTERS) + len(F.TIMESCALES)

    def init(self, key):
        sizes = (self.num_param_features, *self.hidden_sizes)
        keys = jax.random.split(key, len(sizes) + 2)
        theta = {
            f"layer_{i}": _dense_init(keys[i], a, b)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        }
        theta["time"] = {
            "w": jax.random.normal(keys[-2], (self.num_time_features, sizes[1]))
            / jnp.sqrt(self.num_time_features)
        }
        theta["output"] = _dense_init(keys[-1], sizes[-1], 2, self.output_init_scale)
        theta["skip"] = {"w": jnp.zeros((self.num_param_features, 2))}
        return theta

    def param_features(self, grad, param, stats: F.GradientStats, layout):
        """Per-parameter inputs (num_param_features, N), RMS-normalised per tensor."""
        inv_rms = 1.0 / (jnp.sqrt(stats.second_moment) + 1e-8)
        rows = jnp.concatenate(
            [
                grad[None],
                param[None],
                stats.momenta,
                jnp.sqrt(stats.second_moment)[None],
                (grad * inv_rms)[None],
                stats.momenta * inv_rms,
            ]
        )
        return F.normalize_per_tensor(rows, layout)

    def transform(self, theta, num_steps):
        check_num_steps(num_steps)

        def init_fn(params):
            layout = F.TensorLayout.of(params)
            return MLPLOptState(
                count=jnp.zeros((), jnp.int32),
                stats=F.init_gradient_stats(
                    layout.total_size, len(self.momentum_decays)
                ),
            )

        def update_fn(updates, state, params=None, *, value=None, **extra):
            del value, extra  # this architecture reads no loss
            if params is None:
                raise ValueError(
                    "MLPLOpt reads the parameters: call update(grads, state, params)"
                )
            layout = F.TensorLayout.of(updates)
            count = optax.safe_increment(state.count)
            if layout.total_size == 0:
                return updates, MLPLOptState(count, state.stats)
            grad = F.clip_gradient(layout.flatten(updates))
            stats = F.update_gradient_stats(
                state.stats,
                grad,
                momentum_decays=self.momentum_decays,
                second_moment_decay=self.second_moment_decay,
            )
            inputs = self.param_features(grad, layout.flatten(params), stats, layout)
            time = jnp.concatenate(
                [
                    F.progress_features(state.count, num_steps),
                    F.timescale_features(state.count),
                ]
            )
            # feature-major: activations are (width, N), so every matmul streams
            # over the long parameter axis
            bias = theta["layer_0"]["b"] + time @ theta["time"]["w"]
            hidden = jax.nn.relu(theta["layer_0"]["w"].T @ inputs + bias[:, None])
            for i in range(1, len(self.hidden_sizes)):
                layer = theta[f"layer_{i}"]
                hidden = jax.nn.relu(layer["w"].T @ hidden + layer["b"][:, None])
            out = theta["output"]["w"].T @ hidden + theta["output"]["b"][:, None]
            out = out + theta["skip"]["w"].T @ inputs
            step = out[0] * jnp.exp(self.exp_mult * out[1]) * self.step_mult
            dtypes = [g.dtype for g in jax.tree_util.tree_leaves(updates)]
            return layout.unflatten(step, dtypes), MLPLOptState(count, stats)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
