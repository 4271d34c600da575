"""Matrices perturbed by a low-rank term, kept as a shared base and small factors.

EGGROLL (Sarkar et al. 2025, arXiv 2511.16652) perturbs each m x n meta-parameter
matrix of particle i by `scale_i * A_i B_i^T` with A_i (m x r) and B_i (n x r). A
`LowRankPerturbed` holds the four pieces; `dense(x, w)` computes `x w` for a plain
array and `x base + scale (x A) B^T` for a perturbed one, so that under a vmap over
particles whose `base` is not batched (`particle_axes`) the base product is one
matmul that reads the base once for every particle and no particle's matrix is
ever formed. A tensor of rank > 2 is the matrix `(shape[0], prod(shape[1:]))`.

Learned optimizers multiply their theta matrices through `dense`; code that reads
a matrix entry by entry calls `materialize` first (which forms that one matrix).

Example:
    >>> import jax.numpy as jnp
    >>> w = LowRankPerturbed(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((2, 1)), 0.5)
    >>> dense(jnp.ones((1, 2)), w).tolist()
    [[2.0, 2.0]]
    >>> materialize({"w": w})["w"].tolist()
    [[1.5, 0.5], [0.5, 1.5]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LowRankPerturbed:
    """The matrix `base + scale * (a @ b.T).reshape(base.shape)`.

    base: the shared matrix (m, ...); a: (m, r); b: (n, r) with n the product of
    base's trailing dimensions; scale: a scalar (the particle's sign times
    std / sqrt(r)).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def dtype(self):
        return self.base.dtype

    def materialize(self) -> jax.Array:
        """The whole perturbed matrix (forms it: for small matrices only)."""
        delta = (self.a @ self.b.T).reshape(self.base.shape)
        return self.base + self.scale * delta


def is_perturbed(x) -> bool:
    """Whether `x` is a `LowRankPerturbed` (the `is_leaf` of the tree maps here)."""
    return isinstance(x, LowRankPerturbed)


def dense(x: jax.Array, w) -> jax.Array:
    """`x @ w` over w's matrix view `(w.shape[0], -1)`, for an array or a
    `LowRankPerturbed` (base product plus the low-rank term, no matrix formed)."""
    if not is_perturbed(w):
        return x @ (w if w.ndim == 2 else w.reshape(w.shape[0], -1))
    base = w.base.reshape(w.base.shape[0], -1)
    return x @ base + w.scale * ((x @ w.a) @ w.b.T)


def materialize(tree):
    """`tree` with every `LowRankPerturbed` replaced by its whole matrix."""
    return jax.tree.map(
        lambda x: x.materialize() if is_perturbed(x) else x, tree, is_leaf=is_perturbed
    )


def has_perturbed(tree) -> bool:
    """Whether any node of `tree` is a `LowRankPerturbed`."""
    return any(is_perturbed(x) for x in jax.tree.leaves(tree, is_leaf=is_perturbed))


def particle_axes(thetas):
    """The `in_axes` of a population of thetas: 0 for every leaf, except the
    shared `base` of a `LowRankPerturbed` (None: not batched)."""
    if not has_perturbed(thetas):
        return 0

    def axes(x):
        if is_perturbed(x):
            return LowRankPerturbed(base=None, a=0, b=0, scale=0)
        return 0

    return jax.tree.map(axes, thetas, is_leaf=is_perturbed)


def where_particles(mask: jax.Array, on_true, on_false):
    """Per particle (leading axis) `on_true` where `mask`, else `on_false`; a
    `LowRankPerturbed` keeps `on_false`'s shared base and picks its factors."""

    def pick(a, b):
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    def node(a, b):
        if not is_perturbed(a):
            return pick(a, b)
        return b.replace(
            a=pick(a.a, b.a), b=pick(a.b, b.b), scale=pick(a.scale, b.scale)
        )

    return jax.tree.map(node, on_true, on_false, is_leaf=is_perturbed)
