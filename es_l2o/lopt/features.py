"""Accumulators, input features and tensor layouts shared by the learned optimizers.

`mlp` and `hierarchical` update each group of tensors (`ShapeGroups`: one large
tensor, or one zero-padded bucket of small tensors) in one fused, vmapped pass;
`lstm` and `deep_momentum` work coordinatewise on the parts of a `TensorLayout` (the
small tensors as one flat float32 vector, each large tensor in its own shape, so that
its sharding is kept). Factored
second moments (`FactoredMoments`), training-progress and loss features, the
coordinatewise LSTM preprocessing and gradient clipping are shared by all of them.

Example:
    >>> import jax.numpy as jnp
    >>> layout = TensorLayout.of({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    >>> layout.num_tensors, layout.total_size
    (2, 9)
    >>> ShapeGroups.of({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}).num_tensors
    2
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
    """Static map between a pytree of tensors and its coordinatewise parts: the
    small tensors as one flat float32 vector, each large tensor in its own shape.

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
        """Number of parameters."""
        return sum(self.sizes)

    @property
    def large(self) -> tuple[int, ...]:
        """Leaves above `BUCKET_MAX_ENTRIES` entries: parts of their own."""
        return tuple(i for i, n in enumerate(self.sizes) if n > BUCKET_MAX_ENTRIES)

    @property
    def part_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of `split`'s parts: the flat small leaves, then each large one.

        Example:
            >>> TensorLayout.of([jnp.ones(3), jnp.ones((300, 300))]).part_shapes
            ((3,), (300, 300))
        """
        large = self.large
        small = sum(n for i, n in enumerate(self.sizes) if i not in large)
        return ((small,), *(self.shapes[i] for i in large))

    def zeros(self, tree, inner: tuple[int, ...] = ()) -> list[jax.Array]:
        """Float32 zeros `(*part_shape, *inner)` per part; a large leaf's are built
        from the leaf, so that its sharding carries over to its state."""
        leaves, (flat_shape, *_) = jax.tree_util.tree_leaves(tree), self.part_shapes
        out = [jnp.zeros((*flat_shape, *inner), jnp.float32)]
        for i in self.large:
            base = jnp.zeros_like(leaves[i], jnp.float32)
            out.append(
                jnp.broadcast_to(
                    base.reshape(*base.shape, *(1,) * len(inner)), (*base.shape, *inner)
                )
            )
        return out

    def split(self, tree) -> list[jax.Array]:
        """The leaves as float32 parts: the small ones as one flat vector (a single
        concatenate; empty when there are none), then each large leaf in its own
        shape, read in place (its sharding kept)."""
        leaves, large = jax.tree_util.tree_leaves(tree), set(self.large)
        small = [
            jnp.ravel(x).astype(jnp.float32)
            for i, x in enumerate(leaves)
            if i not in large
        ]
        flat = jnp.concatenate(small) if small else jnp.zeros((0,), jnp.float32)
        return [flat, *(leaves[i].astype(jnp.float32) for i in self.large)]

    def merge(self, parts: Sequence[jax.Array], dtypes: Sequence[Any] | None = None):
        """Inverse of `split`; leaves are cast to `dtypes` (default: the layout's)."""
        dtypes = self.dtypes if dtypes is None else dtypes
        large = dict(zip(self.large, parts[1:], strict=True))
        leaves, start = [], 0
        for i, (shape, size) in enumerate(zip(self.shapes, self.sizes, strict=True)):
            if i in large:
                leaf = large[i]
            else:
                leaf = parts[0][start : start + size].reshape(shape)
                start += size
            leaves.append(leaf.astype(dtypes[i]))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def vmap_leading(fn, ndim: int):
    """`fn` vmapped over the `ndim` leading axes of every argument.

    Example:
        >>> vmap_leading(jnp.sum, 2)(jnp.ones((2, 3, 4))).shape
        (2, 3)
    """
    for _ in range(ndim):
        fn = jax.vmap(fn)
    return fn


def update_moments(
    momenta: jax.Array,
    second_moment: jax.Array,
    grad: jax.Array,
    momentum_decays: Sequence[float],
    second_moment_decay: float,
) -> tuple[jax.Array, jax.Array]:
    """One EMA step of the momenta `(num_decays, *shape)` and the second moment.

    Example:
        >>> m, v = update_moments(jnp.zeros((2, 1)), jnp.zeros(1), jnp.array([2.0]),
        ...     momentum_decays=(0.5, 0.9), second_moment_decay=0.99)
        >>> [round(float(x), 4) for x in (*m[:, 0], *v)]
        [1.0, 0.2, 0.04]
    """
    decays = np.asarray(momentum_decays, np.float32).reshape((-1,) + (1,) * grad.ndim)
    b2 = second_moment_decay
    momenta = decays * momenta + (1.0 - decays) * grad
    return momenta, b2 * second_moment + (1.0 - b2) * grad * grad


def clip_gradient(grad: jax.Array, bound: float = GRADIENT_CLIP) -> jax.Array:
    """Clips to +-bound and replaces NaN by 0 (the task's loss reports the failure)."""
    return jnp.clip(jnp.nan_to_num(grad, nan=0.0), -bound, bound)


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


def relu(x: jax.Array) -> jax.Array:
    """ReLU as a select, `where(x > 0, x, 0)` (NaN maps to 0).

    `jax.nn.relu` is a NaN-propagating maximum, which costs two more vector
    instructions per entry; in the fused per-parameter MLPs that is a tenth of the
    pass.

    Example:
        >>> relu(jnp.array([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """
    return jnp.where(x > 0.0, x, 0.0)


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


# -- factored second moments, one tensor at a time ---------------------------------


def matrix_view(x: jax.Array) -> jax.Array:
    """`x` as a batch of matrices `(batch, rows, cols)` for factored statistics.

    Rank >= 2: the last two axes are the matrix (a conv kernel `(h, w, i, o)` is
    `h * w` matrices `(i, o)`); rank 1: one column `(1, n, 1)`; a scalar `(1, 1, 1)`.

    Example:
        >>> matrix_view(jnp.zeros((3, 3, 2, 4))).shape, matrix_view(jnp.zeros(5)).shape
        ((9, 2, 4), (1, 5, 1))
    """
    return x.reshape(matrix_shape(x.shape))


def matrix_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The `(batch, rows, cols)` of `matrix_view` for a tensor of `shape`."""
    shape = tuple(int(d) for d in shape)
    if len(shape) >= 2:
        return int(np.prod(shape[:-2], dtype=np.int64)), shape[-2], shape[-1]
    return 1, int(np.prod(shape, dtype=np.int64)), 1


class FactoredMoments(NamedTuple):
    """Row and column EMAs of one tensor's squared gradient at several decays.

    rows: `(num_decays, batch, rows)` means over each row of the `matrix_view`;
    cols: `(num_decays, batch, cols)` means over each column.
    """

    rows: jax.Array
    cols: jax.Array


def init_factored(shape: Sequence[int], num_decays: int) -> FactoredMoments:
    batch, rows, cols = matrix_shape(shape)
    return FactoredMoments(
        rows=jnp.zeros((num_decays, batch, rows), jnp.float32),
        cols=jnp.zeros((num_decays, batch, cols), jnp.float32),
    )


def update_factored(
    state: FactoredMoments,
    grad_sq: jax.Array,
    decays: Sequence[float],
    extent: jax.Array | None = None,
) -> FactoredMoments:
    """One EMA step of the row and column means of `grad_sq` (one tensor's g**2).

    `extent`: the true `(batch, rows, cols)` when `grad_sq` is a zero-padded view.

    Example:
        >>> s = update_factored(init_factored((2, 2), 1),
        ...     jnp.array([[1.0, 3.0], [5.0, 7.0]]), decays=(0.0,))
        >>> s.rows.tolist(), s.cols.tolist()
        ([[[2.0, 6.0]]], [[[3.0, 5.0]]])
    """
    mat = matrix_view(grad_sq)
    return update_factored_sums(
        state, jnp.sum(mat, axis=2), jnp.sum(mat, axis=1), decays, extent
    )


def update_factored_sums(
    state: FactoredMoments,
    row_sums: jax.Array,
    col_sums: jax.Array,
    decays: Sequence[float],
    extent: jax.Array | None = None,
) -> FactoredMoments:
    """`update_factored` from the row sums `(batch, rows)` and column sums
    `(batch, cols)` of g**2, for callers that compute them in their own pass.

    Example:
        >>> s = update_factored_sums(init_factored((2, 2), 1), jnp.array([[4.0, 12.0]]),
        ...     jnp.array([[6.0, 10.0]]), decays=(0.0,))
        >>> s.rows.tolist(), s.cols.tolist()
        ([[[2.0, 6.0]]], [[[3.0, 5.0]]])
    """
    shape = (row_sums.shape[0], row_sums.shape[1], col_sums.shape[1])
    _, rows, cols = _extent(extent, shape)
    d = jnp.asarray(decays, jnp.float32)[:, None, None]
    return FactoredMoments(
        rows=d * state.rows + (1.0 - d) * (row_sums / cols)[None],
        cols=d * state.cols + (1.0 - d) * (col_sums / rows)[None],
    )


def _extent(extent, shape):
    """The true (batch, rows, cols) of a zero-padded matrix view (default: all)."""
    if extent is None:
        return tuple(float(d) for d in shape)
    return extent[0], extent[1], extent[2]


def factored_factors(
    state: FactoredMoments, extent: jax.Array | None = None, eps: float = 1e-30
):
    """Row factors, column factors and the mean column of each decay.

    The Adafactor estimate of an entry's second moment is
    `row_factor[row] * col_factor[col] * col_mean`, with rows relative to the mean
    row of their matrix and columns relative to the tensor's mean column. `extent`:
    the true `(batch, rows, cols)` of zero-padded statistics.

    Returns:
        `(num_decays, batch, rows)`, `(num_decays, batch, cols)`, `(num_decays,)`.
    """
    batch, rows, cols = _extent(
        extent, (state.rows.shape[1], *state.rows.shape[2:], state.cols.shape[2])
    )
    row_mean = jnp.sum(state.rows, axis=2, keepdims=True) / rows
    row_factor = state.rows / (row_mean + eps)
    col_mean = jnp.sum(state.cols, axis=(1, 2)) / (batch * cols)
    col_factor = state.cols / (col_mean[:, None, None] + eps)
    return row_factor, col_factor, col_mean


def factored_second_moment(state: FactoredMoments, shape: Sequence[int]) -> jax.Array:
    """The Adafactor estimate `row * col / mean(row)`: `(num_decays, *shape)`.

    Exact for a rank-one `g**2` and for vectors (each entry is its own row).

    Example:
        >>> s = update_factored(init_factored((3,), 1), jnp.array([2.0, 3.0, 1.0]),
        ...     decays=(0.0,))
        >>> factored_second_moment(s, (3,)).round(2).tolist()
        [[2.0, 3.0, 1.0]]
    """
    row_factor, col_factor, col_mean = factored_factors(state)
    v_hat = (
        row_factor[..., :, None]
        * col_factor[..., None, :]
        * col_mean[:, None, None, None]
    )
    return v_hat.reshape((-1, *shape))


#: the largest per-parameter MLP (multiply-adds per parameter) that runs as one fused
#: elementwise pass; past it XLA splits the pass and duplicates work between pieces
FUSED_MAX_MULTIPLY_ADDS = 600
#: the fewest entries (members x padded view) of a group whose per-parameter MLP runs
#: as one fused elementwise pass. An unrolled MLP is one very large elementwise
#: kernel; over a group as short as one SIMD vector (4 or 8 floats) LLVM deletes the
#: one-iteration loop and its optimising x86 back end runs away on the straight-line
#: block that is left (memory grows without bound). Smaller groups are cheap anyway
#: and run the MLP as matrix products.
FUSED_MIN_ENTRIES = 1024


def mlp_multiply_adds(sizes: Sequence[int]) -> int:
    """Multiply-adds per input row of a dense MLP with layer widths `sizes`.

    Example:
        >>> mlp_multiply_adds((30, 4, 4, 2))
        144
    """
    return sum(int(a) * int(b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))


# -- tensors grouped by shape ------------------------------------------------------

#: tensors of at most this many entries share zero-padded buckets (powers of two per
#: axis of their view), so a model's many small tensors compile as a few programs
BUCKET_MAX_ENTRIES = 1 << 16
#: False: each larger tensor is a group of its own, read in place (one program per
#: large tensor). True: large tensors of one shape share a program, which compiles
#: faster for models with hundreds of large tensors but copies them into a stack
#: every step (`analysis/bench_grouping.py` measures both)
STACK_LARGE_TENSORS = False


def _is_small(view: tuple[int, ...]) -> bool:
    return int(np.prod(view, dtype=np.int64)) <= BUCKET_MAX_ENTRIES


def _padded_view(view: tuple[int, ...]) -> tuple[int, ...]:
    if not _is_small(view):
        return view
    return tuple(1 << max(int(d) - 1, 0).bit_length() for d in view)


class Group(NamedTuple):
    """Leaves that share one (padded) view: one vmapped per-tensor program.

    view: the group's view shape; leaves: leaf indices; shapes / views: each
    member's own shape and unpadded view; start: first row in tensor order.
    """

    view: tuple[int, ...]
    leaves: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    views: tuple[tuple[int, ...], ...]
    start: int

    @property
    def rows(self) -> slice:
        """This group's rows in tensor order."""
        return slice(self.start, self.start + len(self.leaves))

    @property
    def padded(self) -> bool:
        return any(v != self.view for v in self.views)

    @property
    def in_place(self) -> bool:
        """A large tensor, a group of its own, read where it is (not bucketed)."""
        return not _is_small(self.view)

    def zeros(self, leaves, inner: tuple[int, ...] = ()) -> jax.Array:
        """Float32 zeros `(members, *inner, *view)` for this group's state.

        For a tensor read in place they are built from the tensor itself (`leaves`:
        the pytree's leaves), so that a sharded tensor's state is sharded alike from
        the first step on (no resharding, no second compile).
        """
        shape = (len(self.leaves), *inner, *self.view)
        if not self.in_place:
            return jnp.zeros(shape, jnp.float32)
        leaf = leaves[self.leaves[0]]
        return jnp.broadcast_to(
            jnp.zeros_like(leaf, jnp.float32).reshape(self.view), shape
        )

    @property
    def num_entries(self) -> int:
        """Entries the group's vmapped program runs over: members x padded view."""
        return len(self.leaves) * int(np.prod(self.view, dtype=np.int64))

    def extents(self) -> jax.Array:
        """Each member's true view extent, `(members, len(view))` float32."""
        return jnp.asarray(np.asarray(self.views, np.float32))

    def stack(self, leaves) -> jax.Array:
        """This group's leaves in its view, zero-padded, stacked `(members, *view)`.

        No copy for a lone member that needs no padding.
        """
        picked = []
        for i, view in zip(self.leaves, self.views, strict=True):
            x = jnp.asarray(leaves[i]).reshape(view)
            if view != self.view:
                x = jnp.pad(
                    x.astype(jnp.float32),
                    [(0, t - d) for d, t in zip(view, self.view, strict=True)],
                )
            picked.append(x)
        if len(picked) == 1:
            return picked[0][None]
        return jnp.stack([x.astype(jnp.float32) for x in picked])

    def unstack(self, stacked: jax.Array) -> list[jax.Array]:
        """Members of `stacked (members, *view)` cut to their own shapes."""
        out = []
        for k, (shape, view) in enumerate(zip(self.shapes, self.views, strict=True)):
            x = stacked[k]
            if view != self.view:
                x = x[tuple(slice(0, d) for d in view)]
            out.append(x.reshape(shape))
        return out


class ShapeGroups(tuple):
    """A pytree's leaves grouped by their view (`view_fn` of the shape).

    Tensors are numbered group by group ("tensor order"). Each group's per-parameter
    work is one vmapped program (`map`) that reads its tensors where they are (no
    flat copy) with their per-tensor values as scalars. Small tensors (at most
    `BUCKET_MAX_ENTRIES` entries) share zero-padded buckets, so a model's many small
    tensors compile as a few programs. A large tensor is a group of its own: stacking
    it with others of its shape would copy it every step (it is read in place
    instead), at the price of one program per large tensor, as `optax.adam` compiles
    one fused pass per tensor (`STACK_LARGE_TENSORS` stacks them instead).

    Example:
        >>> groups = ShapeGroups.of({"a": jnp.ones(3), "b": jnp.ones(5),
        ...     "c": jnp.ones(4)}, view_fn=lambda s: (int(np.prod(s)),))
        >>> [(g.view, g.leaves) for g in groups], groups.leaf_rows.tolist()
        ([((4,), (0, 2)), ((8,), (1,))], [0, 2, 1])
    """

    @classmethod
    def of(cls, tree, view_fn=None) -> ShapeGroups:
        view_fn = view_fn or (lambda shape: tuple(shape))
        members: dict[tuple, tuple[tuple[int, ...], list]] = {}
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
            shape = tuple(int(d) for d in jnp.shape(leaf))
            view = tuple(int(d) for d in view_fn(shape))
            padded = _padded_view(view)
            # stacking a large tensor with others copies it every step: it keeps a
            # group of its own and is read where it is
            key = (padded,) if STACK_LARGE_TENSORS or _is_small(view) else (view, i)
            members.setdefault(key, (padded, []))[1].append((i, shape, view))
        groups, start = [], 0
        for padded, items in members.values():
            leaves, shapes, views = (tuple(x) for x in zip(*items, strict=True))
            groups.append(Group(padded, leaves, shapes, views, start))
            start += len(leaves)
        return cls(groups)

    @property
    def num_tensors(self) -> int:
        return sum(len(g.leaves) for g in self)

    @property
    def tensor_shapes(self) -> list[tuple[int, ...]]:
        """Each tensor's own shape, in tensor order."""
        return [s for g in self for s in g.shapes]

    @property
    def leaf_rows(self) -> np.ndarray:
        """For each leaf (pytree order), its row in tensor order."""
        rows = np.empty(self.num_tensors, np.int32)
        for g in self:
            rows[list(g.leaves)] = np.arange(g.start, g.start + len(g.leaves))
        return rows

    def map(self, fn, flag: jax.Array, group_args) -> list[jax.Array]:
        """`fn` vmapped over each group's members; one array per leaf, leaf order.

        group_args: one tuple of arguments per group, each with a leading member
        axis, or None to skip the group (its leaves stay None); `fn` returns an
        array of the group's view. `flag` is a traced True for `compute_once`: a
        group of several members is computed once into one buffer, not once inside
        each member's slice.
        """
        out = [None] * self.num_tensors
        for group, args in zip(self, group_args, strict=True):
            if args is None:
                continue
            if len(group.leaves) > 1:
                result = compute_once(jax.vmap(fn), flag, *args)
            else:
                result = jax.vmap(fn)(*args)
            for leaf, value in zip(group.leaves, group.unstack(result), strict=True):
                out[leaf] = value
        return out


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
