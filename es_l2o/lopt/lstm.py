"""The coordinatewise LSTM optimizer of Andrychowicz et al. 2016 (arXiv 1606.04474).

Every parameter coordinate is updated by the same two-layer LSTM (20 units each),
which keeps its own state per coordinate. Its input is the gradient preprocessed as
`(log|g| / p, sign g)` (or `(-1, exp(p) g)` for tiny gradients) with p = 10; its
output, times an output scale (0.1 in the paper), is the update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from es_l2o.lopt import features as F
from es_l2o.lopt.base import (
    LearnedOptimizer,
    check_hidden_sizes,
    check_num_steps,
    checked_transformation,
)
from es_l2o.lowrank import materialize


class LSTMLOptState(NamedTuple):
    """Optimizer state: a step counter and per-coordinate LSTM states.

    hidden, cell: one tuple per layer, holding a `(*part_shape, units)` array per
    part of the parameters' `features.TensorLayout` (the small tensors as one flat
    vector, then each large tensor).
    """

    count: jax.Array
    hidden: tuple[jax.Array, ...]
    cell: tuple[jax.Array, ...]


def lstm_cell(params, x, h, c):
    """One LSTM step on a batch: x (B, in), h and c (B, H) -> (h, c)."""
    gates = x @ params["wx"] + h @ params["wh"] + params["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


class LSTMLOpt(LearnedOptimizer):
    """Coordinatewise stacked LSTM with shared weights (Andrychowicz et al. 2016).

    Args:
        hidden_sizes: units of each LSTM layer (the paper: two layers of 20).
        preprocess_p: p of the log / sign gradient preprocessing.
        output_scale: multiplies the LSTM's linear output (the paper: 0.1).
        init_noise: scale of the random part of the initial weights.

    The initial `theta` adds `init_noise`-scaled random weights to a path that
    carries `sign(g)` through the first unit of every layer to a negative output, so
    that meta-training starts from a sign-descent-like optimizer (with the LSTM's
    cell as momentum) rather than a random walk.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> lopt = LSTMLOpt()
        >>> opt = lopt.transform(lopt.init(jax.random.key(0)), num_steps=10)
        >>> params = {"w": jnp.ones(3)}
        >>> updates, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
        >>> bool(jnp.all(updates["w"] < 0))
        True
    """

    name = "lstm"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (20, 20),
        preprocess_p: float = F.LSTM_PREPROCESS_P,
        output_scale: float = 0.1,
        init_noise: float = 0.1,
    ):
        self.hidden_sizes = check_hidden_sizes(hidden_sizes)
        if preprocess_p <= 0:
            raise ValueError(f"preprocess_p must be > 0, got {preprocess_p!r}")
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        self.init_noise = float(init_noise)

    def config(self):
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "init_noise": self.init_noise,
        }

    def init(self, key):
        # one compiled program instead of dozens of eagerly dispatched small ops
        return jax.jit(self._init)(key)

    def _init(self, key):
        sizes = (2, *self.hidden_sizes)
        keys = jax.random.split(key, 2 * len(self.hidden_sizes) + 1)
        theta = {}
        for layer, (n_in, n_h) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            kx, kh = keys[2 * layer], keys[2 * layer + 1]
            scale = self.init_noise
            wx = scale * jax.random.normal(kx, (n_in, 4 * n_h)) / np.sqrt(n_in)
            wh = scale * jax.random.normal(kh, (n_h, 4 * n_h)) / np.sqrt(n_h)
            b = jnp.zeros((4 * n_h,))
            # unit 0 carries the sign of the gradient (input column 1 in layer 0):
            # gates are ordered (input, forget, candidate, output)
            source = 1 if layer == 0 else 0
            wx = wx.at[source, 2 * n_h].set(2.0)
            b = b.at[0].set(2.0).at[3 * n_h].set(2.0)
            theta[f"layer_{layer}"] = {"wx": wx, "wh": wh, "b": b}
        n_last = sizes[-1]
        w_out = self.init_noise * jax.random.normal(keys[-1], (n_last, 1))
        w_out = w_out / np.sqrt(n_last)
        theta["output"] = {"w": w_out.at[0, 0].set(-1.0), "b": jnp.zeros((1,))}
        return theta

    def _coordinates(self, theta, grad, hidden, cell):
        """The LSTM on every coordinate of one part `grad (*shape)`: its update and
        the new per-layer states `(*shape, units)`."""
        x = F.lstm_preprocess(F.clip_gradient(grad), self.preprocess_p)
        new_hidden, new_cell = [], []
        for layer in range(len(self.hidden_sizes)):
            h, c = lstm_cell(theta[f"layer_{layer}"], x, hidden[layer], cell[layer])
            new_hidden.append(h)
            new_cell.append(c)
            x = h
        out = x @ theta["output"]["w"] + theta["output"]["b"]
        return self.output_scale * out[..., 0], tuple(new_hidden), tuple(new_cell)

    def transform(self, theta, num_steps):
        check_num_steps(num_steps)
        # reads its (small) matrices entry by entry: low-rank perturbed ones whole
        theta = materialize(theta)

        def init_fn(params):
            layout = F.TensorLayout.of(params)
            zeros = tuple(tuple(layout.zeros(params, (h,))) for h in self.hidden_sizes)
            return LSTMLOptState(jnp.zeros((), jnp.int32), zeros, zeros)

        def update_fn(updates, state, params=None, *, value=None, **extra):
            del params, value, extra  # reads neither parameters nor the loss
            layout = F.TensorLayout.of(updates)
            count = optax.safe_increment(state.count)
            if layout.total_size == 0:
                return updates, state._replace(count=count)
            steps, hidden, cell = [], [], []
            for k, grad in enumerate(layout.split(updates)):
                h = [layer[k] for layer in state.hidden]
                c = [layer[k] for layer in state.cell]
                step, h, c = self._coordinates(theta, grad, h, c)
                steps.append(step)
                hidden.append(h)
                cell.append(c)
            dtypes = [g.dtype for g in jax.tree_util.tree_leaves(updates)]
            new_state = LSTMLOptState(
                count, tuple(zip(*hidden, strict=True)), tuple(zip(*cell, strict=True))
            )
            return layout.merge(steps, dtypes), new_state

        return checked_transformation(init_fn, update_fn)
