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
factors (the accumulated scores stay dense per pair, as PES keeps them).

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

from es_l2o import sharding
from es_l2o.es.keyed import KeyedOpenES
from es_l2o.es.noise import StoredNoise, StoredNoiseState
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
        total = jnp.einsum("imr,i,inr->mn", a, weights, b)
        return total.reshape(-1) / math.sqrt(leaf.rank)

    def weighted_sum(self, factors: jax.Array, weights: jax.Array) -> jax.Array:
        """`sum_i weights_i * z_i` (D,) of the unit perturbations z_i whose factors
        are the rows of `factors` (N, E)."""
        return jnp.concatenate(
            [self._leaf_sum(leaf, factors, weights) for leaf in self.leaves]
        )

    def expand(self, factors: jax.Array) -> jax.Array:
        """The flat unit perturbations (..., D) of factors (..., E) (forms them)."""
        parts = []
        for leaf in self.leaves:
            if not leaf.rows:
                x = leaf.split(factors)
                parts.append(x.reshape((*factors.shape[:-1], -1)))
                continue
            a, b = leaf.split(factors)
            z = jnp.einsum("...mr,...nr->...mn", a, b) / math.sqrt(leaf.rank)
            parts.append(z.reshape((*factors.shape[:-1], -1)))
        return jnp.concatenate(parts, axis=-1)


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


class LowRankStoredNoise(StoredNoise):
    """`StoredNoise` with each pair's perturbation kept as unit low-rank factors.

    `pert` is (M, E) unit factors (the std is applied where a theta is built);
    `score` stays dense (M, D), the accumulated `eps / std^2` that PES keeps in any
    case. `pair_noise` returns `(factors, score, switch factors)`.
    """

    def __init__(self, layout: LowRankLayout, num_pairs: int, spec=None):
        super().__init__(num_pairs, layout.num_dims, spec)
        self.layout = layout

    def init(self, key: jax.Array) -> StoredNoiseState:
        factors = jnp.zeros((self.num_pairs, self.layout.num_factors))
        score = jnp.zeros((self.num_pairs, self.num_dims))
        return StoredNoiseState(factors, score, jax.random.key_data(key))

    def _normal(self, key: jax.Array, std) -> jax.Array:
        del std  # unit factors
        draws = jax.random.normal(key, (self.num_pairs, self.layout.num_factors))
        return sharding.constrain(draws, self.spec)

    def _score(self, factors, std):
        return self.layout.expand(factors) / std

    def advance(self, noise, key, std, draw, rule):
        fresh = self._normal(key, std)
        return StoredNoiseState(
            pert=jnp.where(draw[:, None], fresh, noise.pert),
            score=rule.accumulate(noise.score, self._score(fresh, std), draw),
            ask_key=jax.random.key_data(key),
        )

    def restart(self, noise, reset, std, rule):
        if not rule.restarts:
            return noise
        new = self.switch(noise, std) if rule.reuses else noise.pert
        return noise.replace(
            pert=jnp.where(reset[:, None], new, noise.pert),
            score=jnp.where(reset[:, None], self._score(new, std), noise.score),
        )
