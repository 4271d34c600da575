"""Gradient statistics and input features shared by every learned optimizer.

Learned optimizers here work on one flat float32 vector that holds every parameter
of the optimizee (a `TensorLayout` maps pytrees to and from it), so each feature is a
handful of fused XLA ops whatever the number of tensors. Per-tensor reductions
(RMS normalisation, tensor statistics) are segment sums over that vector.

Example:
    >>> import jax.numpy as jnp
    >>> layout = TensorLayout.of({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    >>> layout.num_tensors, layout.total_size
    (2, 9)
    >>> stats = update_gradient_stats(
    ...     init_gradient_stats(layout.total_size, 2), layout.flatten({"w": jnp.ones((2, 3)),
    ...     "b": jnp.ones(3)}), momentum_decays=(0.5, 0.9), second_moment_decay=0.99)
    >>> [round(float(m), 3) for m in stats.momenta[:, 0]]
    [0.5, 0.1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: centres c of the training-progress features tanh(10 (t / T - c)), as in VeLO
PROGRESS_CENTERS = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
#: time scales tau of the features tanh(t / tau - 1)
TIMESCALES = tuple(float(10 ** (k / 2)) for k in range(11))  # 1 ... 1e5
GRADIENT_CLIP = 1000.0


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """Static map between a pytree of tensors and one flat float32 vector.

    Built from shapes only, so it works on abstract inputs (`jax.ShapeDtypeStruct`).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]

    @classmethod
    def of(cls, tree) -> TensorLayout:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        shapes = tuple(tuple(int(d) for d in jnp.shape(x)) for x in leaves)
        dtypes = tuple(jnp.result_type(x) for x in leaves)
        return cls(treedef, shapes, dtypes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def total_size(self) -> int:
        return sum(self.sizes)

    @property
    def ranks(self) -> np.ndarray:
        """Rank of each tensor, shape (num_tensors,)."""
        return np.asarray([len(s) for s in self.shapes], np.int32)

    @property
    def segment_ids(self) -> np.ndarray:
        """For every flat entry the index of its tensor, shape (total_size,)."""
        return np.repeat(np.arange(self.num_tensors, dtype=np.int32), self.sizes)

    def flatten(self, tree) -> jax.Array:
        """All leaves as one float32 vector (a single concatenate)."""
        leaves = jax.tree_util.tree_leaves(tree)
        if not leaves:
            return jnp.zeros((0,), jnp.float32)
        return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])

    def unflatten(self, flat: jax.Array, dtypes: Sequence[Any] | None = None):
        """Inverse of `flatten`; leaves are cast to `dtypes` (default: the layout's)."""
        dtypes = self.dtypes if dtypes is None else dtypes
        offsets = np.cumsum((0, *self.sizes))
        leaves = [
            flat[a:b].reshape(shape).astype(dtype)
            for a, b, shape, dtype in zip(
                offsets[:-1], offsets[1:], self.shapes, dtypes, strict=True
            )
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tensor_mean(self, x: jax.Array) -> jax.Array:
        """Mean of `x[..., N]` within each tensor: shape (..., num_tensors)."""
        sums = jax.ops.segment_sum(
            jnp.moveaxis(x, -1, 0),
            self.segment_ids,
            num_segments=self.num_tensors,
            indices_are_sorted=True,
        )
        return jnp.moveaxis(sums, 0, -1) / np.asarray(self.sizes, np.float32)

    def broadcast(self, per_tensor: jax.Array) -> jax.Array:
        """Spreads per-tensor values `(..., num_tensors)` to every entry: `(..., N)`."""
        return jnp.take(per_tensor, self.segment_ids, axis=-1)


class GradientStats(NamedTuple):
    """Exponential moving averages of the flat gradient.

    momenta: (num_momentum_decays, N) first moments; second_moment: (N,).
    """

    momenta: jax.Array
    second_moment: jax.Array


def init_gradient_stats(total_size: int, num_momentum_decays: int) -> GradientStats:
    """Zero accumulators for `total_size` parameters."""
    return GradientStats(
        momenta=jnp.zeros((num_momentum_decays, total_size), jnp.float32),
        second_moment=jnp.zeros((total_size,), jnp.float32),
    )


def update_gradient_stats(
    stats: GradientStats,
    grad: jax.Array,
    *,
    momentum_decays: Sequence[float],
    second_moment_decay: float,
) -> GradientStats:
    """One EMA step: m_k <- b_k m_k + (1 - b_k) g and v <- b v + (1 - b) g^2."""
    decays = jnp.asarray(momentum_decays, jnp.float32)[:, None]
    momenta = decays * stats.momenta + (1.0 - decays) * grad
    second_moment = (
        second_moment_decay * stats.second_moment
        + (1.0 - second_moment_decay) * grad**2
    )
    return GradientStats(momenta, second_moment)


def clip_gradient(grad: jax.Array, bound: float = GRADIENT_CLIP) -> jax.Array:
    """Clips to +-bound and replaces NaN by 0 (the task's loss reports the failure)."""
    return jnp.clip(jnp.nan_to_num(grad, nan=0.0), -bound, bound)


def normalize_per_tensor(
    x: jax.Array, layout: TensorLayout, eps: float = 1e-8
) -> jax.Array:
    """Divides each feature row of `x[..., N]` by its RMS within each tensor."""
    rms = jnp.sqrt(layout.tensor_mean(x**2) + eps)
    return x / layout.broadcast(rms)


def progress_features(
    step: jax.Array, num_steps: jax.Array, centers: Sequence[float] = PROGRESS_CENTERS
) -> jax.Array:
    """Training-progress features tanh(10 (t / T - c)), one per centre c."""
    frac = jnp.asarray(step, jnp.float32) / jnp.maximum(
        jnp.asarray(num_steps, jnp.float32), 1.0
    )
    return jnp.tanh(10.0 * (frac - jnp.asarray(centers, jnp.float32)))


def timescale_features(
    step: jax.Array, timescales: Sequence[float] = TIMESCALES
) -> jax.Array:
    """Step-count features tanh(t / tau - 1), one per time scale tau."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.tanh(t / jnp.asarray(timescales, jnp.float32) - 1.0)
