"""A weighted mixture of task families for meta-training.

Tasks of different structures (parameter shapes) cannot share one vmap, so a
mixture does not sample tasks itself: it picks ONE family per meta-iteration, and
the whole population of that iteration trains tasks of that family.

How a trainer uses it: one system and one estimator per family (each compiles its
`step` once, the first time its family is picked), one shared ES state:

    mixture = instantiate(cfg.population).for_split("meta_train")
    systems = [LOptTraining(f, lopt, **cfg.system) for f in mixture.families]
    estimators = [make_estimator(s) for s in systems]  # e.g. FullES(s, ...)
    states = [est.init(key_init, theta) for est in estimators]  # builds each one
    state = states[0]
    for it in range(num_iterations):
        key_choose, key_step = jax.random.split(jax.random.fold_in(key_run, it))
        i = int(mixture.choose(key_choose))
        state, metrics = estimators[i].step(key_step, state)
        metrics["family"] = mixture.names[i]

FullES's state (the evosax state: mean theta, meta-optimizer state, and the
iteration counter) has the same shapes for every family, so one state serves all
estimators. Truncated estimators (PES, truncated ES) also carry per-particle inner
states whose shapes depend on the family: keep `states[i]` per family and move
the shared ES part (`es_state`, and the iteration counter) into `states[i]` before
stepping family i, and out of it afterwards. Loss scales differ across families
(quadratics ~1e2, cross-entropies ~1); rank-based fitness shaping works within one
iteration, hence within one family, so the ES update needs no normalisation across
families; log metrics per family.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from es_l2o.tasks import TaskFamily


class FamilyMixture:
    """Families with sampling weights; `choose(key)` picks one family's index.

    Args:
        families: the task families (each a different structure is fine).
        weights: non-negative, not all zero; normalised to probabilities. Default:
            uniform.

    Example:
        >>> from populations.quadratic import QuadraticFamily
        >>> mixture = FamilyMixture([QuadraticFamily(10), QuadraticFamily(20)], [3, 1])
        >>> mixture.probabilities.tolist()
        [0.75, 0.25]
        >>> int(mixture.choose(jax.random.key(0))) in (0, 1)
        True
    """

    def __init__(
        self,
        families: Sequence[TaskFamily],
        weights: Sequence[float] | None = None,
    ):
        families = tuple(families)
        if not families:
            raise ValueError("a FamilyMixture needs at least one family, got none")
        for family in families:
            if not isinstance(family, TaskFamily):
                raise ValueError(
                    f"families must be TaskFamily instances, got {type(family)!r}"
                )
        if weights is None:
            weights = [1.0] * len(families)
        weights = np.asarray([float(w) for w in weights], np.float64)
        if weights.shape != (len(families),):
            raise ValueError(
                f"got {weights.size} weights for {len(families)} families; "
                "give one weight per family"
            )
        if (
            np.any(weights < 0)
            or not np.all(np.isfinite(weights))
            or weights.sum() == 0
        ):
            raise ValueError(
                f"weights must be finite, >= 0 and not all 0, got {weights.tolist()}"
            )
        self.families = families
        self.weights = tuple(weights.tolist())
        self.probabilities = weights / weights.sum()
        self.names = tuple(f.name for f in families)
        self._log_probs = jnp.log(jnp.asarray(self.probabilities, jnp.float32))

    def __len__(self) -> int:
        return len(self.families)

    def __getitem__(self, index: int) -> TaskFamily:
        return self.families[index]

    @property
    def has_validation(self) -> bool:
        """True when every family has a validation split."""
        return all(f.has_validation for f in self.families)

    def for_split(self, split: str) -> FamilyMixture:
        """The same mixture over `SplitFamily(family, split)` of every family.

        Example:
            >>> from populations.quadratic import QuadraticFamily
            >>> FamilyMixture([QuadraticFamily()]).for_split("meta_train")[0].split
            'meta_train'
        """
        from populations.splits import SplitFamily

        return FamilyMixture(
            [SplitFamily(f, split) for f in self.families], self.weights
        )

    def choose(self, key: jax.Array) -> jax.Array:
        """The index of the family for one meta-iteration (int32 scalar; jittable).

        The trainer converts it with `int(...)` to select the compiled meta-step.
        """
        return jax.random.categorical(key, self._log_probs).astype(jnp.int32)

    def schedule(self, key: jax.Array, num_iterations: int) -> np.ndarray:
        """Family indices for `num_iterations` meta-iterations, drawn at once.

        Entry `i` equals `choose(jax.random.fold_in(key, i))`.
        """
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
            jnp.arange(num_iterations)
        )
        return np.asarray(jax.vmap(self.choose)(keys))

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {p:.3g}" for n, p in zip(self.names, self.probabilities, strict=True)
        )
        return f"FamilyMixture({parts})"
