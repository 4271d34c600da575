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


def _vector(shape):
    """The view the MLP optimizer works on: a small tensor as one vector (so that
    small tensors of any shape share zero-padded buckets), a large one as itself
    (read in place, keeping any sharding of its axes).

    Example:
        >>> _vector((13, 3)), _vector((512, 256))
        ((39,), (512, 256))
    """
    size = int(np.prod(shape, dtype=np.int64))
    return (size,) if size <= F.BUCKET_MAX_ENTRIES else tuple(shape)


class MLPLOptState(NamedTuple):
    """Optimizer state: a step counter and, per group of tensors
    (`features.ShapeGroups` of the tensors as zero-padded vectors), the momenta
    `(members, num_momenta, length)` and the second moment `(members, length)`."""

    count: jax.Array
    momenta: tuple[jax.Array, ...]
    second_moment: tuple[jax.Array, ...]


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
        self.hidden_sizes = check_hidden_sizes(hidden_sizes)
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

    def param_features(self, grad, param, momenta, second_moment) -> list[jax.Array]:
        """One tensor's inputs (each of its shape), before normalisation.

        g, p, the momenta, sqrt(v), g / sqrt(v) and the momenta / sqrt(v); each is
        then divided by its RMS over the tensor (`_tensor_statistics`).
        """
        root = jnp.sqrt(second_moment)
        inv_root = 1.0 / (root + 1e-8)
        nm = len(self.momentum_decays)
        return [
            grad,
            param,
            *(momenta[d] for d in range(nm)),
            root,
            grad * inv_root,
            *(momenta[d] * inv_root for d in range(nm)),
        ]

    def _tensor_statistics(self, grad, param, momenta, second_moment, extent):
        """One tensor's new accumulators and the RMS of each input feature.

        grad, param: the tensor in its view (zero-padded); extent: the view's true
        extent.
        """
        grad = F.clip_gradient(grad.astype(jnp.float32))
        param = param.astype(jnp.float32)
        momenta, second_moment = F.update_moments(
            momenta, second_moment, grad, self.momentum_decays, self.second_moment_decay
        )
        feats = self.param_features(grad, param, momenta, second_moment)
        inv = 1.0 / jnp.maximum(jnp.prod(extent), 1.0)  # padding features are zero
        rms = jnp.stack([jnp.sqrt(jnp.sum(f * f) * inv + 1e-8) for f in feats])
        return (grad, param, momenta, second_moment), rms

    @property
    def fused(self) -> bool:
        """Whether the MLP is small enough to run as one elementwise pass.

        Unrolled into scalar-times-array sums, a small MLP fuses with its features
        into one pass that keeps every activation in registers. Past about 600
        multiply-adds per parameter XLA splits that pass and duplicates work between
        the pieces (compilation grows without bound), so larger MLPs run as
        feature-major matrix products instead.
        """
        sizes = (self.num_param_features, *self.hidden_sizes, 2)
        skip = 2 * self.num_param_features
        return F.mlp_multiply_adds(sizes) + skip <= F.FUSED_MAX_MULTIPLY_ADDS

    def runs_fused(self, group: F.Group) -> bool:
        """Whether `group` runs the unrolled MLP (else: matrix products).

        Only groups of at least `features.FUSED_MIN_ENTRIES` entries do: the
        unrolled pass pays off over long tensors, and over a group of one SIMD
        vector the compiler runs away on it (see `FUSED_MIN_ENTRIES`).

        Example:
            >>> groups = F.ShapeGroups.of({"b": jnp.ones(3), "w": jnp.ones(4096)},
            ...                           _vector)
            >>> [MLPLOpt(hidden_sizes=(8,)).runs_fused(g) for g in groups]
            [False, True]
        """
        return self.fused and group.num_entries >= F.FUSED_MIN_ENTRIES

    def _dense_mlp(self, theta, bias, x):
        """The MLP on feature-major inputs `x (features, ...)`: one matrix product
        per layer over every entry, any trailing shape (and its sharding) kept."""

        def dense(w, inputs):
            return jnp.tensordot(w.T, inputs, axes=1)

        def column(b):
            return b.reshape(b.shape + (1,) * (x.ndim - 1))

        hidden = jax.nn.relu(dense(theta["layer_0"]["w"], x) + column(bias))
        for i in range(1, len(self.hidden_sizes)):
            layer = theta[f"layer_{i}"]
            hidden = jax.nn.relu(dense(layer["w"], hidden) + column(layer["b"]))
        out = dense(theta["output"]["w"], hidden) + column(theta["output"]["b"])
        out = out + dense(theta["skip"]["w"], x)
        return out[0] * jnp.exp(self.exp_mult * out[1]) * self.step_mult

    def _matmul_steps(self, theta, bias, groups, per_group, rms_per_group):
        """The updates of `groups` with the MLP as feature-major matrix products.

        The normalised features of all bucketed (vector-view) tensors form one
        `(features, entries)` matrix, so each layer is one long matrix product over
        all of them; a large tensor keeps its own shape. Returns
        `{leaf index: update}`.
        """
        columns, places, steps = [], [], {}
        for group, tensors, rms in zip(groups, per_group, rms_per_group, strict=True):
            feats = jax.vmap(self.param_features)(*tensors[:4])
            for k, (leaf, view) in enumerate(
                zip(group.leaves, group.views, strict=True)
            ):
                normed = [f[k] / rms[k, j] for j, f in enumerate(feats)]
                if group.in_place:
                    step = self._dense_mlp(theta, bias, jnp.stack(normed))
                    steps[leaf] = step.reshape(group.shapes[k])
                else:
                    n = int(np.prod(view, dtype=np.int64))
                    columns.append(jnp.stack([f.reshape(-1)[:n] for f in normed]))
                    places.append((leaf, n, group.shapes[k]))
        if columns:
            step = self._dense_mlp(theta, bias, jnp.concatenate(columns, axis=1))
            start = 0
            for leaf, n, shape in places:
                steps[leaf] = step[start : start + n].reshape(shape)
                start += n
        return steps

    def _tensor_step(self, tensor, weights):
        """One tensor's update: the MLP with this tensor's folded weights.

        weights: the MLP's layers with the first layer and the skip connection
        divided by this tensor's feature RMS (so the features are normalised
        without a pass of their own) and the time features folded into the bias.
        """
        feats = self.param_features(*tensor)
        layers = [(weights["w0"], weights["b0"])]
        layers += [
            (weights[f"layer_{i}"]["w"], weights[f"layer_{i}"]["b"])
            for i in range(1, len(self.hidden_sizes))
        ]
        layers.append((weights["out_w"], weights["out_b"]))

        def dense(inputs, w, b):
            return [
                sum((wk * x for wk, x in zip(col, inputs, strict=True)), bj)
                for col, bj in zip(w.T, b, strict=True)
            ]

        hidden = feats
        for w, b in layers[:-1]:
            hidden = [jax.nn.relu(h) for h in dense(hidden, w, b)]
        out = dense(hidden, *layers[-1])
        out = [
            o + s
            for o, s in zip(out, dense(feats, weights["skip"], [0.0, 0.0]), strict=True)
        ]
        return out[0] * jnp.exp(self.exp_mult * out[1]) * self.step_mult

    def _fused_steps(self, theta, shared, groups, per_group, rms_per_group, flag):
        """Updates of the groups that `runs_fused`, one list entry per leaf (None for
        the others): each group's tensors through the unrolled MLP, with the first
        layer and the skip connection divided by each tensor's feature RMS. `flag`:
        a traced True (`features.compute_once`)."""
        group_args = []
        for g, tensors, rms in zip(groups, per_group, rms_per_group, strict=True):
            if not self.runs_fused(g):
                group_args.append(None)
                continue
            n = len(g.leaves)
            weights = jax.tree.map(
                lambda x, n=n: jnp.broadcast_to(x, (n, *x.shape)), shared
            )
            # w0 / rms: normalised features without a pass of their own
            weights["w0"] = theta["layer_0"]["w"][None] / rms[:, :, None]
            weights["skip"] = theta["skip"]["w"][None] / rms[:, :, None]
            group_args.append((tensors, weights))
        return groups.map(self._tensor_step, flag, group_args)

    def _init_state(self, params) -> MLPLOptState:
        """The optimizer state of `params` (never reads leaf values)."""
        nm = len(self.momentum_decays)
        groups = F.ShapeGroups.of(params, _vector)
        leaves = jax.tree_util.tree_leaves(params)
        return MLPLOptState(
            count=jnp.zeros((), jnp.int32),
            momenta=tuple(g.zeros(leaves, (nm,)) for g in groups),
            second_moment=tuple(g.zeros(leaves) for g in groups),
        )

    def _shared_weights(self, theta, count, num_steps) -> dict:
        """The weights every tensor shares this step (time features folded into the
        first layer's bias)."""
        time = jnp.concatenate(
            [F.progress_features(count, num_steps), F.timescale_features(count)]
        )
        return {
            "b0": theta["layer_0"]["b"] + time @ theta["time"]["w"],
            "out_w": theta["output"]["w"],
            "out_b": theta["output"]["b"],
            **{
                f"layer_{i}": theta[f"layer_{i}"]
                for i in range(1, len(self.hidden_sizes))
            },
        }

    def _update(self, theta, num_steps, updates, state, params):
        if params is None:
            raise ValueError(
                "MLPLOpt reads the parameters: call update(grads, state, params)"
            )
        grads, treedef = jax.tree_util.tree_flatten(updates)
        count = optax.safe_increment(state.count)
        if not grads:
            return updates, state._replace(count=count)
        groups = F.ShapeGroups.of(updates, _vector)
        params = treedef.flatten_up_to(params)
        shared = self._shared_weights(theta, state.count, num_steps)
        per_group, rms_per_group = [], []
        for g, m, v in zip(groups, state.momenta, state.second_moment, strict=True):
            tensors, rms = jax.vmap(self._tensor_statistics)(
                g.stack(grads), g.stack(params), m, v, g.extents()
            )
            per_group.append(tensors)
            rms_per_group.append(rms)
        steps = self._fused_steps(
            theta, shared, groups, per_group, rms_per_group, state.count >= 0
        )
        rest = [k for k, g in enumerate(groups) if not self.runs_fused(g)]
        by_leaf = self._matmul_steps(
            theta,
            shared["b0"],
            [groups[k] for k in rest],
            [per_group[k] for k in rest],
            [rms_per_group[k] for k in rest],
        )
        for leaf, step in by_leaf.items():
            steps[leaf] = step
        steps = [
            step.astype(jnp.result_type(g))
            for step, g in zip(steps, grads, strict=True)
        ]
        new_state = MLPLOptState(
            count=count,
            momenta=tuple(t[2] for t in per_group),
            second_moment=tuple(t[3] for t in per_group),
        )
        return jax.tree_util.tree_unflatten(treedef, steps), new_state

    def transform(self, theta, num_steps):
        check_num_steps(num_steps)
        # reads its (small) matrices entry by entry: low-rank perturbed ones whole
        theta = materialize(theta)

        def update_fn(updates, state, params=None, *, value=None, **extra):
            del value, extra  # this architecture reads no loss
            return self._update(theta, num_steps, updates, state, params)

        return checked_transformation(self._init_state, update_fn)
