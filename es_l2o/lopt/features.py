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
    >>> grad = layout.flatten({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    >>> stats = update_gradient_stats(
    ...     init_gradient_stats(layout.total_size, 2), grad,
    ...     momentum_decays=(0.5, 0.9), second_moment_decay=0.99)
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


class _TensorShapes:
    """Per-tensor sizes and ranks of a layout with a `shapes` field."""

    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def total_size(self) -> int:
        """Number of parameters (padding, where a layout has it, not counted)."""
        return sum(self.sizes)

    @property
    def ranks(self) -> np.ndarray:
        """Rank of each tensor, shape (num_tensors,)."""
        return np.asarray([len(s) for s in self.shapes], np.int32)


@dataclasses.dataclass(frozen=True)
class TensorLayout(_TensorShapes):
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


# --------------------------------------------------------------------------------------
# Additions for the hierarchical, LSTM and deep-momentum optimizers.

#: exponent p of the gradient preprocessing of Andrychowicz et al. 2016
LSTM_PREPROCESS_P = 10.0
#: loss EMAs kept by optimizers that read the loss; half-lives log-spaced 10 ... T
LOSS_EMA_COUNT = 10
LOSS_EMA_SHORTEST_HALF_LIFE = 10.0
#: ranks 0, 1, 2, 3 and ">= 4" of the rank one-hot
MAX_RANK_FEATURE = 4


def lstm_preprocess(grad: jax.Array, p: float = LSTM_PREPROCESS_P) -> jax.Array:
    """The gradient preprocessing of Andrychowicz et al. 2016 (arXiv 1606.04474).

    Each entry becomes `(log|g| / p, sign g)` if `|g| >= exp(-p)` and `(-1, exp(p) g)`
    otherwise, so that magnitudes spanning many orders map to a small range.

    Returns:
        An array of shape `grad.shape + (2,)`.

    Example:
        >>> import jax.numpy as jnp
        >>> lstm_preprocess(jnp.array([1.0, 0.0]), p=10.0).tolist()
        [[0.0, 1.0], [-1.0, 0.0]]
    """
    magnitude = jnp.abs(grad)
    large = magnitude >= np.exp(-p)
    log_part = jnp.where(large, jnp.log(jnp.maximum(magnitude, np.exp(-p))) / p, -1.0)
    sign_part = jnp.where(large, jnp.sign(grad), np.exp(p) * grad)
    return jnp.stack([log_part, sign_part], axis=-1)


def log_feature(x: jax.Array) -> jax.Array:
    """A positive scale as a bounded feature: `clip(log|10 x|, -5, 5) / 2` (VeLO)."""
    return 0.5 * jnp.clip(jnp.log(jnp.abs(10.0 * x) + 1e-30), -5.0, 5.0)


def symlog_feature(x: jax.Array, scale: float = 1e3) -> jax.Array:
    """A signed value spanning many scales as a feature: `asinh(scale x) / 8`."""
    return jnp.arcsinh(scale * x) / 8.0


def rank_one_hot(ranks: Sequence[int], max_rank: int = MAX_RANK_FEATURE) -> np.ndarray:
    """One-hot of each tensor's rank, ranks above `max_rank` sharing the last column.

    Example:
        >>> rank_one_hot([0, 2, 6], max_rank=3).tolist()
        [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    """
    ranks = np.minimum(np.asarray(ranks, np.int64), max_rank)
    return np.eye(max_rank + 1, dtype=np.float32)[ranks].reshape(-1, max_rank + 1)


def tensor_mean_var(x: jax.Array, layout) -> tuple[jax.Array, jax.Array]:
    """Per-tensor mean and variance of `x[..., N]`: two arrays `(..., num_tensors)`.

    `layout` is any layout with `tensor_mean` (a `TensorLayout` or `BlockLayout`).

    Example:
        >>> layout = TensorLayout.of({"a": jnp.zeros(2), "b": jnp.zeros(1)})
        >>> mean, var = tensor_mean_var(jnp.array([1.0, 3.0, 5.0]), layout)
        >>> mean.tolist(), var.tolist()
        ([2.0, 5.0], [1.0, 0.0])
    """
    mean = layout.tensor_mean(x)
    var = layout.tensor_mean(x * x) - mean**2
    return mean, jnp.maximum(var, 0.0)


# -- loss features ---------------------------------------------------------------------


class LossEMAState(NamedTuple):
    """Exponential moving averages of the training loss at several half-lives.

    emas: (count,) the averages; seen: whether any loss has arrived yet (the first
    loss initialises every average, so no bias correction is needed).
    """

    emas: jax.Array
    seen: jax.Array


def init_loss_emas(count: int = LOSS_EMA_COUNT) -> LossEMAState:
    return LossEMAState(jnp.zeros((count,), jnp.float32), jnp.zeros((), jnp.bool_))


def loss_half_lives(
    num_steps,
    count: int = LOSS_EMA_COUNT,
    shortest: float = LOSS_EMA_SHORTEST_HALF_LIFE,
) -> jax.Array:
    """`count` half-lives log-spaced from `shortest` to `max(num_steps, shortest)`.

    `num_steps` may be traced (a per-particle horizon).

    Example:
        >>> loss_half_lives(1000, count=3).round(1).tolist()
        [10.0, 100.0, 1000.0]
    """
    longest = jnp.maximum(jnp.asarray(num_steps, jnp.float32), shortest)
    frac = jnp.linspace(0.0, 1.0, count)
    return shortest * (longest / shortest) ** frac


def update_loss_emas(state: LossEMAState, loss, num_steps) -> LossEMAState:
    """Folds `loss` into every average; `loss=None` leaves the state unchanged.

    A non-finite loss is ignored (the averages keep their values).
    """
    if loss is None:
        return state
    loss = jnp.asarray(loss, jnp.float32).reshape(())
    decays = 0.5 ** (1.0 / loss_half_lives(num_steps, state.emas.shape[0]))
    updated = decays * state.emas + (1.0 - decays) * loss
    updated = jnp.where(state.seen, updated, loss)
    finite = jnp.isfinite(loss)
    return LossEMAState(
        emas=jnp.where(finite, updated, state.emas), seen=state.seen | finite
    )


def loss_features(state: LossEMAState) -> jax.Array:
    """`count - 1` features comparing each average with its slower neighbour.

    Feature i is `clip((e_i - e_{i+1}) / |e_{i+1}|, -1, 1)`: negative while the
    loss is falling faster than at the longer time scale. All zero before a loss
    arrives.

    Example:
        >>> s = LossEMAState(jnp.array([1.0, 2.0, 2.0]), jnp.array(True))
        >>> loss_features(s).tolist()
        [-0.5, 0.0]
    """
    fast, slow = state.emas[:-1], state.emas[1:]
    rel = (fast - slow) / (jnp.abs(slow) + 1e-8)
    return jnp.where(state.seen, jnp.clip(rel, -1.0, 1.0), 0.0)


# -- a block-padded flat layout -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockLayout(_TensorShapes):
    """Like `TensorLayout`, with every tensor zero-padded to whole blocks of `block`.

    The flat vector is viewed as `(num_blocks, block)`; each block belongs to one
    tensor, so per-tensor values reach the entries as a broadcast along the block
    axis and per-tensor sums are one block reduction plus a segment sum over the
    (few) blocks. Padding entries are masked out of every per-tensor statistic.

    Example:
        >>> layout = BlockLayout.of({"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, block=4)
        >>> layout.num_blocks, layout.padded_size
        (3, 12)
        >>> layout.tensor_mean(layout.flatten({"w": jnp.ones((3, 2)),
        ...     "b": 3 * jnp.ones(2)})).tolist()
        [3.0, 1.0]
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    block: int

    @classmethod
    def of(cls, tree, block: int = 128) -> BlockLayout:
        base = TensorLayout.of(tree)
        if block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        return cls(base.treedef, base.shapes, base.dtypes, int(block))

    @property
    def blocks_per_tensor(self) -> np.ndarray:
        return np.asarray([-(-n // self.block) for n in self.sizes], np.int64)

    @property
    def num_blocks(self) -> int:
        return int(self.blocks_per_tensor.sum())

    @property
    def padded_size(self) -> int:
        return self.num_blocks * self.block

    @property
    def offsets(self) -> np.ndarray:
        """Start of each tensor in the padded flat vector, shape (num_tensors,)."""
        starts = np.cumsum(self.blocks_per_tensor) - self.blocks_per_tensor
        return starts.astype(np.int64) * self.block

    @property
    def block_tensor_ids(self) -> np.ndarray:
        """The tensor of each block, shape (num_blocks,)."""
        return np.repeat(
            np.arange(self.num_tensors, dtype=np.int32), self.blocks_per_tensor
        )

    @property
    def block_valid(self) -> np.ndarray:
        """Real entries in each block, shape (num_blocks,)."""
        valid = np.full((self.num_blocks,), self.block, np.int32)
        ends = np.cumsum(self.blocks_per_tensor) - 1
        for end, size, nblocks in zip(
            ends, self.sizes, self.blocks_per_tensor, strict=True
        ):
            if nblocks:
                valid[end] = size - (nblocks - 1) * self.block
        return valid

    def mask(self) -> jax.Array:
        """1.0 on real entries and 0.0 on padding, shape (num_blocks, block)."""
        iota = jnp.arange(self.block, dtype=jnp.int32)
        return (iota[None, :] < jnp.asarray(self.block_valid)[:, None]).astype(
            jnp.float32
        )

    def flatten(self, tree) -> jax.Array:
        """All leaves, zero-padded, as one float32 array `(num_blocks, block)`."""
        leaves = jax.tree_util.tree_leaves(tree)
        # in-place updates of one zero buffer: XLA:CPU runs a bare concatenate of
        # large operands several times slower than these copies
        flat = jnp.zeros((self.padded_size,), jnp.float32)
        for x, start in zip(leaves, self.offsets, strict=True):
            piece = jnp.ravel(x).astype(jnp.float32)
            flat = jax.lax.dynamic_update_slice(flat, piece, (int(start),))
        return flat.reshape(self.num_blocks, self.block)

    def unflatten(self, flat: jax.Array, dtypes: Sequence[Any] | None = None):
        """Inverse of `flatten`; leaves are cast to `dtypes` (default: the layout's)."""
        dtypes = self.dtypes if dtypes is None else dtypes
        flat = flat.reshape(-1)
        leaves = [
            flat[int(a) : int(a) + n].reshape(shape).astype(dtype)
            for a, n, shape, dtype in zip(
                self.offsets, self.sizes, self.shapes, dtypes, strict=True
            )
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tensor_sum(self, x: jax.Array, masked: bool = True) -> jax.Array:
        """Sums of `x[..., num_blocks, block]` within each tensor: `(..., num_tensors)`.

        With `masked=False` the caller promises that padding entries of `x` are 0.
        """
        if masked:
            x = x * self.mask()
        lead = x.shape[:-2]
        rows = x.reshape(-1, self.num_blocks, self.block)
        # one 2-D minor-axis reduction per leading index: XLA:CPU runs a single
        # 3-D reduction (or a stack of the inputs) many times slower
        per_block = jnp.stack(
            [jnp.sum(rows[i], axis=-1) for i in range(rows.shape[0])], axis=-1
        )
        sums = jax.ops.segment_sum(
            per_block,
            self.block_tensor_ids,
            num_segments=self.num_tensors,
            indices_are_sorted=True,
        )
        return jnp.moveaxis(sums, 0, -1).reshape((*lead, self.num_tensors))

    def tensor_mean(self, x: jax.Array) -> jax.Array:
        """Mean of `x[..., num_blocks, block]` over each tensor's real entries."""
        sizes = np.maximum(np.asarray(self.sizes, np.float32), 1.0)
        return self.tensor_sum(x) / sizes

    def broadcast(self, per_tensor: jax.Array) -> jax.Array:
        """Per-tensor values `(..., num_tensors)` as `(..., num_blocks, 1)`."""
        return jnp.take(per_tensor, jnp.asarray(self.block_tensor_ids), axis=-1)[
            ..., None
        ]


# -- factored (Adafactor) second moments -------------------------------------------


@dataclasses.dataclass(frozen=True)
class FactoredIndex:
    """Static map from flat entries to the rows and columns of their tensors.

    A tensor of shape `(..., a, b)` (rank >= 2) has `prod(...) * a` rows (reduced over
    its last axis) and `prod(...) * b` columns (reduced over its second-to-last
    axis), one matrix per leading index. A tensor of rank < 2 is treated as an
    `(n, 1)` matrix, so its factored estimate is exactly its diagonal second moment.
    Entries outside every tensor (padding) map to a spare row and column that the
    statistics drop.
    """

    row_matrix: np.ndarray  # (num_rows,) int32
    col_tensor: np.ndarray  # (num_cols,) int32
    row_size: np.ndarray  # (num_rows,) entries per row (= b)
    col_size: np.ndarray  # (num_cols,) entries per column (= a)
    matrix_tensor: np.ndarray  # (num_matrices,) int32
    num_tensors: int
    #: dense layouts: the row and column of every entry, (num_entries,) int32
    entry_rows: np.ndarray | None = None
    entry_cols: np.ndarray | None = None
    #: block layouts: per-block tables (num_blocks,) from which `ids` computes the
    #: rows and columns on device, so no array of the parameters' size is embedded
    #: in the compiled program
    block_tables: tuple[np.ndarray, ...] | None = None
    block: int = 0

    @property
    def num_matrices(self) -> int:
        return len(self.matrix_tensor)

    @property
    def num_rows(self) -> int:
        return len(self.row_matrix)

    @property
    def num_cols(self) -> int:
        return len(self.col_tensor)

    def ids(self):
        """(row, column) of every flat entry; padding maps to the spare ones.

        Dense layouts: two `(num_entries,)` numpy arrays. Block layouts: two
        `(num_blocks, block)` int32 arrays computed from per-block tables.
        """
        if self.block_tables is None:
            return self.entry_rows, self.entry_cols
        size, b, ab, row0, rem_b, col0, mat0, rem_ab = (
            jnp.asarray(x)[:, None] for x in self.block_tables
        )
        i = jnp.arange(self.block, dtype=jnp.int32)[None, :]

        def div_small(x, d):
            # x // d for 0 <= x < d + block, vectorised (integer division is not):
            # x >= d when d >= block, else an exact float division of small numbers
            by_float = jnp.floor((x.astype(jnp.float32) + 0.5) / d.astype(jnp.float32))
            return jnp.where(d >= self.block, (x >= d), by_float).astype(jnp.int32)

        x_row, x_mat = rem_b + i, rem_ab + i  # offsets from the block's row / matrix
        k_row = div_small(x_row, b)
        k_mat = div_small(x_mat, ab)
        # padding: the block's entries past its tensor's end
        valid = i < size
        rows = jnp.where(valid, row0 + k_row, self.num_rows)
        cols = jnp.where(
            valid, col0 + (mat0 + k_mat) * b + (x_row - k_row * b), self.num_cols
        )
        return rows, cols

    @classmethod
    def of(cls, layout) -> FactoredIndex:
        """For a `TensorLayout` (dense) or a `BlockLayout` (padded)."""
        blocked = isinstance(layout, BlockLayout)
        if not blocked:
            total = layout.total_size
            entry_rows = np.full((total,), -1, np.int64)
            entry_cols = np.full((total,), -1, np.int64)
        tables = [[] for _ in range(8)]
        row_parts, col_parts, row_size, col_size, mat_parts = [], [], [], [], []
        rows = cols = matrices = start = 0
        for t, shape in enumerate(layout.shapes):
            if len(shape) >= 2:
                batch = int(np.prod(shape[:-2], dtype=np.int64))
                a, b = shape[-2], shape[-1]
            else:
                batch, a, b = 1, int(np.prod(shape, dtype=np.int64)), 1
            n = batch * a * b
            if blocked:
                nblocks = int(layout.blocks_per_tensor[t])
                start_t = np.arange(nblocks, dtype=np.int64) * layout.block
                values = (
                    n - start_t,  # real entries from the block's start
                    b,
                    a * b,
                    rows + start_t // b,  # row of the block's first entry
                    start_t % b,
                    cols,
                    start_t // (a * b),  # matrix of the block's first entry
                    start_t % (a * b),
                )
                for table, value in zip(tables, values, strict=True):
                    table.append(np.broadcast_to(value, (nblocks,)))
            else:
                local = np.arange(n)
                entry_rows[start : start + n] = rows + local // b
                entry_cols[start : start + n] = (
                    cols + (local // (a * b)) * b + local % b
                )
                start += n
            row_parts.append(matrices + np.repeat(np.arange(batch), a))
            col_parts.append(np.full((batch * b,), t))
            mat_parts.append(np.full((batch,), t))
            row_size.append(np.full((batch * a,), b))
            col_size.append(np.full((batch * b,), a))
            rows, cols, matrices = rows + batch * a, cols + batch * b, matrices + batch
        if rows >= 2**31 or cols >= 2**31:
            raise ValueError(f"too many rows ({rows}) or columns ({cols}) for int32")

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        common = dict(
            row_matrix=cat(row_parts, np.int32),
            col_tensor=cat(col_parts, np.int32),
            row_size=cat(row_size, np.float32),
            col_size=cat(col_size, np.float32),
            matrix_tensor=cat(mat_parts, np.int32),
            num_tensors=len(layout.shapes),
        )
        if blocked:
            return cls(
                **common,
                block_tables=tuple(cat(table, np.int32) for table in tables),
                block=layout.block,
            )
        return cls(
            **common,
            entry_rows=entry_rows.astype(np.int32),
            entry_cols=entry_cols.astype(np.int32),
        )


class FactoredStats(NamedTuple):
    """Row and column EMAs of the squared gradient at several decays.

    rows: (num_decays, num_rows) means over each row; cols: (num_decays, num_cols)
    means over each column.
    """

    rows: jax.Array
    cols: jax.Array


def init_factored_stats(index: FactoredIndex, num_decays: int) -> FactoredStats:
    return FactoredStats(
        rows=jnp.zeros((num_decays, index.num_rows), jnp.float32),
        cols=jnp.zeros((num_decays, index.num_cols), jnp.float32),
    )


def update_factored_stats(
    stats: FactoredStats,
    grad_sq: jax.Array,
    index: FactoredIndex,
    decays: Sequence[float],
) -> FactoredStats:
    """One EMA step of the row and column means of `grad_sq` (the flat g**2).

    Example:
        >>> layout = TensorLayout.of({"w": jnp.zeros((2, 2))})
        >>> index = FactoredIndex.of(layout)
        >>> s = update_factored_stats(init_factored_stats(index, 1),
        ...     jnp.array([1.0, 3.0, 5.0, 7.0]), index, decays=(0.0,))
        >>> s.rows.tolist(), s.cols.tolist()
        ([[2.0, 6.0]], [[3.0, 5.0]])
    """
    flat = grad_sq.reshape(-1)
    row_ids, col_ids = (x.reshape(-1) for x in index.ids())
    row_sum = jax.ops.segment_sum(
        flat, row_ids, num_segments=index.num_rows + 1, indices_are_sorted=True
    )[: index.num_rows]
    col_sum = jax.ops.segment_sum(flat, col_ids, num_segments=index.num_cols + 1)[
        : index.num_cols
    ]
    row_mean = row_sum / np.maximum(index.row_size, 1.0)
    col_mean = col_sum / np.maximum(index.col_size, 1.0)
    d = jnp.asarray(decays, jnp.float32)[:, None]
    return FactoredStats(
        rows=d * stats.rows + (1.0 - d) * row_mean,
        cols=d * stats.cols + (1.0 - d) * col_mean,
    )


def factored_row_factors(
    stats: FactoredStats, index: FactoredIndex, eps: float = 1e-30
) -> jax.Array:
    """Rows divided by the mean row of their matrix: `(num_decays, num_rows)`.

    The factored second moment of an entry is `row_factor[row] * cols[col]`.
    """
    matrix_sum = jax.ops.segment_sum(
        stats.rows.T,
        index.row_matrix,
        num_segments=index.num_matrices,
        indices_are_sorted=True,
    ).T
    rows_per_matrix = np.maximum(
        np.bincount(index.row_matrix, minlength=index.num_matrices), 1
    ).astype(np.float32)
    matrix_mean = matrix_sum / rows_per_matrix
    return stats.rows / (jnp.take(matrix_mean, index.row_matrix, axis=1) + eps)


def factored_second_moment(
    stats: FactoredStats, index: FactoredIndex, eps: float = 1e-30
) -> jax.Array:
    """The Adafactor estimate `row * col / mean(row)` of each entry: `(decays, n)`.

    Example:
        >>> layout = TensorLayout.of({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
        >>> index = FactoredIndex.of(layout)
        >>> g2 = jnp.array([2.0, 3.0, 1.0, 1.0, 4.0, 4.0])  # leaves "b", then "w"
        >>> s = update_factored_stats(init_factored_stats(index, 1), g2, index, (0.0,))
        >>> factored_second_moment(s, index).round(2).tolist()  # exact at rank one
        [[2.0, 3.0, 1.0, 1.0, 4.0, 4.0]]
    """
    row_factor = factored_row_factors(stats, index, eps)
    row_ids, col_ids = (x.reshape(-1) for x in index.ids())
    return jnp.take(row_factor, row_ids, axis=1) * jnp.take(stats.cols, col_ids, axis=1)


# -- compilation helpers ------------------------------------------------------------


def compute_once(fn, flag: jax.Array, *args):
    """`fn(*args)`, computed in one pass into its own buffers before any consumer.

    XLA fuses an expensive elementwise producer into every slice that reads it, so
    splitting a flat update into many tensors would compile (and partly run) the
    per-parameter network once per tensor, and gathers fused into a long elementwise
    pass stop its vectorisation. Computing `fn` inside a conditional makes XLA
    materialise its result instead. `flag` must be a traced boolean that is True
    (e.g. `count >= 0`): the other branch returns zeros and only exists so that XLA
    cannot fold the conditional away. The barrier survives `vmap` (the predicate
    stays unbatched) and is transparent to `jax.jvp` / `jax.grad`. `fn` must not
    close over traced values (pass them, and index arrays, as `args`).

    Example:
        >>> compute_once(jnp.sin, jnp.array(True), jnp.zeros(2)).tolist()
        [0.0, 0.0]
    """
    flag = jnp.all(jnp.asarray(flag, jnp.bool_))

    @jax.custom_jvp
    def run(flag, *args):
        return _run_in_conditional(fn, flag, *args)

    @run.defjvp
    def _run_jvp(primals, tangents):
        flag, *args = primals
        _, out_tangent = jax.jvp(fn, tuple(args), tuple(tangents[1:]))
        return run(flag, *args), out_tangent

    return run(flag, *args)


def _run_in_conditional(fn, flag, *args):
    def zeros(*a):
        return jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *a)
        )

    @jax.custom_batching.custom_vmap
    def run(flag, *args):
        return jax.lax.cond(flag, fn, zeros, *args)

    @run.def_vmap
    def _run_vmap(axis_size, in_batched, flag, *args):
        del axis_size
        flag_batched, *args_batched = in_batched
        if flag_batched:  # flag is True everywhere: one predicate serves all
            flag = jnp.all(flag)
        in_axes = tuple(
            jax.tree.map(lambda b: 0 if b else None, batched)
            for batched in args_batched
        )
        batched_fn = jax.vmap(fn, in_axes=in_axes)
        out = _run_in_conditional(batched_fn, flag, *args)
        return out, jax.tree.map(lambda _: True, out)

    return run(flag, *args)
