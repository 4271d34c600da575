"""Which perturbations weight each loss of a truncation: three small rules.

Every truncated estimator perturbs each antithetic pair and scores it by the losses of
one truncation. The rules differ only in which perturbations weight those losses:

- `PESWeighting` (persistent ES, Vicol et al. 2021): a fresh perturbation every
  truncation; a loss is weighted by the sum of all perturbations its episode has
  seen (unbiased for the whole-episode objective).
- `TruncatedWeighting` (truncated ES): a fresh perturbation every truncation; a loss
  is weighted by the current one only (biased: blind to the truncation's past).
- `NoiseReuseWeighting` (noise-reuse ES, Li et al. 2023): one perturbation per
  episode, reused by every truncation of it; an episode that starts inside a
  truncation switches to a fresh perturbation at once.

A rule is stateless; the noise store (`es_l2o.es.noise`) asks it the questions below
and keeps whatever the answers require.

Example:
    >>> import jax.numpy as jnp
    >>> rule = WEIGHTINGS["pes"]
    >>> rule.accumulate(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.ones(1, bool))
    Array([[2., 2.]], dtype=float32)
    >>> WEIGHTINGS["tes"].restarts, WEIGHTINGS["nres"].reuses
    (False, True)
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp


def per_row(flags: jax.Array, rows: jax.Array) -> jax.Array:
    """(N,) flags shaped to broadcast against (N, ...) rows, one flag per row.

    Example:
        >>> per_row(jnp.ones(3, bool), jnp.zeros((3, 4, 5))).shape
        (3, 1, 1)
    """
    return flags.reshape(flags.shape + (1,) * (rows.ndim - 1))


class Weighting:
    """A rule for which perturbations weight each loss (see the module docstring).

    Attributes:
        accumulates: a loss is weighted by every perturbation its episode has seen.
        reuses: an episode runs under one perturbation; one that starts inside a
            truncation switches to a fresh perturbation at its first step.
        restarts: a pair's accumulated score restarts where its episode ends.
    """

    name: ClassVar[str]
    accumulates: ClassVar[bool] = False
    reuses: ClassVar[bool] = False
    restarts: ClassVar[bool] = True

    def draws(self, resample: jax.Array) -> jax.Array:
        """Pairs (M,) that draw a fresh perturbation when a truncation begins."""
        return jnp.ones_like(resample)

    def accumulate(
        self, score: jax.Array, fresh: jax.Array, draw: jax.Array
    ) -> jax.Array:
        """Pairs' scores (M, ...) after the fresh scores `fresh` of `draw` pairs."""
        return jnp.where(per_row(draw, score), score + fresh, score)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PESWeighting(Weighting):
    """Persistent ES: the sum of every perturbation of the episode weights a loss."""

    name = "pes"
    accumulates = True


class TruncatedWeighting(Weighting):
    """Truncated ES: the truncation's own perturbation alone weights its losses."""

    name = "tes"
    restarts = False

    def accumulate(
        self, score: jax.Array, fresh: jax.Array, draw: jax.Array
    ) -> jax.Array:
        del score, draw  # nothing carries over from earlier truncations
        return fresh


class NoiseReuseWeighting(Weighting):
    """Noise-reuse ES: one perturbation per episode weights all of its losses."""

    name = "nres"
    reuses = True

    def draws(self, resample: jax.Array) -> jax.Array:
        return resample


#: the rules by their estimator's short name
WEIGHTINGS: dict[str, Weighting] = {
    rule.name: rule
    for rule in (PESWeighting(), TruncatedWeighting(), NoiseReuseWeighting())
}
