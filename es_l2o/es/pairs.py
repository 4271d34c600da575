"""Antithetic pairs: particles i and i + M (M = P / 2) share pair i's perturbation.

The positive partner runs mean + eps, the negative one mean - eps, on the same task,
initialisation and minibatches, so a pair's loss difference measures its perturbation
alone. Per-pair state (perturbations, scores, counters) is indexed by pair; these
helpers move between pair rows and particle rows, group pairs into chunks, and sum
the ES gradient over pairs.

Example:
    >>> import jax.numpy as jnp
    >>> differences(jnp.array([3.0, 5.0, 1.0, 2.0])).tolist()
    [2.0, 3.0]
    >>> either(jnp.array([True, False, False, False])).tolist()
    [True, False]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from es_l2o import sharding
from es_l2o.es import common
from es_l2o.es.lowrank import LowRankLayout, LowRankStoredNoise
from es_l2o.es.noise import NoiseStore, Rows
from es_l2o.es.truncation import Truncation
from es_l2o.es.weighting import Weighting


def init_particles(system, key: jax.Array, theta, population_size: int):
    """Every particle's initial inner state; antithetic partners share their key,
    so they start on the same task from the same initialisation."""
    keys = common.particle_keys(key, population_size, antithetic=True)
    return jax.vmap(lambda k: system.init(k, theta))(keys)


def differences(x: jax.Array) -> jax.Array:
    """(P,) particle values -> (M,) positive minus negative partner."""
    m = x.shape[0] // 2
    return x[:m] - x[m:]


def either(x: jax.Array) -> jax.Array:
    """(P,) particle flags -> (M,) whether either partner has it."""
    m = x.shape[0] // 2
    return x[:m] | x[m:]


def larger(x: jax.Array) -> jax.Array:
    """(P,) particle values -> (M,) the larger of the two partners'."""
    m = x.shape[0] // 2
    return jnp.maximum(x[:m], x[m:])


def thetas(
    mean: jax.Array,
    pert: jax.Array,
    unravel,
    per_particle: bool,
    mesh: Mesh | None,
    layout: LowRankLayout | None = None,
    std=None,
):
    """The particles' thetas (leading axis 2c) from c pair perturbations (c, D), or
    from one row per particle (2c, D) with `per_particle` (split over the mesh).

    With a low-rank `layout` the rows are unit factors (c or 2c, E) scaled by
    `std`, and the thetas share the mean's matrices (`es_l2o.lowrank`).
    """
    half = pert.shape[0] // 2 if per_particle else pert.shape[0]
    if layout is not None:
        rows = pert if per_particle else jnp.concatenate([pert, pert])
        sign = jnp.where(jnp.arange(2 * half) < half, 1.0, -1.0)
        rows = sharding.shard_population(rows, mesh)
        return layout.theta(unravel(mean), rows, sign * std)
    if per_particle:
        sign = jnp.where(jnp.arange(2 * half) < half, 1.0, -1.0)
        flat = sharding.shard_population(mean + sign[:, None] * pert, mesh)
    else:
        flat = mean + jnp.concatenate([pert, -pert])
    return jax.vmap(unravel)(flat)


def to_groups(x: jax.Array, groups: int, chunk: int) -> jax.Array:
    """(P, ...) particles -> (G, 2c, ...): each group holds its pairs' partners."""
    x = x.reshape((2, groups, chunk) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((groups, 2 * chunk) + x.shape[3:])


def from_groups(x: jax.Array, groups: int, chunk: int) -> jax.Array:
    """The inverse of `to_groups`: (G, 2c, ...) -> (P, ...)."""
    x = x.reshape((groups, 2, chunk) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((2 * groups * chunk,) + x.shape[3:])


def gradient(
    store: NoiseStore,
    noise,
    std,
    rule: Weighting,
    d_old: jax.Array,
    d_new: jax.Array,
    *,
    rows: Rows | None = None,
    per_particle: bool = False,
    chunk: int | None = None,
    layout: LowRankLayout | None = None,
) -> jax.Array:
    """The flat ES gradient (D,) from each pair's loss differences (M,).

    Args:
        d_old: L(+) - L(-) of the losses of the episode running when the
            truncation began (weighted by its accumulated score);
        d_new: the same for losses after a reset inside the truncation (weighted
            by the perturbation the new episode ran under alone).
        rows: `pair_noise` of all pairs if already at hand (else regenerated
            `chunk` pairs at a time); per_particle: `rows` holds one row per
            particle (pair i mod M), so every pair appears twice.
        layout: low rank: `switch` rows are unit factors (`LowRankStoredNoise`).
    """

    def noise_sum(old, score, new, switch):
        if layout is None:
            return old @ score + (new / std**2) @ switch
        return layout.score_sum(old, score, switch, new / std)

    # the mean over particles, taken on the (M,) weights: no pass over D
    inv_population = 1.0 / (2 * store.num_pairs)
    d_old, d_new = d_old * inv_population, d_new * inv_population
    if rows is not None:
        _, score, switch = rows
        if per_particle:  # both partners carry their pair's noise: halve
            d_old = 0.5 * jnp.concatenate([d_old, d_old])
            d_new = 0.5 * jnp.concatenate([d_new, d_new])
        return noise_sum(d_old, score, d_new, switch)

    def chunk_sum(pairs, old, new):
        _, score, switch = store.pair_noise(noise, pairs, std, rule)
        return noise_sum(old, score, new, switch)

    chunk = store.num_pairs if chunk is None else chunk
    groups = store.num_pairs // chunk
    pairs = jnp.arange(store.num_pairs).reshape(groups, chunk)
    d_old, d_new = d_old.reshape(groups, chunk), d_new.reshape(groups, chunk)
    if groups == 1:
        total = chunk_sum(pairs[0], d_old[0], d_new[0])
    else:

        def body(acc, xs):
            return acc + chunk_sum(*xs), None

        zeros = jnp.zeros((store.num_dims,))
        total, _ = jax.lax.scan(body, zeros, (pairs, d_old, d_new))
    return total


@dataclass(frozen=True)
class PairPopulation:
    """The population of a truncated estimator as antithetic pairs: their thetas,
    one truncation of them (`chunk` pairs at a time) and their gradient.

    Args:
        store, rule: where the noise lives and which perturbations weight a loss.
        truncation: the truncation each particle runs.
        unravel: flat (D,) -> theta pytree.
        mesh: the population's mesh (None: one device).
        chunk: pairs unrolled at a time (a divisor of the pairs).
        layout: low rank (`es_l2o.es.lowrank`): the store's perturbation rows are
            unit factors and the thetas share the mean's matrices; None: dense rows.
    """

    store: NoiseStore
    rule: Weighting
    truncation: Truncation
    unravel: Callable
    mesh: Mesh | None
    chunk: int
    layout: LowRankLayout | None = None

    def rows(self, noise, std) -> tuple[Rows | None, bool]:
        """Every pair's noise rows, made once for both the unroll and the gradient
        where no chunks are asked for: `(rows, per_particle)`, one row per particle
        over several devices (each device makes its own), else one per pair; None
        with chunks (each chunk makes its own)."""
        store, rule = self.store, self.rule
        if self.chunk != store.num_pairs:
            return None, False
        if sharding.population_devices(self.mesh) > 1:
            return store.particle_noise(noise, std, rule, self.mesh), True
        if isinstance(store, LowRankStoredNoise):  # all rows, no gather
            return store.pair_noise(noise, None, std, rule), False
        return store.pair_noise(noise, jnp.arange(store.num_pairs), std, rule), False

    def _unroll_group(self, mean, noise, std, group, xs, rows=None, per=False):
        """Unrolls the 2c particles of the pairs `group` (positive partners first);
        `xs` are their (inner states, loss scales, keys)."""
        if rows is None:
            rows = self.store.pair_noise(noise, group, std, self.rule)
        pert, _, switch = rows

        def thetas_of(p):
            return thetas(mean, p, self.unravel, per, self.mesh, self.layout, std)

        # noise reuse: a new episode runs under the next perturbation at once
        switched = thetas_of(switch) if self.rule.reuses else None
        return self.truncation.run(thetas_of(pert), switched, *xs)

    def unroll(self, mean, noise, std, inner, scale, key, rows=None, per=False):
        """One truncation of every particle: `Truncation.run`'s (inner, scale, out).

        rows, per: `rows(noise, std)`, where made.
        """
        m, chunk = self.store.num_pairs, self.chunk
        groups = m // chunk
        keys = common.particle_keys(key, 2 * m, antithetic=True)
        group_pairs = jnp.arange(m).reshape(groups, chunk)
        if groups == 1:
            xs = (inner, scale, keys)
            return self._unroll_group(mean, noise, std, group_pairs[0], xs, rows, per)

        def group(args):
            these, group_inner, group_scale = args
            group_keys = keys[jnp.concatenate([these, these + m])]
            xs = (group_inner, group_scale, group_keys)
            return self._unroll_group(mean, noise, std, these, xs)

        def split(x):
            return to_groups(x, groups, chunk)

        outs = jax.lax.map(
            group, (group_pairs, jax.tree.map(split, inner), split(scale))
        )
        return jax.tree.map(lambda x: from_groups(x, groups, chunk), outs)

    def gradient(self, noise, std, out: dict, rows=None, per=False) -> jax.Array:
        """The flat ES gradient (D,) of a truncation's `out` (see `gradient`)."""
        return gradient(
            self.store,
            noise,
            std,
            self.rule,
            differences(out["old"]),
            differences(out["new"]),
            rows=rows,
            per_particle=per,
            chunk=self.chunk,
            layout=self.layout,
        )
