"""A weighted mixture of task families for meta-training.

The config-facing container of families and their weights (`population=mix`). Every
meta-iteration trains ALL of them: `es_l2o.es.MultiFamilyES` gives each family a
share of the particles (whole antithetic pairs in proportion to the weights), runs
every family's particles on their own tasks inside one jitted meta-step (families
with different parameter shapes are separate vmaps of the same program), shapes
each family's losses within the family and combines the families' gradient
estimates with the weights into one meta-optimizer update. `es-l2o-train
population=mix` composes it:

    mixture = instantiate(cfg.population)
    systems = [LOptTraining(f, lopt, **cfg.system) for f in mixture.families]
    estimator = MultiFamilyES.build(make_estimator, systems, mixture.weights,
                                    population_size=cfg.es.population_size,
                                    gradient_balance=mixture.gradient_balance)

`choose` / `schedule` remain for drawing one family per iteration (a baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from es_l2o.es.families import gradient_balance_of
from es_l2o.tasks import TaskFamily


class FamilyMixture:
    """Families with weights: each family's share of the particles and of the
    meta-gradient (`es_l2o.es.MultiFamilyES`); `choose(key)` picks one family.

    Args:
        families: the task families (each a different structure is fine).
        weights: non-negative, not all zero; normalised to probabilities. Default:
            uniform.
        gradient_balance: what the weights multiply in the meta-gradient
            (`MultiFamilyES`): "none", each family's estimate as it is, or
            "unit_norm", each family's estimate scaled to unit norm first.

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
        gradient_balance: str = "none",
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
        gradient_balance_of(gradient_balance)
        self.families = families
        self.weights = tuple(weights.tolist())
        self.gradient_balance = gradient_balance
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

        For a one-family-per-iteration baseline; `MultiFamilyES` trains them all.
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
