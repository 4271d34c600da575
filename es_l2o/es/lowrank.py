"""Low-rank perturbations of theta (EGGROLL: Sarkar et al. 2025, arXiv 2511.16652).

With `rank=r` an estimator perturbs every matrix-shaped leaf of theta (ndim >= 2,
viewed as `(shape[0], prod(shape[1:]))`, m x n) by `std * A B^T / sqrt(r')` with
A (m x r') and B (n x r') standard normal, r' = min(r, m, n), and every other leaf
by full-rank noise `std * z`. A particle's noise is one flat draw of
`LowRankLayout.num_factors` numbers (r'(m + n) per matrix, the size of each
vector), so a population's noise is P x E instead of P x D. `theta` builds a
particle's theta as shared base matrices plus its factors (`es_l2o.lowrank`), which
the learned optimizers multiply without forming the matrix. The unit perturbation
has identity covariance for every r, so the ES gradient keeps its expectation;
`weighted_sum` forms the population's full-rank gradient `sum_i w_i A_i B_i^T` as one
matrix product per leaf.

`LowRankOpenES` is evosax's Open_ES (`KeyedOpenES`) on such perturbations;
`LowRankStoredNoise` is the truncated estimators' stored noise with per-pair
factors (the accumulated scores stay dense per pair, as PES keeps them, one array
per leaf).

Example:
    >>> import jax, jax.numpy as jnp
    >>> template = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32),
    ...             "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    >>> layout = LowRankLayout(template, rank=1)
    >>> layout.num_dims, layout.num_factors  # 15 numbers as 3 + (4 + 3)
    (15, 10)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax.core.fitness_shaping import centered_rank_fitness_shaping_fn
from flax import struct
from jax.sharding import Mesh

from es_l2o import sharding
from es_l2o.es.keyed import KeyedOpenES
from es_l2o.es.noise import Rows
from es_l2o.es.weighting import per_row
from es_l2o.lowrank import LowRankPerturbed


def check_rank(rank) -> int | None:
    """`rank` as an int, or None for full rank (None or 0).

    Example:
        >>> check_rank(None), check_rank(0), check_rank(4)
        (None, None, 4)
    """
    if rank is None or (
        isinstance(rank, int) and not isinstance(rank, bool) and rank == 0
    ):
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(
            f"rank must be a positive integer (low rank) or null / 0 (full rank), "
            f"got {rank!r}"
        )
    return rank


@dataclass(frozen=True)
class _Leaf:
    shape: tuple[int, ...]
    start: int  # offset in the flat factors
    rows: int  # m (0: a vector, drawn full rank)
    cols: int  # n
    rank: int  # r'

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def view(self) -> tuple[int, ...]:
        """The shape a score of this leaf is kept in: (m, n) for a matrix, so
        that adding its outer products is a broadcast (a flat one costs index
        arithmetic per entry: 2x the pass at VeLO size), (size,) for a vector."""
        return (self.rows, self.cols) if self.rows else (self.size,)

    @property
    def count(self) -> int:
        if not self.rows:
            return int(np.prod(self.shape, dtype=np.int64))
        return self.rank * (self.rows + self.cols)

    def split(self, factors):
        """(a, b) of a matrix leaf, or the vector's noise, from flat factors."""
        x = factors[..., self.start : self.start + self.count]
        if not self.rows:
            return x.reshape((*x.shape[:-1], *self.shape))
        cut = self.rank * self.rows
        a = x[..., :cut].reshape((*x.shape[:-1], self.rows, self.rank))
        b = x[..., cut:].reshape((*x.shape[:-1], self.cols, self.rank))
        return a, b


#: up to this rank `expand` sums outer products elementwise (one fused pass that
#: writes the result once; XLA's CPU dot with so short a contraction is ~10x slower)
_ELEMENTWISE_RANK = 8


def _outer_sum(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b^T` over the last two axes of (..., m, r) and (..., n, r)."""
    if a.shape[-1] > _ELEMENTWISE_RANK:
        return jnp.einsum("...mr,...nr->...mn", a, b)
    terms = (a[..., :, k, None] * b[..., None, :, k] for k in range(a.shape[-1]))
    return sum(terms)


#: up to this many rows `_rows_sum` adds weighted rows elementwise (one fused pass;
#: XLA's CPU product over so few rows is 15% slower at VeLO size)
_ELEMENTWISE_ROWS = 16


def _rows_sum(weights: jax.Array, rows: jax.Array) -> jax.Array:
    """`sum_i weights_i rows_i` of (N,) weights and (N, ...) rows."""
    if rows.shape[0] > _ELEMENTWISE_ROWS:
        return jnp.tensordot(weights, rows, axes=1)
    return sum(weights[i] * rows[i] for i in range(rows.shape[0]))


class LowRankLayout:
    """Where each leaf's noise lives in a particle's flat factors.

    Args:
        template: theta's pytree of shapes (arrays or ShapeDtypeStructs).
        rank: r, the rank of every matrix's perturbation (capped at min(m, n)).
    """

    def __init__(self, template, rank: int):
        self.rank = int(rank)
        leaves, self.treedef = jax.tree.flatten(template)
        self.leaves, start = [], 0
        for leaf in leaves:
            shape = tuple(int(s) for s in jnp.shape(leaf))
            rows = shape[0] if len(shape) >= 2 else 0
            cols = int(np.prod(shape[1:], dtype=np.int64)) if rows else 0
            r = min(self.rank, rows, cols) if rows else 0
            self.leaves.append(_Leaf(shape, start, rows, cols, r))
            start += self.leaves[-1].count
        self.num_factors = start
        self.num_dims = sum(int(np.prod(x.shape, dtype=np.int64)) for x in self.leaves)

    def draw(self, key: jax.Array) -> jax.Array:
        """One particle's unit factors (E,)."""
        return jax.random.normal(key, (self.num_factors,))

    def theta(self, bases, factors: jax.Array, coeff):
        """`bases + coeff * unit perturbation`: `LowRankPerturbed` matrices whose
        base is shared (never copied) and perturbed vectors.

        bases: theta's pytree (the mean); factors: (E,) for one particle, or
        (N, E) for N particles with coeff (N,) (the factors, scales and vectors
        then lead with N; the bases do not: see `es_l2o.lowrank.particle_axes`);
        coeff: each particle's sign times std.
        """
        coeff = jnp.asarray(coeff)
        out = []
        for leaf, base in zip(self.leaves, jax.tree.leaves(bases), strict=True):
            if not leaf.rows:
                c = coeff.reshape(coeff.shape + (1,) * len(leaf.shape))
                out.append(base + c * leaf.split(factors))
                continue
            a, b = leaf.split(factors)
            scale = (coeff / math.sqrt(leaf.rank)).astype(base.dtype)
            out.append(LowRankPerturbed(base, a, b, scale))
        return jax.tree.unflatten(self.treedef, out)

    def _leaf_sum(self, leaf: _Leaf, factors, weights):
        if not leaf.rows:
            return weights @ leaf.split(factors).reshape(weights.shape[0], -1)
        a, b = leaf.split(factors)  # (N, m, r), (N, n, r)
        # one product contracting particles and rank together: full rank, no N x m x n
        weights = weights * (1.0 / math.sqrt(leaf.rank))
        return jnp.einsum("imr,i,inr->mn", a, weights, b)

    def weighted_sum(self, factors: jax.Array, weights: jax.Array) -> jax.Array:
        """`sum_i weights_i * z_i` (D,) of the unit perturbations z_i whose factors
        are the rows of `factors` (N, E)."""
        return jnp.concatenate(
            [self._leaf_sum(leaf, factors, weights).reshape(-1) for leaf in self.leaves]
        )

    def leaf_perturbations(self, factors: jax.Array, scale=1.0) -> list[jax.Array]:
        """Each leaf's unit perturbation (..., *leaf.view) of factors (..., E), times
        `scale` (a scalar, applied to the factors: no pass over the products)."""
        parts = []
        for leaf in self.leaves:
            if not leaf.rows:
                z = scale * leaf.split(factors)
                parts.append(z.reshape((*factors.shape[:-1], -1)))
                continue
            a, b = leaf.split(factors)
            parts.append(_outer_sum(a * (scale / math.sqrt(leaf.rank)), b))
        return parts

    def expand(self, factors: jax.Array) -> jax.Array:
        """The flat unit perturbations (..., D) of factors (..., E) (forms them)."""
        lead = factors.shape[:-1]
        parts = self.leaf_perturbations(factors)
        return jnp.concatenate([z.reshape((*lead, -1)) for z in parts], axis=-1)

    def score_sum(self, score_weights, score, factors, weights) -> jax.Array:
        """`score_weights @ score + weighted_sum(factors, weights)` (D,) of per-leaf
        scores (`LowRankStoredNoise`, each in its leaf's `view`): each leaf's two
        terms are added in that shape before the leaves are joined, so the flat
        gradient is written once."""
        parts = [
            _rows_sum(score_weights, s)
            + self._leaf_sum(leaf, factors, weights).reshape(leaf.view)
            for leaf, s in zip(self.leaves, score, strict=True)
        ]
        return jnp.concatenate([part.reshape(-1) for part in parts])


class LowRankOpenES(KeyedOpenES):
    """`KeyedOpenES` whose perturbations are low rank (`LowRankLayout`).

    Particle i runs the shared mean plus the factors of draw i mod P/2 (sign + for
    the first half, - for the second); the gradient sums the draws' factors with
    the shaped fitness as one full-rank matrix product per leaf.

    Args:
        rank: r of `LowRankLayout`; template: theta's shapes; other arguments
            as `KeyedOpenES`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> template = {"w": jnp.zeros((3, 2))}
        >>> es = LowRankOpenES(4, template, rank=1, template=template,
        ...                    optimizer=optax.sgd(0.1))
        >>> state = es.init(jax.random.key(0), template, es.default_params)
        >>> theta = es.particle_theta(state, jax.random.key(1), 0)
        >>> type(theta["w"]).__name__, theta["w"].a.shape
        ('LowRankPerturbed', (3, 1))
    """

    def __init__(
        self,
        population_size: int,
        solution,
        use_antithetic_sampling: bool = True,
        optimizer: optax.GradientTransformation | None = None,
        std_schedule: Callable | None = None,
        fitness_shaping_fn: Callable = centered_rank_fitness_shaping_fn,
        *,
        rank: int,
        template,
        **kwargs,
    ):
        super().__init__(
            population_size,
            solution,
            use_antithetic_sampling=use_antithetic_sampling,
            optimizer=optimizer,
            std_schedule=std_schedule,
            fitness_shaping_fn=fitness_shaping_fn,
            **kwargs,
        )
        self.layout = LowRankLayout(template, rank)

    def factors(self, key_ask: jax.Array, index) -> tuple[jax.Array, jax.Array]:
        """(unit factors (E,), sign) of particle `index`."""
        index = jnp.asarray(index)
        draw = index % self.num_draws
        factors = self.layout.draw(jax.random.fold_in(key_ask, draw))
        if not self.use_antithetic_sampling:
            return factors, jnp.ones(())
        return factors, jnp.where(index < self.num_draws, 1.0, -1.0)

    def noise(self, key_ask: jax.Array, index) -> jax.Array:
        """The flat unit perturbation z of particle `index` (D,) (formed: for the
        best solution and evosax's `ask` only)."""
        factors, sign = self.factors(key_ask, index)
        return sign * self.layout.expand(factors)

    def particle_theta(self, state, key_ask: jax.Array, index):
        """Particle `index`'s theta: the shared mean plus its low-rank factors."""
        factors, sign = self.factors(key_ask, index)
        bases = self._unravel_solution(state.mean)
        return self.layout.theta(bases, factors, sign * state.std)

    def noise_dot(self, key_ask, weights, mesh=None, chunk=None) -> jax.Array:
        """`sum_i weights_i * z_i` from the draws' factors (P/2 x E at most)."""
        del chunk  # the factors are small: all at once
        weights = jnp.asarray(weights)
        m = self.num_draws
        if self.use_antithetic_sampling:
            weights = weights[:m] - weights[m:]
        draws = jax.vmap(lambda j: self.layout.draw(jax.random.fold_in(key_ask, j)))(
            jnp.arange(m)
        )
        return sharding.replicate(self.layout.weighted_sum(draws, weights), mesh)


@struct.dataclass
class LowRankNoiseState:
    """pert: each pair's current unit factors (M, E); score: its episode's
    accumulated `eps / std^2`, one (M, *leaf.view) array per leaf of theta (so that each
    leaf's update is one fused pass, with no flat M x D copy); ask_key: the key data
    of the last draw; restarted: (M,) pairs whose score restarts at the next
    `advance` (done there, in the same pass as the accumulation)."""

    pert: jax.Array
    score: tuple
    ask_key: jax.Array
    restarted: jax.Array


class LowRankStoredNoise:
    """The truncated estimators' stored noise with low-rank perturbations.

    Each pair keeps its current perturbation as unit factors (M x E; the std is
    applied where a theta is built) and its accumulated score dense per leaf (M x D
    in all, which PES keeps in any case). `pair_noise` returns `(factors, score,
    switch factors)`; `advance` reads and writes the score once per meta-iteration.

    Args:
        layout: theta's `LowRankLayout`; num_pairs: M; spec: where the rows live
            (`es_l2o.sharding.pair_sharding`; None: whole).
    """

    def __init__(self, layout: LowRankLayout, num_pairs: int, spec=None):
        self.layout, self.num_pairs, self.spec = layout, num_pairs, spec
        self.num_dims = layout.num_dims

    def init(self, key: jax.Array) -> LowRankNoiseState:
        m = self.num_pairs
        score = tuple(jnp.zeros((m, *leaf.view)) for leaf in self.layout.leaves)
        factors = jnp.zeros((m, self.layout.num_factors))
        no = jnp.zeros((m,), bool)
        return LowRankNoiseState(factors, score, jax.random.key_data(key), no)

    def _factors(self, key: jax.Array) -> jax.Array:
        """Unit factors (M, E), half the pairs at a time: a loop, so that XLA makes
        them once. Fused into the M x D score update, it would draw every factor
        again for each entry it multiplies (30x the update's time at VeLO size; an
        optimization barrier does not stop it on the CPU, and XLA inlines a loop of
        one iteration). Two iterations, not one per pair: each costs a few small
        kernels (a loop over 8 pairs took 3x as long)."""
        keys = jax.random.split(key, self.num_pairs)
        rows = jax.lax.map(self.layout.draw, keys, batch_size=-(-self.num_pairs // 2))
        return sharding.constrain(rows, self.spec)

    def switch(self, noise, std) -> jax.Array:
        """The fresh factors (M, E) new episodes switch to under noise reuse."""
        del std
        key = jax.random.fold_in(jax.random.wrap_key_data(noise.ask_key), 1)
        return self._factors(key)

    def advance(self, noise, key, std, draw, rule):
        fresh = self._factors(key)
        inv_std = 1.0 / std
        restart = self.layout.leaf_perturbations(noise.pert, inv_std)
        scores = []
        for score, old, new in zip(
            noise.score,
            restart,
            self.layout.leaf_perturbations(fresh, inv_std),
            strict=True,
        ):
            score = jnp.where(per_row(noise.restarted, score), old, score)
            scores.append(rule.accumulate(score, new, draw))
        return LowRankNoiseState(
            pert=jnp.where(draw[:, None], fresh, noise.pert),
            score=sharding.constrain(tuple(scores), self.spec),
            ask_key=jax.random.key_data(key),
            restarted=jnp.zeros_like(noise.restarted),
        )

    def pair_noise(self, noise, pairs, std, rule) -> Rows:
        """Rows of `pairs`, or with None of every pair as they are (no gather)."""
        switch = self.switch(noise, std) if rule.reuses else noise.pert
        rows = (noise.pert, noise.score, switch)
        if pairs is None:
            return rows
        return jax.tree.map(lambda x: x[pairs], rows)

    def particle_noise(self, noise, std, rule, mesh) -> Rows:
        particles = sharding.shard_population(
            jnp.arange(2 * self.num_pairs) % self.num_pairs, mesh
        )
        rows = self.pair_noise(noise, particles, std, rule)
        return sharding.shard_population(rows, mesh)

    def restart(self, noise, reset, std, rule):
        if not rule.restarts:
            return noise
        new = self.switch(noise, std) if rule.reuses else noise.pert
        # the score restarts lazily: at the next advance, from these factors
        return noise.replace(
            pert=jnp.where(reset[:, None], new, noise.pert),
            restarted=noise.restarted | reset,
        )

    def overflow(self, noise, rule) -> jax.Array:
        del noise, rule  # stored rows never run out
        return jnp.zeros((), jnp.int32)

    def constrain(self, noise, replicate: bool = False, mesh: Mesh | None = None):
        rows = {"pert": noise.pert, "score": noise.score}
        if self.spec is None:
            return sharding.replicate(noise, mesh) if replicate else noise
        rows = sharding.constrain(rows, self.spec)
        if replicate:
            rest = {"ask_key": noise.ask_key, "restarted": noise.restarted}
            rows.update(sharding.replicate(rest, mesh))
        return noise.replace(**rows)

    def place(self, noise, mesh: Mesh | None):
        noise = sharding.put_replicated(noise, mesh)
        if self.spec is None or mesh is None or mesh.devices.size == 1:
            return noise
        return noise.replace(
            pert=jax.device_put(noise.pert, self.spec),
            score=jax.device_put(noise.score, self.spec),
        )
