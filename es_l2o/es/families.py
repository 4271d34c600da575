"""A population of several task families, meta-trained in one jitted meta-iteration.

Tasks of different structures (parameter shapes) cannot share one vmap, so each
family keeps its own estimator (`FullES` with Open_ES, `PES`, `TruncatedES` or
`NoiseReuseES`) over its own share of the particles: whole antithetic pairs, in
proportion to the family's weight (`allocate_particles`). One meta-iteration runs
every family's estimate inside the same compiled program (each family's particles
vmapped over their own tasks, split over the mesh's devices as a single family's
are), shapes each family's losses within the family (FullES: its fitness shaping,
centered ranks by default; truncated estimators: their `loss_normalization`), sums
the families' flat gradient estimates with the weights (each first scaled to unit
norm with `gradient_balance="unit_norm"`, so that the weights, not the families'
loss scales, set each family's share), and applies ONE
meta-optimizer step to the shared theta. Every family sees every step; the program
compiles once.

Family i draws its randomness from `fold_in(key, i)` (with a single family, from
`key` itself: a one-family population is the plain estimator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from es_l2o import sharding
from es_l2o.es import common

#: how `MultiFamilyES` scales a family's estimate (given its norm) before the
#: weights; a family whose estimate is exactly zero (no loss moved) stays zero
GRADIENT_BALANCES = {
    "none": lambda grad, _norm: grad,
    "unit_norm": lambda grad, norm: grad / jnp.maximum(norm, 1e-30),
}


def gradient_balance_of(name: str):
    """The rule `name` of `GRADIENT_BALANCES`, or a ValueError naming the valid ones.

    Example:
        >>> gradient_balance_of("unit_norm")(jnp.array([3.0, 4.0]), 5.0).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    return common.choose(name, GRADIENT_BALANCES, "gradient_balance")


@struct.dataclass
class MultiFamilyState:
    """The shared ES state once, each family's own state, the iteration counter.

    es_state: the search state every family shares (mean theta, meta-optimizer
        state, std, generation counter), stored once.
    families: each family's estimator state without the shared parts (its
        `es_state` and `iteration` are None): per-particle inner states, per-pair
        noise. `family_state(state, i)` puts them back together.
    """

    es_state: Any
    families: tuple
    iteration: jax.Array


def family_state(state: MultiFamilyState, index: int):
    """Family `index`'s full estimator state (its own parts and the shared ones).

    Example:
        >>> from flax import struct
        >>> @struct.dataclass
        ... class Own:
        ...     es_state: object
        ...     inner: object
        ...     iteration: object
        >>> state = MultiFamilyState("shared", (Own(None, 1, None),), 0)
        >>> family_state(state, 0)
        Own(es_state='shared', inner=1, iteration=0)
    """
    return state.families[index].replace(
        es_state=state.es_state, iteration=state.iteration
    )


def _own(family) -> Any:
    """A family's state without the parts every family shares."""
    return family.replace(es_state=None, iteration=None)


def allocate_particles(
    population_size: int, weights: Sequence[float], num_devices: int = 1
) -> tuple[int, ...]:
    """Particles per family: whole antithetic pairs in proportion to `weights`.

    Particles are handed out in units of `lcm(2, num_devices)` (a pair, or the
    fewest particles that split evenly over the devices), in proportion to the
    weights by the largest-remainder method (ties go to the earlier family); a
    family left without a unit then takes one from the family furthest above its
    quota, so that every family has at least one.

    Example:
        >>> allocate_particles(32, [1.0, 1.0, 2.0])
        (8, 8, 16)
        >>> allocate_particles(32, [1.0, 3.0], num_devices=8)
        (8, 24)
    """
    weights = _check_weights(weights)
    unit = math.lcm(2, int(num_devices))
    count = len(weights)
    if isinstance(population_size, bool) or not isinstance(population_size, int):
        raise ValueError(f"population_size must be an integer, got {population_size!r}")
    if population_size % unit or population_size < count * unit:
        fits = max(count * unit, -(-population_size // unit) * unit)
        raise ValueError(
            f"population_size={population_size} cannot be split into {count} "
            f"families of whole units of {unit} particles (antithetic pairs split "
            f"evenly over {num_devices} device(s)); use a multiple of {unit} that "
            f"is at least {count * unit}, such as {fits}"
        )
    total = population_size // unit
    quota = weights * total
    units = np.floor(quota).astype(int)
    left = total - int(units.sum())
    order = np.argsort(-(quota - units), kind="stable")
    units[order[:left]] += 1
    while np.any(units == 0):  # a unit for every family, from the most over quota
        donor = int(np.argmax(np.where(units > 1, units - quota, -np.inf)))
        units[donor] -= 1
        units[int(np.argmax(units == 0))] = 1
    return tuple(int(unit * u) for u in units)


def _check_weights(weights) -> np.ndarray:
    w = np.asarray([float(x) for x in weights], np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(
            f"weights must be one finite number > 0 per family, got {list(weights)}"
        )
    return w / w.sum()


def _unique_names(names: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return tuple(out)


class MultiFamilyES:
    """Several families' estimators over one theta: one jitted meta-iteration.

    Args:
        estimators: one estimator per family, all of one class (FullES with
            Open_ES, PES, TruncatedES or NoiseReuseES), on one mesh and with the
            same meta-optimizer and std (family 0's are the ones applied).
        weights: each family's weight in the meta-gradient (> 0; normalised).
        names: the families' names in metrics (default: their systems' family
            names, made unique with "#2", "#3", ...).
        gradient_balance: what the weights multiply: "none", each family's
            estimate as it is (a family whose losses move more dominates), or
            "unit_norm", each family's estimate divided by its norm.

    Metrics: every estimator metric of the combined step ("meta_loss" and
    "nonfinite_steps" weighted / summed over families, "grad_norm" of the combined
    gradient) and per family "meta_loss/NAME", "nonfinite_steps/NAME" and
    "grad_norm/NAME".

    Example:
        >>> import jax, optax
        >>> from es_l2o.es import PES
        >>> from es_l2o.lopt import MLPLOpt
        >>> from es_l2o.unroll import LOptTraining
        >>> from populations.quadratic import QuadraticFamily
        >>> lopt = MLPLOpt(hidden_sizes=(4,))
        >>> systems = [LOptTraining(QuadraticFamily(d), lopt, 8) for d in (3, 5)]
        >>> es = MultiFamilyES.build(
        ...     PES, systems, [1.0, 3.0], population_size=8, truncation_length=4,
        ...     optimizer=optax.adam(1e-3))
        >>> es.population_sizes
        (2, 6)
        >>> state = es.init(jax.random.key(0), lopt.init(jax.random.key(1)))
        >>> state, metrics = es.step(jax.random.key(2), state)
        >>> sorted(k for k in metrics if k.startswith("meta_loss/"))
        ['meta_loss/quadratic', 'meta_loss/quadratic#2']
    """

    def __init__(
        self,
        estimators: Sequence[Any],
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        gradient_balance: str = "none",
    ):
        estimators = tuple(estimators)
        if not estimators:
            raise ValueError("MultiFamilyES needs at least one estimator, got none")
        kinds = {type(e).__name__ for e in estimators}
        if len(kinds) > 1:
            raise ValueError(
                f"every family needs the same estimator class, got {sorted(kinds)}"
            )
        for e in estimators:
            if not hasattr(e, "estimate"):
                raise ValueError(
                    f"{type(e).__name__} cannot be combined (no estimate/finish); "
                    "use FullES, PES, TruncatedES or NoiseReuseES"
                )
        if len({id(e.mesh) for e in estimators}) > 1:
            raise ValueError("every family's estimator must use the same mesh")
        weights = [1.0] * len(estimators) if weights is None else list(weights)
        if len(weights) != len(estimators):
            raise ValueError(
                f"got {len(weights)} weights for {len(estimators)} families; "
                "give one weight per family"
            )
        self.estimators = estimators
        self.weights = tuple(_check_weights(weights).tolist())
        self._balance = gradient_balance_of(gradient_balance)
        self.gradient_balance = gradient_balance
        if names is None:
            names = [_family_name(e.system, i) for i, e in enumerate(estimators)]
        if len(names) != len(estimators):
            raise ValueError(f"got {len(names)} names for {len(estimators)} families")
        self.names = _unique_names([str(n) for n in names])
        self.mesh = estimators[0].mesh
        self.population_sizes = tuple(e.population_size for e in estimators)
        self.population_size = sum(self.population_sizes)
        self.step = jax.jit(self._step)
        #: `step` that consumes its state: the new state is written into the old
        #: one's buffers (`es_l2o.meta.train` runs this)
        self.step_in_place = jax.jit(self._step, donate_argnums=1)
        self.gradient = jax.jit(self._gradient)

    @classmethod
    def build(
        cls,
        make_estimator: Callable[..., Any],
        systems: Sequence[Any],
        weights: Sequence[float] | None = None,
        *,
        population_size: int,
        mesh=None,
        names: Sequence[str] | None = None,
        gradient_balance: str = "none",
        **kwargs,
    ) -> MultiFamilyES:
        """One `make_estimator(system=..., population_size=P_i, mesh=mesh,
        **kwargs)` per system, with P_i from `allocate_particles`."""
        weights = [1.0] * len(systems) if weights is None else list(weights)
        if len(weights) != len(systems):
            raise ValueError(
                f"got {len(weights)} weights for {len(systems)} families; "
                "give one weight per family"
            )
        sizes = allocate_particles(
            population_size, weights, sharding.population_devices(mesh)
        )
        estimators = [
            make_estimator(system=s, population_size=p, mesh=mesh, **kwargs)
            for s, p in zip(systems, sizes, strict=True)
        ]
        return cls(estimators, weights, names, gradient_balance)

    @property
    def systems(self) -> tuple:
        return tuple(e.system for e in self.estimators)

    @property
    def theta_template(self):
        """The abstract theta every family shares (shapes and dtypes only)."""
        return self.estimators[0].theta_template

    def family_key(self, key: jax.Array, index: int) -> jax.Array:
        """The key family `index` uses where the population uses `key`."""
        return key if len(self.estimators) == 1 else jax.random.fold_in(key, index)

    def init(self, key: jax.Array, theta) -> MultiFamilyState:
        """Every family's state centred on `theta`, after one memory check that
        covers all families (before anything large is allocated)."""
        for e in self.estimators:
            if not getattr(e, "keyed", True):
                raise ValueError(
                    "MultiFamilyES needs FullES with algorithm='Open_ES', got "
                    f"{type(e.algorithm).__name__}"
                )
        self.check_memory(theta)
        states = tuple(
            e.init(self.family_key(key, i), theta)
            for i, e in enumerate(self.estimators)
        )
        lead = jax.tree.structure(states[0].es_state.opt_state)
        for name, s in zip(self.names, states, strict=True):
            if jax.tree.structure(s.es_state.opt_state) != lead:
                raise ValueError(
                    f"family {name!r} has another meta-optimizer than family "
                    f"{self.names[0]!r}; every family must share one"
                )
        state = MultiFamilyState(
            es_state=states[0].es_state,
            families=tuple(_own(s) for s in states),
            iteration=states[0].iteration,
        )
        return common.distinct_arrays(state, jax.tree.leaves(theta))

    def state_template(self) -> MultiFamilyState:
        """The abstract state of `init` (shapes and dtypes only)."""
        states = [e.state_template() for e in self.estimators]
        return MultiFamilyState(
            es_state=states[0].es_state,
            families=tuple(_own(s) for s in states),
            iteration=states[0].iteration,
        )

    def check_memory(self, theta) -> None:
        """Refuses families whose particles together cannot fit on the devices
        (`es_l2o.es.common.check_population_memory`, summed over families)."""
        total, replicated = 0, 0
        for e in self.estimators:
            copies = 1 if getattr(e, "keyed", False) else 2
            total += e.population_size * common.particle_bytes(e.system, theta, copies)
            template = e.state_template()
            own = (template.es_state, getattr(template, "noise", None))
            replicated += sharding.tree_bytes(own)
        try:
            sharding.check_memory(
                population_size=self.population_size,
                bytes_per_particle=-(-total // self.population_size),
                replicated_bytes=replicated,
                mesh=self.mesh,
            )
        except MemoryError as err:
            sizes = dict(zip(self.names, self.population_sizes, strict=True))
            raise MemoryError(f"{len(sizes)} families {sizes}: {err}") from None

    def theta(self, state: MultiFamilyState):
        """The current mean meta-parameters."""
        return self.estimators[0].unravel(state.es_state.mean)

    def _estimate(self, key, state: MultiFamilyState):
        """Every family's estimate, combined with the weights (flat, unapplied)."""
        grads, families, metrics = [], [], {}
        for i, e in enumerate(self.estimators):
            grad, s, m = e.estimate(self.family_key(key, i), family_state(state, i))
            grads.append(self._balance(grad, m["grad_norm"]))
            families.append(_own(s))
            name = self.names[i]
            for what in ("meta_loss", "nonfinite_steps", "grad_norm"):
                metrics[f"{what}/{name}"] = m[what]
        grad = sum(w * g for w, g in zip(self.weights, grads, strict=True))
        metrics["meta_loss"] = sum(
            w * metrics[f"meta_loss/{n}"]
            for w, n in zip(self.weights, self.names, strict=True)
        )
        metrics["nonfinite_steps"] = sum(
            metrics[f"nonfinite_steps/{n}"] for n in self.names
        )
        metrics["grad_norm"] = jnp.linalg.norm(grad)
        return grad, state.replace(families=tuple(families)), metrics

    def _gradient(self, key, state: MultiFamilyState):
        grad, state, metrics = self._estimate(key, state)
        return self.estimators[0].unravel(grad), {
            "state": state,
            "metrics": metrics,
        }

    def _step(self, key, state: MultiFamilyState):
        grad, state, metrics = self._estimate(key, state)
        es_state = self.estimators[0].apply_gradient(state.es_state, grad)
        state = state.replace(es_state=es_state)
        finished = [
            e.finish(family_state(state, i)) for i, e in enumerate(self.estimators)
        ]
        norm, finite = common.norm_and_finite(es_state.mean)
        metrics["theta_norm"], metrics["theta_finite"] = norm, finite
        state = MultiFamilyState(
            es_state=finished[0].es_state,
            families=tuple(_own(s) for s in finished),
            iteration=finished[0].iteration,
        )
        return common.strong_types(state), metrics


def _family_name(system, index: int) -> str:
    family = getattr(system, "family", None)
    return str(getattr(family, "name", f"family{index}"))
