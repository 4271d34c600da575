"""How a truncated estimator keeps its perturbation noise: stored rows or keys.

Each antithetic pair j has a current perturbation (that of its positive partner;
the negative partner uses its negation) and an accumulated score, the sum of
eps / std^2 over the perturbations that weight its episode's losses (which ones is
the `es_l2o.es.weighting` rule's choice). A `NoiseStore` keeps them one of two ways:

- `StoredNoise`: both as (M, D) arrays in the state (M = P / 2 pairs), split over
  the devices that run their pairs where the mesh allows.
- `KeyedNoise`: a few integers per pair and one key; every row is regenerated
  where it is needed. PES's accumulated perturbations are then a Brownian path
  evaluated by Levy's midpoint construction (`brownian_path`): log2(episode
  truncations) normal draws per pair, so neither memory nor compute grows with the
  horizon.

Both return `(pert, score, switch)` rows for any set of pairs: the current
perturbation, the accumulated score, and the perturbation an episode that starts
inside this truncation runs under (the current one, or for noise reuse a fresh one).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_l2o.es.weighting import WEIGHTINGS
    >>> store, rule = KeyedNoise(num_pairs=2, num_dims=3), WEIGHTINGS["pes"]
    >>> noise = store.init(jax.random.key(0))
    >>> noise = store.advance(noise, jax.random.key(1), 0.1, jnp.ones(2, bool), rule)
    >>> pert, score, switch = store.pair_noise(noise, jnp.arange(2), 0.1, rule)
    >>> pert.shape, bool(jnp.allclose(score, pert / 0.1**2, rtol=1e-5))
    ((2, 3), True)
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from es_l2o import sharding
from es_l2o.es.weighting import Weighting

#: where per-pair perturbations live, by the estimators' `noise=` name
NOISE_MODES = ("stored", "keys")
#: default Brownian-path depth for keyed PES on systems that never reset
DEFAULT_WALK_DEPTH = 20

Rows = tuple[jax.Array, jax.Array, jax.Array]


def brownian_path(key: jax.Array, n: jax.Array, depth: int, dim: int) -> jax.Array:
    """W(n) of a Gaussian random walk with N(0, I) steps, W(0) = 0, n in [0, 2**depth].

    Levy's construction: W(2**depth) is drawn first, then each level draws the
    midpoint of the interval holding n given its ends (a Brownian bridge), so any
    W(n) costs depth + 1 normal draws and W(n) - W(n - 1) are i.i.d. N(0, I).

    Example:
        >>> w = jax.vmap(lambda n: brownian_path(jax.random.key(0), n, 4, 3))(
        ...     jnp.arange(17))
        >>> bool(jnp.all(w[0] == 0)), w.shape
        (True, (17, 3))
    """
    size = 2**depth
    n = jnp.asarray(n, jnp.int32)
    end = math.sqrt(size) * jax.random.normal(jax.random.fold_in(key, 0), (dim,))

    def level(_, carry):
        a, b, wa, wb, node = carry
        m = (a + b) // 2
        scale = jnp.sqrt((b - a).astype(jnp.float32) / 4.0)
        wm = 0.5 * (wa + wb) + scale * jax.random.normal(
            jax.random.fold_in(key, node), (dim,)
        )
        left = n <= m
        return (
            jnp.where(left, a, m),
            jnp.where(left, m, b),
            jnp.where(left, wa, wm),
            jnp.where(left, wm, wb),
            2 * node + jnp.where(left, 0, 1),
        )

    carry = (jnp.int32(0), jnp.int32(size), jnp.zeros((dim,)), end, jnp.int32(1))
    *_, w, _ = jax.lax.fori_loop(0, depth, level, carry)
    return jnp.where(n == 0, 0.0, w)


class NoiseStore(Protocol):
    """How per-pair perturbations and scores are kept (`StoredNoise`, `KeyedNoise`).

    `std` is the current perturbation scale; `rule` the estimator's weighting.
    """

    num_pairs: int
    num_dims: int

    def init(self, key: jax.Array):
        """The noise state of a fresh estimator: no perturbation drawn yet."""

    def advance(self, noise, key: jax.Array, std, draw: jax.Array, rule: Weighting):
        """Draws a fresh perturbation for the pairs in `draw` (a truncation begins)."""

    def pair_noise(self, noise, pairs: jax.Array, std, rule: Weighting) -> Rows:
        """`(pert, score, switch)` rows (c, D) of the positive partners of `pairs`."""

    def particle_noise(self, noise, std, rule: Weighting, mesh: Mesh | None) -> Rows:
        """`pair_noise` rows (P, D), one per particle (pair i mod M), split over
        the mesh so that each device makes only its own particles' rows."""

    def restart(self, noise, reset: jax.Array, std, rule: Weighting):
        """Restarts the scores of pairs whose episode ended in this truncation."""

    def overflow(self, noise, rule: Weighting) -> jax.Array:
        """Pairs whose noise ran past what the store can represent (0 if none)."""

    def constrain(self, noise, replicate: bool = False, mesh: Mesh | None = None):
        """`noise` in jit with its rows split over the devices that use them (and,
        with `replicate`, everything else whole on every device of `mesh`)."""

    def place(self, noise, mesh: Mesh | None):
        """Concrete `noise` put where `constrain(noise, True, mesh)` says."""


def _particle_rows(store: NoiseStore, noise, std, rule, mesh, population_size: int):
    """Per-particle `pair_noise` (pair i mod M), made where each particle runs."""
    m = store.num_pairs
    particles = sharding.shard_population(jnp.arange(population_size) % m, mesh)
    rows = store.pair_noise(noise, particles, std, rule)
    return sharding.shard_population(rows, mesh)


@struct.dataclass
class StoredNoiseState:
    """pert: each pair's current perturbation (M, D); score: its episode's
    accumulated sum of eps / std^2 (M, D); ask_key: the key data of the last draw
    (noise reuse regenerates from it the perturbations new episodes switch to)."""

    pert: jax.Array
    score: jax.Array
    ask_key: jax.Array


class StoredNoise:
    """Per-pair perturbations and scores kept as (M, D) arrays in the state.

    Args:
        num_pairs, num_dims: M and D.
        spec: where the rows live (`es_l2o.sharding.pair_sharding`; None: whole).

    Example:
        >>> from es_l2o.es.weighting import WEIGHTINGS
        >>> store, rule = StoredNoise(num_pairs=2, num_dims=3), WEIGHTINGS["tes"]
        >>> noise = store.init(jax.random.key(0))
        >>> draw = jnp.ones(2, bool)
        >>> noise = store.advance(noise, jax.random.key(1), 0.1, draw, rule)
        >>> bool(jnp.allclose(noise.score, noise.pert / 0.1**2)), noise.pert.shape
        (True, (2, 3))
    """

    def __init__(
        self, num_pairs: int, num_dims: int, spec: NamedSharding | None = None
    ):
        self.num_pairs, self.num_dims, self.spec = num_pairs, num_dims, spec

    def init(self, key: jax.Array) -> StoredNoiseState:
        zeros = jnp.zeros((self.num_pairs, self.num_dims))
        return StoredNoiseState(zeros, zeros, jax.random.key_data(key))

    def _normal(self, key: jax.Array, std) -> jax.Array:
        # split like the rows: each device draws only its own pairs
        rows = jax.random.normal(key, (self.num_pairs, self.num_dims))
        return std * sharding.constrain(rows, self.spec)

    def advance(self, noise, key, std, draw, rule):
        fresh = self._normal(key, std)
        return StoredNoiseState(
            pert=jnp.where(draw[:, None], fresh, noise.pert),
            score=rule.accumulate(noise.score, fresh * (1.0 / std**2), draw),
            ask_key=jax.random.key_data(key),
        )

    def switch(self, noise: StoredNoiseState, std) -> jax.Array:
        """The fresh perturbations (M, D) of this truncation that new episodes
        switch to under noise reuse, regenerated from the ask key."""
        key = jax.random.fold_in(jax.random.wrap_key_data(noise.ask_key), 1)
        return self._normal(key, std)

    def pair_noise(self, noise, pairs, std, rule) -> Rows:
        pert = noise.pert[pairs]
        switch = self.switch(noise, std)[pairs] if rule.reuses else pert
        return pert, noise.score[pairs], switch

    def particle_noise(self, noise, std, rule, mesh) -> Rows:
        if self.spec is None:
            return _particle_rows(self, noise, std, rule, mesh, 2 * self.num_pairs)
        # repeat each device's block of pair rows for both signs: no gather
        both = NamedSharding(self.spec.mesh, PartitionSpec("sign", "pairs"))

        def rows(x):  # (M, D) pair rows -> (P, D) particle rows
            x = sharding.constrain(jnp.broadcast_to(x[None], (2, *x.shape)), both)
            return sharding.shard_population(x.reshape(-1, x.shape[-1]), mesh)

        pert = rows(noise.pert)
        switch = rows(self.switch(noise, std)) if rule.reuses else pert
        return pert, rows(noise.score), switch

    def restart(self, noise, reset, std, rule):
        if not rule.restarts:
            return noise
        # the new episode has seen one perturbation: the one it ran under
        new = self.switch(noise, std) if rule.reuses else noise.pert
        return noise.replace(
            pert=jnp.where(reset[:, None], new, noise.pert),
            score=jnp.where(reset[:, None], new * (1.0 / std**2), noise.score),
        )

    def overflow(self, noise, rule) -> jax.Array:
        del noise, rule  # stored rows never run out
        return jnp.zeros((), jnp.int32)

    def constrain(self, noise, replicate: bool = False, mesh: Mesh | None = None):
        if self.spec is None:
            return sharding.replicate(noise, mesh) if replicate else noise
        rows = sharding.constrain({"pert": noise.pert, "score": noise.score}, self.spec)
        if replicate:
            noise = noise.replace(ask_key=sharding.replicate(noise.ask_key, mesh))
        return noise.replace(**rows)

    def place(self, noise, mesh: Mesh | None):
        noise = sharding.put_replicated(noise, mesh)
        if self.spec is None or mesh is None or mesh.devices.size == 1:
            return noise
        return noise.replace(
            pert=jax.device_put(noise.pert, self.spec),
            score=jax.device_put(noise.score, self.spec),
        )


@struct.dataclass
class KeyedNoiseState:
    """A few integers per pair (M,) and one key that regenerate every row.

    episode: the pair's stream (an episode, or for truncated ES a truncation);
    index: truncations of the stream so far (PES's Brownian path position);
    carry_episode, carry_index, has_carry: PES only: the truncation perturbation a
    new episode began under (the last step of the previous stream).
    """

    key: jax.Array
    episode: jax.Array
    index: jax.Array
    carry_episode: jax.Array
    carry_index: jax.Array
    has_carry: jax.Array


class KeyedNoise:
    """Per-pair perturbations regenerated from (key, pair, stream, index).

    Args:
        num_pairs, num_dims: M and D.
        walk_depth: PES only: log2 of the longest episode in truncations.
    """

    def __init__(self, num_pairs: int, num_dims: int, walk_depth: int | None = None):
        depth = DEFAULT_WALK_DEPTH if walk_depth is None else int(walk_depth)
        if not 1 <= depth <= 30:
            raise ValueError(f"walk_depth must lie in [1, 30], got {walk_depth}")
        self.num_pairs, self.num_dims, self.walk_depth = num_pairs, num_dims, depth

    def init(self, key: jax.Array) -> KeyedNoiseState:
        ints = jnp.zeros((self.num_pairs,), jnp.int32)
        no = jnp.zeros((self.num_pairs,), bool)
        return KeyedNoiseState(jax.random.key_data(key), ints, ints, ints, ints, no)

    def advance(self, noise, key, std, draw, rule):
        del key, std  # every draw is a function of the stored key
        if rule.accumulates:  # one step further along the episode's path
            return noise.replace(index=noise.index + 1)
        return noise.replace(episode=jnp.where(draw, noise.episode + 1, noise.episode))

    def _walk(self, stream: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(W(n) - W(n - 1), W(n)) of the Brownian path of `stream`."""
        depth, dim = self.walk_depth, self.num_dims
        paths = jax.vmap(lambda i: brownian_path(stream, i, depth, dim))(
            jnp.stack([n, n - 1])
        )
        return paths[0] - paths[1], paths[0]

    def _pair_rows(self, noise, j, episode, index, carry, std, rule):
        base = jax.random.fold_in(jax.random.wrap_key_data(noise.key), j)
        stream = jax.random.fold_in(base, episode)
        if rule.accumulates:
            carry_episode, carry_index, has_carry = carry
            z, total = self._walk(stream, index)
            before, _ = self._walk(jax.random.fold_in(base, carry_episode), carry_index)
            total = total + jnp.where(has_carry, before, 0.0)
            switch = z
        else:
            z = total = switch = jax.random.normal(stream, (self.num_dims,))
            if rule.reuses:  # the next episode's stream
                next_stream = jax.random.fold_in(base, episode + 1)
                switch = jax.random.normal(next_stream, (self.num_dims,))
        return std * z, total * (1.0 / std), std * switch

    def pair_noise(self, noise, pairs, std, rule) -> Rows:
        def one(j, episode, index, carry_episode, carry_index, has_carry):
            carry = (carry_episode, carry_index, has_carry)
            return self._pair_rows(noise, j, episode, index, carry, std, rule)

        fields = (
            noise.episode,
            noise.index,
            noise.carry_episode,
            noise.carry_index,
            noise.has_carry,
        )
        return jax.vmap(one)(pairs, *(x[pairs] for x in fields))

    def particle_noise(self, noise, std, rule, mesh) -> Rows:
        return _particle_rows(self, noise, std, rule, mesh, 2 * self.num_pairs)

    def restart(self, noise, reset, std, rule):
        del std
        if rule.accumulates:  # the ended path's last step carries into the new one
            return noise.replace(
                carry_episode=jnp.where(reset, noise.episode, noise.carry_episode),
                carry_index=jnp.where(reset, noise.index, noise.carry_index),
                has_carry=reset | noise.has_carry,
                episode=jnp.where(reset, noise.episode + 1, noise.episode),
                index=jnp.where(reset, 0, noise.index),
            )
        if rule.reuses:  # new episodes keep the stream they switched to
            return noise.replace(
                episode=jnp.where(reset, noise.episode + 1, noise.episode)
            )
        return noise

    def overflow(self, noise, rule) -> jax.Array:
        if not rule.accumulates:
            return jnp.zeros((), jnp.int32)
        return jnp.sum(noise.index > 2**self.walk_depth)

    def constrain(self, noise, replicate: bool = False, mesh: Mesh | None = None):
        return sharding.replicate(noise, mesh) if replicate else noise

    def place(self, noise, mesh: Mesh | None):
        return sharding.put_replicated(noise, mesh)


def make_store(
    noise: str, num_pairs: int, num_dims: int, *, spec=None, walk_depth=None
) -> NoiseStore:
    """The store named by an estimator's `noise=` ("stored" or "keys")."""
    if noise == "stored":
        return StoredNoise(num_pairs, num_dims, spec)
    if noise == "keys":
        return KeyedNoise(num_pairs, num_dims, walk_depth)
    raise ValueError(f"unknown noise mode {noise!r}; valid: {sorted(NOISE_MODES)}")
