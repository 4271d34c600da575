"""One truncation of a population: K inner steps, per-particle episodes and scores.

Every particle keeps its own inner state (its own task, horizon and step counter, see
`es_l2o.unroll.LOptTraining`) across meta-iterations, so with a staggered system its
episodes end at different times, often inside a truncation. `Truncation.run` unrolls
the particles K steps from where they stopped (one `lax.scan` over steps of the
vmapped population) and splits each particle's losses at its first reset: those
before it belong to the episode running when the truncation began ("old"), those
after it to the episode that started inside it ("new"). Antithetic partners share
their task, initialisation and minibatches, so a pair also ends its episodes
together; when one partner fails, both restart.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from es_l2o.toy_systems import InfluenceBalancing
    >>> system = InfluenceBalancing(horizon=3)
    >>> truncation = Truncation(system, length=2)
    >>> thetas = jnp.full((2,), 0.5)
    >>> inner = jax.vmap(lambda k: system.init(k, 0.5))(jax.random.split(
    ...     jax.random.key(0), 2))
    >>> keys = jax.random.split(jax.random.key(1), 2)
    >>> inner, scale, out = truncation.run(thetas, None, inner, jnp.ones(2), keys)
    >>> out["old"].shape, bool(jnp.any(out["reset"]))
    ((2,), False)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from es_l2o import sharding
from es_l2o.es import common
from es_l2o.es.noise import NOISE_MODES
from es_l2o.lowrank import particle_axes, where_particles
from es_l2o.unroll import UnrolledSystem

#: what a truncation is scored by (each averaged over the truncation's steps)
META_LOSSES = ("train_mean", "heldout", "validation")
#: per-task normalisation of every step's meta-loss
LOSS_NORMALIZATIONS = ("none", "initial", "log")
_LOG_FLOOR = 1e-8


def end_where(system: UnrolledSystem, mask: jax.Array, states):
    """Ends the episodes of the particles in `mask` (leading axis of `states`)."""
    return where_particles(mask, jax.vmap(system.end_episode)(states), states)


def initial_scale(values, losses, resets, finite, scale):
    """Divides (K, n) step values by the first training loss of their episode.

    `scale` (n,) is each particle's episode's first loss before the truncation (NaN
    before its first step); a finite reset step starts a new episode's scale.
    Returns the normalised values and the scale after the truncation.

    Example:
        >>> ones = jnp.ones((2, 1), bool)
        >>> values, scale = initial_scale(
        ...     jnp.full((2, 1), 4.0), jnp.full((2, 1), 2.0), ~ones, ones,
        ...     jnp.full((1,), jnp.nan))
        >>> values.ravel().tolist(), scale.tolist()
        ([2.0, 2.0], [2.0])
    """
    steps = jnp.arange(values.shape[0])[:, None]
    first_finite = finite & (jnp.cumsum(finite, axis=0) == 1)
    anchor = finite & (resets | (jnp.isnan(scale)[None, :] & first_finite))
    last = jax.lax.cummax(jnp.where(anchor, steps, -1), axis=0)
    candidates = jnp.maximum(jnp.abs(losses), _LOG_FLOOR)
    picked = jnp.take_along_axis(candidates, jnp.maximum(last, 0), axis=0)
    scales = jnp.where(last >= 0, picked, scale[None, :])
    return values / scales, scales[-1]


def walk_depth_for(system: UnrolledSystem, truncation_length: int) -> int | None:
    """Brownian-path depth for keyed PES: log2 of the most truncations one episode
    spans (None where the system has no `max_horizon`)."""
    max_horizon = getattr(system, "max_horizon", None)
    if max_horizon is None:
        return None
    # a stream spans at most ceil(T / K) + 1 truncations of one episode
    return max(1, math.ceil(math.log2(-(-max_horizon // truncation_length) + 2)))


def pair_step_counts(
    counts: jax.Array, reset: jax.Array, steps_after_reset: jax.Array, length: int
) -> jax.Array:
    """Inner steps since each pair's accumulator restarted, after a truncation."""
    return jnp.where(reset, steps_after_reset, counts + length)


def check_settings(system, population_size, truncation_length, **settings) -> None:
    """Raises ValueError naming the first bad setting of a truncated estimator."""
    common.choose(settings["meta_loss"], dict.fromkeys(META_LOSSES), "meta_loss")
    common.choose(
        settings["loss_normalization"],
        dict.fromkeys(LOSS_NORMALIZATIONS),
        "loss_normalization",
    )
    common.choose(settings["noise"], dict.fromkeys(NOISE_MODES), "noise mode")
    if settings["meta_loss"] == "validation" and not system.has_validation:
        raise ValueError(
            "meta_loss='validation' needs a population with a validation split; "
            "use 'train_mean' or 'heldout' for this one"
        )
    if not isinstance(truncation_length, int) or truncation_length < 1:
        raise ValueError(
            f"truncation_length must be a positive integer, got {truncation_length!r}"
        )
    if population_size < 2:
        raise ValueError(f"population_size must be >= 2, got {population_size}")
    common.check_population(population_size, antithetic=True)
    sharding.check_population(population_size, settings["mesh"])
    max_grad_norm, penalty = settings["max_grad_norm"], settings["nonfinite_penalty"]
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if penalty <= 0 or not math.isfinite(penalty):
        raise ValueError(f"nonfinite_penalty must be finite and > 0, got {penalty}")


def pair_chunk_of(pair_chunk: int | None, num_pairs: int) -> int:
    """Pairs unrolled at a time: `pair_chunk`, a divisor of the pairs (None: all)."""
    chunk = num_pairs if pair_chunk is None else int(pair_chunk)
    if chunk < 1 or num_pairs % chunk:
        raise ValueError(
            f"pair_chunk must divide the number of pairs {num_pairs}, got {pair_chunk}"
        )
    return chunk


def std_schedule_of(std) -> tuple[Callable, float]:
    """`(schedule, initial std)` of a std or a schedule `iteration -> std`."""
    schedule = std if callable(std) else optax.constant_schedule(float(std))
    std0 = float(schedule(0))
    if std0 <= 0:
        raise ValueError(f"std must be > 0, got {std0}")
    return schedule, std0


def truncation_metrics(out: dict, grad: jax.Array, std) -> dict:
    """The metrics of one truncation's `Truncation.run` output and its gradient."""
    fitness = out["old"] + out["new"]
    grad_norm, grad_finite = common.norm_and_finite(grad)
    return {
        "meta_loss": jnp.mean(fitness),
        "meta_loss_min": jnp.min(fitness),
        "meta_loss_max": jnp.max(fitness),
        "train_loss": jnp.sum(out["raw_sum"])
        / jnp.maximum(jnp.sum(out["finite_steps"]), 1),
        "resets": jnp.sum(out["reset"]),
        "nonfinite_steps": jnp.sum(out["nonfinite"]),
        "nonfinite_particles": jnp.sum(out["nonfinite"] > 0),
        "grad_norm": grad_norm,
        "grad_finite": grad_finite,
        "std": std,
    }


@dataclass(frozen=True)
class Truncation:
    """K inner steps of a population of particles, scored step by step.

    Args:
        system: the unrolled system.
        length: K, inner steps per particle per truncation.
        meta_loss: "train_mean", "heldout" or "validation" (see `TruncatedEstimator`).
        loss_normalization: "none", "initial" or "log".
        nonfinite_penalty: the bounded value of a failed step (and the clip).
    """

    system: UnrolledSystem
    length: int
    meta_loss: str = "train_mean"
    loss_normalization: str = "none"
    nonfinite_penalty: float = 1e3

    def _step_keys(self, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(K, n) step keys and as many evaluation keys, drawn outside the loop."""
        k = self.length
        evaluate = self.meta_loss != "train_mean"
        step_keys = jnp.swapaxes(
            jax.vmap(lambda key: jax.random.split(key, 2 * k if evaluate else k))(keys),
            0,
            1,
        )
        return step_keys[:k], step_keys[k:] if evaluate else step_keys

    def _body(self, thetas, switched_thetas, half: int):
        """The scan body over steps: one step of every particle (2 * half)."""
        system = self.system
        split = "validation" if self.meta_loss == "validation" else "train"
        evaluate = self.meta_loss != "train_mean"

        def body(carry, xs):
            inner, switched = carry
            step_key, eval_key = xs
            theta = thetas
            if switched_thetas is not None:
                switched = switched | jax.vmap(system.episode_done)(inner)
                theta = where_particles(switched, switched_thetas, thetas)
            inner, out = system.batch_step(step_key, theta, inner)
            # keep antithetic partners in step: when one fails, both restart
            lone = out.finite & ~jnp.roll(out.finite, half)
            inner = jax.lax.cond(
                jnp.any(lone), lambda s: end_where(system, lone, s), lambda s: s, inner
            )
            if evaluate:
                value = jax.vmap(
                    lambda q, th, s: system.meta_loss(q, th, s, split),
                    in_axes=(0, particle_axes(theta), 0),
                )(eval_key, theta, inner)
            else:
                value = out.loss
            return (inner, switched), (value, out.loss, out.reset, out.finite)

        return body

    def run(self, thetas, switched_thetas, inner, scale: jax.Array, keys: jax.Array):
        """Unrolls the 2c particles (positive partners first) K steps.

        Args:
            thetas: each particle's theta (leading axis 2c).
            switched_thetas: the thetas a particle switches to from the step its
                new episode starts (noise reuse), or None: no switching.
            inner: the particles' inner states; scale: (2c,) their episodes'
                first losses; keys: (2c,) their keys.

        Returns:
            (inner, scale, out): out holds per particle the "old" and "new" mean
            step values, whether it "reset", its "steps_after_reset", its
            "nonfinite" steps, and the "raw_sum" and "finite_steps" of its losses.
        """
        k = self.length
        n = jax.tree.leaves(inner)[0].shape[0]
        carry = (inner, jnp.zeros((n,), bool))
        (inner, _), (values, losses, resets, finite) = jax.lax.scan(
            self._body(thetas, switched_thetas, n // 2), carry, self._step_keys(keys)
        )
        if self.loss_normalization == "initial":
            values, scale = initial_scale(values, losses, resets, finite, scale)
        elif self.loss_normalization == "log":
            values = jnp.log(jnp.maximum(values, _LOG_FLOOR))
        penalty = self.nonfinite_penalty
        ok = finite & jnp.isfinite(values)
        values = jnp.where(ok, jnp.clip(values, -penalty, penalty), penalty)
        first_reset = jnp.where(jnp.any(resets, axis=0), jnp.argmax(resets, axis=0), k)
        old = jnp.arange(k)[:, None] < first_reset[None, :]
        out = {
            "old": jnp.sum(jnp.where(old, values, 0.0), axis=0) / k,
            "new": jnp.sum(jnp.where(old, 0.0, values), axis=0) / k,
            "reset": first_reset < k,
            "steps_after_reset": k - first_reset,
            "nonfinite": jnp.sum(~finite, axis=0),
            "raw_sum": jnp.sum(jnp.where(finite, losses, 0.0), axis=0),
            "finite_steps": jnp.sum(finite, axis=0),
        }
        return inner, scale, out
